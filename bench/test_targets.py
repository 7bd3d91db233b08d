"""The CPU targets of the fused losses, measured in one run on this machine and asserted.

On the target shape (bench/shapes.py: TARGET, 2048 rows x V=32,000), temperature 2, fwd+bwd:

- kl_div_loss fp32 >= 20x faster than the eager seed formula, >= 4x faster than torch.compile of it;
- kl_div_loss extra peak memory <= 1.5x one logits tensor (eager needs several);
- distillation_loss with all three terms (alpha_kl=5, alpha_ce=2, alpha_mse=1, labels) costs
  <= 1.3x kl_div_loss alone;
- bf16 kl_div_loss at least as fast as fp32 (5% allowed for noise).

Timing: every implementation is checked against the float64 oracle and measured for peak memory
first (harness.prepare; torch.compile compiles there, outside the timing), then one untimed warm-up
pass, then ``--target-reps`` passes in which the implementations are interleaved (in a seeded random
order per pass), each timed with perf_counter around loss + backward. The best (min) time per
implementation is compared; medians are reported too. The table is printed at the end of the run
and, with ``--targets-json PATH``, written as JSON (bench/report.py reads it).
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest
import torch

from . import harness, shapes

FP32, BF16 = torch.float32, torch.bfloat16
MODE = "fwd+bwd"

# key -> (op, implementation, dtype)
CONTENDERS = {
    "fastdistill kl_div fp32": ("kl_div", "fastdistill", FP32),
    "eager kl_div fp32": ("kl_div", "eager", FP32),
    "compile kl_div fp32": ("kl_div", "compile", FP32),
    "fastdistill distillation fp32": ("distillation", "fastdistill", FP32),
    "fastdistill kl_div bf16": ("kl_div", "fastdistill", BF16),
}
FD_KL = "fastdistill kl_div fp32"

REQUIRED = {
    "kl_div fp32 speed-up vs eager": (">=", 20.0),
    "kl_div fp32 speed-up vs torch.compile": (">=", 4.0),
    "kl_div fp32 extra peak memory (x logits)": ("<=", 1.5),
    "eager kl_div extra peak memory (x logits)": (">=", 3.0),
    "distillation (3 terms) / kl_div time": ("<=", 1.3),
    "kl_div bf16 / fp32 time": ("<=", 1.05),
}


def _timed(prep: harness.Prepared) -> float:
    args, kwargs = prep.setup()
    t0 = time.perf_counter()
    prep.target(*args, **kwargs)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def measured(request, input_cache, copy_bw, targets_json_path):
    reps = request.config.getoption("--target-reps")
    shape = shapes.TARGET
    preps = {
        # torch.compile specialised to the target shape: its best case, a fixed-shape loop.
        key: harness.prepare(
            harness.Case(op, impl, shape, dtype, MODE, static_compile=True), input_cache
        )
        for key, (op, impl, dtype) in CONTENDERS.items()
    }
    keys = list(preps)
    load_before = os.getloadavg()[0]
    for key in keys:  # untimed warm-up pass
        _timed(preps[key])
    times: dict[str, list[float]] = {k: [] for k in keys}
    # A fresh gradient's first-touch cost depends on what the previous call freed (the eager
    # formula frees five logits-sized blocks; huge-page availability changes with it), so a fixed
    # or rotating order would always put the same contender behind the eager baseline. A seeded
    # shuffle per pass varies every contender's predecessor and stays reproducible.
    order = random.Random(2)
    pass_orders = []
    for _ in range(reps):
        keys_this_pass = keys[:]
        order.shuffle(keys_this_pass)
        pass_orders.append(keys_this_pass)
        for key in keys_this_pass:
            times[key].append(_timed(preps[key]))

    load_after = os.getloadavg()[0]
    best = {k: min(v) for k, v in times.items()}
    rows = {}
    for key, prep in preps.items():
        nbytes = prep.case.min_bytes()
        rows[key] = {
            "min_s": best[key],
            "median_s": statistics.median(times[key]),
            "times_s": times[key],
            "x_vs_fastdistill_kl_fp32": best[key] / best[FD_KL],
            "peak_extra_bytes": prep.peak_bytes,
            "peak_extra_x_logits": prep.peak_ratio,
            "peak_source": prep.memory_source,
            "peak_allocator_bytes": prep.allocator_peak_bytes,
            "peak_python_bytes": prep.python_peak_bytes,
            "peak_rss_bytes_crosscheck": prep.rss_peak_bytes,
            "min_bytes": nbytes,
            "eff_bw_GBps": nbytes / best[key] / 1e9,
            "eff_bw_frac_copy": nbytes / best[key] / copy_bw["bytes_per_s"],
            "loss_rel_err": prep.loss_err,
            "grad_rel_err": prep.grad_err,
            "compile_s": prep.warmup_seconds if prep.case.impl == "compile" else None,
        }
    values = {
        "kl_div fp32 speed-up vs eager": best["eager kl_div fp32"] / best[FD_KL],
        "kl_div fp32 speed-up vs torch.compile": best["compile kl_div fp32"] / best[FD_KL],
        "kl_div fp32 extra peak memory (x logits)": preps[FD_KL].peak_ratio,
        "eager kl_div extra peak memory (x logits)": preps["eager kl_div fp32"].peak_ratio,
        "distillation (3 terms) / kl_div time": best["fastdistill distillation fp32"] / best[FD_KL],
        "kl_div bf16 / fp32 time": best["fastdistill kl_div bf16"] / best[FD_KL],
    }

    # The same time ratios as the median over passes of the ratio within each pass: a burst of
    # load from other processes hits one pass, so this is steadier than a ratio of two minima
    # (shown for judging the noise; the targets are asserted on the minima, as specified).
    def paired(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    per_pass = {
        "kl_div fp32 speed-up vs eager": paired("eager kl_div fp32", FD_KL),
        "kl_div fp32 speed-up vs torch.compile": paired("compile kl_div fp32", FD_KL),
        "distillation (3 terms) / kl_div time": paired("fastdistill distillation fp32", FD_KL),
        "kl_div bf16 / fp32 time": paired("fastdistill kl_div bf16", FD_KL),
    }
    verdicts = {}
    for name, (op, bound) in REQUIRED.items():
        v = values[name]
        verdicts[name] = v >= bound if op == ">=" else v <= bound

    lines = [
        f"shape {shape.describe()}, T={shapes.TEMPERATURE}, {MODE}, {reps} interleaved reps, "
        f"copy bandwidth {copy_bw['bytes_per_s'] / 1e9:.1f} GB/s (read+write), "
        f"load average {load_before:.2f} before / {load_after:.2f} after the timed passes",
        "",
        "| implementation | best ms | median ms | x fastdistill kl fp32 | extra peak (x logits) "
        "| eff. GB/s | % of copy BW |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        lines.append(
            f"| {key} | {row['min_s'] * 1e3:.1f} | {row['median_s'] * 1e3:.1f} "
            f"| {row['x_vs_fastdistill_kl_fp32']:.2f} | {row['peak_extra_x_logits']:.2f} "
            f"| {row['eff_bw_GBps']:.2f} | {100 * row['eff_bw_frac_copy']:.0f}% |"
        )
    lines += [
        "",
        "| target | measured (ratio of best times) | median of per-pass ratios | required | |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (op, bound) in REQUIRED.items():
        pp = f"{per_pass[name]:.2f}" if name in per_pass else "-"
        lines.append(
            f"| {name} | {values[name]:.2f} | {pp} | {op} {bound:g} "
            f"| {'PASS' if verdicts[name] else 'FAIL'} |"
        )
    harness.SUMMARY_LINES.extend(lines)

    payload = {
        "machine": harness.machine_info(),
        "shape": {"name": shape.name, "rows": shape.rows, "vocab": shape.vocab},
        "temperature": shapes.TEMPERATURE,
        "reps": reps,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        "pass_orders": pass_orders,
        "copy_bw_bytes_per_s": copy_bw["bytes_per_s"],
        "rows": rows,
        "targets": {
            name: {
                "value": values[name],
                "median_per_pass": per_pass.get(name),
                "op": op,
                "bound": bound,
                "pass": verdicts[name],
            }
            for name, (op, bound) in REQUIRED.items()
        },
        "table_markdown": lines,
    }
    if targets_json_path:
        harness.write_json(targets_json_path, payload)
    return payload


def _check(measured, name):
    t = measured["targets"][name]
    assert t["pass"], f"{name}: measured {t['value']:.3f}, required {t['op']} {t['bound']:g}"


def test_kl_div_vs_eager(measured):
    _check(measured, "kl_div fp32 speed-up vs eager")


def test_kl_div_vs_compile(measured):
    _check(measured, "kl_div fp32 speed-up vs torch.compile")


def test_kl_div_peak_memory(measured):
    _check(measured, "kl_div fp32 extra peak memory (x logits)")


def test_eager_needs_several_logits(measured):
    # Not a target for fastdistill: a sanity check that the memory method sees the eager
    # formula's temporaries (if it reported ~1 here, the fastdistill figure would mean nothing).
    _check(measured, "eager kl_div extra peak memory (x logits)")


def test_distillation_overhead(measured):
    _check(measured, "distillation (3 terms) / kl_div time")


def test_bf16_not_slower(measured):
    _check(measured, "kl_div bf16 / fp32 time")
