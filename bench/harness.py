"""Shared machinery of the benchmark suites: inputs, the float64 oracle, running one case
(correctness check + peak memory + timing inputs), copy bandwidth and machine info.

A *case* is (op, implementation, shape, dtype, mode) with mode ``fwd`` (loss only, inputs do not
require grad) or ``fwd+bwd`` (loss, then ``loss.backward()`` into a fresh student leaf).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdistill import reference

from . import baselines
from .memory import peak_extra_memory
from .shapes import ALPHAS, TEMPERATURE, Shape

IMPLS = ("fastdistill", "eager", "compile", "liger")
MODES = ("fwd", "fwd+bwd")
IGNORE_INDEX = -100

# Relative tolerances of the pre-timing check (loss, gradient) against the float64 oracle.
# fp32: the brief's 1e-4 for everything. bf16: fastdistill does fp32 math on the bf16 inputs, so
# its loss is still fp32-accurate; its gradient is stored in bf16 (rounding ~2^-9 = 2e-3). The
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


def _make_inputs(shape: Shape, dtype: torch.dtype, hidden: bool) -> Inputs:
    g = torch.Generator().manual_seed(1234 + shape.vocab + (7 if hidden else 0))
    cols = shape.hidden if hidden else shape.vocab
    # Logits with a spread like a trained LM head (std ~3), teacher correlated with the student so
    # the KL is of a realistic size rather than that of two unrelated distributions.
    student = torch.randn(shape.rows, cols, generator=g).mul_(3.0)
    teacher = torch.randn(shape.rows, cols, generator=g).mul_(1.5).add_(student, alpha=0.8)
    labels = torch.randint(0, shape.vocab, (shape.rows,), generator=g)
    labels[::8] = IGNORE_INDEX
    mask = (torch.arange(shape.rows) % 64) < 56
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
            made = _make_inputs(shape, dtype, hidden)
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
            self._refs[key] = _reference_rows(self.get(shape, dtype, hidden), hidden)
        return self._refs[key]


# ---- the float64 oracle -------------------------------------------------------------------


def _reference_rows(
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
    x = torch.as_tensor(x, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


# ---- one case --------------------------------------------------------------------------------


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
        """One input tensor (a logits tensor, or hidden states for cosine): the memory unit."""
        return (
            self.shape.hidden_bytes(self.dtype)
            if self.hidden
            else self.shape.logits_bytes(self.dtype)
        )

    def min_bytes(self) -> int:
        """Bytes a perfect kernel moves: inputs read once, the gradient written once."""
        unit = self.unit_bytes()
        rows = self.shape.rows
        reads = {
            "kl_div": 2 * unit,
            "kl_div_masked": 2 * unit + rows,  # + bool mask
            "mse": 2 * unit,
            "cosine": 2 * unit,
            "cross_entropy": unit + 8 * rows,  # + int64 labels
            "distillation": 2 * unit + 8 * rows,
        }[self.op]
        return reads + (unit if self.mode == "fwd+bwd" else 0)

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

    if backward:

        def target(x, t, labels, mask):
            out = fn(x, t, labels, mask)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss

    else:

        def target(x, t, labels, mask):
            out = fn(x, t, labels, mask)
            return out[0] if isinstance(out, tuple) else out

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
        loss_err = rel_err(float(loss.detach().double()), expected_loss(case.op, ref, inp))
        if backward:
            idx = check_rows(case.shape.rows)
            grad_err = rel_err(x.grad[idx].double(), expected_grad_rows(case.op, inp, idx))
        problems = []
        if not loss_err <= loss_tol:  # also catches NaN
            problems.append(f"loss rel. error {loss_err:.2e} > {loss_tol:g}")
        if grad_err is not None and not grad_err <= grad_tol:
            problems.append(f"gradient rel. error {grad_err:.2e} > {grad_tol:g}")
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


# ---- machine ----------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 20) -> dict[str, float]:
    """Best-of-``reps`` ``dst.copy_(src)`` on a pre-allocated, pre-touched buffer pair.

    Bandwidth counts bytes read plus bytes written (2 x nbytes), the same accounting as the
    benchmarks' minimal bytes (inputs read + gradient written)."""
    n = nbytes // 4
    src = torch.ones(n)  # ones/zeros write every page: nothing is first-touched while timed
    dst = torch.zeros(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"bytes": 2 * nbytes, "seconds": best, "bytes_per_s": 2 * nbytes / best}


def _git_commit() -> str:
    """The source tree measured (``+dirty``: with uncommitted changes, as while developing)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine_info() -> dict[str, str]:
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
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    try:
        from fastdistill import _native

        isa = _native.core().isa()
    except Exception as exc:
        isa = f"unavailable ({exc})"
    try:
        import fastdistill

        fd_version = getattr(fastdistill, "__version__", "?")
    except Exception:
        fd_version = "?"
    return {
        "commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cpu_flags": " ".join(isa_flags),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastdistill": fd_version,
        "fastdistill_isa": isa,
        "backend": os.environ.get("FASTDISTILL_BACKEND", "auto"),
        # Other work on the machine skews every number (2 cores: one busy core halves a 2-thread
        # kernel); recorded so a reader can tell a quiet run from a contended one.
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
        "platform": platform.platform(),
    }


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
