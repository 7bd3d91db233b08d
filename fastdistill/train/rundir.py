"""The run directory: what may be written where, and what a resumed run must share with the run it
continues.

* Never destroy a user's files: an output directory that is not empty and not a fastdistill run
  directory is refused unless ``--overwrite-output-dir``; one equal to or inside the teacher's,
  the student's or the tokenizer's directory is always refused. A run directory is marked by
  :data:`RUN_MARKER` when a run starts (directories of earlier versions are recognised by their
  ``metrics.jsonl``, ``checkpoints/`` or ``eval_results.json``).
* Resume continues *the same* run: every key that changes the training trajectory must equal the
  checkpoint's; only the keys in :data:`RESUME_MAY_CHANGE` (where and how often the run reports
  and saves) may differ. Differences are refused, each named with its old and new value.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RUN_MARKER = "fastdistill-run.json"
_LEGACY_RUN_FILES = ("metrics.jsonl", "checkpoints", "eval_results.json")
# Keys a resumed run may change: they decide what is logged, evaluated and kept, where the caches
# and devices are, not what is trained.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "overwrite_output_dir",
        "output_dir",
        "cache_dir",
        "device",
        "num_threads",
        "log_interval",
        "save_interval",
        "eval_interval",
        "eval_files",
        "eval_max_sequences",
        "keep_checkpoints",
        "progress_bar",
        "tensorboard",
        "max_consecutive_skips",
        "n_best_size",
        "max_answer_length",
        "null_score_diff_threshold",
    }
)


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file() or any((path / f).exists() for f in _LEGACY_RUN_FILES)


def _model_dirs(cfg) -> list[tuple[str, Path]]:
    """The local directories the run reads models and tokenizers from."""
    out = []
    for key in ("teacher", "student_pretrained", "student_config", "tokenizer"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists():
            p = Path(value).expanduser().resolve()
            out.append((key, p if p.is_dir() else p.parent))
    return out


def check_output_dir(cfg) -> None:
    """``ValueError`` when writing the run to ``cfg.output_dir`` could destroy files that are not
    the run's own (module doc)."""
    out = Path(cfg.output_dir).expanduser().resolve()
    for key, model in _model_dirs(cfg):
        if out == model or model in out.parents:
            where = "is" if out == model else "is inside"
            raise ValueError(
                f"output_dir {cfg.output_dir} {where} the {key} directory {model}: the run would "
                "write over it. Choose another --output-dir"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {cfg.output_dir} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out) and not cfg.overwrite_output_dir:
        raise ValueError(
            f"output_dir {cfg.output_dir} is not empty and is not a fastdistill run directory: "
            "choose an empty or new directory, or pass --overwrite-output-dir to write into it"
        )


def mark_run_dir(run_dir: Path) -> None:
    """Create the run directory (if needed) and its marker; ``ValueError`` if it is not writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"created": time.time()}) + "\n", encoding="utf-8")
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"cannot write to output_dir {run_dir} ({exc.strerror or exc}): choose a writable "
            "--output-dir"
        ) from None


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: old → new"`` for each training key whose value differs from the checkpoint's (keys
    the checkpoint did not record, added by a later version, cannot be compared)."""
    diffs = []
    for key in sorted(set(saved) & set(now)):
        if key not in RESUME_MAY_CHANGE and saved[key] != now[key]:
            diffs.append(f"{key}: {saved[key]!r} → {now[key]!r}")
    return diffs


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    diffs = resume_differences(saved, now)
    if diffs:
        may = ", ".join(sorted(RESUME_MAY_CHANGE - {"resume", "overwrite_output_dir"}))
        raise ValueError(
            f"--resume: these settings differ from the run's (checkpoint {checkpoint}): "
            + "; ".join(diffs)
            + ". Resume with the run's settings (its config.json) or start a new run in another "
            f"--output-dir. Only these may change on resume: {may}"
        )
