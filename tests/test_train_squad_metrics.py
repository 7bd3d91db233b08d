"""The official SQuAD v1.1 / v2.0 metrics on the dev-v2.0.json fixture, against numbers derived by
hand in each test (token counts written out), not by running the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastdistill.train.tasks.squad.metrics import (
    evaluate_files,
    exact_match,
    f1_v1,
    f1_v2,
    gold_answers,
    normalize_answer,
    squad_v1_evaluate,
    squad_v2_evaluate,
)

DATA = Path(__file__).parent / "data"
DEV = DATA / "dev-v2.0.json"
SAMPLE = DATA / "sample.json"

# dev-v2.0.json, in file order: 8 answerable (one gold each), 6 unanswerable.
Q = [
    "56ddde6b9a695914005b9628",  # 1  France
    "56ddde6b9a695914005b9629",  # 2  10th and 11th centuries
    "56ddde6b9a695914005b962a",  # 3  Denmark, Iceland and Norway
    "5ad39d53604f3c001a3fe8d3",  # 4  (no answer; plausible: Rollo)
    "5ad39d53604f3c001a3fe8d4",  # 5  (no answer)
    "56dddf4066d3e219004dad5f",  # 6  William the Conqueror
    "5ad3a266604f3c001a3fea2b",  # 7  (no answer)
    "56e16182e3433e1400422e28",  # 8  Computational complexity theory
    "5ad5316b5b96ef001a10ab76",  # 9  (no answer; plausible: algorithm)
    "56e16839cd28a01900c67887",  # 10 if its solution requires significant resources
    "56e16839cd28a01900c67888",  # 11 mathematical models of computation
    "56e16839cd28a01900c67889",  # 12 time and storage
    "5ad532575b96ef001a10ab7f",  # 13 (no answer)
    "5ad532575b96ef001a10ab80",  # 14 (no answer; plausible: the number of processors)
]
HAS = [1, 2, 3, 6, 8, 10, 11, 12]
NO = [4, 5, 7, 9, 13, 14]

# Hand-made predictions, with each question's (EM, F1) worked out by hand.
MIXED = {
    1: ("france.", 1, 1.0),  # punctuation is dropped
    # "10th century" vs "10th and 11th centuries": 1 shared token, P = 1/2, R = 1/4 → F1 = 1/3
    2: ("the 10th century", 0, 1 / 3),
    3: ("Denmark, Iceland, and Norway", 1, 1.0),  # commas
    4: ("Rollo", 0, 0.0),  # unanswerable, answered
    5: ("", 1, 1.0),  # unanswerable, no answer: right
    6: ("The William the Conqueror", 1, 1.0),  # articles are dropped
    7: ("", 1, 1.0),
    # "complexity theory" vs 3 gold tokens: 2 shared, P = 1, R = 2/3 → F1 = 4/5
    8: ("complexity theory", 0, 0.8),
    9: ("an algorithm", 0, 0.0),
    # 6 tokens each, 5 shared (not "whatever", not "if") → F1 = 5/6
    10: ("its solution requires significant resources, whatever", 0, 5 / 6),
    # 1 of 4 gold tokens, P = 1, R = 1/4 → F1 = 2/5
    11: ("models", 0, 0.4),
    12: ("storage and time", 0, 1.0),  # same bag of tokens, different order
    13: ("", 1, 1.0),
    14: ("the number of processors", 0, 0.0),
}


def preds(table):
    return {Q[i - 1]: table[i][0] for i in table}


@pytest.fixture(scope="module")
def gold():
    return gold_answers(DEV)


def test_fixture_layout(gold):
    assert list(gold) == Q
    assert [i for i in range(1, 15) if gold[Q[i - 1]]] == HAS


@pytest.mark.parametrize(
    "text, normal",
    [
        ("The  Cat's, a hat!", "cats hat"),
        ("Anna and the banana", "anna and banana"),  # 'an' only as a word
        ("theory of THE mind.", "theory of mind"),
        ("  A  ", ""),
        ("(10th)-century", "10thcentury"),  # punctuation removed, not replaced by a space
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_token_scores():
    assert exact_match("The France!", "france") == 1
    assert f1_v2("", "") == 1.0 and f1_v1("", "") == 0.0  # the versions differ here
    assert f1_v2("", "France") == 0.0 and f1_v2("a", "the") == 1.0  # both normalise to ""
    assert f1_v1("x y z", "z w") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1_v1("x x y", "x y y") == pytest.approx(2 / 3)  # multiset overlap: x, y


def test_v2_perfect(gold):
    p = {qid: (answers[0] if answers else "") for qid, answers in gold.items()}
    m = squad_v2_evaluate(gold, p)
    assert m == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 14,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 8,
        "NoAns_exact": 100.0,
        "NoAns_f1": 100.0,
        "NoAns_total": 6,
    }


def test_v2_all_empty(gold):
    m = squad_v2_evaluate(gold, {qid: "" for qid in Q})
    assert m["exact"] == pytest.approx(100 * 6 / 14) and m["f1"] == pytest.approx(100 * 6 / 14)
    assert m["HasAns_exact"] == 0 and m["HasAns_f1"] == 0
    assert m["NoAns_exact"] == 100 and m["NoAns_f1"] == 100


def test_v2_mixed_predictions(gold):
    m = squad_v2_evaluate(gold, preds(MIXED))
    em = {i: MIXED[i][1] for i in MIXED}
    f1 = {i: MIXED[i][2] for i in MIXED}
    # written out: EM 1,0,1,0,1,1,1,0,0,0,0,0,1,0 = 6 of 14
    assert sum(em.values()) == 6
    assert m["exact"] == pytest.approx(100 * 6 / 14)
    assert m["f1"] == pytest.approx(100 * (5.2 + 1 / 3 + 5 / 6 + 3) / 14)
    assert m["HasAns_exact"] == pytest.approx(100 * 3 / 8)
    assert m["HasAns_f1"] == pytest.approx(100 * sum(f1[i] for i in HAS) / 8)
    assert m["NoAns_exact"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert (m["total"], m["HasAns_total"], m["NoAns_total"]) == (14, 8, 6)
    assert "best_f1" not in m  # only with no-answer probabilities


# No-answer probabilities for MIXED: q1 0.1, q3 0.2, q9 0.3, q6 0.4, q2 0.5, q4 0.6, q12 0.7, then
# q7 0.8, q8 0.81, q10 0.82, q11 0.83, q13 0.84, q14 0.85, q5 0.9.
NA = {1: 0.1, 3: 0.2, 9: 0.3, 6: 0.4, 2: 0.5, 4: 0.6, 12: 0.7}
NA.update({7: 0.8, 8: 0.81, 10: 0.82, 11: 0.83, 13: 0.84, 14: 0.85, 5: 0.9})


def test_v2_best_thresholds(gold):
    na = {Q[i - 1]: p for i, p in NA.items()}
    m = squad_v2_evaluate(gold, preds(MIXED), na)
    # Start at 6 (every unanswerable right) and answer questions by rising probability:
    # EM: q1 +1 → 7, q3 +1 → 8 (best, at 0.2), q9 -1, q6 +1 (8 again, not better), q2 0, q4 -1, ...
    assert m["best_exact"] == pytest.approx(100 * 8 / 14) and m["best_exact_thresh"] == 0.2
    # F1: 6 → 7 → 8 → 7 → 8 → 8⅓ (q2) → 7⅓ (q4) → 8⅓ (q12) → 8⅓ (q7) → 9.1333 (q8) → 9.9667
    # (q10) → 10.3667 (q11, best at 0.83) → 10.3667 (q13) → 9.3667 (q14) → 9.3667 (q5)
    assert m["best_f1"] == pytest.approx(
        100 * (6 + 1 + 1 - 1 + 1 + 1 / 3 - 1 + 1 + 0.8 + 5 / 6 + 0.4) / 14
    )
    assert m["best_f1_thresh"] == 0.83
    # The default threshold 1.0 forces nothing here: the plain scores are unchanged.
    assert m["exact"] == pytest.approx(100 * 6 / 14)


def test_v2_no_answer_threshold_forces_empty_answers(gold):
    na = {Q[i - 1]: p for i, p in NA.items()}
    m = squad_v2_evaluate(gold, preds(MIXED), na, na_prob_thresh=0.5)
    # Above 0.5: q4, q12, q7, q8, q10, q11, q13, q14, q5 count as "no answer": 1 if unanswerable
    # (q4, q7, q13, q14, q5), 0 otherwise (q12, q8, q10, q11). Below: q1 1, q2 0|⅓, q3 1, q6 1, q9 0.
    assert m["exact"] == pytest.approx(100 * 8 / 14)
    assert m["f1"] == pytest.approx(100 * (8 + 1 / 3) / 14)
    assert m["NoAns_exact"] == pytest.approx(100 * 5 / 6)
    assert m["HasAns_f1"] == pytest.approx(100 * (3 + 1 / 3) / 8)


def test_v2_ties_follow_the_official_scan():
    # Equal probabilities: the script visits them in the file's order and keeps a threshold only on
    # strict improvement, so the order decides. Reproduced, not "fixed".
    gold = {"a": ["x"], "b": []}
    p = {"a": "x", "b": "y"}
    first_b = squad_v2_evaluate(gold, p, {"b": 0.5, "a": 0.5})
    assert (first_b["best_exact"], first_b["best_exact_thresh"]) == (50.0, 0.0)
    first_a = squad_v2_evaluate(gold, p, {"a": 0.5, "b": 0.5})
    assert (first_a["best_exact"], first_a["best_exact_thresh"]) == (100.0, 0.5)


def test_v2_gold_answers_that_normalise_to_nothing_count_as_no_answer():
    gold = {"q": ["The", "a"]}  # answerable (has answers), but every gold normalises to ""
    assert squad_v2_evaluate(gold, {"q": ""})["exact"] == 100.0
    assert squad_v2_evaluate(gold, {"q": ""})["HasAns_total"] == 1


def test_v2_missing_prediction_is_an_error(gold):
    p = preds(MIXED)
    del p[Q[3]]
    with pytest.raises(ValueError, match="1 question.*no prediction.*5ad39d53604f3c001a3fe8d3"):
        squad_v2_evaluate(gold, p)
    with pytest.raises(ValueError, match="no no-answer probability"):
        squad_v2_evaluate(gold, preds(MIXED), {Q[0]: 0.0})
    with pytest.raises(ValueError, match="must be strings"):
        squad_v2_evaluate(gold, {**preds(MIXED), Q[0]: None})


def test_v1_on_the_flat_file_with_several_gold_answers():
    gold = {qid: a for qid, a in gold_answers(SAMPLE).items() if a}
    assert len(gold) == 8 and len(gold[Q[1]]) == 4
    p = {
        Q[0]: "France",  # 1, 1
        # vs "in the 10th and 11th centuries" (the second gold): [in, 10th, century] against
        # [in, 10th, and, 11th, centuries]: 2 shared, P = 2/3, R = 2/5 → F1 = 1/2 (the first gold
        # gives only 2/7)
        Q[1]: "in the 10th century",
        # Q[2] missing: scores 0 and still counts
        Q[5]: "",  # v1.1: an empty prediction scores 0
        Q[7]: "computational complexity theory",  # 1, 1
        Q[9]: "its solution requires significant resources",  # the second gold: 1, 1
        Q[10]: "models of computation",  # 3 of 4 tokens, P = 1 → F1 = 6/7
        Q[11]: "time and storage.",  # 1, 1
    }
    m = squad_v1_evaluate(gold, p)
    assert m["exact_match"] == pytest.approx(100 * 4 / 8)  # Q0, Q7, Q9, Q11
    assert m["f1"] == pytest.approx(100 * (1 + 0.5 + 0 + 0 + 1 + 1 + 6 / 7 + 1) / 8)
    with pytest.raises(ValueError, match="no gold answer.*v2.0"):
        squad_v1_evaluate(gold_answers(SAMPLE), p)


def test_evaluate_files_like_the_official_scripts(tmp_path, gold):
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(preds(MIXED)))
    na_file = tmp_path / "null_odds.json"
    na_file.write_text(json.dumps({Q[i - 1]: p for i, p in NA.items()}))
    m = evaluate_files(DEV, pred_file, na_file)
    assert m["best_f1_thresh"] == 0.83 and m["exact"] == pytest.approx(100 * 6 / 14)
    # The flat file holds the same questions with more gold answers; the max over them changes
    # q10: "its solution requires significant resources" (5 tokens, all shared, P = 5/6, R = 1)
    # gives F1 = 10/11 instead of 5/6. (For q2 the extra gold gives 2/7 < 1/3.)
    assert evaluate_files(SAMPLE, pred_file)["f1"] == pytest.approx(
        100 * (5.2 + 1 / 3 + 10 / 11 + 3) / 14
    )
    with pytest.raises(ValueError, match="no gold answer"):
        evaluate_files(DEV, pred_file, version=1)
