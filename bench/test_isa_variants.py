"""Every compiled CPU variant of the fused logits kernel, timed side by side.

The unit tests run every op on every instruction-set variant (tests/_oracle.py) but time nothing,
so a variant that silently drops out of its vector loops still passes them. That happened: for
part of one session the avx2 and baseline variants ran pass 2 and pass 3 as scalar loops (GCC
versioned them around stores through a struct's pointers), 6x slower, with the right results.

This times kl_div and distillation (three terms) forward + backward, fp32, on the BERT shape (the
suite's own inputs and calls: harness.InputCache, baselines.FASTDISTILL), on each variant this CPU
runs, interleaved (best of ``REPS``), and asserts that each narrower variant stays within
``MAX_SLOWDOWN`` of the widest. The bounds leave room for the real differences
(vector width, FMA, the AVX-512 loops' prefetch and page walks) and catch a fallback to scalar
code. The table is printed at the end of the run.
"""

from __future__ import annotations

import time

import pytest
import torch

from fastdistill import _native

from . import baselines, harness, shapes

REPS = 5
# Slowdown against the widest variant that still counts as vectorised code. Measured on the
# project's Zen 4 VM (this file, 2026-11-25): avx2 1.5x for both ops; baseline (SSE2, no FMA, no
# streaming stores) 3.4-3.5x for kl_div and 6.2-6.3x for distillation. The scalar loops of the bug
# above were 11x (avx2, kl_div, 2048 x 32000).
MAX_SLOWDOWN = {"avx512": 1.0, "avx2": 3.0, "baseline": 12.0}

pytestmark = pytest.mark.skipif(not _native.available(), reason="compiled core not built")

OPS = ("kl_div", "distillation")  # the suite's own calls (bench/baselines.py), T = 2


def _timed(fn, inp) -> float:
    x = inp.student.detach().requires_grad_()
    t0 = time.perf_counter()
    out = fn(x, inp.teacher, inp.labels)
    (out[0] if isinstance(out, tuple) else out).backward()
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def variant_times(input_cache):
    core = _native.core()
    isas = list(core.supported_isas())  # narrowest first
    before = core.isa()
    inp = input_cache.get(shapes.BERT, torch.float32)
    best: dict[tuple[str, str], float] = {}
    try:
        for op in OPS:
            fn = baselines.FASTDISTILL[op]
            for isa in isas:  # untimed warm-up: buffer pool, first-touch faults
                core.set_isa(isa)
                _timed(fn, inp)
            for _ in range(REPS):
                for isa in isas:
                    core.set_isa(isa)
                    dt = _timed(fn, inp)
                    best[op, isa] = min(best.get((op, isa), float("inf")), dt)
    finally:
        core.set_isa(before)
    widest = isas[-1]
    lines = [f"shape {shapes.BERT.describe()}, fp32 fwd+bwd, best of {REPS} interleaved", ""]
    lines.append("| op | " + " | ".join(f"{isa} ms" for isa in isas) + " |")
    lines.append("|---|" + "---:|" * len(isas))
    for op in OPS:
        row = [
            f"{best[op, isa] * 1e3:.1f} ({best[op, isa] / best[op, widest]:.2f}x)" for isa in isas
        ]
        lines.append(f"| {op} | " + " | ".join(row) + " |")
    harness.SUMMARY_LINES.extend(["", "CPU variants (bench/test_isa_variants.py)", *lines])
    return best, widest


@pytest.mark.parametrize("op", list(OPS))
def test_narrower_variants_stay_vectorised(variant_times, op):
    best, widest = variant_times
    for (name, isa), seconds in best.items():
        if name != op:
            continue
        ratio = seconds / best[op, widest]
        bound = MAX_SLOWDOWN.get(isa, 12.0)
        assert ratio <= bound, (
            f"{op} on the {isa} variant takes {ratio:.1f}x the {widest} time "
            f"({seconds * 1e3:.1f} vs {best[op, widest] * 1e3:.1f} ms; bound {bound}x): its inner "
            "loops have probably lost their vectorisation (check -fopt-info-vec for "
            "csrc/cpu/fused_logits.cpp in that variant)"
        )
