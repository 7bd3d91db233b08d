"""The decoder-LLM task: every supported family distils through the trainer, chat rendering marks
exactly the assistant tokens, packing leaks nothing across sequences, and vocabulary or family
mismatches are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from _tiny import build_bpe_tokenizer
from safetensors.torch import load_file

from fastdistill.train import TrainConfig, train
from fastdistill.train.demo import CORPUS
from fastdistill.train.student import init_student_from_teacher
from fastdistill.train.tasks.llm import data as LD

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FAMILIES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "mistral": transformers.MistralConfig,
    "gemma": transformers.GemmaConfig,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()][:160]
    (root / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = build_bpe_tokenizer([root / "text.txt"], 300, root / "tok", style="gpt2")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "tok")
    short = [" ".join(line.split()[:6]) for line in lines]  # conversations of 20-50 tokens
    chats = [
        {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
        for a, b in zip(short[0:120:2], short[1:120:2], strict=True)
    ]
    (root / "train.jsonl").write_text("\n".join(map(json.dumps, chats[:50])) + "\n")
    (root / "eval.jsonl").write_text("\n".join(map(json.dumps, chats[50:])) + "\n")
    return {"root": root, "tok": tok}


def _decoder(family, tok, layers=2, vocab=None):
    config = FAMILIES[family](
        vocab_size=vocab or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _save_teacher(inputs, family, **kw):
    path = inputs["root"] / f"teacher-{family}-{kw.get('vocab', 0)}"
    if not path.exists():
        _decoder(family, inputs["tok"], **kw).save_pretrained(path)
        inputs["tok"].save_pretrained(path)
    return path


def _cfg(inputs, teacher, out, **kw):
    base = dict(
        task="llm",
        teacher=str(teacher),
        train_files=[str(inputs["root"] / "train.jsonl")],
        eval_files=[str(inputs["root"] / "eval.jsonl")],
        cache_dir=str(inputs["root"] / "cache"),
        output_dir=str(out),
        max_length=192,
        batch_size=4,
        max_steps=4,
        log_interval=2,
        save_interval=4,
        learning_rate=3e-3,
        teacher_dtype="float32",
        progress_bar=False,
        tensorboard=False,
    )
    return TrainConfig.from_dict(base | kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_distils_a_student_initialised_from_its_layers(inputs, tmp_path, family):
    teacher = _save_teacher(inputs, family)
    packing = family in ("llama", "gemma")  # the packed path through the trainer too
    cfg = _cfg(
        inputs, teacher, tmp_path / "run", divergence="jsd", beta=0.3, alpha_ce=0.5, packing=packing
    )
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert summary["student_parameters"] < summary["teacher_parameters"]
    after = summary["eval_after"]
    assert np.isfinite(after["kl_to_teacher"]) and 0 <= after["top1_agreement"] <= 1
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert student.config.model_type == family and student.config.num_hidden_layers == 1


def test_chat_rendering_marks_exactly_the_assistant_tokens(inputs):
    tok = inputs["tok"]
    record = {
        "messages": [
            {"role": "user", "content": "in the beginning"},
            {"role": "assistant", "content": "god created"},
            {"role": "user", "content": "and the earth"},
            {"role": "assistant", "content": "was without form"},
        ]
    }
    ids, flags = LD.render(record, tok, train_on_prompt=False)
    text = tok.decode([i for i, f in zip(ids, flags, strict=True) if f])
    assert text == "god created<|end|>was without form<|end|>"
    _, all_flags = LD.render(record, tok, train_on_prompt=True)
    assert all(all_flags)
    plain = transformers.AutoTokenizer.from_pretrained(inputs["root"] / "tok")
    plain.chat_template = None
    ids, flags = LD.render({"prompt": "in the", "completion": " beginning"}, plain, False)
    assert (
        tok.decode([i for i, f in zip(ids, flags, strict=True) if f]) == " beginning<|endoftext|>"
    )
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        LD.render(record, plain, False)


def test_packed_rows_give_each_sequence_exactly_its_unpacked_logits(inputs):
    tok = inputs["tok"]
    settings = LD.LLMDataSettings(max_length=192)
    examples = LD.load_examples(
        [str(inputs["root"] / "train.jsonl")], tok, settings, cache_dir=inputs["root"] / "cache"
    )
    assert examples.meta["stats"]["truncated"] == 0
    packed = LD.pack(examples, 192, enabled=True)
    assert len(packed) < len(examples) / 2 and packed.lengths.max() <= 192
    assert sorted(np.concatenate(packed.members).tolist()) == list(range(len(examples)))
    model = _decoder("llama", tok).eval()
    batch = LD.collate(packed, [0, 1], pad_id=tok.eos_token_id, packed=True)
    with torch.no_grad():
        logits = model(**batch.model_inputs(model)).logits
    for row in (0, 1):
        at = 0
        for i in packed.members[row]:
            seq, tgt = examples.sequence(int(i))
            with torch.no_grad():
                alone = model(torch.from_numpy(seq.astype(np.int64))[None]).logits[0]
            torch.testing.assert_close(logits[row, at : at + len(seq)], alone, atol=2e-5, rtol=0)
            labels = batch.labels[row, at : at + len(seq)]
            assert labels[-1] == LD.IGNORE_INDEX  # nothing predicted across the boundary
            want = np.where(tgt[1:] == 1, seq[1:], LD.IGNORE_INDEX)
            assert np.array_equal(labels[:-1].numpy(), want)
            at += len(seq)


def test_mismatched_vocabularies_and_unknown_families_are_clear_errors(inputs, tmp_path):
    teacher = _save_teacher(inputs, "qwen2", vocab=len(inputs["tok"]) + 64)  # padded vocabulary
    student_cfg = _decoder("qwen2", inputs["tok"], layers=1).config
    student_cfg.save_pretrained(tmp_path / "student-config")
    kw = dict(student_config=str(tmp_path / "student-config"))
    with pytest.raises(ValueError, match="pass --vocab common"):
        train(_cfg(inputs, teacher, tmp_path / "a", fused_linear=False, **kw))
    summary = train(_cfg(inputs, teacher, tmp_path / "b", vocab="common", fused_linear=False, **kw))
    assert summary["skipped_steps"] == 0
    phi = transformers.AutoModelForCausalLM.from_config(
        transformers.PhiConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    with pytest.raises(ValueError, match="supported families are .*llama.*qwen3"):
        init_student_from_teacher(phi)


def test_the_clm_demo_runs_and_prints_its_configs(tmp_path, capsys):
    from fastdistill.train.cli import main
    from fastdistill.train.demo import format_demo
    from fastdistill.train.demo_clm import run_clm_demo

    assert main(["--demo", "clm", "--print-config", "--output-dir", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert "task: llm" in printed and "divergence: jsd" in printed and not (tmp_path / "x").exists()
    result = run_clm_demo(tmp_path / "demo", quick=True, progress_bar=False, tensorboard=False)
    for key in ("kl_to_teacher", "top1_agreement"):
        assert np.isfinite(result["before"][key]) and np.isfinite(result["after"][key])
    assert "a Llama teacher" in format_demo(result, kind="clm")
    student = transformers.AutoModelForCausalLM.from_pretrained(result["student"])
    assert student.config.model_type == "llama" and student.config.num_hidden_layers == 1


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_path_trains_like_the_logits_path(inputs, tmp_path, divergence):
    """The default path (hidden states and heads, no logits) optimises the same objective as the
    models' materialised logits: the same logged losses and, after two steps, the same weights
    within fp32 round-off of the update."""
    teacher = _save_teacher(inputs, "llama")
    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        kw = dict(divergence=divergence, alpha_ce=0.5, fused_linear=fused, max_steps=2)
        train(_cfg(inputs, teacher, out, num_threads=1, **kw))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[fused] = (
            [r for r in records if r["kind"] == "train"][0],
            load_file(str(out / "final" / "model.safetensors")),
        )
    (r1, w1), (r0, w0) = runs[True], runs[False]
    for key in ("loss", "kl", "ce"):
        assert abs(r1[key] - r0[key]) <= 1e-5 * abs(r0[key]) + 1e-7, key
    init = load_file(str(teacher / "model.safetensors"))
    for k in w0:
        update = (w0[k] - init.get(k, w0[k])).norm()
        assert (w1[k] - w0[k]).norm() <= 1e-3 * update + 1e-6, k


# ---- the offline teacher: a top-k cache of an llm teacher --------------------------------------


def _cache_run(inputs, teacher, out, cache, **kw):
    """A run that trains from ``cache`` without the teacher (a student from a config unless
    ``student_pretrained`` is given)."""
    base = dict(tokenizer=str(teacher), teacher_cache=str(cache))
    if "student_pretrained" not in kw:
        config = inputs["root"] / "student-config-llama"
        if not config.exists():
            _decoder("llama", inputs["tok"], layers=1).config.save_pretrained(config)
        base["student_config"] = str(config)
    cfg = _cfg(inputs, teacher, out, **(base | kw))
    return TrainConfig.from_dict(cfg.to_dict() | {"teacher": None})


def _first_train_record(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "train")


def test_the_cache_holds_each_examples_teacher_and_lines_up_with_packed_rows(inputs, tmp_path):
    """The cache is written per example (unpacked, whatever --packing), holds the teacher's
    top-k of every token of it, and a packed training row takes each member's rows at its
    positions."""
    from fastdistill.train import teacher_cache as TC
    from fastdistill.train.tasks.llm import LLMTask

    teacher = _save_teacher(inputs, "llama")
    cfg = _cfg(inputs, teacher, tmp_path / "unused", packing=True, teacher_top_k=8)
    TC.write(cfg, tmp_path / "tc")
    examples = LD.load_examples(
        [str(inputs["root"] / "train.jsonl")], inputs["tok"], LD.LLMDataSettings(192),
        cache_dir=inputs["root"] / "cache",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "tc" / TC.MANIFEST).read_text())
    assert manifest["num_sequences"] == len(examples)
    assert manifest["num_tokens"] == int(examples.offsets[-1])
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher).eval()
    cache = TC.TeacherCache(tmp_path / "tc", manifest)
    for i in (0, len(examples) - 1):
        seq = torch.from_numpy(examples.sequence(i)[0].astype(np.int64))[None]
        with torch.no_grad():
            top = torch.log_softmax(model(seq).logits[0].double(), -1).topk(8, -1)
        ids, lp, _ = cache.rows(i, examples.offsets)
        assert np.array_equal(ids.astype(np.int64), top.indices.numpy())
        np.testing.assert_allclose(lp.astype(np.float64), top.values.numpy(), rtol=2**-10)
    train_cfg = _cache_run(inputs, teacher, tmp_path / "run", tmp_path / "tc", packing=True)
    task = LLMTask(train_cfg.resolved(), torch.device("cpu"))
    rows = task.load_data(inputs["tok"], {"train": train_cfg.train_files}, build=False)["train"]
    task.use_teacher_cache(train_cfg.teacher_cache, inputs["tok"], rows)
    batch = task.collate(rows, [0, 1], stream=1)
    assert task.collate(rows, [0, 1], stream=0).teacher_topk is None  # evaluation: no targets
    ids, lp, _ = batch.teacher_topk
    for row in (0, 1):
        at = 0
        assert len(rows.members[row]) > 1  # packed
        for i in rows.members[row]:
            want_ids, want_lp, _ = cache.rows(int(i), examples.offsets)
            end = at + len(want_ids)
            assert np.array_equal(ids[row, at:end].numpy(), want_ids.astype(np.int64))
            assert np.array_equal(lp[row, at:end].numpy(), want_lp.astype(np.float32))
            at = end


def _peaked_teacher_and_its_student(inputs):
    """A llama teacher whose head is 10x its input embeddings, so that its next-token
    distribution is peaked and differs from token to token, and a student made of its first
    layer: their KL is small where the cache lines up with the tokens and large where it does not
    (measured: 600x larger with the cache shifted by one position)."""
    path = inputs["root"] / "teacher-peaked"
    if not path.exists():
        model = _decoder("llama", inputs["tok"])
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight * 10.0)
        model.save_pretrained(path)
        inputs["tok"].save_pretrained(path)
        init_student_from_teacher(model, [0]).save_pretrained(inputs["root"] / "student-peaked")
    return path, inputs["root"] / "student-peaked"


@pytest.mark.parametrize(
    "fused, packing", [(True, True), (False, False)], ids=["fused-packed", "logits-padded"]
)
def test_a_full_cache_gives_the_live_teachers_first_step_loss(inputs, tmp_path, fused, packing):
    """k = V in "full" mode is the dense forward KL: the first step's logged KL equals the live
    teacher's up to what differs: the log-probabilities are stored in float16 (each moved by at
    most 2⁻¹¹ of its magnitude, in random directions), and with packing the live teacher sees
    packed rows, the cache each example alone (the same logits within ~1e-5). Measured: 1.2e-4
    (fused, packed) and 2.7e-4 (logits, padded) relative on a KL of 0.0055; the tolerance is the
    clm test's 2e-3, while a cache shifted by one position is off by a factor of ~600. The hard
    loss does not involve the teacher: equal within fp32 round-off."""
    from fastdistill.train import teacher_cache as TC

    teacher, student = _peaked_teacher_and_its_student(inputs)
    vocab = len(inputs["tok"])
    TC.write(_cfg(inputs, teacher, tmp_path / "unused", teacher_top_k=vocab), tmp_path / "tc")
    kw = dict(fused_linear=fused, packing=packing, alpha_ce=0.5, max_steps=1, log_interval=1,
              save_interval=1, eval_files=[], num_threads=1, student_pretrained=str(student))  # fmt: skip
    train(_cfg(inputs, teacher, tmp_path / "live", **kw))
    train(_cache_run(inputs, teacher, tmp_path / "cached", tmp_path / "tc", **kw))
    live, cached = _first_train_record(tmp_path / "live"), _first_train_record(tmp_path / "cached")
    assert abs(cached["kl"] - live["kl"]) <= 2e-3 * abs(live["kl"]), (cached, live)
    assert abs(cached["ce"] - live["ce"]) <= 1e-5 * abs(live["ce"]), (cached, live)


def test_training_from_a_cache_runs_without_the_teacher_and_resumes_exactly(
    inputs, tmp_path, monkeypatch
):
    from _ddp import Stop, stop_after

    from fastdistill.train import loading
    from fastdistill.train import teacher_cache as TC

    teacher = _save_teacher(inputs, "llama")
    TC.write(_cfg(inputs, teacher, tmp_path / "unused", teacher_top_k=8), tmp_path / "tc")

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr(loading, "teacher_for", no_teacher)
    kw = dict(packing=True, alpha_ce=0.5, topk_normalization="tail", save_interval=2,
              eval_files=[], num_threads=1)  # fmt: skip
    whole = train(_cache_run(inputs, teacher, tmp_path / "whole", tmp_path / "tc", **kw))
    assert whole["steps"] == 4 and whole["skipped_steps"] == 0
    out = tmp_path / "cut"
    with pytest.raises(Stop):
        train(_cache_run(inputs, teacher, out, tmp_path / "tc", **kw), on_step_end=stop_after(3))
    resumed = train(_cache_run(inputs, teacher, out, tmp_path / "tc", resume=True, **kw))
    assert resumed["steps"] == 4
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    for k in a:  # resumed from step 2: the same weights as the run never interrupted
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="k: cache 8, run 16"):
        train(_cache_run(inputs, teacher, tmp_path / "k16", tmp_path / "tc", teacher_top_k=16))
    with pytest.raises(ValueError, match="data_key: cache"):
        train(_cache_run(inputs, teacher, tmp_path / "other", tmp_path / "tc", max_length=128))
    with pytest.raises(ValueError, match="forward KL only .* divergence jsd"):
        train(_cache_run(inputs, teacher, tmp_path / "jsd", tmp_path / "tc", divergence="jsd"))
