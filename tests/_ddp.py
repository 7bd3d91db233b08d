"""The two-processes-versus-one harness of the DDP tests: gloo processes started the way torchrun
starts them, and the same run in one process for comparison."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fastdistill.train import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stop(Exception):
    """Raised after optimizer step ``stop_at``: a run killed there (by every process)."""


def stop_after(step: int | None):
    """An ``on_step_end`` hook that raises :class:`Stop` after optimizer step ``step``."""

    def hook(s):
        if s == step:
            raise Stop

    return hook


def _worker(rank: int, world: int, port: int, config: dict, stop_at: int | None = None) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)

    try:
        train(TrainConfig.from_dict(config), on_step_end=stop_after(stop_at))
    except Stop:
        pass


def run_processes(config: dict, world: int = 2, stop_at: int | None = None) -> None:
    """Train ``config`` in ``world`` gloo processes (stopping all after step ``stop_at``)."""
    mp.spawn(_worker, args=(world, _free_port(), config, stop_at), nprocs=world, join=True)


def train_two_processes_and_one(tmp_path: Path, common: dict, *, global_batch: int) -> dict:
    """Train ``common`` with 2 processes (batch ``global_batch // 2`` each, into tmp_path/two,
    cache tmp_path/c2) and with 1 process (batch ``global_batch``, tmp_path/one, cache
    tmp_path/c1): each run builds its own cache, and in the 2-process run rank 0 builds it while
    rank 1 only reads it. Returns the one-process run's summary."""
    two = dict(
        common,
        batch_size=global_batch // 2,
        output_dir=str(tmp_path / "two"),
        cache_dir=str(tmp_path / "c2"),
    )
    mp.spawn(_worker, args=(2, _free_port(), two), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        return train(
            TrainConfig.from_dict(
                dict(
                    common,
                    batch_size=global_batch,
                    output_dir=str(tmp_path / "one"),
                    cache_dir=str(tmp_path / "c1"),
                )
            )
        )
    finally:
        torch.set_num_threads(threads)
