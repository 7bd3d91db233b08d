"""Text-task data: the token cache (build, reuse, invalidation, corruption), the DistilBERT
scripts' sequence rules, MLM masking statistics and the batch plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastdistill.train import cache
from fastdistill.train.batching import BatchPlan
from fastdistill.train.demo import CORPUS, build_wordpiece_tokenizer
from fastdistill.train.tasks import text_data as D


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()][:800]
    path = root / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    tok = build_wordpiece_tokenizer([path], 500)
    return path, tok


def _settings(tok, max_length=32, min_length=12, max_unknown_fraction=0.5):
    boundary = D.boundary_ids(tok, ("cls_token", "sep_token"), "mlm")
    return D.TextSettings(boundary, max_length, min_length, max_unknown_fraction)


def _build(path, tok, cache_dir, build=True, **kw):
    settings = _settings(tok, **kw)
    return D.load_or_build([str(path)], tok, settings, cache_dir=cache_dir, build=build)


def test_cache_is_built_then_reused(corpus, tmp_path, monkeypatch):
    path, tok = corpus
    first = _build(path, tok, tmp_path)
    assert len(first) > 500 and first.lengths.max() <= 32 and first.lengths.min() >= 12
    assert first.counts.sum() == first.num_tokens
    (key_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in key_dir.iterdir()) == [cache.ARRAYS_FILE, cache.META_FILE]

    def no_tokenising(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(D, "tokenize_files", no_tokenising)
    again = _build(path, tok, tmp_path)
    np.testing.assert_array_equal(again.ids, first.ids)
    np.testing.assert_array_equal(again.offsets, first.offsets)


def test_cache_key_covers_inputs(corpus, tmp_path):
    path, tok = corpus
    key = D.cache_key([str(path)], tok, _settings(tok))[0]
    assert D.cache_key([str(path)], tok, _settings(tok, max_length=64))[0] != key
    assert D.cache_key([str(path)], tok, _settings(tok, min_length=10))[0] != key
    assert D.cache_key([str(path)], tok, _settings(tok, max_unknown_fraction=0.4))[0] != key
    other = tmp_path / "other.txt"
    other.write_text(path.read_text() + "one more line of text for the hash\n")
    assert D.cache_key([str(other)], tok, _settings(tok))[0] != key
    tok2 = build_wordpiece_tokenizer([path], 450)
    assert D.cache_key([str(path)], tok2, _settings(tok2))[0] != key


@pytest.mark.parametrize(
    "damage", ["truncate_arrays", "garbage_meta", "flip_byte", "missing_arrays"]
)
def test_corrupt_cache_is_rebuilt(corpus, tmp_path, damage, caplog):
    path, tok = corpus
    good = _build(path, tok, tmp_path)
    (key_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    arrays = key_dir / cache.ARRAYS_FILE
    if damage == "truncate_arrays":
        arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    elif damage == "garbage_meta":
        (key_dir / cache.META_FILE).write_text("{not json")
    elif damage == "flip_byte":
        raw = bytearray(arrays.read_bytes())
        raw[-3] ^= 0xFF
        arrays.write_bytes(bytes(raw))
    else:
        arrays.unlink()
    with pytest.raises(ValueError, match="unusable"):
        _build(path, tok, tmp_path, build=False)  # a reader that may not build says so clearly
    rebuilt = _build(path, tok, tmp_path)
    assert "rebuilding" in caplog.text
    np.testing.assert_array_equal(rebuilt.ids, good.ids)
    assert json.loads((key_dir / "meta.json").read_text())["key"] == key_dir.name


def test_sequence_rules(tmp_path, corpus):
    _, tok = corpus
    f = tmp_path / "rules.txt"
    long_line = " ".join(["and the lord spake unto moses saying"] * 20)
    f.write_text(
        "\n".join(
            [
                long_line,
                "too short",
                "\u4e00\u4e01\u4e02\u4e03\u4e04\u4e05\u4e06\u4e07\u4e08\u4e09\u4e0a\u4e0b\u4e0c\u4e0d and",
                "",
                "in the beginning god created the heaven and the earth and the earth was without form",
            ]
        )
        + "\n"
    )
    ids, offsets, stats = D.tokenize_files([str(f)], tok, _settings(tok))
    lengths = np.diff(offsets)
    assert stats["split"] >= 3 and stats["too_short"] >= 1 and stats["unknown"] == 1
    assert lengths.max() <= 32 and lengths.min() >= 12
    for i in range(len(lengths)):  # every piece is wrapped in [CLS] ... [SEP]
        seq = ids[offsets[i] : offsets[i + 1]]
        assert seq[0] == tok.cls_token_id and seq[-1] == tok.sep_token_id
        assert tok.cls_token_id not in seq[1:-1]


def test_mlm_masking_statistics(corpus, tmp_path):
    path, tok = corpus
    data = _build(path, tok, tmp_path, max_length=64)
    masker = D.MLMMasker(data.counts, tok.all_special_ids, tok.mask_token_id)
    special = set(tok.all_special_ids)
    selected = masked = rand = kept = maskable = 0
    hits = np.zeros(len(data.counts))
    seen = np.zeros(len(data.counts))
    n_pred = masker.num_predictions(data)
    for i in range(len(data)):
        seq = data.sequence(i).astype(np.int64)
        inp, lab = masker(seq, D.sequence_rng(0, 1, i))
        sel = lab != D.IGNORE_INDEX
        assert sel.sum() == n_pred[i]  # the host-side count the trainer normalises with
        assert not any(int(t) in special for t in seq[sel])  # specials are never selected
        assert np.array_equal(inp[~sel], seq[~sel]) and np.array_equal(lab[sel], seq[sel])
        selected += sel.sum()
        maskable += sum(int(t) not in special for t in seq)
        masked += (inp[sel] == tok.mask_token_id).sum()
        kept += (inp[sel] == seq[sel]).sum()
        rand += ((inp[sel] != seq[sel]) & (inp[sel] != tok.mask_token_id)).sum()
        np.add.at(hits, seq[sel], 1)
        np.add.at(seen, seq, 1)
    assert abs(selected / maskable - 0.15) < 0.01  # per-sequence rounding
    assert abs(masked / selected - 0.8) < 0.02
    assert abs(rand / selected - 0.1) < 0.015
    assert abs(kept / selected - 0.1) < 0.015  # (a random token may equal the original: rare)
    # count^-0.7 smoothing: rare tokens are selected more often than frequent ones.
    rate = np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)
    frequent = data.counts >= np.quantile(data.counts[data.counts > 0], 0.99)
    rare = (data.counts > 0) & (data.counts <= 3)
    rare[list(special)] = False
    frequent[list(special)] = False
    assert rate[rare].mean() > 2 * rate[frequent].mean()
    # Deterministic in (seed, epoch, index), different across epochs.
    seq = data.sequence(3).astype(np.int64)
    a, _ = masker(seq, D.sequence_rng(0, 1, 3))
    b, _ = masker(seq, D.sequence_rng(0, 1, 3))
    c, _ = masker(seq, D.sequence_rng(0, 2, 3))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_batch_plan_partitions_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 128, size=1000)
    one = BatchPlan(lengths, batch_size=8, world_size=1, accum=2, seed=3)
    two = BatchPlan(lengths, batch_size=4, world_size=2, accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 1000 // 8 // 2
    s1, s2 = one.steps(0), two.steps(0)
    for a, b in zip(
        s1, s2, strict=True
    ):  # the same global batches whatever the number of processes
        for ma, mb in zip(a, b, strict=True):
            np.testing.assert_array_equal(ma, mb)
            np.testing.assert_array_equal(np.concatenate([two.local(mb, 0), two.local(mb, 1)]), ma)
    flat = np.concatenate([m for s in s1 for m in s])
    assert len(set(flat.tolist())) == len(flat)  # no sequence twice in an epoch
    assert not np.array_equal(np.concatenate(s1[0]), np.concatenate(one.steps(1)[0]))
    # Length grouping: far less padding than random batches.
    padded = sum(lengths[m].max() * len(m) - lengths[m].sum() for s in s1 for m in s)
    perm = rng.permutation(len(flat))
    random_padded = sum(
        lengths[m].max() * len(m) - lengths[m].sum() for m in np.split(flat[perm], len(flat) // 8)
    )
    assert padded < 0.3 * random_padded


def test_batch_plan_too_little_data():
    with pytest.raises(ValueError, match="not enough data"):
        BatchPlan(np.full(5, 20), batch_size=4, world_size=1, accum=2, seed=0)


def test_missing_file_is_a_clear_error(corpus, tmp_path):
    _, tok = corpus
    with pytest.raises(ValueError, match="data file not found"):
        D.load_or_build([str(tmp_path / "nope.txt")], tok, _settings(tok), cache_dir=tmp_path)
