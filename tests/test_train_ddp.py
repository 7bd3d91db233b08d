"""Two processes with gloo (DDP, as torchrun launches them) give the weights of one process that
sees the same global batch."""

from __future__ import annotations

import json

import transformers
from _ddp import train_two_processes_and_one
from _tiny import tiny_inputs
from safetensors.torch import load_file

from fastdistill.train.student import init_student_from_teacher


def test_two_gloo_processes_equal_one_process(tmp_path):
    paths = tiny_inputs(tmp_path / "in", arch="bert", task="mlm", lines=300, vocab_size=400)
    common = dict(
        teacher=paths["teacher"],
        train_files=[paths["train"]],
        eval_files=[paths["eval"]],
        max_length=32,
        gradient_accumulation_steps=2,
        max_steps=4,
        log_interval=2,
        save_interval=2,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_max_sequences=16,
        progress_bar=False,
        tensorboard=False,
        device="cpu",
    )
    one = train_two_processes_and_one(tmp_path, common, global_batch=8)
    assert one["steps"] == 4
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    teacher = transformers.AutoModelForMaskedLM.from_pretrained(paths["teacher"])
    init = init_student_from_teacher(teacher).state_dict()
    for k in a:
        if k.endswith("attention.self.key.bias"):
            # Softmax ignores a key bias: its true gradient is 0, so what it gets is round-off,
            # which Adam's normalisation blows up to lr-sized steps of random sign. Not comparable.
            continue
        # The two runs sum gradients in a different order (all-reduce): fp32 round-off, which
        # Adam's normalisation enlarges where gradients nearly cancel. So compare the updates.
        update = (a[k] - init[k]).norm()
        assert (b[k] - a[k]).norm() <= 1e-3 * update + 1e-6, k
    # The logged losses are the global means in both runs.

    def losses(run):
        return [
            json.loads(x)["loss"]
            for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"
        ]

    for x, y in zip(losses("one"), losses("two"), strict=True):
        assert abs(x - y) <= 1e-4 * abs(x)
    assert len(list((tmp_path / "c2").iterdir())) == 2  # train + eval caches, built once each
