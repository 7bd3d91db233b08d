"""Shared helpers for the numerics tests (ARCHITECTURE.md, "Numerics rules").

The oracle is ``fastdistill.reference`` evaluated in float64 on the SAME already-rounded inputs
(``x.double()`` of the bf16/fp16/fp32 tensor the kernel sees), so it shares none of the kernel's
casts. Losses and student gradients are compared with norm-wise relative errors:

- loss (any input dtype, fp32 math): ``|x - ref| <= 1e-5 |ref| + atol``;
- gradient, fp32 inputs: ``|g - ref| <= 1e-5 |ref| + atol``;
- gradient, bf16/fp16 inputs: no worse than rounding the float64 gradient to that dtype:
  ``|g - ref| <= 2 r + 1e-5 |ref| + atol`` where ``r`` is the rounding error (see ``grad_bound``:
  the larger of rounding ``ref`` once and rounding it in the two steps a fused op that saves its
  gradient in the forward cannot avoid).

Every test draws fresh data; the seed is in every assertion message, and
``FASTDISTILL_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from fastdistill import _native

# The CPU variants of the compiled core this machine runs, narrowest first.
ISAS: list[str] = list(_native.core().supported_isas()) if _native.available() else []
# Every implementation a numerics test covers: the native core on each CPU variant, the torch
# backend, and the Triton kernels on CPU tensors through the Triton interpreter (conftest.py turns
# TRITON_INTERPRET on) whenever triton is installed.
IMPLS: list[str] = [f"native:{isa}" for isa in ISAS] + ["torch"]
if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
    IMPLS.append("triton")


# Markers for torch-backend bugs since fixed (unselected-row NaN gradients, a NaN teacher hidden
# by the reference): the tests that carried them now pass on every implementation.
TORCH_BACKEND_UNSELECTED_NAN_GRAD = None
TORCH_BACKEND_HIDES_TEACHER_NAN = None


def impl_params(torch_mark=None) -> list:
    """``IMPLS`` as pytest params (ids ``native-avx2``, ``torch``), ``torch_mark`` on the torch
    backend: for tests that must run every implementation and record a torch-backend bug."""
    return [
        pytest.param(
            name,
            id=name.replace(":", "-"),
            marks=[torch_mark] if torch_mark is not None and name == "torch" else [],
        )
        for name in IMPLS
    ]


def fp16_impl(impl: str) -> bool:
    """fp16 (the least used input dtype) is covered on the default CPU variant and the non-native
    backends only, to keep the suite fast; fp32 and bf16 run on every variant."""
    return not impl.startswith("native:") or impl == f"native:{ISAS[-1]}"


def use_impl(monkeypatch, impl: str) -> None:
    """Select ``backend[:isa]`` for the rest of the test (monkeypatch undoes the env var; the
    conftest restores the CPU variant)."""
    backend, _, isa = impl.partition(":")
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    if isa:
        _native.core().set_isa(isa)


LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
# Gradients of bf16/fp16 inputs: this many times the error of rounding the exact gradient.
ROUNDING_MARGIN = 2.0
SEED_ENV = "FASTDISTILL_TEST_SEED"


def new_seed() -> int:
    fixed = os.environ.get(SEED_ENV)
    if fixed:
        return int(fixed)
    return int.from_bytes(os.urandom(4), "little")


class Rng:
    """Random test data from one printed seed."""

    def __init__(self, seed: int | None = None):
        self.seed = new_seed() if seed is None else seed
        self.gen = torch.Generator().manual_seed(self.seed)

    @property
    def tag(self) -> str:
        return f"[seed {self.seed}: rerun with {SEED_ENV}={self.seed}]"

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        return x.to(dtype)

    def uniform(self, *shape: int, low: float, high: float, dtype=torch.float32) -> Tensor:
        x = torch.rand(shape, generator=self.gen, dtype=torch.float64) * (high - low) + low
        return x.to(dtype)

    def logits(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 3.0):
        return self.randn(*shape, scale=scale, dtype=dtype)

    def mask(self, lead: tuple[int, ...], p: float = 0.6) -> Tensor:
        """A bool row mask with both selected and unselected rows (when there are >= 2 rows)."""
        m = torch.rand(lead, generator=self.gen) < p
        flat = m.view(-1)
        if flat.numel() >= 2:
            flat[0] = True
            flat[-1] = False
        return m

    def labels(
        self,
        lead: tuple[int, ...],
        classes: int,
        *,
        ignore_index: int = -100,
        ignore_frac: float = 0.3,
    ) -> Tensor:
        """int64 class indices with a fraction of rows set to ``ignore_index`` (never all)."""
        lab = torch.randint(0, classes, lead, generator=self.gen)
        ignored = torch.rand(lead, generator=self.gen) < ignore_frac
        lab = torch.where(ignored, torch.full_like(lab, ignore_index), lab)
        flat = lab.view(-1)
        if flat.numel() >= 2:
            flat[0] = classes - 1  # at least one valid row, and the last class is used
        return lab

    def grad_output(self, shape: tuple[int, ...]) -> Tensor:
        """Upstream gradient != 1: 0.37 for a scalar loss, random per row for reduction none."""
        if shape == ():
            return torch.tensor(0.37)
        return self.randn(*shape)


def norm(x: Tensor) -> float:
    return torch.linalg.vector_norm(x.detach().double()).item()


def identity(x: Tensor) -> Tensor:
    return x


def oracle(
    ref_fn: Callable[[Tensor], Tensor],
    student: Tensor,
    grad_out: Tensor,
    view: Callable[[Tensor], Tensor] = identity,
) -> tuple[Tensor, Tensor]:
    """float64 reference loss and d(<loss, grad_out>)/d student on ``student.double()``.

    ``ref_fn`` receives ``view(student64)``; it must close over float64 copies of the other inputs.
    """
    x = student.detach().double().requires_grad_(True)
    loss = ref_fn(view(x))
    loss.backward(grad_out.double().expand_as(loss))
    return loss.detach(), x.grad


def run_loss(
    fn: Callable[[Tensor], Tensor],
    student: Tensor,
    grad_out: Tensor,
    view: Callable[[Tensor], Tensor] = identity,
) -> tuple[Tensor, Tensor]:
    """fastdistill loss of ``view(leaf)`` and the gradient of ``<loss, grad_out>`` w.r.t. the leaf."""
    x = student.detach().clone().requires_grad_(True)
    loss = fn(view(x))
    loss.backward(grad_out)
    assert x.grad is not None, "the student received no gradient"
    return loss.detach(), x.grad


def assert_loss_close(
    loss: Tensor, ref: Tensor, *, what: str, rtol: float = LOSS_RTOL, atol: float = 1e-10
) -> None:
    assert loss.dtype == torch.float32, f"{what}: loss dtype {loss.dtype}, expected float32"
    assert loss.shape == ref.shape, f"{what}: loss shape {tuple(loss.shape)} != {tuple(ref.shape)}"
    err, size = norm(loss.double() - ref), norm(ref)
    assert err <= rtol * size + atol, (
        f"{what}: loss error {err:.3e} (|ref| {size:.3e}, relative {err / max(size, 1e-300):.2e})"
        f" > rtol {rtol:g} + atol {atol:g}"
    )


def leaf_scale(student: Tensor, grad_out: Tensor, view: Callable[[Tensor], Tensor] = identity):
    """The factor ``grad_out`` applies to the gradient of each element of ``student`` (float64,
    1 where the view does not read the leaf), or the 0-dim ``grad_out`` for a scalar loss."""
    if grad_out.dim() == 0:
        return grad_out.double()
    scale = torch.ones(student.shape, dtype=torch.float64)
    v = view(scale)
    v.copy_(grad_out.double().unsqueeze(-1).expand_as(v))
    return scale


def grad_bound(
    ref: Tensor,
    dtype: torch.dtype,
    *,
    scale: Tensor | None = None,
    rtol: float = GRAD_RTOL,
    atol: float = 1e-10,
) -> float:
    """Allowed ``|grad - ref|`` (see the module docstring).

    For bf16/fp16 the rounding term is the larger of the error of rounding ``ref`` once and the
    error of the best a fused op can do when it stores the gradient in the input dtype during the
    forward and scales it by ``grad_output`` (in fp32, rounded again) in the backward:
    ``round(round(ref / scale) * scale)``. The second one is what rules when the gradient's
    entries are nearly all of one magnitude (peaked softmax at T=0.05), where rounding ``ref``
    once can be nearly exact by chance while no two-step rounding is.
    """
    bound = rtol * norm(ref) + atol
    if dtype != torch.float32:
        rounding = norm(ref.to(dtype).double() - ref)
        if scale is not None:
            safe = torch.where(scale == 0, 1.0, scale)
            twice = ((ref / safe).to(dtype).float() * safe.float()).to(dtype).double()
            rounding = max(rounding, norm(twice - ref))
        bound += ROUNDING_MARGIN * rounding
    return bound


def assert_grad_close(
    grad: Tensor,
    ref: Tensor,
    dtype: torch.dtype,
    *,
    what: str,
    scale: Tensor | None = None,
    rtol: float = GRAD_RTOL,
    atol: float = 1e-10,
) -> None:
    assert grad.dtype == dtype, f"{what}: gradient dtype {grad.dtype}, expected {dtype}"
    assert grad.shape == ref.shape, f"{what}: grad shape {tuple(grad.shape)} != {tuple(ref.shape)}"
    err = norm(grad.double() - ref)
    bound = grad_bound(ref, dtype, scale=scale, rtol=rtol, atol=atol)
    assert err <= bound, (
        f"{what}: gradient error {err:.3e} > bound {bound:.3e} (|ref| {norm(ref):.3e}, relative "
        f"{err / max(norm(ref), 1e-300):.2e}, rounding error of ref to {dtype}: "
        f"{norm(ref.to(dtype).double() - ref):.2e})"
    )


def check(
    fn: Callable[[Tensor], Tensor],
    ref_fn: Callable[[Tensor], Tensor] | None,
    student: Tensor,
    grad_out: Tensor,
    *,
    what: str,
    view: Callable[[Tensor], Tensor] = identity,
    expected: tuple[Tensor, Tensor] | None = None,
    loss_atol: float = 1e-10,
    grad_atol: float = 1e-10,
    grad_rtol: float = GRAD_RTOL,
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` on ``view(student)`` with ``grad_out`` and compare loss and gradient with the
    float64 oracle (computed here unless ``expected`` is given). Returns the oracle."""
    if expected is None:
        expected = oracle(ref_fn, student, grad_out, view)
    ref_loss, ref_grad = expected
    assert torch.isfinite(ref_loss).all() and torch.isfinite(ref_grad).all(), (
        f"{what}: the oracle itself is not finite (test bug)"
    )
    loss, grad = run_loss(fn, student, grad_out, view)
    assert_loss_close(loss, ref_loss, what=what, atol=loss_atol)
    assert_grad_close(
        grad,
        ref_grad,
        student.dtype,
        what=what,
        rtol=grad_rtol,
        atol=grad_atol,
        scale=leaf_scale(student, grad_out, view),
    )
    return expected


def assert_garbage_ignored(
    fn_bad, s_bad: Tensor, fn_ok, s_ok: Tensor, unselected: Tensor, tag: str
) -> None:
    """NaN/inf in unselected rows (of ``s_bad`` or of what ``fn_bad`` closes over) change
    nothing: same loss and gradient as clean data, and exactly zero gradient in those rows."""
    g = torch.tensor(0.37)
    loss, grad = run_loss(fn_bad, s_bad, g)
    loss_ok, grad_ok = run_loss(fn_ok, s_ok, g)
    assert torch.isfinite(loss).all() and torch.allclose(loss, loss_ok, rtol=1e-6, atol=0), (
        f"loss {loss} vs {loss_ok} {tag}"
    )
    bad_rows = grad[unselected]
    assert torch.equal(bad_rows, torch.zeros_like(bad_rows)), f"unselected rows' grad {tag}"
    assert torch.allclose(grad, grad_ok, rtol=1e-6, atol=1e-9), f"gradient {tag}"
