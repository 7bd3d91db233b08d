"""Run metrics: one JSON line per log interval (``RUN/metrics.jsonl``), the same scalars in
tensorboard (``RUN/tensorboard``), and a figure of the run (``RUN/metrics.png``) drawn at the end
and by ``fastdistill report RUN_DIR``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
FIGURE_FILE = "metrics.png"
# Scalars written to tensorboard under train/<name> (the loss terms, optimisation, throughput).
SCALARS = (
    "loss",
    "kl",
    "ce",
    "mse",
    "cos",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "skipped_steps",
    "skipped_total",
)


class MetricsLogger:
    """Appends records to the JSONL file and mirrors the scalars to tensorboard (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if self.path.exists():
            # Keep the records up to the checkpoint we resume from; drop the ones a killed run wrote
            # after it (they will be written again) and, for a fresh run, all of them.
            kept = [
                r
                for r in read_metrics(self.path)
                if "step" in r and r["step"] <= resume_step and resume_step > 0
            ]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.run_dir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            prefix = record.get("kind", "train")
            for name, value in record.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and name != "step"
                ):
                    if prefix != "train" or name in SCALARS:
                        self._tb.add_scalar(f"{prefix}/{name}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


def plot_metrics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw loss terms, learning rate, gradient norm and throughput over steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no {METRICS_FILE}: is it a fastdistill-train run directory?"
        )
    train = [r for r in read_metrics(path) if r.get("kind", "train") == "train" and "step" in r]
    if not train:
        raise ValueError(f"{path} holds no training records yet")
    steps = [r["step"] for r in train]

    def series(name):
        values = [r.get(name) for r in train]
        return [math.nan if v is None else v for v in values]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0][0]
    for name in ("loss", "kl", "ce", "mse", "cos"):
        values = series(name)
        if any(isinstance(v, (int, float)) and v > 0 for v in values):
            ax.plot(steps, values, label=name)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend()
    ax.set_title("loss: weighted total and each term")
    ax.set_xlabel("step")
    axes[0][1].plot(steps, series("lr"))
    axes[0][1].set_title("learning rate")
    axes[0][1].set_xlabel("step")
    axes[1][0].plot(steps, series("grad_norm"))
    axes[1][0].set_title("gradient norm (before clipping)")
    axes[1][0].set_xlabel("step")
    ax = axes[1][1]
    ax.plot(steps, series("tokens_per_s"))
    ax.set_title("throughput (tokens/s)")
    ax.set_xlabel("step")
    skipped = series("skipped_total")
    if skipped and skipped[-1]:
        ax.text(0.02, 0.02, f"skipped steps: {skipped[-1]}", transform=ax.transAxes)
    fig.suptitle(f"fastdistill-train: {run_dir.resolve().name}")
    out = Path(out) if out is not None else run_dir / FIGURE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
