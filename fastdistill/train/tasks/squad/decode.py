"""Start/end logits of every window → an answer per question (n-best span decoding).

For each question, over all its windows:

* a span (i, j) is valid when both tokens are context tokens, i ≤ j < i + ``max_answer_length``,
  and window gives token i its maximal context (so overlapping windows do not both propose it);
  its score is ``start_logits[i] + end_logits[j]``, its text the context characters from the start
  of token i to the end of token j (the fast tokenizer's offsets; no re-alignment needed);
* each window contributes its ``n_best_size`` best valid spans (all of them are scored: the DistilBERT script's
  shortcut of pairing the 20 best starts with the 20 best ends can miss valid spans); the union is
  sorted by score, spans with a text already seen dropped, and the best ``n_best_size`` kept;
* SQuAD v2.0: the no-answer score is the smallest ``start_logits[CLS] + end_logits[CLS]`` over the
  windows; ``null_odds`` = no-answer score − best span's score, and the prediction is "" when it
  exceeds ``null_score_diff_threshold`` (the DistilBERT script's rule; ``null_odds.json`` is what the official
  v2.0 script takes as ``--na-prob-file``). The no-answer entry ("") is part of the n-best list;
* the n-best list carries each entry's probability: a softmax over the listed scores.

A question with no valid span at all (an empty context) is answered "" (v2.0: with
``null_odds`` = :data:`NO_SPAN_NULL_ODDS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdistill.train.tasks.squad.features import SquadFeatures

# null_odds of a question without any valid span: certainly "no answer". Finite, so the JSON
# files stay standard JSON.
NO_SPAN_NULL_ODDS = 1e9


@dataclass
class Decoded:
    predictions: dict[str, str]  # question id → answer text ("" for no answer)
    nbest: dict[str, list[dict]]  # question id → [{text, probability, start_logit, end_logit}]
    null_odds: dict[str, float] | None  # v2.0 only


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    max_context: np.ndarray,
    *,
    n_best_size: int,
    max_answer_length: int,
) -> list[tuple[float, int, int]]:
    """The ``n_best_size`` best valid spans of one window as (score, first token, last token),
    best first (ties: earlier start, then shorter). ``offsets`` is -1 outside the context."""
    ctx = offsets[:, 0] >= 0
    starts = np.flatnonzero(ctx & (max_context > 0))
    if len(starts) == 0:
        return []
    n = len(start_logits)
    # (start, length) grid: end = start + d for d < max_answer_length, kept where it is a context
    # token (context tokens are contiguous, so the whole span is context).
    ends = starts[:, None] + np.arange(max_answer_length)[None, :]
    valid = ends < n
    valid[valid] = ctx[ends[valid]]
    first = np.broadcast_to(starts[:, None], ends.shape)[valid]
    last = ends[valid]
    score = start_logits[first].astype(np.float64) + end_logits[last]
    if len(score) > n_best_size:  # sort only the candidates (ties at the cut all stay)
        kth = np.partition(score, len(score) - n_best_size)[len(score) - n_best_size]
        keep = np.flatnonzero(score >= kth)
        score, first, last = score[keep], first[keep], last[keep]
    order = np.lexsort((last, first, -score))[:n_best_size]
    return [(float(score[k]), int(first[k]), int(last[k])) for k in order]


def decode_predictions(
    data: SquadFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> Decoded:
    """Answers for every question of ``data`` from ``(features, width)`` logits (row i holds
    feature i's logits in its first ``len(feature i)`` columns; padding is ignored)."""
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError("n_best_size and max_answer_length must be >= 1")
    if len(start_logits) != len(data) or len(end_logits) != len(data):
        raise ValueError(
            f"expected logits for {len(data)} features, got {len(start_logits)} and "
            f"{len(end_logits)}"
        )
    v2 = data.v2
    cls_index = data.arrays["cls_index"]
    predictions: dict[str, str] = {}
    nbest_all: dict[str, list[dict]] = {}
    null_odds: dict[str, float] | None = {} if v2 else None
    for ex, feats in zip(data.examples, data.features_of(), strict=True):
        candidates = []  # (score, window rank, first, last, start logit, end logit, text)
        null = None  # (score, start logit, end logit): the smallest CLS score over windows
        for rank, f in enumerate(feats):
            n = len(data.tokens("input_ids", f))
            s_log = np.asarray(start_logits[f][:n], dtype=np.float32)
            e_log = np.asarray(end_logits[f][:n], dtype=np.float32)
            offsets = data.tokens("offsets", f)
            if v2:
                c = cls_index[f]
                score = float(s_log[c]) + float(e_log[c])
                if null is None or score < null[0]:
                    null = (score, float(s_log[c]), float(e_log[c]))
            spans = best_spans(
                s_log,
                e_log,
                offsets,
                data.tokens("max_context", f),
                n_best_size=n_best_size,
                max_answer_length=max_answer_length,
            )
            for score, i, j in spans:
                text = ex.context[offsets[i, 0] : offsets[j, 1]]
                candidates.append((score, rank, i, j, float(s_log[i]), float(e_log[j]), text))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
        entries, seen = [], set()
        for score, _, _, _, s_l, e_l, text in candidates:
            if text in seen:
                continue
            seen.add(text)
            entries.append({"text": text, "score": score, "start_logit": s_l, "end_logit": e_l})
            if len(entries) == n_best_size:
                break
        best_text = entries[0]["text"] if entries else ""
        best_score = entries[0]["score"] if entries else None
        if v2:
            null_entry = {
                "text": "",
                "score": null[0],
                "start_logit": null[1],
                "end_logit": null[2],
            }
            # The no-answer entry takes its place by score, and stays even past n_best_size.
            merged = sorted([*entries, null_entry], key=lambda x: -x["score"])
            entries = merged[:n_best_size]
            if not any(x is null_entry for x in entries):
                entries.append(null_entry)
            if best_score is None:
                odds = NO_SPAN_NULL_ODDS
            else:
                odds = null[0] - best_score
            null_odds[ex.qid] = float(odds)
            predictions[ex.qid] = "" if odds > null_score_diff_threshold else best_text
        else:
            predictions[ex.qid] = best_text
        scores = np.array([x["score"] for x in entries], dtype=np.float64)
        probs = np.exp(scores - scores.max()) if len(scores) else scores
        probs = probs / probs.sum() if len(scores) else probs
        nbest_all[ex.qid] = [
            {
                "text": x["text"],
                "probability": float(p),
                "start_logit": x["start_logit"],
                "end_logit": x["end_logit"],
            }
            for x, p in zip(entries, probs, strict=True)
        ]
    return Decoded(predictions, nbest_all, null_odds)
