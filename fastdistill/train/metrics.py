"""Run metrics: one JSON line per log interval (``RUN/metrics.jsonl``) and one per held-out
evaluation (``"kind": "eval"``), the same scalars in tensorboard (``RUN/tensorboard``), and a
figure of the run (``RUN/metrics.png``: training curves and every held-out metric) drawn at the end
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
    """Draw loss terms, learning rate, gradient norm and throughput over steps into a PNG, and
    below them every held-out metric of the ``eval`` records (one panel per metric family; the
    teacher's value of a metric, ``teacher_<name>``, dashed in its panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no {METRICS_FILE}: is it a fastdistill-train run directory?"
        )
    records = read_metrics(path)
    train = [r for r in records if r.get("kind", "train") == "train" and "step" in r]
    if not train:
        raise ValueError(f"{path} holds no training records yet")
    panels = eval_panels([r for r in records if r.get("kind") == "eval" and "step" in r])
    columns = max(2, min(4, len(panels)))  # held-out panels per row
    eval_rows = -(-len(panels) // columns)
    fig = plt.figure(figsize=(11, 7 + 2.8 * eval_rows), constrained_layout=True)
    grid = fig.add_gridspec(2 + eval_rows, 2 * columns, height_ratios=[1.3] * 2 + [1] * eval_rows)
    half = columns  # a training panel spans half the width
    train_axes = [
        fig.add_subplot(grid[r, c * half : (c + 1) * half]) for r in (0, 1) for c in (0, 1)
    ]
    _plot_training(train_axes, train)
    for i, (title, lines) in enumerate(panels.items()):
        row, col = 2 + i // columns, i % columns
        _plot_eval(fig.add_subplot(grid[row, 2 * col : 2 * col + 2]), title, lines)
    fig.suptitle(f"fastdistill-train: {run_dir.resolve().name}")
    out = Path(out) if out is not None else run_dir / FIGURE_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_training(axes, train: list[dict[str, Any]]) -> None:
    steps = [r["step"] for r in train]

    def series(name):
        values = [r.get(name) for r in train]
        return [math.nan if v is None else v for v in values]

    ax = axes[0]
    for name in ("loss", "kl", "ce", "mse", "cos"):
        values = series(name)
        if any(isinstance(v, (int, float)) and v > 0 for v in values):
            ax.plot(steps, values, label=name)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend()
    ax.set_title("loss: weighted total and each term")
    for ax, name, title in zip(
        axes[1:],
        ("lr", "grad_norm", "tokens_per_s"),
        ("learning rate", "gradient norm (before clipping)", "throughput (tokens/s)"),
        strict=True,
    ):
        ax.plot(steps, series(name))
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
    skipped = series("skipped_total")
    if skipped and skipped[-1]:
        axes[3].text(0.02, 0.02, f"skipped steps: {skipped[-1]}", transform=axes[3].transAxes)


def eval_panels(evals: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list, list]]]:
    """The held-out metrics of ``eval`` records as ``{panel title: {metric: (steps, values)}}``.

    Every number a task's ``evaluate`` returned is drawn, whatever the task. Metrics of one family
    share a panel, the family being the last ``_`` part of the name (squad: ``exact``,
    ``HasAns_exact``, ``best_exact`` in one panel; hidden: ``token_cosine`` and
    ``embedding_cosine``); ``teacher_<name>`` goes into the panel of ``<name>``. A step evaluated
    twice (a resumed run) keeps its last record."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in evals:
        by_step[r["step"]] = r
    series: dict[str, tuple[list, list]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            if name in ("kind", "step", "time"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    families: dict[str, dict[str, tuple[list, list]]] = {}
    for name in sorted(series, key=lambda n: n.startswith("teacher_")):
        own = name.removeprefix("teacher_") if name.startswith("teacher_") else name
        families.setdefault(own.rsplit("_", 1)[-1], {})[name] = series[name]
    return {
        (next(iter(lines)) if len(lines) == 1 else f"held-out {family}"): lines
        for family, lines in families.items()
    }


def _plot_eval(ax, title: str, lines: dict[str, tuple[list, list]]) -> None:
    for name, (steps, values) in lines.items():
        teacher = name.startswith("teacher_")
        if teacher and len(steps) == 1:
            # The teacher is scored once (before training): a level to compare against.
            ax.axhline(values[0], linestyle="--", color="grey", label=name)
        else:
            ax.plot(steps, values, "--" if teacher else "-", marker="o", label=name)
    ax.set_title(title if title.startswith("held-out") else f"held-out {title}")
    ax.set_xlabel("step")
    ax.legend(fontsize="small")


def append_eval(run_dir: str | os.PathLike, step: int, values: dict[str, Any]) -> None:
    """Append one held-out evaluation record to RUN/metrics.jsonl (after the logger closed)."""
    if values:
        with open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "eval", "step": step, **values}) + "\n")


def fmt(values: dict[str, Any]) -> str:
    """``key=value`` pairs of a record for a log line."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()
        if k not in ("kind", "time")
    )
