"""Which sequences each process sees in each micro-batch of each optimizer step.

The same plan on every process (seeded by seed and epoch). Examples are shuffled, sorted by length
inside windows of ``group_window`` global micro-batches (so padding is small, as in the DistilBERT
scripts' length groups), cut into global micro-batches of ``batch_size × world_size`` and shuffled
again; process r takes slice r of each global micro-batch. ``gradient_accumulation_steps``
consecutive micro-batches form one optimizer step; an epoch holds only whole steps. Every task's
data set gives the plan its examples' lengths; nothing else.
"""

from __future__ import annotations

import numpy as np


class BatchPlan:
    """Which sequences each process sees in each micro-batch of each optimizer step (module doc).

    ``steps(epoch)`` → list of optimizer steps; each is a list of ``accum`` global micro-batches,
    each an int64 array of ``batch_size × world_size`` sequence indices; ``local(mb, rank)`` is the
    slice of a global micro-batch that process ``rank`` computes. ``set_epoch`` mirrors
    DistributedSampler's: every process must use the same epoch."""

    group_window = (
        50  # global micro-batches sorted together (the DistilBERT scripts' length groups)
    )

    def __init__(
        self, lengths: np.ndarray, *, batch_size: int, world_size: int, accum: int, seed: int
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.accum = accum
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.epoch = 0
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"not enough data for one optimizer step: {len(self.lengths)} sequences, but one step "
                f"needs batch_size × world_size × gradient_accumulation_steps = "
                f"{self.global_batch * accum}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return (len(self.lengths) // self.global_batch) // self.accum

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, 1_000_003, epoch])
        perm = rng.permutation(len(self.lengths))
        m = self.global_batch
        window = m * self.group_window
        micro: list[np.ndarray] = []
        for start in range(0, len(perm), window):
            chunk = perm[start : start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            micro.extend(chunk[i : i + m] for i in range(0, len(chunk) - m + 1, m))
        order = rng.permutation(len(micro))
        micro = [micro[i] for i in order]
        n_steps = len(micro) // self.accum
        return [micro[s * self.accum : (s + 1) * self.accum] for s in range(n_steps)]

    def local(self, micro: np.ndarray, rank: int) -> np.ndarray:
        return micro[rank * self.batch_size : (rank + 1) * self.batch_size]
