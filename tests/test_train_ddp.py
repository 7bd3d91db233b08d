"""Two processes with gloo (DDP, as torchrun launches them) give the weights of one process that
sees the same global batch."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from fastdistill.train import TrainConfig, train
from fastdistill.train.demo import tiny_inputs
from fastdistill.train.student import init_student_from_teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: dict) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    train(TrainConfig(**config))


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
    # Each run builds its own cache: in the 2-process run rank 0 builds it, rank 1 only reads it.
    two = dict(
        common, batch_size=4, output_dir=str(tmp_path / "two"), cache_dir=str(tmp_path / "c2")
    )
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(
            TrainConfig(
                **common,
                batch_size=8,
                output_dir=str(tmp_path / "one"),
                cache_dir=str(tmp_path / "c1"),
            )
        )
    finally:
        torch.set_num_threads(threads)
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
