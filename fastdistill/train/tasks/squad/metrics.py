"""The official SQuAD metrics, v1.1 and v2.0, written from their specification.

Both versions compare a predicted answer string with each gold answer after the same
normalisation (lower-case; drop ASCII punctuation; drop the articles *a*, *an*, *the* as whole
words; collapse whitespace) and keep the best score over the gold answers:

* exact match (EM): 1 if the normalised strings are equal, else 0;
* F1 over the bags of normalised tokens (whitespace-split): with ``s`` tokens in common (multiset
  intersection), precision ``s / #predicted``, recall ``s / #gold``, F1 = their harmonic mean.

Scores are reported in percent. The two official scripts differ in the details, and each function
here reproduces its own script:

=============================  ==========================  ====================================
                               v1.1 (``evaluate-v1.1``)    v2.0 (``evaluate-v2.0``)
=============================  ==========================  ====================================
gold answers used              all of them                 those that do not normalise to "";
                                                           none left (unanswerable): just ""
F1 when either side is empty   0                           1 if both are empty, else 0
question with no prediction    counts, with score 0        an error (the script fails on it)
no-answer probabilities        —                           ``na_probs`` > ``na_prob_thresh``
                                                           forces "" (default 1.0); they also
                                                           give ``best_exact``/``best_f1`` and
                                                           their thresholds
keys                           ``exact_match``, ``f1``     ``exact``, ``f1``, ``total``,
                                                           ``HasAns_*``, ``NoAns_*``, ``best_*``
=============================  ==========================  ====================================

A question "has an answer" (v2.0) when its list of gold answers is not empty. The best threshold
scan follows the script exactly, including its treatment of ties (questions are visited in order
of no-answer probability, ties in the order of ``na_probs``, and the running score is compared
after every question).

Gold answers are a mapping ``question id → [answer text, ...]`` in dataset order
(:func:`gold_answers` reads them from a SQuAD JSON file in any format
:mod:`fastdistill.train.tasks.squad.files` reads); predictions a mapping ``question id → text``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, then the articles a/an/the, then fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_v1(prediction: str, gold: str) -> float:
    """Token F1 as evaluate-v1.1 computes it (0 when nothing is in common, empty sides included)."""
    return _f1(answer_tokens(prediction), answer_tokens(gold), empty_match=False)


def f1_v2(prediction: str, gold: str) -> float:
    """Token F1 as evaluate-v2.0 computes it: an empty side scores 1 only against an empty side."""
    return _f1(answer_tokens(prediction), answer_tokens(gold), empty_match=True)


def _f1(pred: list[str], gold: list[str], *, empty_match: bool) -> float:
    if empty_match and (not pred or not gold):
        return float(pred == gold)
    shared = sum((Counter(pred) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred)
    recall = shared / len(gold)
    return 2 * precision * recall / (precision + recall)


# ---- v1.1 ----------------------------------------------------------------------------------


def squad_v1_evaluate(
    gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over every question of ``gold``; a question without a
    prediction scores 0 (the v1.1 script's rule). ``ValueError`` for a question with no gold
    answer (v1.1 has none: evaluate v2.0 data with :func:`squad_v2_evaluate`)."""
    _check_predictions(predictions)
    if not gold:
        raise ValueError("no questions to evaluate")
    em_sum = f1_sum = 0.0
    for qid, answers in gold.items():
        if not answers:
            raise ValueError(
                f"question {qid!r} has no gold answer: SQuAD v1.1 scoring needs one; this looks "
                "like SQuAD v2.0 data (evaluate with version 2)"
            )
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em_sum += max(exact_match(pred, a) for a in answers)
        f1_sum += max(f1_v1(pred, a) for a in answers)
    n = len(gold)
    return {"exact_match": 100.0 * em_sum / n, "f1": 100.0 * f1_sum / n}


# ---- v2.0 ----------------------------------------------------------------------------------


def raw_scores_v2(
    gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question (exact, f1) before any no-answer threshold, with v2.0's gold filtering."""
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for qid, answers in gold.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions[qid]
        exact[qid] = float(max(exact_match(pred, a) for a in golds))
        f1[qid] = max(f1_v2(pred, a) for a in golds)
    return exact, f1


def squad_v2_evaluate(
    gold: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """The metrics of evaluate-v2.0: ``exact``, ``f1``, ``total``; ``HasAns_exact``/``_f1``/
    ``_total`` and ``NoAns_*`` when the data hold such questions; with ``na_probs`` (the
    ``--na-prob-file``, e.g. ``null_odds.json``) also ``best_exact``, ``best_exact_thresh``,
    ``best_f1``, ``best_f1_thresh``. Every question of ``gold`` needs a prediction (and a
    no-answer probability when ``na_probs`` is given): ``ValueError`` naming the missing ones."""
    _check_predictions(predictions)
    if not gold:
        raise ValueError("no questions to evaluate")
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} question(s) have no prediction (the official v2.0 script fails on "
            f"them too), e.g. {', '.join(map(repr, missing[:3]))}"
        )
    if na_probs is None:
        probs = {qid: 0.0 for qid in predictions}
    else:
        probs = dict(na_probs)
        missing = [qid for qid in gold if qid not in probs]
        if missing:
            raise ValueError(
                f"{len(missing)} question(s) have no no-answer probability, e.g. "
                f"{', '.join(map(repr, missing[:3]))}"
            )
    has_answer = {qid: bool(answers) for qid, answers in gold.items()}
    exact_raw, f1_raw = raw_scores_v2(gold, predictions)
    exact = _apply_threshold(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = _apply_threshold(f1_raw, probs, has_answer, na_prob_thresh)
    result: dict[str, Any] = _summary(exact, f1, list(gold))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [qid for qid, has in has_answer.items() if has is wanted]
        if ids:
            result.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, ids).items()})
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            best, thresh = _best_threshold(predictions, raw, probs, has_answer)
            result[f"best_{name}"] = best
            result[f"best_{name}_thresh"] = thresh
    return result


def _apply_threshold(scores, probs, has_answer, thresh):
    """Questions whose no-answer probability exceeds ``thresh`` are answered with "": right for an
    unanswerable question, wrong otherwise."""
    return {
        qid: (float(not has_answer[qid]) if probs[qid] > thresh else s) for qid, s in scores.items()
    }


def _summary(exact, f1, ids):
    n = len(ids)
    return {
        "exact": 100.0 * sum(exact[q] for q in ids) / n,
        "f1": 100.0 * sum(f1[q] for q in ids) / n,
        "total": n,
    }


def _best_threshold(predictions, raw, probs, has_answer):
    """The threshold on the no-answer probability that maximises the score, as the script scans it.

    Start from "answer nothing" (every unanswerable question right, every other wrong). Visiting
    the questions from the lowest probability up (a stable sort, so ties keep ``probs``' order),
    answering question q changes the score by its raw score if it has an answer, by -1 if it is
    unanswerable and its prediction is not empty, by 0 otherwise; the best running score and the
    probability where it was reached are kept (strict improvement only, starting at threshold 0).
    The score is in percent of the questions scored."""
    score = sum(1 for has in has_answer.values() if not has)
    best, best_thresh = score, 0.0
    for qid in sorted(probs, key=lambda q: probs[q]):
        if qid not in raw:
            continue
        if has_answer[qid]:
            score += raw[qid]
        elif predictions[qid]:
            score -= 1
        if score > best:
            best, best_thresh = score, probs[qid]
    return 100.0 * best / len(raw), best_thresh


def _check_predictions(predictions: Mapping[str, str]) -> None:
    if not isinstance(predictions, Mapping):
        raise TypeError(
            f"predictions must map question ids to answer strings, got {type(predictions).__name__}"
        )
    bad = [qid for qid, text in predictions.items() if not isinstance(text, str)]
    if bad:
        raise ValueError(
            f"predictions must be strings; question {bad[0]!r} has {predictions[bad[0]]!r}"
        )


# ---- convenience -------------------------------------------------------------------------------


def gold_answers(path) -> dict[str, list[str]]:
    """``question id → gold answer texts`` of a SQuAD file (nested, flat or JSON lines)."""
    from fastdistill.train.tasks.squad.files import read_squad

    return {ex.qid: [text for text, _ in ex.answers] for ex in read_squad(path).examples}


def evaluate_files(data_file, predictions_file, na_prob_file=None, *, version: int = 2):
    """Evaluate a predictions JSON file against a SQuAD data file, like the official scripts."""
    import json

    gold = gold_answers(data_file)
    with open(predictions_file, encoding="utf-8") as f:
        predictions = json.load(f)
    if version == 1:
        if na_prob_file is not None:
            raise ValueError("a no-answer probability file applies to SQuAD v2.0 only")
        return squad_v1_evaluate(gold, predictions)
    if version != 2:
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    na_probs = None
    if na_prob_file is not None:
        with open(na_prob_file, encoding="utf-8") as f:
            na_probs = json.load(f)
    return squad_v2_evaluate(gold, predictions, na_probs)
