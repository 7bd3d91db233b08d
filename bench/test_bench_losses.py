"""pytest-benchmark suite: every op x registry shape x {fwd, fwd+bwd}, for fastdistill (native
CPU core), the seed's eager formula and torch.compile of it (and Liger-Kernel on a GPU).

Each case is first run once under the memory profiler and checked against the float64 oracle
(loss, and the gradient on a spread of rows); a wrong result fails the test before anything is
timed. Each benchmark's extra_info carries the shape, dtype, peak extra memory (as a multiple of
one logits tensor) and effective bandwidth (minimal bytes / best time) as a fraction of this
machine's copy bandwidth measured in the same run.

    pytest bench/test_bench_losses.py -q                       # everything (a few minutes)
    pytest bench/test_bench_losses.py -q --bench-shapes bert   # one shape
"""

from __future__ import annotations

import pytest
import torch

from . import baselines, harness, shapes

FP32, BF16 = torch.float32, torch.bfloat16

# (op, dtype, implementations). kl_div and distillation are the products people compare in
# fp32 and bf16; the single terms in fp32. Liger has kl_div only (and is GPU-only).
MATRIX = [
    ("kl_div", FP32, ("fastdistill", "eager", "compile", "liger")),
    ("kl_div", BF16, ("fastdistill", "eager", "compile", "liger")),
    ("distillation", FP32, ("fastdistill", "eager", "compile")),
    ("distillation", BF16, ("fastdistill", "eager", "compile")),
    ("mse", FP32, ("fastdistill", "eager", "compile")),
    ("cross_entropy", FP32, ("fastdistill", "eager", "compile")),
    ("cosine", FP32, ("fastdistill", "eager", "compile")),
    # The LLM divergences against TRL's eager expressions and torch.compile of them, in fp32 (in
    # bf16 those expressions compute in bf16 and miss the float64 oracle by ~10% at V = 256,000,
    # past the sanity bound of the check before timing).
    ("reverse_kl", FP32, ("fastdistill", "eager", "compile")),
    ("jsd", FP32, ("fastdistill", "eager", "compile")),
    ("tvd", FP32, ("fastdistill", "eager", "compile")),
]
CASES = [
    pytest.param(op, dtype, impl, id=f"{op}-{harness.DTYPE_NAMES[dtype]}-{impl}")
    for op, dtype, impls in MATRIX
    for impl in impls
]


def run_case(benchmark, case: harness.Case, cache: harness.InputCache, copy_bw: dict) -> None:
    if case.impl == "liger":
        reason = baselines.liger_status("cpu")
        if reason:
            pytest.skip(reason)
    prep = harness.prepare(case, cache)  # raises (fails the test) on a wrong result
    rounds = harness.rounds_for(prep.check_seconds)
    benchmark.group = f"{case.op} {case.dtype_name} {case.mode} {case.shape.name}"
    info = benchmark.extra_info
    info.update(
        op=case.op,
        impl=case.impl,
        shape=case.shape.name,
        rows=case.shape.rows,
        cols=case.shape.hidden if case.hidden else case.shape.vocab,
        dtype=case.dtype_name,
        mode=case.mode,
        threads=torch.get_num_threads(),
        loss_rel_err=prep.loss_err,
        grad_rel_err=prep.grad_err,
        peak_extra_bytes=prep.peak_bytes,
        peak_extra_x_input=round(prep.peak_ratio, 3),
        peak_source=prep.memory_source,
        peak_allocator_bytes=prep.allocator_peak_bytes,
        peak_python_bytes=prep.python_peak_bytes,
        peak_rss_bytes_crosscheck=prep.rss_peak_bytes,
        min_bytes=case.min_bytes(),
        copy_bw_GBps=round(copy_bw["bytes_per_s"] / 1e9, 2),
    )
    if case.impl == "compile":
        info["compile_s"] = round(prep.warmup_seconds, 2)
    # The checked, profiled run in prepare() already warmed the case up (and compiled it); a slow
    # case gets no second warm-up round, a fast one gets one (the profiler run is not typical).
    warmup = 1 if prep.check_seconds < 0.5 else 0
    info["rounds"] = rounds
    benchmark.pedantic(
        prep.target, setup=prep.setup, rounds=rounds, iterations=1, warmup_rounds=warmup
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        best = stats.stats.min
        info["eff_bw_GBps"] = round(case.min_bytes() / best / 1e9, 2)
        info["eff_bw_frac_copy"] = round(case.min_bytes() / best / copy_bw["bytes_per_s"], 3)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("op,dtype,impl", CASES)
def test_loss(benchmark, op, dtype, impl, mode, shape, input_cache, copy_bw):
    run_case(benchmark, harness.Case(op, impl, shape, dtype, mode), input_cache, copy_bw)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("impl", ["fastdistill", "eager", "compile"])
def test_kl_div_masked(benchmark, impl, mode, input_cache, copy_bw, request):
    """The DistilBERT recipe on its own shape: KL over the attention-masked tokens. The seed
    masked_selects both (N, V) tensors; fastdistill takes the mask."""
    shape = shapes.BERT
    if shape not in shapes.select(request.config.getoption("--bench-shapes")):
        pytest.skip(f"shape {shape.name} not selected")
    run_case(
        benchmark, harness.Case("kl_div_masked", impl, shape, FP32, mode), input_cache, copy_bw
    )
