"""Data parallelism on an existing engine: DDP (``--parallel ddp``, the default) or FSDP2
(``--parallel fsdp``, ``torch.distributed.fsdp.fully_shard``) under torchrun.

FSDP2 shards each transformer layer and then the whole model, for the student (parameters,
gradients and AdamW moments) and the teacher (parameters only, gathered layer by layer during its
forward). Gradients are reduced across processes as DDP's are (averaged), so the trainer's loss
normalisation is the same for both. Checkpoints stay in the one format: the model and the
optimizer state are gathered into full (unsharded) state dicts on every process — a collective —
and rank 0 writes them; a resumed run loads the full state and shards it again. So an FSDP2
checkpoint is an ordinary ``from_pretrained`` directory, at the cost of one gathered copy of the
model on the host at save time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from fastdistill.train.student import layer_modules

PARALLEL = ("ddp", "fsdp")


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def shard(model: nn.Module) -> None:
    """FSDP2: each transformer layer, then the rest, as its own unit (in place)."""
    from torch.distributed.fsdp import fully_shard

    for layer in layer_modules(model):
        fully_shard(layer)
    fully_shard(model)


def wrap(student: nn.Module, kind: str, world: int, device: torch.device) -> nn.Module:
    """The module the training forward runs: the student itself (one process, or FSDP2 after
    :func:`shard`) or its DDP wrapper."""
    if world == 1 or kind == "fsdp":
        return student
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def no_sync(model: nn.Module, kind: str, skip: bool):
    """A context that skips the gradient reduction of an accumulation micro-batch (``skip``)."""
    if not skip:
        return contextlib.nullcontext()
    if kind == "fsdp":
        return _fsdp_no_sync(model)
    return model.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's local shard (or its full value when replicated)."""
    if is_dtensor(t):
        return t.full_tensor() if t.placements[0].is_replicate() else t.to_local()
    return t


def all_finite_everywhere(flag: torch.Tensor, world: int) -> torch.Tensor:
    """``flag`` (0-dim bool, this process's shards are finite) reduced over the processes."""
    if world == 1:
        return flag
    value = flag.float()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value > 0


def full_model_state(model: nn.Module, kind: str) -> dict | None:
    """The unsharded model state dict (FSDP2: gathered, a collective; ``None`` otherwise: the
    model saves itself)."""
    if kind != "fsdp" or not dist.is_initialized():
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model, optimizer, kind: str) -> dict | None:
    """The unsharded optimizer state dict keyed by parameter name (FSDP2, a collective)."""
    if kind != "fsdp" or not dist.is_initialized():
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Shard a full, name-keyed optimizer state back into an FSDP2 optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
