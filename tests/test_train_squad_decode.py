"""n-best span decoding: valid spans only, max context, max answer length, the v2.0 no-answer rule,
and the n-best list."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _tiny import build_word_tokenizer

from fastdistill.train.tasks.squad import features as sd
from fastdistill.train.tasks.squad.decode import best_spans, decode_predictions
from fastdistill.train.tasks.squad.evaluate import score_predictions

DEV = Path(__file__).parent / "data" / "dev-v2.0.json"
SETTINGS = sd.FeatureSettings(max_length=64, doc_stride=24, max_query_length=16, v2=True)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    examples = sd.read_examples([DEV])
    tok = build_word_tokenizer(
        [t for ex in examples for t in (ex.question, ex.context)], tmp_path_factory.mktemp("tok")
    )
    arrays, stats = sd.convert_examples(examples, tok, SETTINGS)
    return sd.SquadFeatures(arrays, examples, SETTINGS, {})


def gold_logits(feats, *, null: float = 5.0):
    """Logits of a perfect model: 10 at the gold start and end token of every window holding the
    answer; in the other windows (all windows of an unanswerable question) ``null`` at [CLS] for
    start and end; 0 everywhere else. So an answerable question's no-answer score is 0 (the CLS of
    a window with the answer), its best span 20; an unanswerable one's 2·null against 0."""
    n, w = len(feats), SETTINGS.max_length
    start, end = np.zeros((n, w), np.float32), np.zeros((n, w), np.float32)
    a = feats.arrays
    for f in range(n):
        s, e = a["start_positions"][f], a["end_positions"][f]
        if s == a["cls_index"][f]:
            start[f, s] = end[f, e] = null
        else:
            start[f, s] = end[f, e] = 10.0
    return start, end


def test_best_spans_by_hand():
    # positions 0..6; 0 is [CLS], 1-2 question, 3-6 context; window gives 3..6 max context
    offsets = np.array([[-1, -1]] * 3 + [[0, 3], [4, 8], [9, 12], [13, 20]])
    max_context = np.array([0, 0, 0, 1, 1, 1, 0])
    start = np.array([9.0, 9, 9, 1, 3, 0, 5], dtype=np.float32)
    end = np.array([9.0, 9, 9, 0, 1, 2, 4], dtype=np.float32)
    spans = best_spans(start, end, offsets, max_context, n_best_size=3, max_answer_length=2)
    # starts 3, 4, 5 (6 has no max context; 0-2 are not context); ends within 2 tokens:
    # (4,5) 5, (4,4) 4, (5,6) 4, (3,4) 2, (3,3) 1, (5,5) 2 → top 3, ties by earlier start
    assert spans == [(5.0, 4, 5), (4.0, 4, 4), (4.0, 5, 6)]
    assert (
        best_spans(start, end, offsets, max_context * 0, n_best_size=3, max_answer_length=2) == []
    )


def test_perfect_logits_give_perfect_scores(feats):
    start, end = gold_logits(feats)
    decoded = decode_predictions(feats, start, end)
    for ex in feats.examples:
        expected = "" if ex.is_impossible else ex.answers[0][0]
        assert decoded.predictions[ex.qid] == expected, ex.qid
    m = score_predictions(feats, decoded)
    assert m["exact"] == 100.0 and m["f1"] == 100.0 and m["best_f1"] == 100.0
    for ex in feats.examples:  # odds: 0 - 20 (answerable), 10 - 0 (unanswerable)
        odds = decoded.null_odds[ex.qid]
        assert (odds > 0) if ex.is_impossible else (odds < 0), ex.qid


def test_null_threshold_and_v1(feats):
    start, end = gold_logits(feats, null=2.0)  # odds: -20 (answerable), 4 (unanswerable)
    decoded = decode_predictions(feats, start, end, null_score_diff_threshold=3.9)
    assert all(decoded.predictions[e.qid] == "" for e in feats.examples if e.is_impossible)
    decoded = decode_predictions(feats, start, end, null_score_diff_threshold=4.1)
    assert all(decoded.predictions[e.qid] != "" for e in feats.examples)
    answerable = [e for e in feats.examples if not e.is_impossible]
    # v1.1: no no-answer entry; every question gets its best span
    v1 = sd.SquadFeatures(feats.arrays, feats.examples, replace(SETTINGS, v2=False), {})
    decoded = decode_predictions(v1, start, end)
    assert decoded.null_odds is None
    assert all(decoded.predictions[e.qid] == e.answers[0][0] for e in answerable)
    assert all(decoded.predictions[e.qid] != "" for e in feats.examples)
    assert all("" not in [x["text"] for x in decoded.nbest[e.qid]] for e in feats.examples)


def test_max_answer_length_and_nbest_list(feats):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(len(feats), SETTINGS.max_length)).astype(np.float32)
    end = rng.normal(size=(len(feats), SETTINGS.max_length)).astype(np.float32)
    decoded = decode_predictions(feats, start, end, n_best_size=5, max_answer_length=3)
    for ex in feats.examples:
        nbest = decoded.nbest[ex.qid]
        texts = [x["text"] for x in nbest]
        assert len(texts) == len(set(texts)) and "" in texts and len(nbest) <= 6
        scores = [x["start_logit"] + x["end_logit"] for x in nbest]
        assert scores == sorted(scores, reverse=True)
        assert sum(x["probability"] for x in nbest) == pytest.approx(1.0)
        for t in texts:
            assert len(t.split()) <= 3 and (t == "" or t in ex.context)
        best = next(x for x in nbest if x["text"])
        odds = decoded.null_odds[ex.qid]
        null = next(x for x in nbest if not x["text"])
        assert odds == pytest.approx(
            null["start_logit"] + null["end_logit"] - best["start_logit"] - best["end_logit"],
            abs=1e-5,
        )
        assert decoded.predictions[ex.qid] == ("" if odds > 0 else best["text"])


def test_wrong_number_of_rows(feats):
    start, end = gold_logits(feats)
    with pytest.raises(ValueError, match="logits for"):
        decode_predictions(feats, start[:-1], end)
