"""GPU benchmark: every op on GPU-sized shapes from bench/shapes.py, forward+backward,
fastdistill's Triton and CUDA backends against the seed's eager formula, ``torch.compile`` of it
and Liger-Kernel's two kl_div pipelines, in one run that also measures the card's copy bandwidth.

    python -m bench.gpu_bench                    # the default plan (about 4-6 min on an H100)
    python -m bench.gpu_bench --quick            # only the two headline rows (the GPU targets)
    python -m bench.gpu_bench --ops kl_div --shapes llama2,llama3 --dtypes bf16
    python -m bench.gpu_bench --impls fastdistill-triton,eager --budget-s 120
    python -m bench.gpu_bench --list             # print the plan and exit (no GPU needed)

``bash tools/gpu/gpu_check.sh`` runs it after building with CUDA and running the GPU tests.

For every row (op, shape, dtype) and implementation, in one process:

1. a first call (torch.compile compiles, Triton kernels are JIT-compiled; its host time is kept as
   ``first_call_s``);
2. one call measured for memory: ``torch.cuda.max_memory_allocated()`` during the call minus what
   was allocated before it (the inputs, the oracle values), so the gradient left in ``.grad``
   counts; reported as a multiple of one input tensor (the logits; hidden states for cosine);
3. that call's loss, and its gradient on a subsample of rows, compared with the float64 oracle
   (``fastdistill.reference`` on ``.double()`` of the same inputs, bench/harness.py); a
   disagreement marks the row FAIL (it is still timed);
4. two more warm-up calls, then N calls (5-40, about half a second in all), each between its own
   pair of CUDA events, with a fresh student leaf per call (what ``zero_grad(set_to_none=True)``
   gives in training) and the L2 cache flushed before each call, outside the events; the host
   synchronises once, after the last call. The median is reported.

Effective bandwidth = minimal bytes (inputs read once + gradient written once, in the input
dtype) / median time, as a share of the copy bandwidth (median of ``dst.copy_(src)`` on 1 GiB,
counting bytes read + written) measured at the start of the same run. Speed-ups are ratios of
medians from the same run. A failure in one row (out of memory, a backend that is not available,
an exception) is reported in that row and the run goes on; a lost CUDA context stops it.

Results go to ``$OUT/gpu_results.json`` and ``.md`` when ``OUT`` is set, else to
``bench/results/gpu-<date>.json`` and ``.md``; both are rewritten after every row, so a run cut short
still leaves what it measured. The markdown is rendered from the JSON by bench/report.py
(``python -m bench.report --gpu-json FILE`` renders it again). Exit status: 0 when every fastdistill row that ran is correct, 1 when
one failed its check or raised (or, with ``--require-backends``, could not run), 2 without a
CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastdistill import backend as fd_backend

from . import baselines, harness, report, shapes

IMPLS = (
    "fastdistill-triton",
    "fastdistill-cuda",
    "eager",
    "compile",
    "liger-kldiv",
    "liger-jsd",
)
FD_BACKENDS = {"fastdistill-triton": "triton", "fastdistill-cuda": "native"}
LIGER_OPS = ("kl_div",)  # the ops Liger's pipelines compute
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COSINE_OP = "cosine"
FWD_ONLY = ("all_finite",)  # no gradient: forward only

# The default plan, most important first: when the time budget runs out the rows at the end are
# the ones left out. (op, shape name in shapes.GPU_REGISTRY, dtype name).
PLAN: list[tuple[str, str, str]] = [
    # the headline rows, the GPU targets' cases: kl_div fwd+bwd bf16 on 16,384 x 32,000 and
    # 8,192 x 128,256
    ("kl_div", "llama2", "bf16"),
    ("kl_div", "llama3", "bf16"),
    ("kl_div", "llama2", "fp32"),
    ("kl_div", "bert", "bf16"),
    ("kl_div", "gpt2", "bf16"),
    ("distillation", "llama2", "bf16"),  # all three terms
    ("cross_entropy", "llama3", "bf16"),
    ("cosine", "bert", "fp32"),  # hidden 768
    ("cosine", "llama2", "bf16"),  # hidden 4096
    ("all_finite", "llama2", "bf16"),
    ("kl_div", "llama3", "fp32"),
    ("kl_div", "bert", "fp32"),
    ("distillation", "bert", "fp32"),
    ("kl_div", "gpt2", "fp32"),
    ("cross_entropy", "llama2", "bf16"),
    ("mse", "llama2", "bf16"),
    ("kl_div", "gemma", "bf16"),
    ("kl_div_masked", "bert", "bf16"),  # the DistilBERT recipe: attention-masked tokens
]
QUICK_PLAN = PLAN[:2]

# Pre-timing check against the float64 oracle: (loss rtol, gradient rtol). fastdistill computes
# in fp32 from the rounded inputs, so its loss is fp32-accurate whatever the input dtype, and its
# bf16 gradient is allowed twice the error of rounding the exact gradient to bf16 on top of the
# rtol (tests/_oracle.py's rule; tests/test_gpu.py holds the kernels to rtol 1e-5, this sanity
# check over 0.5-1 G logits allows 1e-4). The baselines compute *in* the input dtype, so in bf16
# they get harness.TOLERANCES' loose bound: the check catches a wrong baseline, not its precision.
FD_RTOL = 1e-4
ROUNDING_MARGIN = 2.0
GRAD_SAMPLE_ROWS = 64
# The GPU memory target, "at most the gradient plus O(rows)": extra peak memory of kl_div fwd+bwd
# <= one gradient + 1% of one logits tensor + 1 MiB (1% of 16,384 x 32,000 bf16 is 640 B a row).
MEMORY_SLACK_FRACTION = 0.01


# ---- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    op: str
    shape: shapes.Shape
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def hidden(self) -> bool:
        return self.op == COSINE_OP

    @property
    def backward(self) -> bool:
        return self.op not in FWD_ONLY

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def cols(self) -> int:
        return self.shape.hidden if self.hidden else self.shape.vocab

    @property
    def dispatch_op(self) -> str:
        """The op name fastdistill.backend resolves (kl_div_masked is kl_div with a mask)."""
        return "kl_div" if self.op == "kl_div_masked" else self.op

    def impls(self, wanted: tuple[str, ...]) -> list[str]:
        return [i for i in wanted if not i.startswith("liger") or self.op in LIGER_OPS]

    def unit_bytes(self) -> int:
        return harness.unit_bytes(self.shape, self.dtype, self.hidden)

    def min_bytes(self) -> int:
        return harness.min_bytes(self.op, self.shape, self.dtype, self.backward)

    def label(self) -> str:
        kind = " (hidden)" if self.hidden else ""
        return f"{self.shape.name} {self.shape.rows}x{self.cols}{kind}"


def build_plan(args) -> list[Row]:
    ops = _csv(args.ops)
    names = _csv(args.shapes)
    dtypes = _csv(args.dtypes)
    for name in names or []:
        shapes.get_gpu(name)  # a typo is an error, not an empty plan
    for d in dtypes or []:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    if args.quick:
        base = QUICK_PLAN
    elif ops or names or dtypes:
        # An explicit selection: every combination of what was asked (defaults: all).
        all_ops = list(dict.fromkeys(op for op, _, _ in PLAN))
        base = [
            (op, name, d)
            for op in (ops or all_ops)
            for name in (names or list(shapes.GPU_REGISTRY))
            for d in (dtypes or list(DTYPES))
        ]
        known = set(baselines.EAGER)
        for op in ops or []:
            if op not in known:
                raise SystemExit(f"unknown op {op!r}; known: {', '.join(sorted(known))}")
    else:
        base = PLAN
    return [Row(op, shapes.get_gpu(name), d) for op, name, d in base]


def _csv(value: str | None) -> list[str] | None:
    if not value or value == "all":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# ---- inputs and oracle -----------------------------------------------------------------------


@dataclass
class Oracle:
    """float64 values of one row's inputs: the loss of every op and gradient rows to check."""

    loss: dict[str, float] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def build_oracle(row: Row, inp: harness.Inputs, seed: int) -> tuple[torch.Tensor, Oracle]:
    """Per-row float64 terms over the whole tensor (in chunks of 64 M elements) and the sampled
    gradient rows of ``row.op``."""
    n = row.shape.rows
    gen = torch.Generator().manual_seed(seed)
    picks = set(harness.check_rows(n).tolist())
    picks |= set(torch.randint(0, n, (GRAD_SAMPLE_ROWS,), generator=gen).tolist())
    idx = torch.tensor(sorted(picks))
    oracle = Oracle()
    if row.op == "all_finite":
        return idx, oracle
    with torch.no_grad():
        ref = harness.reference_rows(inp, row.hidden, chunk_elems=1 << 26)
    oracle.loss[row.op] = harness.expected_loss(row.op, ref, inp)
    if row.backward:
        oracle.rows[row.op] = harness.expected_grad_rows(row.op, inp, idx.to(inp.student.device))
    return idx, oracle


def grad_bound_rel(ref: torch.Tensor, dtype: torch.dtype, rtol: float) -> float:
    """Allowed relative gradient error: rtol, plus for bf16/fp16 twice the relative error of
    rounding the exact gradient to that dtype (tests/_oracle.py's rule)."""
    bound = rtol
    if dtype != torch.float32:
        size = float(ref.norm().clamp_min(1e-300))
        bound += ROUNDING_MARGIN * float((ref.to(dtype).double() - ref).norm()) / size
    return bound


# ---- measuring one implementation ---------------------------------------------------------------


@dataclass
class Result:
    op: str
    shape: str
    rows: int
    cols: int
    dtype: str
    mode: str
    impl: str
    status: str = "not run"  # ok | FAIL | OOM | unavailable | not installed | error | not run
    detail: str = ""
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    iters: int = 0
    first_call_s: float | None = None
    peak_bytes: int | None = None
    peak_x_unit: float | None = None
    unit_bytes: int = 0
    min_bytes: int = 0
    eff_GBps: float | None = None
    frac_copy_bw: float | None = None
    loss: float | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    loss_tol: float | None = None
    grad_tol: float | None = None
    x_eager: float | None = None
    x_compile: float | None = None

    @property
    def measured(self) -> bool:
        return self.ms_median is not None


def new_result(row: Row, impl: str) -> Result:
    """The not-yet-run result of ``impl`` on ``row``."""
    return Result(
        op=row.op,
        shape=row.shape.name,
        rows=row.shape.rows,
        cols=row.cols,
        dtype=row.dtype_name,
        mode=row.mode,
        impl=impl,
        unit_bytes=row.unit_bytes(),
        min_bytes=row.min_bytes(),
    )


class Unavailable(Exception):
    """The implementation cannot run here (backend not built, library not installed)."""


@contextlib.contextmanager
def backend_env(name: str | None):
    """Set FASTDISTILL_BACKEND for the block (read by fastdistill at every call)."""
    key = fd_backend.ENV_VAR
    old = os.environ.get(key)
    if name is not None:
        os.environ[key] = name
    try:
        yield
    finally:
        if name is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def impl_fn(row: Row, impl: str, device: torch.device) -> Callable:
    """The function ``(student, teacher, labels, mask) -> loss | tuple`` of ``impl`` for
    ``row``, or Unavailable with the reason."""
    if impl in FD_BACKENDS:
        if impl == "fastdistill-triton" and fd_backend.triton_interpreting():
            raise Unavailable(
                "TRITON_INTERPRET is on: the Triton kernels would be interpreted, not compiled "
                "for the GPU; run with TRITON_INTERPRET=0"
            )
        try:
            fd_backend.select_backend(row.dispatch_op, device)
        except fd_backend.BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from None
        return baselines.FASTDISTILL[row.op]
    if impl == "eager":
        return baselines.EAGER[row.op]
    if impl == "compile":
        # One compiled object per (op, shape, dtype), specialised to the shape (dynamic=False):
        # torch.compile's best case, as a training loop with fixed shapes gets it.
        return baselines.compiled(row.op, (row.shape.name, row.shape.rows, row.dtype, "gpu"))
    if impl.startswith("liger"):
        reason = baselines.liger_status(device)
        if reason:
            raise Unavailable(reason)
        return baselines.LIGER_PIPELINES[impl]
    raise ValueError(f"unknown implementation {impl!r}")


def tolerances(row: Row, impl: str) -> tuple[float, float]:
    if impl in FD_BACKENDS:
        return FD_RTOL, FD_RTOL
    kind = "liger" if impl.startswith("liger") else impl
    return harness.TOLERANCES[(row.dtype, kind)]


class Runner:
    def __init__(self, device: torch.device, args, copy_bw: dict):
        self.device = device
        self.args = args
        self.copy_bw = copy_bw
        # A buffer larger than any L2 cache (50 MB H100, 60 MB H200), zeroed before each timed
        # call so that no call finds its inputs in L2 from the previous one.
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def measure(self, row: Row, impl: str, inp: harness.Inputs, idx, oracle: Oracle) -> Result:
        res = new_result(row, impl)
        with backend_env(FD_BACKENDS.get(impl)):
            try:
                self._measure(row, impl, inp, idx, oracle, res)
            except Unavailable as exc:
                missing = impl.startswith("liger") and "not installed" in str(exc)
                res.status = "not installed" if missing else "unavailable"
                res.detail = str(exc)
            except torch.cuda.OutOfMemoryError as exc:
                res.status = "OOM"
                res.detail = str(exc).splitlines()[0] if str(exc) else "out of memory"
            except Exception as exc:  # one row's failure must not end the run
                text = str(exc).strip().splitlines()
                oom = "out of memory" in str(exc).lower()
                res.status = "OOM" if oom else "error"
                res.detail = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
                if self.args.verbose:
                    traceback.print_exc()
        return res

    def _measure(self, row, impl, inp, idx, oracle: Oracle, res: Result) -> None:
        step = harness.loss_step(impl_fn(row, impl, self.device), row.backward)
        mask = inp.mask if row.op == "kl_div_masked" else None

        def setup():
            return inp.student.detach().requires_grad_(row.backward)

        def call(x):
            return step(x, inp.teacher, inp.labels, mask)

        # 1. first call: compilation / JIT, outside every measurement.
        t0 = time.perf_counter()
        call(setup())
        torch.cuda.synchronize()
        res.first_call_s = round(time.perf_counter() - t0, 3)

        # 2. one call measured for memory (inputs and oracle excluded, the gradient counted).
        gc.collect()
        harness.empty_library_caches()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        x = setup()
        loss = call(x)
        torch.cuda.synchronize()
        res.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - before)
        res.peak_x_unit = res.peak_bytes / res.unit_bytes

        # 3. correctness against the float64 oracle.
        problems = self._check(row, impl, inp, idx, oracle, x, loss, res)
        del x, loss

        # 4. timing.
        t0 = time.perf_counter()
        for _ in range(2):
            call(setup())
        torch.cuda.synchronize()
        per_call = (time.perf_counter() - t0) / 2
        n = max(self.args.min_iters, min(self.args.max_iters, int(self.args.row_time / per_call)))

        def fresh_leaf_cold_cache():
            x = setup()  # a fresh leaf: its gradient goes with it, as zero_grad(set_to_none=True)
            self.flush.zero_()
            return (x,)

        seconds = harness.time_calls(call, n, self.device, before=fresh_leaf_cold_cache)
        ms = sorted(1e3 * t for t in seconds)
        res.iters = n
        res.ms_median = statistics.median(ms)
        res.ms_min, res.ms_max = ms[0], ms[-1]
        res.eff_GBps = res.min_bytes / (res.ms_median * 1e-3) / 1e9
        res.frac_copy_bw = res.eff_GBps * 1e9 / self.copy_bw["bytes_per_s_median"]
        if problems:
            res.status = "FAIL"
            res.detail = "; ".join(problems)
        else:
            res.status = "ok"

    def _check(self, row, impl, inp, idx, oracle: Oracle, x, loss, res: Result) -> list[str]:
        if row.op == "all_finite":
            return self._check_all_finite(row, impl, inp, loss)
        loss_tol, grad_tol = tolerances(row, impl)
        grad = want_grad = None
        problems: list[str] = []
        if row.backward:
            if x.grad is None:
                problems.append("the student received no gradient")
            else:
                grad, want_grad = x.grad[idx.to(x.grad.device)], oracle.rows[row.op]
                if impl in FD_BACKENDS:
                    if x.grad.dtype != row.dtype:
                        problems.append(f"gradient dtype {x.grad.dtype}, expected {row.dtype}")
                    grad_tol = grad_bound_rel(want_grad, row.dtype, grad_tol)
        res.loss = float(loss.detach().double())
        res.loss_rel_err, res.grad_rel_err, found = harness.oracle_errors(
            res.loss, oracle.loss[row.op], loss_tol, grad, want_grad, grad_tol
        )
        res.loss_tol = loss_tol
        res.grad_tol = None if grad is None else grad_tol
        return found + problems

    def _check_all_finite(self, row, impl, inp, result) -> list[str]:
        """True on the clean inputs; False with one NaN planted in the student and, separately,
        one +inf in the teacher's last element (restored afterwards)."""
        problems = []
        if not (isinstance(result, torch.Tensor) and result.dtype == torch.bool):
            return [f"returned {type(result).__name__} {getattr(result, 'dtype', '')}"]
        if result.device != inp.student.device:
            problems.append(f"result on {result.device}, expected {inp.student.device}")
        if not bool(result):
            problems.append("False on finite inputs")
        fn = impl_fn(row, impl, self.device)
        r, c = row.shape.rows // 2, row.cols // 3
        for tensor, (i, j), bad in (
            (inp.student, (r, c), float("nan")),
            (inp.teacher, (row.shape.rows - 1, row.cols - 1), float("inf")),
        ):
            keep = tensor[i, j].clone()
            tensor[i, j] = bad
            try:
                if bool(fn(inp.student, inp.teacher, None, None)):
                    problems.append(f"True with {bad} at [{i}, {j}]")
            finally:
                tensor[i, j] = keep
        return problems


def add_ratios(results: list[Result]) -> None:
    by_impl = {r.impl: r for r in results if r.measured}
    eager, comp = by_impl.get("eager"), by_impl.get("compile")
    for r in results:
        if not r.measured:
            continue
        if eager:
            r.x_eager = eager.ms_median / r.ms_median
        if comp:
            r.x_compile = comp.ms_median / r.ms_median


# ---- Triton kernel resources -----------------------------------------------------------------


def triton_kernel_report() -> list[dict]:
    """Registers and spills of every fastdistill Triton kernel compiled in this run, read from
    Triton's per-function caches (best effort: the cache layout is Triton-internal)."""
    try:
        from fastdistill import triton as fd_triton

        modules = sorted(set(getattr(fd_triton, "KERNEL_MODULES", {}).values()))
    except Exception:
        return []
    found: dict[tuple, dict] = {}
    for mod_name in modules:
        module = sys.modules.get(f"fastdistill.triton.{mod_name}")
        if module is None:
            continue
        for attr, obj in vars(module).items():
            fn = obj
            for _ in range(4):  # Autotuner / Heuristics wrap the JITFunction in .fn
                if hasattr(fn, "device_caches") or not hasattr(fn, "fn"):
                    break
                fn = fn.fn
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in list(caches.values()):
                cache = entry[0] if isinstance(entry, tuple) else entry
                if not isinstance(cache, dict):
                    continue
                for kernel in list(cache.values()):
                    try:
                        if hasattr(kernel, "_init_handles"):
                            kernel._init_handles()
                        meta = getattr(kernel, "metadata", None)
                        info = {
                            "kernel": f"{mod_name}.{attr}",
                            "num_warps": getattr(meta, "num_warps", None),
                            "regs": getattr(kernel, "n_regs", None),
                            "spills": getattr(kernel, "n_spills", None),
                            "shared": getattr(meta, "shared", None),
                        }
                    except Exception as exc:
                        info = {"kernel": f"{mod_name}.{attr}", "error": repr(exc)[:120]}
                    found[tuple(sorted(info.items(), key=lambda kv: kv[0]))] = info
    return list(found.values())


# ---- output ------------------------------------------------------------------------------------


def output_paths(args) -> tuple[str, str]:
    if args.out:
        md = args.out
    elif os.environ.get("OUT"):
        md = os.path.join(os.environ["OUT"], "gpu_results.md")
    else:
        root = os.path.dirname(os.path.abspath(__file__))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
        md = os.path.join(root, "results", f"gpu-{stamp}.md")
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    return md, os.path.splitext(md)[0] + ".json"


def settings() -> dict:
    """What the report needs to know about how this run was configured and judged."""
    return {
        "temperature": shapes.TEMPERATURE,
        "alphas": shapes.ALPHAS,
        "grad_sample_rows": GRAD_SAMPLE_ROWS,
        "fastdistill_impls": list(FD_BACKENDS),
        "copy_bw_targets": shapes.GPU_TARGETS,
        "memory_slack_fraction": MEMORY_SLACK_FRACTION,
    }


def write_outputs(paths, machine, copy_bw, results, kernels, notes) -> None:
    """The run so far as JSON and as markdown rendered from that JSON (bench/report.py), so
    ``python -m bench.report --gpu-json`` renders the same report again."""
    md, js = paths
    payload = {
        "machine": machine,
        "copy_bw": copy_bw,
        "settings": settings(),
        "results": [dataclasses.asdict(r) for r in results],
        "triton_kernels": kernels,
        "notes": notes,
    }
    with open(js, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(js) as f:  # render what a re-render reads (JSON turns tuples into lists)
        payload = json.load(f)
    with open(md, "w") as f:
        f.write(report.render_gpu(payload))


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--ops", help="comma-separated ops (default: the plan's)")
    p.add_argument("--shapes", help="comma-separated shapes: " + ", ".join(shapes.GPU_REGISTRY))
    p.add_argument("--dtypes", help="comma-separated dtypes: " + ", ".join(DTYPES))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    p.add_argument(
        "--quick", action="store_true", help="only the two headline rows (the GPU targets)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="start no new row (or implementation) after this many seconds (0: no limit)",
    )
    p.add_argument("--row-time", type=float, default=0.5, help="seconds of timed calls per impl")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--out",
        help="markdown output path (default: $OUT/gpu_results.md, else bench/results/gpu-<date>.md)",
    )
    p.add_argument(
        "--require-backends",
        action="store_true",
        help="count a fastdistill backend that cannot run as a failure (tools/gpu/gpu_check.sh)",
    )
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    args = p.parse_args(argv)
    impls = tuple(_csv(args.impls) or IMPLS)
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    args.impls = impls
    return args


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.list:
        for row in plan:
            print(
                f"{row.op:14s} {row.label():32s} {row.dtype_name} {row.mode:8s} "
                + ",".join(row.impls(args.impls))
            )
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_bench: no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run it on a GPU "
            "machine, e.g. `bash tools/gpu/gpu_check.sh`.",
            file=sys.stderr,
        )
        return 2
    start = time.monotonic()
    device = _device()
    paths = output_paths(args)
    machine = harness.gpu_machine_info(device)
    print(
        f"gpu_bench: {machine['gpu']}, torch {machine['torch']}, triton {machine['triton']}, "
        f"Liger {machine['liger_kernel']}, commit {machine['commit']}",
        flush=True,
    )
    copy_bw = harness.copy_bandwidth(device)
    print(
        f"gpu_bench: copy bandwidth {copy_bw['bytes_per_s_median'] / 1e9:.0f} GB/s (median); "
        f"{len(plan)} rows; results -> {paths[0]}",
        flush=True,
    )
    baselines._raise_recompile_limit()
    runner = Runner(device, args, copy_bw)
    results: list[Result] = []
    notes: list[str] = []
    stop_reason = None
    inputs_key = None
    inp = None
    for row_no, row in enumerate(plan):
        impls = row.impls(args.impls)
        row_results = []
        key = (row.shape.name, row.dtype_name, row.hidden)
        if stop_reason is None and args.budget_s and time.monotonic() - start > args.budget_s:
            stop_reason = f"time budget of {args.budget_s:.0f} s spent"
        if stop_reason is None:
            try:
                if key != inputs_key:
                    inp = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    inp = harness.make_inputs(
                        row.shape, row.dtype, row.hidden, args.seed + row.cols, device
                    )
                    inputs_key = key
                idx, oracle = build_oracle(row, inp, args.seed + row_no)
            except Exception as exc:
                inp, inputs_key = None, None
                for impl in impls:
                    r = new_result(row, impl)
                    r.status = "OOM" if "out of memory" in str(exc).lower() else "error"
                    r.detail = f"inputs/oracle: {type(exc).__name__}: {str(exc)[:200]}"
                    row_results.append(r)
                gc.collect()
                torch.cuda.empty_cache()
                impls = []
        for impl in impls:
            if stop_reason is None and args.budget_s and time.monotonic() - start > args.budget_s:
                stop_reason = f"time budget of {args.budget_s:.0f} s spent"
            if stop_reason is not None:
                r = new_result(row, impl)
                r.detail = stop_reason
                row_results.append(r)
                continue
            t0 = time.monotonic()
            r = runner.measure(row, impl, inp, idx, oracle)
            row_results.append(r)
            print(
                f"  {row.op:14s} {row.label():32s} {row.dtype_name} {impl:18s} "
                f"{report.fmt(r.ms_median, '9.3f')} ms  {report.gpu_status_cell(dataclasses.asdict(r))}"
                f"  ({time.monotonic() - t0:.1f} s)",
                flush=True,
            )
            if r.status in ("OOM", "error"):
                gc.collect()
                torch.cuda.empty_cache()
                try:
                    torch.cuda.synchronize()
                except Exception as exc:  # a sticky error (illegal address): nothing more runs
                    stop_reason = f"CUDA context lost after {row.op} {row.label()} {impl}: {exc}"
                    notes.append(stop_reason)
        add_ratios(row_results)
        results += row_results
        write_outputs(paths, machine, copy_bw, results, [], notes)
    inp = None
    kernels = triton_kernel_report()
    notes.append(f"wall time {time.monotonic() - start:.0f} s")
    write_outputs(paths, machine, copy_bw, results, kernels, notes)
    print()
    rows = [dataclasses.asdict(r) for r in results]
    print("\n".join(report.gpu_results_table(rows)))
    print()
    print("\n".join(report.gpu_targets_section(rows, settings())))
    if kernels:
        spills = [k for k in kernels if k.get("spills")]
        print(f"Triton kernels compiled: {len(kernels)}, with register spills: {len(spills)}")
    print(f"gpu_bench: wrote {paths[0]} and {paths[1]}")

    failed = [
        r
        for r in results
        if r.impl in FD_BACKENDS
        and (
            r.status in ("FAIL", "error", "OOM")
            or (args.require_backends and r.status == "unavailable")
        )
    ]
    if stop_reason and stop_reason.startswith("CUDA context lost"):
        failed.append(None)
    if failed:
        print(f"gpu_bench: {len(failed)} fastdistill row(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
