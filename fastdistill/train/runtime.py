"""The trainer's runtime pieces: processes (torchrun), the device, the learning-rate schedule and
the per-step dropout seed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job: (rank, world size, local rank); (0, 1, 0) alone."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@contextlib.contextmanager
def process_group(procs: Processes, device_kind: str) -> Iterator[None]:
    """Initialise the process group of a multi-process job (NCCL on GPUs, gloo on CPUs) unless the
    caller already did; destroy it on the way out if this created it."""
    owns = False
    if procs.world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        owns = True
    try:
        yield
    finally:
        if owns:
            dist.destroy_process_group()


def select_device(kind: str, local_rank: int) -> torch.device:
    """``kind`` = auto | cpu | cuda; with CUDA, the local rank's GPU."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG seed of one optimizer step (so a resumed run draws the same numbers)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def choose_threads(requested: int | None) -> int:
    """CPU threads for this process: ``requested``, else the cores that other processes are not
    using (cores minus the 1-minute load average, at least 1), shared among the processes of the
    job on this machine (torchrun's LOCAL_WORLD_SIZE). Threads beyond the free cores only spin
    against the other processes' (a run on a busy 2-core machine went 7x slower)."""
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    free = max(1, min(cores, round(cores - busy)))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, free // local)
