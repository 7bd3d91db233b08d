"""GPU tests: the ``triton`` and ``native`` (CUDA) backends on CUDA tensors of realistic size,
against the float64 oracle (tests/_oracle.py's rules, ARCHITECTURE.md "Numerics rules").

Every test is marked ``gpu`` and skips, with the reason, where there is no CUDA device (every
development and CI machine); a backend that cannot run (the core built without CUDA kernels, no
Triton kernel for an op) skips that backend with the reason. tests/conftest.py turns the Triton
interpreter on for the CPU suite, and Triton decides between interpreting and compiling once per
process, so the Triton half needs ``TRITON_INTERPRET=0`` (without it those tests skip and say so).
``bash tools/gpu/gpu_check.sh`` runs them on a GPU machine with ``FASTDISTILL_GPU_STRICT=1``,
which turns every such skip into a failure:

    TRITON_INTERPRET=0 pytest -q -m gpu tests/test_gpu.py

Data is drawn on the GPU from one printed seed per test (``FASTDISTILL_TEST_SEED`` replays it).
The oracle is ``fastdistill.reference`` in float64 on the GPU, on ``.double()`` of the same
(already rounded) inputs. About a minute on an H100, most of it compiling Triton kernels.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _oracle import Rng, assert_grad_close, assert_loss_close, norm, oracle, run_loss

from fastdistill import backend, reference
from fastdistill.losses import (
    all_finite,
    cosine_loss,
    cross_entropy,
    distillation_loss,
    jsd_loss,
    kl_div_loss,
    mse_loss,
    reverse_kl_loss,
    tvd_loss,
)

pytestmark = pytest.mark.gpu

HAVE_CUDA = torch.cuda.is_available()
STRICT = os.environ.get("FASTDISTILL_GPU_STRICT", "").strip() not in ("", "0")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TEMPERATURES = (1.0, 2.0, 4.0)
IGNORE = -100


def _unavailable(reason: str) -> None:
    if STRICT:
        pytest.fail(f"{reason} (FASTDISTILL_GPU_STRICT=1: a GPU check must run everything)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _cuda_only():
    if not HAVE_CUDA:
        _unavailable("needs a CUDA device: torch.cuda.is_available() is False")
    yield
    torch.cuda.synchronize()  # an asynchronous kernel error surfaces in the test that caused it


@pytest.fixture(params=["triton", "native"], ids=["triton", "cuda"])
def gpu_backend(request, monkeypatch) -> str:
    """FASTDISTILL_BACKEND for the test: the Triton kernels, then the CUDA kernels."""
    name = request.param
    if name == "triton" and backend.triton_interpreting():
        _unavailable(
            "TRITON_INTERPRET is on (tests/conftest.py's default for the CPU suite): the Triton "
            "kernels would be interpreted, not compiled for the GPU; run with TRITON_INTERPRET=0"
        )
    if name == "native" and not backend.native_cuda_built():
        _unavailable(
            "fastdistill._C was built without CUDA kernels (built_with_cuda() is False): "
            "reinstall with FASTDISTILL_CUDA=1 pip install --no-build-isolation --no-deps -e ."
        )
    monkeypatch.setenv(backend.ENV_VAR, name)
    return name


def _require(op: str) -> None:
    """Skip (or, strict, fail) when the selected backend has no kernel for ``op`` on CUDA."""
    try:
        backend.select_backend(op, torch.device("cuda"))
    except backend.BackendUnavailableError as exc:
        _unavailable(str(exc))


class CudaRng(Rng):
    """tests/_oracle.Rng drawing its floats on the GPU (512 M-element inputs would take seconds
    on the CPU); masks, labels and grad_outputs come from the CPU generator, moved over."""

    def __init__(self):
        super().__init__()
        self.cuda_gen = torch.Generator(device="cuda").manual_seed(self.seed)

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = FP32):
        x = torch.randn(shape, generator=self.cuda_gen, device="cuda")
        return (x * scale).to(dtype)

    def uniform(self, *shape: int, low: float, high: float, dtype=FP32):
        x = torch.rand(shape, generator=self.cuda_gen, device="cuda")
        return (x * (high - low) + low).to(dtype)

    def rand_bool(self, *shape: int, p: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.cuda_gen, device="cuda") < p

    def cuda_mask(self, rows: int, p: float = 0.6) -> torch.Tensor:
        return self.mask((rows,), p).cuda()

    def cuda_labels(self, rows: int, classes: int, ignore_frac: float = 0.3) -> torch.Tensor:
        return self.labels((rows,), classes, ignore_index=IGNORE, ignore_frac=ignore_frac).cuda()


@pytest.fixture
def crng() -> CudaRng:
    return CudaRng() if HAVE_CUDA else None


def _g(value: float = 0.37) -> torch.Tensor:
    """A grad_output != 1 on the device (autograd rejects one on another device)."""
    return torch.tensor(value, device="cuda")


def check_gpu(
    fn, ref_fn, student, grad_out, *, what: str, view=None, loss_atol=1e-10, grad_atol=1e-10
):
    """tests/_oracle.check on CUDA tensors: ``fn(view(leaf))`` and the float64 oracle
    ``ref_fn(view(leaf64))``, with the scale of ``grad_out`` (scalar, or one per row) kept on
    the device. Returns (loss, gradient)."""
    view = view or (lambda x: x)
    ref_loss, ref_grad = oracle(ref_fn, student, grad_out, view)
    assert torch.isfinite(ref_loss).all() and torch.isfinite(ref_grad).all(), (
        f"{what}: the oracle itself is not finite (test bug)"
    )
    loss, grad = run_loss(fn, student, grad_out, view)
    assert_loss_close(loss, ref_loss, what=what, atol=loss_atol)
    if grad_out.dim() == 0:
        scale = grad_out.double()
    else:  # per-row grad_output of reduction="none"; identity views only
        scale = grad_out.double().unsqueeze(-1).expand(student.shape)
    assert_grad_close(grad, ref_grad, student.dtype, what=what, scale=scale, atol=grad_atol)
    return loss, grad


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- kl_div ------------------------------------------------------------------------------------

KL_CASES = [
    (4096, 32_000, BF16),  # Llama-2 vocabulary, a realistic batch
    (4096, 32_000, FP32),
    (1024, 128_256, BF16),  # Llama-3 vocabulary: past any single-tile row
    (1271, 50_257, FP32),  # GPT-2: odd V and odd rows (no tile divides them)
    (1271, 50_257, FP16),
]


@pytest.mark.parametrize(
    "rows,V,dtype", KL_CASES, ids=[f"{r}x{v}-{_name(d)}" for r, v, d in KL_CASES]
)
def test_kl_div_matches_oracle(gpu_backend, crng, rows, V, dtype):
    _require("kl_div")
    s = crng.logits(rows, V, dtype=dtype)
    t = crng.logits(rows, V, dtype=dtype)
    mask = crng.cuda_mask(rows)
    t64 = t.double()
    for temperature in TEMPERATURES:
        for m, reduction in ((None, "batchmean"), (mask, "batchmean"), (mask, "sum")):

            def fn(x, m=m, reduction=reduction, temperature=temperature):
                return kl_div_loss(x, t, temperature=temperature, mask=m, reduction=reduction)

            def ref(x64, m=m, reduction=reduction, temperature=temperature):
                return reference.kl_div_loss(
                    x64, t64, temperature=temperature, mask=m, reduction=reduction
                )

            what = (
                f"kl_div {gpu_backend} {rows}x{V} {_name(dtype)} T={temperature} {reduction} "
                f"mask={m is not None} {crng.tag}"
            )
            check_gpu(fn, ref, s, _g(), what=what)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_kl_div_reduction_none_per_row_grad(gpu_backend, crng, dtype):
    """reduction="none" with a different grad_output per row, masked rows 0."""
    _require("kl_div")
    rows, V = 1271, 50_257
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    mask = crng.cuda_mask(rows)
    g = crng.randn(rows)

    def fn(x):
        return kl_div_loss(x, t, temperature=2.0, mask=mask, reduction="none")

    def ref(x64):
        return reference.kl_div_loss(x64, t.double(), temperature=2.0, mask=mask, reduction="none")

    loss, grad = check_gpu(fn, ref, s, g, what=f"kl_div none {gpu_backend} {dtype} {crng.tag}")
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask])), crng.tag
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), crng.tag


def test_kl_div_sliced_vocab(gpu_backend, crng):
    """A non-contiguous view (a vocabulary slice of a wider tensor, rows strided)."""
    _require("kl_div")
    rows, V = 2048, 32_000
    s_leaf = crng.logits(rows, V + 16, dtype=BF16)
    t = crng.logits(rows, V + 16, dtype=BF16)[:, 3 : 3 + V]

    def view(x):
        return x[:, 5 : 5 + V]

    def fn(x):
        return kl_div_loss(x, t, temperature=2.0)

    def ref(x64):
        return reference.kl_div_loss(x64, t.double(), temperature=2.0)

    _, grad = check_gpu(fn, ref, s_leaf, _g(), view=view, what=f"sliced {gpu_backend} {crng.tag}")
    assert torch.equal(grad[:, :5], torch.zeros_like(grad[:, :5])), crng.tag


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_kl_div_neg_inf_entries(gpu_backend, crng, dtype):
    """Masked vocabulary: the teacher -inf where the student is finite, and both -inf."""
    _require("kl_div")
    rows, V = 512, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    t[crng.rand_bool(rows, V, p=0.2)] = float("-inf")
    both = crng.rand_bool(rows, V, p=0.1)
    both[:, 0] = False  # one finite logit per row
    s[both] = float("-inf")
    t[both] = float("-inf")
    for temperature in TEMPERATURES:

        def fn(x, temperature=temperature):
            return kl_div_loss(x, t, temperature=temperature)

        def ref(x64, temperature=temperature):
            return reference.kl_div_loss(x64, t.double(), temperature=temperature)

        what = f"-inf logits {gpu_backend} {_name(dtype)} T={temperature} {crng.tag}"
        _, grad = check_gpu(fn, ref, s, _g(), what=what)
        assert torch.isfinite(grad).all(), what
        assert torch.equal(grad[both], torch.zeros_like(grad[both])), what


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_student_equals_teacher_is_zero(gpu_backend, crng, dtype):
    """s == t: KL 0 and gradient 0 within 1e-6 at every temperature; MSE exactly 0."""
    _require("kl_div")
    x = crng.logits(4096, 32_000, dtype=dtype)
    for temperature in TEMPERATURES:

        def fn(s, temperature=temperature):
            return kl_div_loss(s, x.clone(), temperature=temperature)

        loss, grad = run_loss(fn, x, _g())
        what = f"{gpu_backend} {_name(dtype)} T={temperature} {crng.tag}"
        assert loss.abs().item() <= 1e-6, f"kl_div loss {loss.item()} {what}"
        assert grad.abs().max().item() <= 1e-6, f"kl_div gradient {what}"
    _require("mse")
    loss, grad = run_loss(lambda s: mse_loss(s, x.clone()), x, _g())
    assert loss.item() == 0 and not grad.any(), f"mse {gpu_backend} {crng.tag}"


def test_kl_div_all_masked_is_exactly_zero(gpu_backend, crng):
    _require("kl_div")
    s = crng.logits(64, 32_000, dtype=BF16)
    t = crng.logits(64, 32_000, dtype=BF16)
    mask = torch.zeros(64, dtype=torch.bool, device="cuda")
    loss, grad = run_loss(lambda x: kl_div_loss(x, t, temperature=2.0, mask=mask), s, _g())
    assert loss.item() == 0.0 and not grad.any(), crng.tag


# ---- cross_entropy, mse, distillation, cosine --------------------------------------------------

CE_CASES = [(4096, 32_000, BF16), (1024, 128_256, BF16), (1271, 50_257, FP32)]


@pytest.mark.parametrize(
    "rows,V,dtype", CE_CASES, ids=[f"{r}x{v}-{_name(d)}" for r, v, d in CE_CASES]
)
def test_cross_entropy_matches_oracle(gpu_backend, crng, rows, V, dtype):
    _require("cross_entropy")
    s = crng.logits(rows, V, dtype=dtype)
    labels = crng.cuda_labels(rows, V)
    for reduction in ("mean", "sum"):

        def fn(x, reduction=reduction):
            return cross_entropy(x, labels, reduction=reduction)

        def ref(x64, reduction=reduction):
            return reference.cross_entropy(x64, labels, reduction=reduction)

        what = f"cross_entropy {gpu_backend} {rows}x{V} {_name(dtype)} {reduction} {crng.tag}"
        check_gpu(fn, ref, s, _g(), what=what)
    ignored = torch.full_like(labels, IGNORE)
    loss, grad = run_loss(lambda x: cross_entropy(x, ignored), s, _g())
    assert loss.item() == 0.0 and not grad.any(), f"all ignored {gpu_backend} {crng.tag}"


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_mse_matches_oracle(gpu_backend, crng, dtype):
    _require("mse")
    rows, V = 4096, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    mask = crng.cuda_mask(rows)
    for m, reduction in ((None, "batchmean"), (mask, "batchmean"), (mask, "mean")):

        def fn(x, m=m, reduction=reduction):
            return mse_loss(x, t, mask=m, reduction=reduction)

        def ref(x64, m=m, reduction=reduction):
            return reference.mse_loss(x64, t.double(), mask=m, reduction=reduction)

        what = f"mse {gpu_backend} {_name(dtype)} {reduction} mask={m is not None} {crng.tag}"
        check_gpu(fn, ref, s, _g(), what=what)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_distillation_three_terms(gpu_backend, crng, dtype):
    """kl + ce + mse in one pass, with labels (ignore_index) and a mask; the total against the
    oracle (loss and gradient) and each logged component against its own oracle."""
    _require("distillation")
    rows, V = 4096, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    labels = crng.cuda_labels(rows, V)
    mask = crng.cuda_mask(rows)
    # The MSE weight is small because MSE is a sum over V: the KL and CE terms stay visible.
    kw = dict(labels=labels, mask=mask, temperature=2.0, alpha_kl=0.7, alpha_ce=0.2)
    kw["alpha_mse"] = 1e-3
    _check_distillation(s, t, kw, what=f"distillation {gpu_backend} {_name(dtype)} {crng.tag}")


def _check_distillation(s, t, kw, *, what: str) -> None:
    """distillation_loss(s, t, **kw): the total (loss and gradient) and each logged component
    against the float64 oracle."""
    check_gpu(
        lambda x: distillation_loss(x, t, **kw)[0],
        lambda x64: reference.distillation_loss(x64, t.double(), **kw)[0],
        s,
        _g(),
        what=what,
    )
    with torch.no_grad():
        got = distillation_loss(s, t, **kw)[1:]
        want = reference.distillation_loss(s.double(), t.double(), **kw)[1:]
    for name, a, b in zip(("kl", "ce", "mse"), got, want, strict=True):
        assert_loss_close(a, b, what=f"{what} component {name}")


COSINE_CASES = [(4096, 768, FP32), (4096, 768, BF16), (4096, 4096, BF16)]


@pytest.mark.parametrize(
    "rows,D,dtype", COSINE_CASES, ids=[f"{r}x{d}-{_name(t)}" for r, d, t in COSINE_CASES]
)
def test_cosine_matches_oracle(gpu_backend, crng, rows, D, dtype):
    _require("cosine")
    s = crng.randn(rows, D, dtype=dtype)
    t = (crng.randn(rows, D) + 0.5 * s.float()).to(dtype)  # correlated, as hidden states are
    mask = crng.cuda_mask(rows)
    for m, reduction in ((None, "mean"), (mask, "mean"), (mask, "sum")):

        def fn(x, m=m, reduction=reduction):
            return cosine_loss(x, t, mask=m, reduction=reduction)

        def ref(x64, m=m, reduction=reduction):
            return reference.cosine_loss(x64, t.double(), mask=m, reduction=reduction)

        what = f"cosine {gpu_backend} {rows}x{D} {_name(dtype)} {reduction} {crng.tag}"
        check_gpu(fn, ref, s, _g(), what=what)


# ---- all_finite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=_name)
def test_all_finite_finds_nan_and_inf(gpu_backend, dtype):
    _require("all_finite")
    x = torch.randn(4096, 32_000, device="cuda").to(dtype)
    n = x.numel()

    def result(*tensors):
        out = all_finite(*tensors)
        assert out.dtype == torch.bool and out.shape == () and out.device.type == "cuda", out
        return bool(out)

    assert result(x), f"{gpu_backend} {dtype}: False on finite data"
    assert result(x, None, torch.ones(3, dtype=torch.int64, device="cuda"), x[:, :7])
    flat = x.view(-1)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in (0, n // 2 + 12_345, n - 1):
            keep = flat[i].clone()
            flat[i] = bad
            assert not result(x), f"{gpu_backend} {dtype}: {bad} at {i} not found"
            assert not result(torch.ones(5, device="cuda"), x), f"{bad} at {i}, 2nd tensor"
            flat[i] = keep
    assert result(x)


# ---- properties of the whole call ------------------------------------------------------------


def _op_calls(rows: int = 256, V: int = 32_000):
    """(op, fwd+bwd callable) for every op, on fixed bf16 inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(rows, V, generator=g, device="cuda") * 3).to(BF16)
    t = (torch.randn(rows, V, generator=g, device="cuda") * 3).to(BF16)
    h_s = torch.randn(rows, 768, generator=g, device="cuda")
    h_t = torch.randn(rows, 768, generator=g, device="cuda")
    labels = torch.randint(0, V, (rows,), generator=g, device="cuda")
    labels[::5] = IGNORE
    mask = torch.arange(rows, device="cuda") % 7 != 0
    grad_out = _g()

    def fwd_bwd(loss_fn, x):
        def call():
            leaf = x.detach().requires_grad_(True)
            out = loss_fn(leaf)
            (out[0] if isinstance(out, tuple) else out).backward(grad_out)
            return leaf.grad

        return call

    return {
        "kl_div": fwd_bwd(lambda x: kl_div_loss(x, t, temperature=2.0, mask=mask), s),
        "mse": fwd_bwd(lambda x: mse_loss(x, t, mask=mask), s),
        "cross_entropy": fwd_bwd(lambda x: cross_entropy(x, labels), s),
        "distillation": fwd_bwd(
            lambda x: distillation_loss(
                x, t, labels=labels, mask=mask, alpha_kl=1.0, alpha_ce=1.0, alpha_mse=1e-3
            ),
            s,
        ),
        "cosine": fwd_bwd(lambda x: cosine_loss(x, h_t, mask=mask), h_s),
        "all_finite": lambda: all_finite(s, t),
        "reverse_kl": fwd_bwd(lambda x: reverse_kl_loss(x, t, mask=mask, softcap=30.0), s),
        "jsd": fwd_bwd(lambda x: jsd_loss(x, t, beta=0.3, mask=mask, t2_scale=True), s),
        "tvd": fwd_bwd(lambda x: tvd_loss(x, t, mask=mask, logit_scale=0.5), s),
        "distillation_divergence": fwd_bwd(
            lambda x: distillation_loss(
                x, t, labels=labels, mask=mask, alpha_kl=1.0, alpha_ce=1.0, divergence="jsd"
            ),
            s,
        ),
    }


OPS = (
    "kl_div",
    "mse",
    "cross_entropy",
    "distillation",
    "cosine",
    "all_finite",
    "reverse_kl",
    "jsd",
    "tvd",
    "distillation_divergence",
)


@pytest.mark.parametrize("op", OPS)
def test_no_host_sync(gpu_backend, op):
    """ARCHITECTURE.md ("Op conventions"): no host synchronisation in forward or backward (torch's sync debug mode
    raises on .item(), a blocking copy to the host, a stream synchronize, ...)."""
    _require(op)
    call = _op_calls()[op]
    call()  # compile / load the kernels first: that may synchronise, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kl_div_peak_memory_is_the_gradient(gpu_backend, crng):
    """The GPU memory target: extra peak memory of kl_div forward+backward at most the gradient
    plus O(rows) (here: + 1% of one logits tensor + 1 MiB), the gradient in the input dtype."""
    _require("kl_div")
    rows, V = 4096, 32_000
    s, t = crng.logits(rows, V, dtype=BF16), crng.logits(rows, V, dtype=BF16)

    def call():
        x = s.detach().requires_grad_(True)
        kl_div_loss(x, t, temperature=2.0).backward()
        return x

    call()  # warm-up: kernels compiled, no first-call allocations in the figure
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    x = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert x.grad.dtype == BF16, f"gradient stored as {x.grad.dtype}"
    unit = s.numel() * s.element_size()
    allowed = unit + unit // 100 + (1 << 20)
    assert extra <= allowed, (
        f"{gpu_backend}: extra peak {extra / 2**20:.1f} MiB = {extra / unit:.2f}x the logits "
        f"(allowed {allowed / 2**20:.1f} MiB: the gradient + O(rows))"
    )


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_compile_fullgraph_matches_eager(gpu_backend, crng, dtype):
    """torch.compile(fullgraph=True) traces through kl_div_loss on CUDA and gives the eager
    loss and gradient (fp32: within 1e-6; bf16, where the traced graph may round the scaled
    gradient differently: the loss within 1e-6, both gradients against the oracle)."""
    _require("kl_div")
    torch._dynamo.reset()  # no graph compiled under the other backend is reused
    rows, V = 1024, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    mask = crng.cuda_mask(rows)

    def fn(x):
        return kl_div_loss(x, t, temperature=2.0, mask=mask)

    what = f"compile {gpu_backend} {_name(dtype)} {crng.tag}"
    try:
        compiled = torch.compile(fn, fullgraph=True)
        eager_loss, eager_grad = run_loss(fn, s, _g())
        # compiled loss and gradient against the float64 oracle (the same rules as eager) ...
        loss, grad = check_gpu(
            compiled,
            lambda x64: reference.kl_div_loss(x64, t.double(), temperature=2.0, mask=mask),
            s,
            _g(),
            what=what,
        )
    finally:
        torch._dynamo.reset()
    # ... and against eager: the same kernel, so the same loss; in fp32 the same gradient.
    assert_loss_close(loss, eager_loss.double(), what=what, rtol=1e-6)
    if dtype == FP32:
        err = norm(grad.double() - eager_grad.double())
        assert err <= 1e-6 * norm(eager_grad), f"{what}: gradient differs from eager by {err:.3e}"


# ---- LLM divergences (reverse_kl, jsd, tvd) and the logit transforms ---------------------------
# Both backends: the Triton kernel's divergence modes and the CUDA kernel's (csrc/cuda/
# fused_logits.cu, DIV and XF). JSD's oracle is the float64 reference formula, which keeps 1e-5 of
# the value only while the student is not within ~1e-4 of the teacher: the data here is not
# (tools/gpu/cuda_emu/check.py covers that regime with a cancellation-free float64 form).

DIVERGENCE_LOSSES = ("reverse_kl", "jsd", "tvd")

DIVERGENCE_CASES = [
    ("reverse_kl", {}, 4096, 32_000, BF16),
    ("jsd", {"beta": 0.5}, 4096, 32_000, BF16),
    ("jsd", {"beta": 0.1, "softcap": 30.0}, 1024, 128_256, BF16),
    ("jsd", {"beta": 0.9, "logit_scale": 0.7, "t2_scale": True}, 1271, 50_257, FP32),
    ("tvd", {}, 1271, 50_257, FP32),
    ("reverse_kl", {"softcap": 20.0, "logit_scale": 1.5}, 1271, 50_257, FP16),
]


def _divergence_fn(name: str):
    return {"reverse_kl": reverse_kl_loss, "jsd": jsd_loss, "tvd": tvd_loss}[name]


@pytest.mark.parametrize(
    "name,extra,rows,V,dtype",
    DIVERGENCE_CASES,
    ids=[f"{n}-{r}x{v}-{_name(d)}-{len(e)}" for n, e, r, v, d in DIVERGENCE_CASES],
)
def test_divergence_matches_oracle(gpu_backend, crng, name, extra, rows, V, dtype):
    _require(name)
    fn = _divergence_fn(name)
    s = crng.logits(rows, V, dtype=dtype)
    t = crng.logits(rows, V, dtype=dtype)
    labels = crng.cuda_labels(rows, V)
    n = torch.tensor(float(rows), device="cuda")
    kw = dict(extra, temperature=2.0, labels=labels, normalizer=n)
    check_gpu(
        lambda x: fn(x, t, **kw),
        lambda x64: reference.divergence_loss(x64, t.double(), name, **kw),
        s,
        _g(),
        what=f"{name} {gpu_backend} {extra} {rows}x{V} {_name(dtype)} {crng.tag}",
    )


@pytest.mark.parametrize("name", DIVERGENCE_LOSSES)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_divergence_temperatures_reductions_transforms(gpu_backend, crng, name, dtype):
    """T in {0.05, 1, 4} (one-hot-like rows at 0.05), t2_scale on and off, a mask, reduction
    "none" with a grad_output per row and "sum", with and without logit_scale and softcap."""
    _require(name)
    fn = _divergence_fn(name)
    rows, V = 1024, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    mask = crng.cuda_mask(rows)
    beta = {"beta": 0.3} if name == "jsd" else {}
    transforms = ({}, {"logit_scale": 0.8, "softcap": 5.0})
    for temperature, t2_scale, xf in ((0.05, False, transforms[0]), (1.0, True, transforms[1]),
                                      (4.0, False, transforms[1]), (4.0, True, transforms[0])):  # fmt: skip
        # At T = 0.05 the rows are nearly one-hot and the gradients tiny: fp32 resolves each
        # row's top column to ~1e-8 of the weight (as in tests/test_divergences.py).
        grad_atol = 1e-7 * math.sqrt(rows) if temperature == 0.05 else 1e-10
        for reduction, g in (("none", crng.randn(rows)), ("sum", _g())):
            kw = dict(beta, **xf, temperature=temperature, t2_scale=t2_scale, mask=mask)
            kw["reduction"] = reduction
            check_gpu(
                lambda x, kw=kw: fn(x, t, **kw),
                lambda x64, kw=kw: reference.divergence_loss(x64, t.double(), name, **kw),
                s,
                g,
                what=f"{name} {gpu_backend} {_name(dtype)} {kw} {crng.tag}",
                grad_atol=grad_atol,
            )


@pytest.mark.parametrize("divergence", ["forward_kl", *DIVERGENCE_LOSSES])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_distillation_divergence_three_terms(gpu_backend, crng, divergence, dtype):
    """distillation_loss with another divergence or the transforms (the distillation_divergence
    op): div + ce + mse in one pass, labels with ignore_index, a mask, t2_scale off; the total
    (loss and gradient) and each component against the oracle."""
    _require("distillation_divergence")
    rows, V = 2048, 32_000
    s, t = crng.logits(rows, V, dtype=dtype), crng.logits(rows, V, dtype=dtype)
    kw = dict(labels=crng.cuda_labels(rows, V), mask=crng.cuda_mask(rows), temperature=2.0)
    kw.update(alpha_kl=0.7, alpha_ce=0.2, alpha_mse=1e-3, divergence=divergence, beta=0.4)
    kw.update(t2_scale=divergence == "forward_kl", logit_scale=0.9, softcap=8.0)
    what = f"distillation {divergence} {gpu_backend} {_name(dtype)} {crng.tag}"
    _check_distillation(s, t, kw, what=what)


@pytest.mark.parametrize("name", DIVERGENCE_LOSSES)
def test_divergence_special_values(gpu_backend, crng, name):
    """student == teacher: exactly 0 and a 0 gradient (with the transforms too); every row masked:
    0 and 0; -inf logits on both sides and on the student's side; log-probabilities far below
    -104 on both sides (no NaN at interior beta); JSD >= 0 next to a bf16 teacher."""
    _require(name)
    fn = _divergence_fn(name)
    rows, V = 512, 32_000
    x = crng.logits(rows, V, dtype=BF16)
    for kw in ({}, {"softcap": 20.0, "logit_scale": 0.5}):
        for temperature in (0.05, 1.0, 4.0):
            loss, grad = run_loss(
                lambda s, kw=kw, T=temperature: fn(s, x.clone(), temperature=T, reduction="none", **kw),
                x, crng.randn(rows),
            )  # fmt: skip
            what = f"{name} {gpu_backend} s == t T={temperature} {kw} {crng.tag}"
            assert not loss.any() and not grad.any(), what
    s, t = crng.logits(rows, V), crng.logits(rows, V)
    none = torch.zeros(rows, dtype=torch.bool, device="cuda")
    loss, grad = run_loss(lambda y: fn(y, t, temperature=2.0, mask=none), s, _g())
    assert loss.item() == 0.0 and not grad.any(), f"{name} {gpu_backend} all masked {crng.tag}"
    both = crng.rand_bool(rows, V, p=0.2)
    both[:, :3] = False
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[both] = float("-inf")
    t_inf[both] = float("-inf")
    s_inf[:, 1] = float("-inf")  # the student gives no mass where the teacher does
    low = crng.rand_bool(rows, V, p=0.3)
    low[:, 0] = False
    s_low, t_low = s.clone(), t.clone()
    s_low[low] = -150.0
    t_low[low] = crng.uniform(rows, V, low=-170.0, high=-130.0)[low]
    betas = ({"beta": 0.01}, {"beta": 0.5}, {"beta": 0.99}) if name == "jsd" else ({},)
    for leaf, teacher, what in ((s_inf, t_inf, "-inf"), (s_low, t_low, "lp < -104")):
        for extra in betas:
            kw = dict(extra, temperature=1.0, reduction="none")
            _, grad = check_gpu(
                lambda y, kw=kw, teacher=teacher: fn(y, teacher, **kw),
                lambda y64, kw=kw, teacher=teacher: reference.divergence_loss(
                    y64, teacher.double(), name, **kw
                ),
                leaf,
                crng.randn(rows),
                what=f"{name} {gpu_backend} {what} {extra} {crng.tag}",
            )
            assert torch.isfinite(grad).all(), f"{name} {what} {extra} {crng.tag}"
    if name == "jsd":
        tb = crng.logits(rows, V, dtype=BF16)
        sb = (tb.float() + crng.randn(rows, V, scale=1e-3)).to(BF16)
        for beta in (0.1, 0.5, 0.9):
            loss = fn(sb, tb, beta=beta, temperature=1.0, reduction="none")
            assert (loss >= 0).all(), f"jsd {gpu_backend} beta={beta} min {loss.min()} {crng.tag}"


def test_divergences_auto_without_host_sync(crng):
    """`auto` on CUDA runs the divergences on the CUDA kernel when the core has it (else Triton),
    and a device normalizer is never read on the host."""
    expected = "native" if backend.native_cuda_built() else "triton"
    if expected == "triton" and backend.triton_interpreting():
        _unavailable("TRITON_INTERPRET is on: run with TRITON_INTERPRET=0 (see the module doc)")
    for op in ("reverse_kl", "jsd", "tvd", "distillation_divergence"):
        assert backend.select_backend(op, torch.device("cuda")) == expected, op
    s = crng.logits(512, 32_000, dtype=BF16)
    t = crng.logits(512, 32_000, dtype=BF16)
    n = torch.tensor(300.0, device="cuda")

    def call():
        leaf = s.detach().requires_grad_(True)
        jsd_loss(leaf, t, beta=0.3, normalizer=n, softcap=30.0).backward(_g())
        reverse_kl_loss(leaf, t, normalizer=n).backward(_g())

    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- topk_kl (sparse teacher targets) --------------------------------------------------------


@pytest.mark.parametrize("normalization", ["full", "renormalized", "tail"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=_name)
def test_topk_kl_matches_oracle(gpu_backend, crng, normalization, dtype):
    """topk_distillation_loss (KD over a top-64 teacher + CE) at 2048 x 32,000 on the GPU against
    the float64 oracle; a repeated id makes its token NaN (no host check on a GPU); no host
    sync."""
    from fastdistill.losses import topk_distillation_loss

    _require("topk_kl")
    rows, V, k = 2048, 32_000, 64
    T = 2.0
    Tc = T if normalization == "tail" else 1.0
    logp = torch.log_softmax(crng.randn(rows, V, scale=3.0) / Tc, -1)
    lp, ids = logp.topk(k, -1)
    tail = torch.log1p(-lp.double().exp().sum(-1).clamp(max=1 - 1e-12)).float()
    s = crng.randn(rows, V, scale=3.0, dtype=dtype)
    labels, mask = crng.cuda_labels(rows, V), crng.cuda_mask(rows)
    kw = dict(
        teacher_tail=tail, labels=labels, mask=mask, normalization=normalization,
        temperature=T, capture_temperature=Tc, t2_scale=True, alpha_kd=1.0, alpha_ce=0.5,
    )  # fmt: skip
    ref_kw = dict(kw, teacher_tail=tail.double())
    check_gpu(
        lambda x: topk_distillation_loss(x, ids, lp, **kw)[0],
        lambda x: reference.topk_distillation_loss(x, ids, lp.double(), **ref_kw)[0],
        s, _g(), what=f"topk {normalization} {dtype} {crng.tag}",
    )  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaf = s.detach().requires_grad_(True)
        topk_distillation_loss(leaf, ids, lp, **kw)[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = ids.clone()
    bad[5, 1] = bad[5, 0]
    leaf = s.detach().requires_grad_(True)
    out = torch.ops.fastdistill.topk_kl(
        leaf, bad, lp, tail, None, None, normalization, T, Tc, False, 1.0, 0.0, IGNORE, "none",
        None, True,
    )  # fmt: skip
    assert torch.isnan(out[0][5]) and torch.isnan(out[2][5]).all()
    assert torch.isfinite(out[0][:5]).all() and torch.isfinite(out[2][:5]).all()
