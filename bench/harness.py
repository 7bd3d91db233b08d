"""Shared machinery of the benchmarks, CPU suites and GPU benchmark alike: inputs, the float64
oracle and the check against it, running one case (correctness check + peak memory + timing
inputs), per-call timing, copy bandwidth and machine info.

A *case* is (op, implementation, shape, dtype, mode) with mode ``fwd`` (loss only, inputs do not
require grad) or ``fwd+bwd`` (loss, then ``loss.backward()`` into a fresh student leaf).
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdistill import reference

from . import baselines
from .baselines import DIVERGENCE_OPS, JSD_BETA
from .memory import peak_extra_memory
from .shapes import ALPHAS, TEMPERATURE, Shape

IMPLS = ("fastdistill", "eager", "compile", "liger")
MODES = ("fwd", "fwd+bwd")
IGNORE_INDEX = -100

# Relative tolerances of the pre-timing check (loss, gradient) against the float64 oracle.
# fp32: 1e-4 for everything. bf16: fastdistill does fp32 math on the bf16 inputs, so its loss is
# still fp32-accurate; its gradient is stored in bf16 (rounding ~2^-9 = 2e-3). The
# eager/compiled seed formulas compute *in* bf16 (their softmax, log and sums round at every
# step), so they get a loose bound: the check is there to catch a wrong baseline, not to grade
# its precision. The measured errors are recorded in extra_info either way.
TOLERANCES = {
    (torch.float32, "fastdistill"): (1e-4, 1e-4),
    (torch.float32, "eager"): (1e-4, 1e-4),
    (torch.float32, "compile"): (1e-4, 1e-4),
    (torch.float32, "liger"): (1e-4, 1e-4),
    (torch.bfloat16, "fastdistill"): (1e-4, 1e-2),
    (torch.bfloat16, "eager"): (5e-2, 5e-2),
    (torch.bfloat16, "compile"): (5e-2, 5e-2),
    (torch.bfloat16, "liger"): (5e-2, 5e-2),
}

# Lines the suites want shown at the end of the run (bench/conftest.py prints them; pytest
# captures what tests print).
SUMMARY_LINES: list[str] = []

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- inputs ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    student: torch.Tensor  # (rows, V) logits, or (rows, D) hidden states for cosine
    teacher: torch.Tensor
    labels: torch.Tensor  # (rows,) int64, every 8th row ignore_index (padding positions)
    mask: torch.Tensor  # (rows,) bool attention mask, the last 1/8 of each 64-token "sequence" off


def make_inputs(
    shape: Shape, dtype: torch.dtype, hidden: bool, seed: int, device: torch.device | str = "cpu"
) -> Inputs:
    """``shape.rows`` rows of logits (or hidden states), drawn in fp32 on ``device`` from ``seed``
    and rounded to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows, cols = shape.rows, (shape.hidden if hidden else shape.vocab)
    # Logits with a spread like a trained LM head (std ~3), teacher correlated with the student so
    # the KL is of a realistic size rather than that of two unrelated distributions.
    student = torch.randn(rows, cols, generator=g, device=device).mul_(3.0)
    teacher = torch.randn(rows, cols, generator=g, device=device).mul_(1.5).add_(student, alpha=0.8)
    labels = torch.randint(0, shape.vocab, (rows,), generator=g, device=device)
    labels[::8] = IGNORE_INDEX
    mask = (torch.arange(rows, device=device) % 64) < 56
    return Inputs(student.to(dtype), teacher.to(dtype), labels, mask)


class InputCache:
    """Inputs per (shape, dtype, hidden), generated once (randn of 65 M elements takes ~1 s) and
    kept for the few most recent keys: the suite is ordered by shape, so a small cache hits."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._items: OrderedDict[tuple, Inputs] = OrderedDict()
        self._refs: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(self, shape: Shape, dtype: torch.dtype, hidden: bool = False) -> Inputs:
        key = (shape.name, dtype, hidden)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        if dtype == torch.float32:
            made = make_inputs(shape, dtype, hidden, seed=1234 + shape.vocab + (7 if hidden else 0))
        else:
            # The same values rounded: a bf16 case sees the fp32 case's data.
            base = self.get(shape, torch.float32, hidden)
            made = Inputs(base.student.to(dtype), base.teacher.to(dtype), base.labels, base.mask)
        while len(self._items) >= self.keep:
            self._items.popitem(last=False)
        self._items[key] = made
        return made

    def reference_rows(self, shape: Shape, dtype: torch.dtype, hidden: bool = False):
        """float64 per-row oracle values (small vectors, so all are kept)."""
        key = (shape.name, dtype, hidden)
        if key not in self._refs:
            self._refs[key] = reference_rows(self.get(shape, dtype, hidden), hidden)
        return self._refs[key]


# ---- the float64 oracle -------------------------------------------------------------------


def reference_rows(
    inp: Inputs, hidden: bool, chunk_elems: int = 4_000_000
) -> dict[str, torch.Tensor]:
    """Per-row float64 values of every term, from fastdistill.reference on float64 copies of the
    (already rounded) inputs, in row chunks so the float64 copies stay small."""
    rows, cols = inp.student.shape
    step = max(1, chunk_elems // cols)
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, rows, step):
            s = inp.student[i : i + step].double()
            t = inp.teacher[i : i + step].double()
            if hidden:
                out.setdefault("cos", []).append(reference.cosine_rows(s, t))
                continue
            out.setdefault("kl", []).append(reference.kl_div_rows(s, t, TEMPERATURE))
            for name in DIVERGENCE_OPS:
                row = reference.divergence_rows(s, t, name, temperature=TEMPERATURE, beta=JSD_BETA)
                out.setdefault(name, []).append(row)
            out.setdefault("mse", []).append(reference.mse_rows(s, t))
            ce, valid = reference.cross_entropy_rows(s, inp.labels[i : i + step], IGNORE_INDEX)
            out.setdefault("ce", []).append(torch.where(valid, ce, 0.0))
    return {k: torch.cat(v) for k, v in out.items()}


def _row_terms(op: str, s, t, labels, mask, n_rows: int, n_valid: int, n_sel: int):
    """Per-row contributions to the loss of ``op`` (float64), already divided by the global
    normalisers, so that they sum to the loss over all rows and differentiate to its gradient."""
    if op == "kl_div":
        return reference.kl_div_rows(s, t, TEMPERATURE) / n_rows
    if op == "kl_div_masked":
        return torch.where(mask, reference.kl_div_rows(s, t, TEMPERATURE), 0.0) / n_sel
    if op == "mse":
        return reference.mse_rows(s, t) / n_rows
    if op in DIVERGENCE_OPS:
        return reference.divergence_rows(s, t, op, temperature=TEMPERATURE, beta=JSD_BETA) / n_rows
    if op == "cosine":
        return reference.cosine_rows(s, t) / n_rows
    ce, valid = reference.cross_entropy_rows(s, labels, IGNORE_INDEX)
    ce = torch.where(valid, ce, 0.0) / n_valid
    if op == "cross_entropy":
        return ce
    if op == "distillation":
        return (
            ALPHAS["alpha_kl"] * reference.kl_div_rows(s, t, TEMPERATURE) / n_rows
            + ALPHAS["alpha_ce"] * ce
            + ALPHAS["alpha_mse"] * reference.mse_rows(s, t) / n_rows
        )
    raise ValueError(f"unknown op {op!r}")


def expected_loss(op: str, ref: dict[str, torch.Tensor], inp: Inputs) -> float:
    n = inp.labels.numel()
    n_valid = int((inp.labels != IGNORE_INDEX).sum())
    if op == "kl_div":
        return float(ref["kl"].sum() / n)
    if op == "kl_div_masked":
        return float(ref["kl"][inp.mask].sum() / inp.mask.sum())
    if op == "mse":
        return float(ref["mse"].sum() / n)
    if op in DIVERGENCE_OPS:
        return float(ref[op].sum() / n)
    if op == "cross_entropy":
        return float(ref["ce"].sum() / n_valid)
    if op == "cosine":
        return float(ref["cos"].mean())
    if op == "distillation":
        return float(
            ALPHAS["alpha_kl"] * ref["kl"].sum() / n
            + ALPHAS["alpha_ce"] * ref["ce"].sum() / n_valid
            + ALPHAS["alpha_mse"] * ref["mse"].sum() / n
        )
    raise ValueError(f"unknown op {op!r}")


def check_rows(n: int) -> torch.Tensor:
    """Rows whose gradient is checked: both ends and the middle (thread-partition boundaries)."""
    picks = {0, 1, 2, n // 2 - 1, n // 2, n - 3, n - 2, n - 1, 7, 8, 63, 64}
    return torch.tensor(sorted(i for i in picks if 0 <= i < n))


def expected_grad_rows(op: str, inp: Inputs, idx: torch.Tensor) -> torch.Tensor:
    n = inp.labels.numel()
    n_valid = int((inp.labels != IGNORE_INDEX).sum())
    n_sel = int(inp.mask.sum())
    s = inp.student[idx].double().requires_grad_()
    t = inp.teacher[idx].double()
    terms = _row_terms(op, s, t, inp.labels[idx], inp.mask[idx], n, n_valid, n_sel)
    (grad,) = torch.autograd.grad(terms.sum(), s)
    return grad


def rel_err(x: torch.Tensor | float, ref: torch.Tensor | float) -> float:
    """``|x - ref| / |ref|`` in float64 (2-norms; on the host, whatever device x and ref are on)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def oracle_errors(
    loss: torch.Tensor | float,
    want_loss: float,
    loss_tol: float,
    grad: torch.Tensor | None = None,
    want_grad: torch.Tensor | None = None,
    grad_tol: float | None = None,
) -> tuple[float, float | None, list[str]]:
    """Relative errors of a loss (and of gradient rows, when given) against the float64 oracle,
    and what exceeds its tolerance, as (loss error, gradient error, problems)."""
    loss_err = rel_err(float(torch.as_tensor(loss).detach().double()), want_loss)
    grad_err = None if grad is None else rel_err(grad, want_grad)
    problems = []
    if not loss_err <= loss_tol:  # also catches NaN
        problems.append(f"loss rel. error {loss_err:.2e} > {loss_tol:.3g}")
    if grad_err is not None and not grad_err <= grad_tol:
        problems.append(f"gradient rel. error {grad_err:.2e} > {grad_tol:.3g}")
    return loss_err, grad_err, problems


# ---- one case --------------------------------------------------------------------------------


def unit_bytes(shape: Shape, dtype: torch.dtype, hidden: bool) -> int:
    """One input tensor (a logits tensor, or hidden states for cosine): the memory unit."""
    return shape.hidden_bytes(dtype) if hidden else shape.logits_bytes(dtype)


def min_bytes(op: str, shape: Shape, dtype: torch.dtype, backward: bool) -> int:
    """Bytes a perfect kernel moves: inputs read once, the gradient written once."""
    unit = unit_bytes(shape, dtype, op == "cosine")
    rows = shape.rows
    reads = {
        "kl_div": 2 * unit,
        "kl_div_masked": 2 * unit + rows,  # + bool mask
        "mse": 2 * unit,
        "cosine": 2 * unit,
        "cross_entropy": unit + 8 * rows,  # + int64 labels
        "distillation": 2 * unit + 8 * rows,
        "all_finite": 2 * unit,
        **dict.fromkeys(DIVERGENCE_OPS, 2 * unit),
    }[op]
    return reads + (unit if backward else 0)


def loss_step(fn: Callable, backward: bool) -> Callable[..., torch.Tensor]:
    """``(student, teacher, labels, mask) -> loss`` of a benchmark function (which may return a
    tuple whose first element is the loss), with ``loss.backward()`` when ``backward``."""

    def step(x, t, labels, mask):
        out = fn(x, t, labels, mask)
        loss = out[0] if isinstance(out, tuple) else out
        if backward:
            loss.backward()
        return loss

    return step


@dataclass
class Case:
    op: str
    impl: str
    shape: Shape
    dtype: torch.dtype
    mode: str
    static_compile: bool = False  # compile: specialise to this shape (dynamic=False)

    @property
    def hidden(self) -> bool:
        return self.op == "cosine"

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.op}/{self.impl}/{self.shape.name}/{self.dtype_name}/{self.mode}"

    def unit_bytes(self) -> int:
        return unit_bytes(self.shape, self.dtype, self.hidden)

    def min_bytes(self) -> int:
        return min_bytes(self.op, self.shape, self.dtype, self.mode == "fwd+bwd")

    def fn(self) -> Callable:
        if self.impl == "fastdistill":
            return baselines.FASTDISTILL[self.op]
        if self.impl == "eager":
            return baselines.EAGER[self.op]
        if self.impl == "compile":
            if self.static_compile:
                return baselines.compiled(self.op, (self.shape.name, self.dtype, self.mode))
            # One dynamic-shape graph per (op, dtype, mode) serves every registry shape: compiling
            # each shape separately would cost more than all the timing on 2 cores.
            return baselines.compiled(self.op, (self.dtype, self.mode), dynamic=True)
        if self.impl == "liger":
            return baselines.LIGER[self.op]
        raise ValueError(f"unknown implementation {self.impl!r}")


@dataclass
class Prepared:
    """What a benchmark needs for one case: setup/target for timing plus the check results."""

    case: Case
    setup: Callable[[], tuple[tuple, dict]]
    target: Callable[..., torch.Tensor]
    loss_err: float
    grad_err: float | None
    peak_bytes: int
    check_seconds: float
    warmup_seconds: float = 0.0  # compile time for torch.compile
    memory_source: str = "allocator"  # which counter carries peak_bytes (bench/memory.py)
    rss_peak_bytes: int | None = None
    allocator_peak_bytes: int | None = None
    python_peak_bytes: int | None = None

    @property
    def peak_ratio(self) -> float:
        return self.peak_bytes / self.case.unit_bytes()


class CheckFailed(AssertionError):
    pass


def prepare(case: Case, cache: InputCache, check: bool = True) -> Prepared:
    """Build setup/target for ``case``; compile (if needed) outside any timing; run it once under
    the memory profiler and check loss and gradient against the float64 oracle."""
    inp = cache.get(case.shape, case.dtype, case.hidden)
    fn = case.fn()
    backward = case.mode == "fwd+bwd"
    mask = inp.mask if case.op == "kl_div_masked" else None

    def setup():
        x = inp.student.detach().requires_grad_(backward)
        return (x, inp.teacher, inp.labels, mask), {}

    target = loss_step(fn, backward)

    warm = 0.0
    if case.impl == "compile":
        # Compilation (and the first-call autotuning) stays out of the profile and the timing.
        t0 = time.perf_counter()
        args, _ = setup()
        target(*args)
        warm = time.perf_counter() - t0

    holder = {}

    def once():
        args, _ = setup()
        holder["x"] = args[0]
        return target(*args)

    # A buffer pool that already holds a gradient-sized block would make the call look free;
    # measure what one call needs (the pool is refilled by the call itself).
    gc.collect()  # a previous case's gradient kept alive by a reference cycle goes now
    empty_library_caches()
    t0 = time.perf_counter()
    mem = peak_extra_memory(once)
    check_seconds = time.perf_counter() - t0
    loss = mem.result
    x = holder.pop("x")

    loss_tol, grad_tol = TOLERANCES[(case.dtype, case.impl)]
    loss_err = grad_err = None
    if check:
        ref = cache.reference_rows(case.shape, case.dtype, case.hidden)
        grad = want_grad = None
        if backward:
            idx = check_rows(case.shape.rows)
            grad, want_grad = x.grad[idx], expected_grad_rows(case.op, inp, idx)
        loss_err, grad_err, problems = oracle_errors(
            loss, expected_loss(case.op, ref, inp), loss_tol, grad, want_grad, grad_tol
        )
        if problems:
            raise CheckFailed(f"{case.label}: " + "; ".join(problems))
    del x, loss
    prep = Prepared(case, setup, target, loss_err, grad_err, mem.peak_bytes, check_seconds, warm)
    prep.memory_source = mem.source
    prep.rss_peak_bytes = mem.rss_peak_bytes
    prep.allocator_peak_bytes = mem.allocator_peak_bytes
    prep.python_peak_bytes = mem.python_peak_bytes
    return prep


def empty_library_caches() -> None:
    """Release fastdistill's pooled CPU gradient buffers, where the installed version has them."""
    try:
        from fastdistill import _buffers
    except ImportError:
        return
    empty = getattr(_buffers, "empty_cache", None)
    if callable(empty):
        empty()


def rounds_for(seconds_per_call: float, budget: float = 1.0, lo: int = 2, hi: int = 10) -> int:
    """Few rounds for slow cases, more for fast ones (whose noise is relatively larger)."""
    if seconds_per_call <= 0:
        return hi
    return max(lo, min(hi, int(budget / seconds_per_call)))


# ---- timing ---------------------------------------------------------------------------------


def time_calls(
    fn: Callable[..., object],
    n: int,
    device: torch.device | str = "cpu",
    before: Callable[[], tuple] = tuple,
) -> list[float]:
    """Seconds of ``n`` calls ``fn(*before())``, each timed on its own; ``before`` runs outside
    the timed region (fresh inputs, a cache flush), as does dropping what it returned.

    On a CUDA device each call sits between its own pair of CUDA events and the host synchronises
    once, after the last call; on the CPU each call is timed with ``perf_counter``."""
    if torch.device(device).type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends, strict=True):
            args = before()
            start.record()
            fn(*args)
            end.record()
            del args  # e.g. the student leaf and its gradient, as zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)]
    times = []
    for _ in range(n):
        args = before()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        del args
    return times


def copy_bandwidth(
    device: torch.device | str = "cpu", nbytes: int | None = None, reps: int = 20
) -> dict[str, float]:
    """``dst.copy_(src)`` on a pre-allocated, pre-touched buffer pair, timed ``reps`` times
    (time_calls): 256 MiB on the CPU, 1 GiB on a GPU (past any L2 cache) unless ``nbytes`` says.

    Bandwidth counts bytes read plus bytes written (2 x nbytes), the same accounting as the
    benchmarks' minimal bytes (inputs read + gradient written). ``bytes_per_s`` is from the best
    time (the CPU suites' figure), ``bytes_per_s_median`` from the median (the GPU benchmark's)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else 256 * 2**20
    n = nbytes // 4
    src = torch.ones(n, device=device)  # ones/zeros write every page: nothing first-touched later
    dst = torch.zeros(n, device=device)
    for _ in range(3 if device.type == "cuda" else 1):
        dst.copy_(src)
    times = sorted(time_calls(functools.partial(dst.copy_, src), reps, device))
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    best, median = times[0], statistics.median(times)
    return {
        "bytes": 2 * nbytes,
        "reps": reps,
        "seconds": best,
        "seconds_median": median,
        "bytes_per_s": 2 * nbytes / best,
        "bytes_per_s_median": 2 * nbytes / median,
    }


# ---- machine ----------------------------------------------------------------------------------


def command_output(cmd: list[str], cwd: str | None = None) -> str | None:
    """Stripped stdout of ``cmd``, or None when it is missing, fails or takes over 30 s."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str:
    """The source tree measured (``+dirty``: with uncommitted changes, as while developing)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = command_output(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    dirty = command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return (head or "unknown") + ("+dirty" if dirty else "")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install must not take the benchmark down
        return f"not importable ({type(exc).__name__})"
    return triton.__version__


def software_info() -> dict[str, str]:
    """What every benchmark report records about the code measured and its stack."""
    try:
        import fastdistill

        fd_version = getattr(fastdistill, "__version__", "?")
    except Exception:
        fd_version = "?"
    return {
        "commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fastdistill": fd_version,
        "platform": platform.platform(),
    }


def machine_info() -> dict[str, str]:
    """The CPU suites' machine record: software_info and the CPU, cores, ISA variant, load."""
    cpu = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa_flags = [
        f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags
    ]
    try:
        from fastdistill import _native

        isa = _native.core().isa()
    except Exception as exc:
        isa = f"unavailable ({exc})"
    return {
        **software_info(),
        "cpu": cpu,
        "cpu_flags": " ".join(isa_flags),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "fastdistill_isa": isa,
        "backend": os.environ.get("FASTDISTILL_BACKEND", "auto"),
        # Other work on the machine skews every number (2 cores: one busy core halves a 2-thread
        # kernel); recorded so a reader can tell a quiet run from a contended one.
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
    }


def gpu_machine_info(device: torch.device) -> dict:
    """The GPU benchmark's machine record: software_info and the card, driver, CUDA, nvcc, Liger,
    whether the core has CUDA kernels, and the command line."""
    props = torch.cuda.get_device_properties(device)
    smi = command_output(
        [
            "nvidia-smi",
            f"--id={device.index or 0}",
            "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
            "--format=csv,noheader",
        ]
    )
    nvcc = command_output(["nvcc", "--version"])
    try:
        from fastdistill import _native

        cuda_built = (
            bool(_native.core().built_with_cuda()) if _native.available() else "core missing"
        )
    except Exception as exc:
        cuda_built = f"unknown ({exc})"
    return {
        **software_info(),
        "gpu": torch.cuda.get_device_name(device),
        "capability": f"{props.major}.{props.minor}",
        "sms": getattr(props, "multi_processor_count", None),
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "l2_MB": round(getattr(props, "L2_cache_size", 0) / 1e6, 1) or None,
        "nvidia_smi": smi,
        "cuda_torch": torch.version.cuda,
        "nvcc": next((ln for ln in nvcc.splitlines() if "release" in ln), None) if nvcc else None,
        "liger_kernel": baselines.liger_version() or "not installed",
        "fastdistill_cuda_kernels_built": cuda_built,
        "FASTDISTILL_CUDA_ARCHS": os.environ.get("FASTDISTILL_CUDA_ARCHS"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
