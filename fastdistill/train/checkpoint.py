"""Checkpoints: atomic, checksummed, pickle-free, enough to continue a run exactly.

Layout of ``RUN/checkpoints/step-00000100/``:

* ``model/``: the student in ``save_pretrained`` form (safetensors) plus the tokenizer, so a
  checkpoint loads with ``from_pretrained`` like any model;
* ``optimizer.safetensors``: the optimizer's per-parameter state tensors
  (``state.<param index>.<name>``);
* ``trainer_state.json``: step, data position (epoch, optimizer step within the epoch), optimizer
  param groups, LR-scheduler and GradScaler state, skipped-step counters, the config;
* ``checksums.json``, written last: the SHA-256 of every other file. A checkpoint is *intact* when
  every file it lists is there with that digest; resume verifies it and names a damaged file.

There is no RNG state to save: dropout is reseeded from (seed, step, rank) at every optimizer step
and per-example randomness is drawn from (seed, epoch, example index), so the step counter and data
position determine every random number that follows.

Writing: everything goes into ``checkpoints/.tmp-<pid>-*``, each file is fsynced, the directory is
renamed into place under a name no existing checkpoint has (re-saving step N, e.g. when a finished
run is resumed, writes ``step-0000000N-1``), and only then ``checkpoints/latest`` (the name of the
newest checkpoint) is replaced atomically; older checkpoints beyond ``keep`` are removed last. So a
crash at any point leaves ``latest`` naming a complete checkpoint, and partial copies left by a
killed process are removed at the next start (:func:`remove_leftovers`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastdistill.train import fsutil

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKSUMS = "checksums.json"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})(?:-(\d+))?$")
# Keys every trainer_state.json holds (a state missing one cannot be resumed).
STATE_KEYS = ("step", "epoch", "step_in_epoch", "total_steps", "scheduler", "config")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


# ---- writing -----------------------------------------------------------------------------------


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], list]:
    """``state.<param>.<name>`` tensors and the param groups of an optimizer state dict (params
    keyed by index, or by name for a gathered FSDP2 state)."""
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is not a tensor; cannot store it")
            tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
    return tensors, sd["param_groups"]


def _seal(tmp: Path) -> None:
    """fsync every file, then write and fsync ``checksums.json`` (the checkpoint's last file)."""
    sums = {}
    for f in _files(tmp):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        sums[f.relative_to(tmp).as_posix()] = fsutil.sha256(f)
    with open(tmp / CHECKSUMS, "w", encoding="utf-8") as fh:
        json.dump(sums, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for d in sorted({f.parent for f in _files(tmp)} | {tmp}, key=lambda p: -len(p.parts)):
        fsutil.fsync_dir(d)


def _free_name(root: Path, step: int) -> Path:
    base = f"step-{step:08d}"
    if not (root / base).exists():
        return root / base
    k = 1
    while (root / f"{base}-{k}").exists():
        k += 1
    return root / f"{base}-{k}"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``.
    ``model_state``/``optimizer_state``: full state dicts gathered from a sharded model (else the
    model and the optimizer give their own)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.make_tmp_dir(root)
    try:
        model.save_pretrained(tmp / "model", state_dict=model_state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        sd = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        tensors, groups = _optimizer_tensors(sd)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(trainer_state, step=step, optimizer_param_groups=groups)
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=_json_default))
        _seal(tmp)
        final = _free_name(root, step)
        os.replace(tmp, final)
        fsutil.fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsutil.write_text_atomic(root / LATEST, final.name + "\n")
    # Keep the newest `keep` by (step, re-save index), never the one just written.
    others = [p for p in _checkpoints(root) if p != final]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [p for *_, p in sorted(found)]


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Remove partial checkpoints left by a killed process (their writer is gone)."""
    removed = fsutil.remove_stale_tmp(checkpoint_root(run_dir))
    if removed:
        log.info("removed %d partial checkpoint(s) left by a killed run", len(removed))
    return removed


# ---- reading -------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names (``None`` when there is no marker); not verified."""
    root = checkpoint_root(run_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    return root / marker.read_text(encoding="utf-8", errors="replace").strip()


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    root = checkpoint_root(run_dir)
    return (root / LATEST).is_file() or bool(_checkpoints(root))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer state of an intact checkpoint; ``ValueError`` naming the damaged file."""
    if not path.is_dir():
        raise ValueError(f"{path} is missing")
    sums_file = path / CHECKSUMS
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{sums_file} is damaged ({exc})") from None
        for rel, digest in sums.items():
            f = path / rel
            if not f.is_file():
                raise ValueError(f"{f} is missing")
            if fsutil.sha256(f) != digest:
                raise ValueError(f"{f} does not match its checksum (damaged or edited)")
    else:  # written before checksums were recorded: only the state can be checked
        log.warning("%s has no %s: its files cannot be verified", path, CHECKSUMS)
    return load_trainer_state(path)


def load_trainer_state(path: Path) -> dict[str, Any]:
    f = path / STATE
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{f} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f} is damaged ({exc})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{f} lacks {', '.join(missing)}: not a trainer state of this version")
    return state


def resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint and its state: the one ``latest`` names, else the newest
    other one, each damaged one skipped with a warning that says why. ``None`` when there is
    none at all; ``ValueError`` listing the reasons when every one is damaged."""
    root = checkpoint_root(run_dir)
    named = latest_checkpoint(run_dir)
    candidates = list(reversed(_checkpoints(root)))
    if named is not None:
        candidates = [named] + [p for p in candidates if p != named]
    if not candidates:
        return None
    reasons = []
    for path in candidates:
        try:
            return path, verify_checkpoint(path)
        except ValueError as exc:
            reasons.append(str(exc))
            log.warning("skipping checkpoint %s: %s", path.name, exc)
    raise ValueError(f"no intact checkpoint in {root}: " + "; ".join(reasons))


def load_optimizer(
    optimizer: torch.optim.Optimizer, path: Path, state: dict[str, Any], model=None
) -> None:
    """Restore the optimizer of a checkpoint: index-keyed states directly; name-keyed ones (a
    gathered FSDP2 state) sharded again through ``model``."""
    f = path / "optimizer.safetensors"
    try:
        tensors = load_file(str(f))
        per_param: dict[Any, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            param, name = key.split(".", 1)[1].rsplit(".", 1)
            per_param.setdefault(int(param) if param.isdigit() else param, {})[name] = value
        groups = state["optimizer_param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        full = {"state": per_param, "param_groups": groups}
        if any(isinstance(k, str) for k in per_param) or (
            groups and groups[0]["params"] and isinstance(groups[0]["params"][0], str)
        ):
            from fastdistill.train.parallel import load_full_optimizer_state

            load_full_optimizer_state(model, optimizer, full)
        else:
            optimizer.load_state_dict(full)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{f}: cannot restore the optimizer ({exc})") from None


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in trainer_state.json")
