"""Adding a task is local: a toy regression task defined here, registered, and trained through the
unchanged trainer and command line (flags, config keys, checkpoints, resume, evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _ddp import Stop, stop_after
from _tiny import build_word_tokenizer

from fastdistill import losses as FL
from fastdistill.train import TrainConfig, train
from fastdistill.train.cli import main as train_main
from fastdistill.train.demo import tiny_config
from fastdistill.train.fields import option
from fastdistill.train.tasks import Task, TaskOptions, get_task, register_task, unregister_task


@dataclass
class ToyOptions(TaskOptions):
    toy_target_scale: float = option(1.0, "the teacher's scores are multiplied by this")

    def validate(self, cfg) -> None:
        if not self.toy_target_scale > 0:
            raise ValueError(f"toy_target_scale must be > 0, got {self.toy_target_scale}")


@dataclass
class ToyData:
    ids: list[np.ndarray]

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self):
        return np.array([len(x) for x in self.ids], dtype=np.int64)


@dataclass
class ToyBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    num_tokens: int

    def to(self, device):
        return ToyBatch(self.input_ids.to(device), self.attention_mask.to(device), self.num_tokens)

    def model_inputs(self, model):
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


class ToyRegressionTask(Task):
    """Regress the teacher's (scaled) sequence score: one number per sequence, MSE."""

    name = "toy-regression"
    help = "toy: regress a sequence-classification teacher's score"
    Options = ToyOptions
    normalizers = ("mse",)

    @classmethod
    def fill_defaults(cls, cfg):
        cfg.alpha_kl = 0.0 if cfg.alpha_kl is None else cfg.alpha_kl
        cfg.alpha_cos = 0.0 if cfg.alpha_cos is None else cfg.alpha_cos
        cfg.max_length = 16 if cfg.max_length is None else cfg.max_length

    @classmethod
    def has_training_signal(cls, cfg):
        return True

    def auto_class(self):
        import transformers

        return transformers.AutoModelForSequenceClassification

    def load_data(self, tokenizer, files, *, build):
        out = {}
        for split, paths in files.items():
            lines = [ln for p in paths for ln in open(p, encoding="utf-8").read().splitlines()]
            ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
            out[split] = ToyData([np.asarray(x[: self.cfg.max_length]) for x in ids if x])
        return out

    def token_counts(self, data):
        return {"mse": np.ones(len(data), dtype=np.int64)}

    def collate(self, data, indices, *, stream):
        seqs = [data.ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.from_numpy(s)
            mask[row, : len(s)] = 1
        return ToyBatch(ids, mask, int(mask.sum()))

    def loss(self, s_out, t_out, batch, w):
        target = t_out.logits.float() * self.opts.toy_target_scale
        m = FL.mse_loss(s_out.logits.float(), target, reduction="batchmean")
        total = m * (w["mse"] * w["world"])
        zero = m.detach() * 0
        return total, torch.stack([zero, zero, m.detach() * w["mse"], zero])

    @torch.inference_mode()
    def evaluate(self, student, teacher, data, *, score_teacher=False, **_):
        if data is None or teacher is None:
            return {}
        batch = self.collate(data, list(range(len(data))), stream=0).to(self.device)
        s = student(**batch.model_inputs(student)).logits.float()
        t = teacher(**batch.model_inputs(teacher)).logits.float() * self.opts.toy_target_scale
        return {"mse_to_teacher": float(((s - t) ** 2).mean())}


@pytest.fixture
def toy(tmp_path):
    register_task(ToyRegressionTask)
    lines = [f"word{i % 7} word{(3 * i) % 11} word{(5 * i) % 13} word{i % 5}" for i in range(96)]
    tok = build_word_tokenizer(lines, tmp_path / "tok")
    config = tiny_config("bert", len(tok), hidden=32, layers=2, tokenizer=tok)
    config.num_labels = 1
    config.problem_type = "regression"
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(
        tmp_path / "teacher"
    )
    tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "train.txt").write_text("\n".join(lines[:80]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines[80:]) + "\n")
    yield tmp_path
    unregister_task(ToyRegressionTask.name)


def _config(root, out, **kw):
    base = dict(
        task="toy-regression",
        teacher=str(root / "teacher"),
        train_files=[str(root / "train.txt")],
        eval_files=[str(root / "eval.txt")],
        output_dir=str(out),
        batch_size=8,
        max_steps=20,
        learning_rate=3e-3,
        log_interval=5,
        save_interval=10,
        progress_bar=False,
        tensorboard=False,
        toy_target_scale=2.0,
        num_threads=1,  # the same threads in every run: bit-identical resume
    )
    return base | kw


def test_a_task_defined_here_trains_through_the_unchanged_trainer(toy, capsys):
    assert get_task("toy-regression") is ToyRegressionTask
    assert train_main(["--help"]) == 0
    assert "--toy-target-scale" in capsys.readouterr().out
    with pytest.raises(ValueError, match="toy_target_scale must be > 0"):
        TrainConfig.from_dict(_config(toy, toy / "x", toy_target_scale=-1.0)).resolved()

    summary = train(TrainConfig.from_dict(_config(toy, toy / "run")))
    before = summary["eval_before"]["mse_to_teacher"]
    after = summary["eval_after"]["mse_to_teacher"]
    assert after < 0.5 * before, (before, after)
    records = [json.loads(x) for x in (toy / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert train_records[-1]["mse"] < train_records[0]["mse"]
    assert json.loads((toy / "run" / "config.json").read_text())["toy_target_scale"] == 2.0
    assert (toy / "run" / "final" / "model.safetensors").is_file()

    # The command line and resume work for it too: a run stopped at step 10 continues exactly.
    args = ["--task", "toy-regression", "--teacher", str(toy / "teacher")]
    args += ["--train-files", str(toy / "train.txt"), "--eval-files", str(toy / "eval.txt")]
    args += ["--output-dir", str(toy / "cli")]
    args += ["--batch-size", "8", "--learning-rate", "3e-3", "--log-interval", "5"]
    args += ["--save-interval", "10", "--no-progress-bar", "--no-tensorboard"]
    args += ["--toy-target-scale", "2.0", "--max-steps", "20", "--num-threads", "1"]
    with pytest.raises(Stop):
        train(TrainConfig.from_dict(_config(toy, toy / "cli")), on_step_end=stop_after(10))
    assert train_main([*args, "--resume"]) == 0
    from safetensors.torch import load_file

    resumed = load_file(str(toy / "cli" / "final" / "model.safetensors"))
    whole = load_file(str(toy / "run" / "final" / "model.safetensors"))
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)
