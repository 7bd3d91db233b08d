"""Checkpoints: atomic, pickle-free, enough to continue a run exactly.

Layout of ``RUN/checkpoints/step-00000100/``:

* ``model/``: the student in ``save_pretrained`` form (safetensors) plus the tokenizer, so a
  checkpoint loads with ``from_pretrained`` like any model;
* ``optimizer.safetensors``: the optimizer's per-parameter state tensors
  (``state.<param index>.<name>``);
* ``trainer_state.json``: step, data position (epoch, optimizer step within the epoch), optimizer
  param groups, LR-scheduler and GradScaler state, skipped-step counters, the config.

There is no RNG state to save: dropout is reseeded from (seed, step, rank) at every optimizer step
and MLM masks are drawn from (seed, epoch, sequence index), so the step counter and data position
determine every random number that follows.

A checkpoint is written into ``checkpoints/.tmp-*`` and renamed into place with ``os.replace``;
then ``checkpoints/latest`` (the name of the newest complete checkpoint) is replaced the same way.
A crash at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is not a tensor; cannot store it")
            tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(trainer_state, step=step, optimizer_param_groups=groups)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(root / LATEST, final.name + "\n")
    # Keep the newest `keep` by step (zero-padded names sort by step), never the one just written.
    others = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(run_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"{marker} names {path.name}, which is not a complete checkpoint")
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, state: dict[str, Any]) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = value
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in trainer_state.json")
