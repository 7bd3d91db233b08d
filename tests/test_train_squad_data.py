"""SQuAD data: the three file layouts, features (windows, targets, max context), the safe feature
cache (keyed by every setting; damage is detected) and batches."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from _tiny import build_word_tokenizer

from fastdistill.train import cache
from fastdistill.train.demo import tiny_config
from fastdistill.train.tasks.squad import features as sd
from fastdistill.train.tasks.squad import files as sf
from fastdistill.train.tasks.squad.features import FeatureSettings

DATA = Path(__file__).parent / "data"
DEV = DATA / "dev-v2.0.json"
SAMPLE = DATA / "sample.json"
SMALL = FeatureSettings(max_length=64, doc_stride=24, max_query_length=16, v2=True)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [t for ex in sf.read_examples([DEV]) for t in (ex.question, ex.context)]
    return build_word_tokenizer(texts, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def feats(tok):
    examples = sf.read_examples([DEV])
    arrays, stats = sd.convert_examples(examples, tok, SMALL)
    return sd.SquadFeatures(arrays, examples, SMALL, {"stats": stats})


# ---- files -----------------------------------------------------------------------------------------


def test_nested_flat_and_json_lines_read_the_same_questions(tmp_path):
    nested = sf.read_squad(DEV)
    flat = sf.read_squad(SAMPLE)
    assert nested.version == "v2.0" and len(nested.examples) == 14
    key = [(e.qid, e.question, e.context, e.is_impossible) for e in nested.examples]
    assert [(e.qid, e.question, e.context, e.is_impossible) for e in flat.examples] == key
    assert sum(e.is_impossible for e in nested.examples) == 6
    assert nested.examples[0].answers == (("France", 159),)
    assert len(flat.examples[1].answers) == 4 and flat.examples[1].answers[1][0].startswith("in ")
    assert nested.examples[0].title == "Normans"
    records = json.loads(SAMPLE.read_text())["data"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(records))
    for path in (tmp_path / "a.jsonl", tmp_path / "list.json"):
        assert sf.read_squad(path).examples == flat.examples
    # answers as a list of objects in a flat record
    rec = dict(records[0], answers=[{"text": "France", "answer_start": 159}])
    (tmp_path / "one.json").write_text(json.dumps({"data": [rec]}))
    assert sf.read_squad(tmp_path / "one.json").examples[0].answers == (("France", 159),)


@pytest.mark.parametrize(
    "content, match",
    [
        (
            '{"data": [{"id": "a", "question": "q"}]}',
            "data\\[0\\]: expected a string under 'context'",
        ),
        (
            '{"data": [{"id": "a", "question": "q", "context": "abc", '
            '"answers": [{"text": "abcd", "answer_start": 0}]}]}',
            "answer 'abcd' at 0 lies outside its context",
        ),
        (
            '{"data": [{"id": "a", "question": "q", "context": "abc", '
            '"answers": {"text": ["a"], "answer_start": []}}]}',
            "lists of one length",
        ),
        (
            '{"data": [{"id": "a", "question": "q", "context": "c"}, '
            '{"id": "a", "question": "r", "context": "c"}]}',
            "'a' appears more than once",
        ),
        ('{"version": 2}', "'data' list"),
        ("{not json", "not JSON"),
        ('{"data": []}', "no questions"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        sf.read_squad(path)


def test_missing_file():
    with pytest.raises(ValueError, match="not found"):
        sf.read_squad("/nonexistent/train.json")


def test_version_resolution():
    dev = sf.read_examples([DEV])
    answerable = [e for e in dev if not e.is_impossible]
    assert sf.resolve_version("auto", [dev]) is True
    assert sf.resolve_version("auto", [answerable]) is False
    assert sf.resolve_version("v2", [answerable]) is True
    with pytest.raises(ValueError, match="hold 6 question.*without an answer.*v2 or auto"):
        sf.resolve_version("v1", [answerable, dev])


# ---- features ----------------------------------------------------------------------------------


def test_targets_point_at_the_answer_or_at_cls(feats):
    a = feats.arrays
    cls = a["cls_index"]
    assert (cls == 0).all()  # BERT: [CLS] first
    for ex, fs in zip(feats.examples, feats.features_of(), strict=True):
        assert len(fs) >= 1
        starts, ends = a["start_positions"][fs], a["end_positions"][fs]
        if ex.is_impossible:
            assert (starts == 0).all() and (ends == 0).all()
            continue
        text, start_char = ex.answers[0]
        found = 0
        for f, s, e in zip(fs, starts, ends, strict=True):
            if s == 0:
                assert e == 0
                continue
            off = feats.tokens("offsets", f)
            # the span's characters are exactly the answer (the tokenizer splits at its edges)
            assert ex.context[off[s, 0] : off[e, 1]] == text and off[s, 0] == start_char
            found += 1
        assert found >= 1, ex.qid  # every answer fits in some window
    assert feats.meta["stats"]["windows_without_answer"] > 0  # and some windows miss theirs


def test_windows_overlap_by_design_and_cover_the_context(tok, feats):
    multi = 0
    for ex, fs in zip(feats.examples, feats.features_of(), strict=True):
        ctx = [feats.tokens("offsets", f) for f in fs]
        ctx = [o[o[:, 0] >= 0] for o in ctx]
        whole = np.asarray(
            tok(ex.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        )
        for k, o in enumerate(ctx):
            # window k starts doc_stride context tokens after window k - 1
            assert np.array_equal(o, whole[k * SMALL.doc_stride : k * SMALL.doc_stride + len(o)])
        assert k * SMALL.doc_stride + len(ctx[-1]) == len(whole)  # the last one reaches the end
        multi += len(fs) > 1
        # every context token is "max context" in exactly one window
        hits = np.zeros(len(whole), dtype=int)
        for k, f in enumerate(fs):
            m = feats.tokens("max_context", f)[feats.tokens("offsets", f)[:, 0] >= 0]
            hits[k * SMALL.doc_stride : k * SMALL.doc_stride + len(m)] += m
        assert (hits == 1).all()
    assert multi >= 4
    assert (feats.lengths <= SMALL.max_length).all() and feats.lengths.max() == SMALL.max_length


def test_long_question_is_cut_to_max_query_length(tok):
    ex = sf.read_examples([DEV])[0]
    long = replace(ex, question=" ".join(["what country is normandy located in"] * 10))
    arrays, _ = sd.convert_examples([long], tok, SMALL)
    tt = arrays["token_type_ids"][: arrays["seq_offsets"][1]]
    assert int((tt == 0).sum()) == SMALL.max_query_length + 2  # [CLS] question [SEP]


def test_max_context_prefers_the_centred_window():
    best = sd._max_context_windows([6, 6, 3], stride=4)
    # token 4 has 4 left/1 right in window 0, 0 left/5 right in window 1 → window 0 (score 1.06
    # vs 0.06); token 5: 5/0 vs 1/4 → window 1
    assert best.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_bad_settings(tok):
    with pytest.raises(ValueError, match="doc_stride .* must not exceed"):
        sd.check_settings(tok, FeatureSettings(max_length=40, doc_stride=30, max_query_length=16))
    fake = type("Slow", (), {"is_fast": False})()
    with pytest.raises(ValueError, match="fast tokenizer"):
        sd.check_settings(fake, SMALL)


# ---- the cache --------------------------------------------------------------------------------------


def _load(tok, tmp_path, settings=SMALL, files=(DEV,), **kw):
    return sd.load_features(list(files), tok, settings, cache_dir=tmp_path / "cache", **kw)


def test_cache_hit_and_every_setting_changes_the_key(tok, tmp_path, monkeypatch):
    first = _load(tok, tmp_path)
    monkeypatch.setattr(sd, "convert_examples", lambda *a, **k: pytest.fail("not cached"))
    again = _load(tok, tmp_path)
    for name in sd.ARRAYS:
        assert np.array_equal(first.arrays[name], again.arrays[name])
    monkeypatch.undo()
    key = sd.cache_key([str(DEV)], tok, SMALL)[0]
    other_tok = build_word_tokenizer(["a different vocabulary"], tmp_path / "tok2")
    copy = tmp_path / "dev-copy.json"
    copy.write_text(DEV.read_text().replace("France", "Frankia"))
    keys = {
        sd.cache_key([str(DEV)], tok, replace(SMALL, max_length=65))[0],
        sd.cache_key([str(DEV)], tok, replace(SMALL, doc_stride=23))[0],
        sd.cache_key([str(DEV)], tok, replace(SMALL, max_query_length=15))[0],
        sd.cache_key([str(DEV)], tok, replace(SMALL, v2=False))[0],
        sd.cache_key([str(DEV)], other_tok, SMALL)[0],
        sd.cache_key([str(copy)], tok, SMALL)[0],
        sd.cache_key([str(DEV), str(SAMPLE)], tok, SMALL)[0],
    }
    assert len(keys) == 7 and key not in keys


def test_key_ignores_the_truncation_state_a_call_leaves(tmp_path):
    # transformers leaves a call's truncation/stride on the backend tokenizer (and save_pretrained
    # stores it): the key of the same tokenizer must not change with it.
    texts = [t for ex in sf.read_examples([DEV]) for t in (ex.question, ex.context)]
    tok = build_word_tokenizer(texts, tmp_path / "tok")
    before = sd.cache_key([str(DEV)], tok, SMALL)[0]
    sd.convert_examples(sf.read_examples([DEV]), tok, SMALL)
    assert sd.cache_key([str(DEV)], tok, SMALL)[0] == before
    tok.save_pretrained(tmp_path / "again")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert sd.cache_key([str(DEV)], again, SMALL)[0] == before


def _cache_dir(tmp_path) -> Path:
    (path,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("squad-")]
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_cache_is_rebuilt_or_refused(tok, tmp_path, caplog, damage):
    good = _load(tok, tmp_path)
    path = _cache_dir(tmp_path)
    arrays = path / cache.ARRAYS_FILE
    blob = arrays.read_bytes()
    if damage == "truncate":
        arrays.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":  # same size, one byte of token ids changed
        arrays.write_bytes(blob[:-9] + bytes([blob[-9] ^ 0xFF]) + blob[-8:])
    else:
        (path / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="unusable"):
        _load(tok, tmp_path, build=False)  # a process that must not build refuses it
    with caplog.at_level(logging.WARNING):
        rebuilt = _load(tok, tmp_path)
    assert "rebuilding" in caplog.text
    for name in sd.ARRAYS:
        assert np.array_equal(rebuilt.arrays[name], good.arrays[name])


def test_consistent_checksum_but_bad_layout_is_refused(tok, tmp_path):
    from safetensors.numpy import save_file

    _load(tok, tmp_path)
    path = _cache_dir(tmp_path)
    from safetensors.numpy import load_file

    arrays = load_file(str(path / cache.ARRAYS_FILE))
    arrays["start_positions"] = arrays["start_positions"] + 1000  # outside every feature
    save_file(arrays, str(path / cache.ARRAYS_FILE))
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = cache.file_sha256(path / cache.ARRAYS_FILE)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="start_positions outside its feature"):
        _load(tok, tmp_path, build=False)


def test_missing_cache_is_refused_without_build(tok, tmp_path):
    with pytest.raises(ValueError, match="missing"):
        _load(tok, tmp_path, build=False)
    _load(tok, tmp_path)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ValueError, match="missing"):
        _load(tok, tmp_path, build=False)


def test_cache_for_other_questions_is_not_used(tok, tmp_path):
    _load(tok, tmp_path)
    examples = sf.read_examples([DEV])[:3]
    with pytest.raises(ValueError, match="other questions"):
        _load(tok, tmp_path, build=False, examples=examples)


# ---- batches ------------------------------------------------------------------------------------------


def test_batches_are_padded_to_max_length_with_an_answer_mask(tok, feats):
    idx = [0, 5, len(feats) - 1]
    b = sd.collate_features(feats, idx, pad_id=tok.pad_token_id)
    assert b.input_ids.shape == (3, SMALL.max_length)
    for row, i in enumerate(idx):
        n = int(feats.lengths[i])
        assert b.attention_mask[row].sum() == n and (b.input_ids[row, n:] == 0).all()
        ctx = feats.tokens("offsets", i)[:, 0] >= 0
        expected = np.zeros(SMALL.max_length, dtype=bool)
        expected[:n] = ctx
        expected[0] = True  # [CLS] stays: the no-answer position
        assert np.array_equal(b.answer_mask[row].numpy(), expected)
        assert b.start_positions[row] == feats.arrays["start_positions"][i]
    assert b.num_tokens == int(sum(feats.lengths[i] for i in idx))
    # segment ids go to BERT, not to DistilBERT (no such argument)
    bert = transformers.AutoModelForQuestionAnswering.from_config(tiny_config("bert", len(tok)))
    distil = transformers.AutoModelForQuestionAnswering.from_config(
        tiny_config("distilbert", len(tok))
    )
    assert "token_type_ids" in b.model_inputs(bert)
    assert set(b.model_inputs(distil)) == {"input_ids", "attention_mask"}
    assert b.to(torch.device("cpu")).input_ids.dtype == torch.int64
