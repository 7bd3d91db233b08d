"""The distiller: it learns, resumes exactly, skips non-finite steps, stops on persistent NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from _tiny import tiny_inputs
from safetensors.torch import load_file

from fastdistill.__main__ import main as fastdistill_main
from fastdistill.train import TrainConfig, TrainingError, train
from fastdistill.train.cli import main as train_main
from fastdistill.train.demo import tiny_config
from fastdistill.train.tasks.mlm import MLMTask

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    paths = tiny_inputs(root, arch="bert", task="mlm", lines=400, vocab_size=400, layers=4)
    student_cfg = tiny_config("bert", 400, hidden=32, layers=2)
    student_cfg.save_pretrained(root / "student-config")
    paths["student_config"] = str(root / "student-config")
    paths["root"] = root
    return paths


def _cfg(paths, out, **kw):
    base = dict(
        teacher=paths["teacher"],
        train_files=[paths["train"]],
        eval_files=[paths["eval"]],
        cache_dir=str(paths["root"] / "cache"),
        output_dir=str(out),
        batch_size=8,
        max_length=32,
        log_interval=2,
        save_interval=2,
        max_steps=6,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_max_sequences=32,
        progress_bar=False,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_distillation_learns_and_writes_everything(bert, tmp_path):
    out = tmp_path / "run"
    summary = train(
        _cfg(
            bert,
            out,
            student_config=bert["student_config"],
            max_steps=30,
            tensorboard=True,
            progress_bar=True,
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(2, 31, 2))
    assert steps[-1]["kl"] < 0.85 * steps[0]["kl"] and steps[-1]["loss"] < steps[0]["loss"]
    for key in ("kl", "ce", "cos", "lr", "grad_norm", "tokens_per_s", "skipped_total"):
        assert math.isfinite(steps[-1][key]), key
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["kl_to_teacher"] < before["kl_to_teacher"]
    # (top-1 agreement of a 30-step student on ~150 held-out tokens is too noisy to assert on; the
    # tokenizer trainer breaks ties differently from run to run, so the data differ slightly.)
    assert 0 <= after["top1_agreement"] <= 1
    assert (out / "metrics.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    model = transformers.AutoModelForMaskedLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 2
    assert transformers.AutoTokenizer.from_pretrained(out / "final").mask_token == "[MASK]"


def test_resume_continues_exactly(bert, tmp_path):
    # Dropout on, accumulation on, a save every 2 steps: a run killed after step 4 and resumed ends
    # with the weights of a run never interrupted.
    kw = dict(gradient_accumulation_steps=2, max_steps=8, student_layers=[1, 3], weight_decay=0.01)
    teacher_dir = bert["root"] / "teacher-dropout"
    if not teacher_dir.exists():
        t = transformers.AutoModelForMaskedLM.from_pretrained(bert["teacher"])
        t.config.hidden_dropout_prob = 0.1
        t.save_pretrained(teacher_dir)
        transformers.AutoTokenizer.from_pretrained(bert["teacher"]).save_pretrained(teacher_dir)
    paths = dict(bert, teacher=str(teacher_dir))
    whole = train(_cfg(paths, tmp_path / "whole", **kw))

    class Killed(Exception):
        pass

    def kill_after_5(step):
        if step == 5:  # step 5 ran but was never checkpointed: lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(paths, tmp_path / "split", **kw), on_step_end=kill_after_5)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(paths, tmp_path / "split", **kw))
    resumed = train(_cfg(paths, tmp_path / "split", resume=True, **kw))
    assert resumed["steps"] == whole["steps"] == 8
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == [2, 4, 6, 8]  # the killed run's records after its checkpoint were dropped


def _nan_from(monkeypatch, bad_steps):
    calls = {"n": 0}
    real = MLMTask.loss

    def loss(self, s_out, t_out, batch, w):
        total, terms = real(self, s_out, t_out, batch, w)
        calls["n"] += 1  # one call per micro-batch; accumulation 1 here, so one per step
        if bad_steps(calls["n"]):
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(MLMTask, "loss", loss)


def test_one_nan_step_is_skipped(bert, tmp_path, monkeypatch):
    _nan_from(monkeypatch, lambda step: step == 3)
    snapshots = {}

    def snap(step):
        if step in (2, 3):
            snapshots[step] = {k: v.clone() for k, v in model_ref["m"].state_dict().items()}

    model_ref = {}
    real_build = MLMTask.build_student

    def build(self, teacher, resume_dir=None):
        model_ref["m"] = real_build(self, teacher, resume_dir)
        return model_ref["m"]

    monkeypatch.setattr(MLMTask, "build_student", build)
    summary = train(_cfg(bert, tmp_path / "run"), on_step_end=snap)
    assert summary["skipped_steps"] == 1
    for k, v in snapshots[2].items():  # the skipped step changed nothing
        assert torch.equal(v, snapshots[3][k]), k
    weights = _weights(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in weights.values())
    opt = load_file(
        str(tmp_path / "run" / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    )
    assert float(opt["state.0.step"]) == 5  # AdamW's step count did not advance on the skip
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_total"] for r in records if r["kind"] == "train"] == [0, 1, 1]


def test_persistent_nan_stops_with_error(bert, tmp_path, monkeypatch, capsys):
    _nan_from(monkeypatch, lambda step: step >= 5)
    out = tmp_path / "run"
    args = [
        "--teacher",
        bert["teacher"],
        "--train-files",
        bert["train"],
        "--cache-dir",
        str(bert["root"] / "cache"),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--log-interval",
        "2",
        "--save-interval",
        "2",
        "--max-steps",
        "30",
        "--max-consecutive-skips",
        "3",
        "--no-progress-bar",
        "--no-tensorboard",
    ]
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "consecutive optimizer steps had a non-finite loss" in err and "step-00000004" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    good = load_file(str(out / "checkpoints" / "step-00000004" / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    with pytest.raises(TrainingError):  # the library raises; only the CLI turns it into a status
        train(_cfg(bert, tmp_path / "lib", max_steps=30, max_consecutive_skips=3))


def test_eager_seed_formulas_match_fused(bert, tmp_path):
    kw = dict(
        student_config=bert["student_config"], max_steps=3, alpha_mse=0.5, restrict_ce_to_mask=True
    )
    train(_cfg(bert, tmp_path / "fused", **kw))
    train(_cfg(bert, tmp_path / "eager", loss_impl="eager", **kw))
    a, b = _weights(tmp_path / "fused"), _weights(tmp_path / "eager")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(bert, tmp_path, precision):
    summary = train(_cfg(bert, tmp_path / precision, mixed_precision=precision, max_steps=12))
    # fp16: the GradScaler starts at 2^16 and skips overflowing steps while it halves the scale.
    assert summary["steps"] == 12 and summary["skipped_steps"] <= (0 if precision == "bf16" else 10)
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / precision).values())


def test_clm_gpt2(tmp_path):
    paths = tiny_inputs(tmp_path / "in", arch="gpt2", task="clm", lines=300, vocab_size=400)
    paths["root"] = tmp_path
    summary = train(_cfg(paths, tmp_path / "run", task="clm", max_steps=4))
    assert summary["eval_after"]["top1_agreement"] >= 0 and summary["skipped_steps"] == 0
    assert (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.n_layer
        == 2
    )


def test_hidden_state_distillation_raises_embedding_cosine(tmp_path):
    # A bare encoder (no LM head) from a local directory → a 3-layer student from its layers 0, 2, 4.
    paths = tiny_inputs(
        tmp_path / "in", arch="bert", task="hidden", lines=300, vocab_size=400, layers=6
    )
    paths["root"] = tmp_path
    summary = train(_cfg(paths, tmp_path / "run", task="hidden", max_steps=16, alpha_mse=1.0))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["embedding_cosine"] > before["embedding_cosine"] + 0.02
    assert after["token_cosine"] > before["token_cosine"] + 0.02
    model = transformers.AutoModel.from_pretrained(tmp_path / "run" / "final")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 3


def test_report_command(bert, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(bert, out, max_steps=2))
    (out / "metrics.png").unlink()
    assert fastdistill_main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out at step 0" in text and (out / "metrics.png").is_file()
    assert fastdistill_main(["report", str(tmp_path / "nothing")]) == 1


def test_overwrite_output_dir_starts_clean(bert, tmp_path):
    out = tmp_path / "run"
    train(_cfg(bert, out, max_steps=6, keep_checkpoints=1))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000006"]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_cfg(bert, out, max_steps=2))
    train(_cfg(bert, out, max_steps=2, overwrite_output_dir=True, keep_checkpoints=1))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2]
