"""What the trainer accumulates between two log lines, on the device.

Every optimizer step adds its loss terms, gradient norm and finite/skipped flags to device tensors
with no host sync; :meth:`IntervalStats.read` is the one sync per log interval. A skipped
(non-finite) step adds nothing to the means; it counts as skipped, and the run of consecutive skips
is tracked so the trainer can stop a run going bad.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist

from fastdistill.train.tasks.base import LOSS_TERMS


class IntervalStats:
    def __init__(self, device: torch.device):
        z = lambda n=(): torch.zeros(n, device=device)  # noqa: E731
        self.terms = z(1 + len(LOSS_TERMS))  # total, then each loss term
        self.grad_norm = z()
        self.ok = z()
        self.skipped = z()
        self.consecutive = z()  # consecutive skips up to now (carried across intervals)
        self.max_consecutive = z()  # most consecutive skips within the interval
        self.tokens = 0  # host-side: tokens of the interval's batches, all processes
        self.start = time.perf_counter()

    def add_step(self, ok, loss, terms, grad_norm) -> None:
        """One optimizer step's values (``ok``: 0-dim bool, all finite)."""
        okf = ok.float()
        self.terms += torch.where(ok, torch.cat([loss.reshape(1), terms]), 0.0)
        self.grad_norm += torch.where(ok, grad_norm.float(), 0.0)
        self.ok += okf
        self.skipped += 1 - okf
        self.consecutive = torch.where(ok, 0.0, self.consecutive + 1)
        self.max_consecutive = torch.maximum(self.max_consecutive, self.consecutive)

    def read(self, world: int, *, params_ok: torch.Tensor) -> dict[str, Any]:
        """The interval's means and counters (one host sync), and a reset for the next one.
        Keys: loss and each loss term, grad_norm (means over the finite steps, NaN when none was),
        n_ok, n_skipped, max_consecutive, consecutive_now, tokens_per_s, and params_ok (the
        0-dim bool ``params_ok``, read in the same sync)."""
        if world > 1:  # each process holds its share of the step means: sum them
            dist.all_reduce(self.terms)
        extra = torch.stack(
            [
                self.grad_norm,
                self.ok,
                self.skipped,
                self.max_consecutive,
                self.consecutive,
                params_ok.to(self.ok.dtype),
            ]
        )
        values = torch.cat([self.terms, extra]).tolist()
        n = len(self.terms)
        gnorm, n_ok, n_skip, max_consec, consec_now, p_ok = values[n:]
        d = n_ok if n_ok > 0 else math.nan
        now = time.perf_counter()
        out = {name: v / d for name, v in zip(("loss", *LOSS_TERMS), values[:n], strict=True)}
        out.update(
            grad_norm=gnorm / d,
            n_ok=int(n_ok),
            n_skipped=int(n_skip),
            max_consecutive=int(max_consec),
            consecutive_now=int(consec_now),
            params_ok=bool(p_ok),
            tokens_per_s=self.tokens / max(now - self.start, 1e-9),
        )
        for t in (self.terms, self.grad_norm, self.ok, self.skipped, self.max_consecutive):
            t.zero_()
        self.tokens, self.start = 0, now
        return out

    def restart_clock(self) -> None:
        """Exclude time spent since the last read (an evaluation) from tokens/s."""
        self.start = time.perf_counter()


def finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf floats as ``None`` (JSON null)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def train_record(step: int, epoch: int, values: dict[str, Any], lr: float, skipped_total: int):
    """The metrics.jsonl record of one log interval (NaN/inf as null)."""
    record = {"kind": "train", "step": step, "epoch": epoch}
    record.update({k: values[k] for k in ("loss", *LOSS_TERMS)})
    record.update(
        lr=lr,
        grad_norm=values["grad_norm"],
        tokens_per_s=values["tokens_per_s"],
        skipped_steps=values["n_skipped"],
        skipped_total=skipped_total,
        time=time.time(),
    )
    return finite_or_none(record)
