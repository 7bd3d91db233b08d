"""The offline teacher cache: what it stores, resumable and atomic writing, refusal of a cache that
does not fit the run, and a damaged shard named by its checksum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from _tiny import tiny_inputs

from fastdistill.train import TrainConfig
from fastdistill.train import teacher_cache as TC
from fastdistill.train.tasks import text_data as TD

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    paths = tiny_inputs(root, arch="gpt2", task="clm", lines=120, vocab_size=300, layers=2)
    paths["root"] = root
    return paths


def _cfg(paths, **kw):
    base = dict(
        task="clm",
        teacher=paths["teacher"],
        train_files=[paths["train"]],
        cache_dir=str(paths["root"] / "cache"),
        max_length=32,
        batch_size=16,
        teacher_top_k=8,
        progress_bar=False,
    )
    return TrainConfig.from_dict(base | kw)


def _token_data(paths):
    tok = transformers.AutoTokenizer.from_pretrained(paths["teacher"])
    settings = TD.TextSettings(TD.boundary_ids(tok, ("bos_token", "eos_token"), "clm"), 32)
    return TD.load_or_build([paths["train"]], tok, settings, cache_dir=paths["root"] / "cache")


def test_cache_holds_the_teachers_top_k_and_the_rest_of_the_mass(gpt2, tmp_path):
    summary = TC.write(_cfg(gpt2, capture_temperature=2.0), tmp_path / "tc")
    manifest = json.loads((tmp_path / "tc" / TC.MANIFEST).read_text())
    assert summary["bytes_per_token"] == manifest["bytes_per_token"] == 8 * (2 + 2) + 4
    data = _token_data(gpt2)
    assert manifest["num_tokens"] == data.num_tokens and manifest["data_key"] == data.meta["key"]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(gpt2["teacher"]).eval()
    cache = TC.TeacherCache(tmp_path / "tc", manifest)
    for i in (0, 7, len(data) - 1):
        seq = torch.from_numpy(data.sequence(i).astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(seq).logits[0].double() / 2.0, -1)
        ids, lp, tail = cache.rows(i, data.offsets)
        top = torch.topk(logp, 8, dim=-1)
        assert np.array_equal(ids.astype(np.int64), top.indices.numpy())
        np.testing.assert_allclose(lp.astype(np.float64), top.values.numpy(), rtol=2**-10)
        rest = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(tail, rest.numpy(), rtol=1e-5)


def test_an_interrupted_write_resumes_and_keeps_finished_shards(gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(TC, "SHARD_SEQUENCES", 64)
    real = TC.write_shard
    calls = []

    def crash_on_third(out, j, arrays, record):
        calls.append(j)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the write
        real(out, j, arrays, record)

    monkeypatch.setattr(TC, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        TC.write(_cfg(gpt2), tmp_path / "tc")
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tc").glob("shard-*.safetensors")}
    assert len(done) == 2 and not (tmp_path / "tc" / TC.MANIFEST).exists()
    monkeypatch.setattr(TC, "write_shard", real)
    summary = TC.write(_cfg(gpt2), tmp_path / "tc")
    for name, mtime in done.items():  # kept, not rewritten
        assert (tmp_path / "tc" / name).stat().st_mtime_ns == mtime
    assert summary["shards"] == len(list((tmp_path / "tc").glob("shard-*.safetensors"))) > 3


def test_a_cache_that_does_not_fit_is_refused_saying_what_differs(gpt2, tmp_path):
    TC.write(_cfg(gpt2), tmp_path / "tc")
    with pytest.raises(ValueError, match="other settings .*k: cache 8, run 4"):
        TC.write(_cfg(gpt2, teacher_top_k=4), tmp_path / "tc")
    data = _token_data(gpt2)
    want = {"k": 8, "data_key": data.meta["key"], "tokenizer": "x", "vocab_size": None}
    want |= {"num_sequences": len(data), "num_tokens": data.num_tokens}
    with pytest.raises(ValueError, match="does not match this run: tokenizer: cache"):
        TC.TeacherCache.open(tmp_path / "tc", want)
    with pytest.raises(ValueError, match="data_key: cache"):
        TC.TeacherCache.open(tmp_path / "tc", want | {"tokenizer": None, "data_key": "other"})
    with pytest.raises(ValueError, match="k: cache 8, run 16"):
        TC.TeacherCache.open(tmp_path / "tc", want | {"tokenizer": None, "k": 16})
    with pytest.raises(ValueError, match="no manifest.json"):
        TC.TeacherCache.open(tmp_path / "nothing", want)


def test_a_damaged_shard_is_named(gpt2, tmp_path):
    TC.write(_cfg(gpt2), tmp_path / "tc")
    shard = tmp_path / "tc" / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x10
    shard.write_bytes(bytes(raw))
    manifest = json.loads((tmp_path / "tc" / TC.MANIFEST).read_text())
    cache = TC.TeacherCache(tmp_path / "tc", manifest)
    with pytest.raises(ValueError, match=f"{shard} is missing or does not match its checksum"):
        cache.rows(0, _token_data(gpt2).offsets)


def test_only_tasks_with_fixed_teacher_inputs_can_be_cached(gpt2, tmp_path):
    with pytest.raises(ValueError, match="--task mlm cannot.*tasks that can: clm, llm"):
        TC.write(_cfg(gpt2, task="mlm"), tmp_path / "tc")


def _student_config(gpt2, root):
    path = root / "student-config"
    if not path.exists():
        config = transformers.AutoConfig.from_pretrained(gpt2["teacher"])
        config.n_layer = 1
        config.save_pretrained(path)
    return str(path)


def test_training_from_the_cache_runs_without_the_teacher(gpt2, tmp_path, monkeypatch):
    TC.write(_cfg(gpt2), tmp_path / "tc")
    from fastdistill.train import loading, train

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr(loading, "teacher_for", no_teacher)
    for mode in ("full", "renormalized", "tail"):
        cfg = _cfg(
            gpt2,
            teacher=None,
            tokenizer=gpt2["teacher"],
            teacher_cache=str(tmp_path / "tc"),
            student_config=_student_config(gpt2, gpt2["root"]),
            topk_normalization=mode,
            temperature=1.0,
            output_dir=str(tmp_path / f"run-{mode}"),
            max_steps=4,
            log_interval=2,
            save_interval=2,
            tensorboard=False,
        )
        summary = train(cfg)
        assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    with pytest.raises(ValueError, match="k: cache 8, run 16"):
        other = {"teacher_top_k": 16, "output_dir": str(tmp_path / "k16")}
        train(TrainConfig.from_dict(cfg.to_dict() | other))


def test_a_full_cache_trains_like_the_live_teacher(gpt2, tmp_path):
    """k = V in "full" mode is the dense KL (up to the float16 storage of the log-probs)."""
    from fastdistill.train import train

    vocab = transformers.AutoConfig.from_pretrained(gpt2["teacher"]).vocab_size
    TC.write(_cfg(gpt2, teacher_top_k=vocab), tmp_path / "tc")
    common = dict(
        student_config=_student_config(gpt2, gpt2["root"]),
        max_steps=2,
        log_interval=2,
        save_interval=2,
        tensorboard=False,
        alpha_cos=0.0,
    )
    live = train(_cfg(gpt2, output_dir=str(tmp_path / "live"), **common))
    cached = train(
        _cfg(
            gpt2,
            teacher=None,
            tokenizer=gpt2["teacher"],
            teacher_cache=str(tmp_path / "tc"),
            teacher_top_k=vocab,
            output_dir=str(tmp_path / "cached"),
            **common,
        )
    )
    assert live["steps"] == cached["steps"] == 2

    def first_kl(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return next(json.loads(x)["kl"] for x in lines if json.loads(x)["kind"] == "train")

    assert abs(first_kl("cached") - first_kl("live")) <= 2e-3 * abs(first_kl("live"))
