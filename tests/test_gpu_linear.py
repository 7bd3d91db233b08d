"""GPU tests of the fused linear losses (fastdistill/ops/linear_distillation.py and
linear_topk_distillation.py) on CUDA tensors, against the float64 materialised reference.

Marked ``gpu``; every test skips where there is no CUDA device (``FASTDISTILL_GPU_STRICT=1``, as
tools/gpu/gpu_check.sh sets, turns the skip into a failure). What only a GPU can check: the
half-precision heads' logits come from ``torch.mm(..., out_dtype=torch.float32)`` there (cuBLAS,
fp32 accumulation and output) instead of a float32 copy of the head, which the CPU tests cannot
reach (PyTorch's CPU build has no such kernel).

    TRITON_INTERPRET=0 pytest -q -m gpu tests/test_gpu_linear.py
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdistill.losses as FL
from fastdistill import reference_linear
from fastdistill.ops.linear_distillation import fp32_output_gemm

pytestmark = pytest.mark.gpu

STRICT = os.environ.get("FASTDISTILL_GPU_STRICT", "").strip() not in ("", "0")
N, H, HT, V = 1024, 256, 384, 32_000


@pytest.fixture(autouse=True)
def _cuda_only():
    if not torch.cuda.is_available():
        reason = "needs a CUDA device: torch.cuda.is_available() is False"
        if STRICT:
            pytest.fail(f"{reason} (FASTDISTILL_GPU_STRICT=1: a GPU check must run everything)")
        pytest.skip(reason)
    yield
    torch.cuda.synchronize()


def _inputs(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=g, device="cuda") * scale
        return x.to(dtype)

    h = randn(N, H).requires_grad_(True)
    w = randn(V, H, scale=H**-0.5).requires_grad_(True)
    th, tw = randn(N, HT), randn(V, HT, scale=HT**-0.5)
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    labels[::7] = -100
    return h, w, th, tw, labels


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_linear_distillation_matches_float64(dtype, divergence):
    h, w, th, tw, labels = _inputs(dtype)
    assert fp32_output_gemm(h, w) == (dtype != torch.float32)
    kw = dict(labels=labels, divergence=divergence, alpha_ce=0.5, temperature=2.0)
    total, _, _ = FL.linear_distillation_loss(
        h, w, teacher_hidden=th, teacher_weight=tw, chunk_size=300, **kw
    )
    total.backward()
    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref, _, _ = reference_linear.linear_distillation_loss(
        hd, wd, teacher_hidden=th.double(), teacher_weight=tw.double(), **kw
    )
    ref.backward()
    assert float(total) == pytest.approx(float(ref), rel=1e-5)
    # fp32 logits and gradients, then one rounding of each gradient to the input dtype.
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert _relative_error(h.grad, hd.grad) <= tol
    assert _relative_error(w.grad, wd.grad) <= tol


def test_a_half_precision_teacher_head_is_not_widened():
    """The teacher's head is only multiplied forward: with bf16 inputs no float32 copy of it
    (V x Ht x 4 bytes) is allocated; the working memory is the chunk buffers and the student's
    float32 head and weight gradient."""
    h, w, th, tw, labels = _inputs(torch.bfloat16)
    chunk = 256
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    FL.linear_distillation_loss(
        h, w, teacher_hidden=th, teacher_weight=tw, labels=labels, chunk_size=chunk
    )[0].backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    student_fp32 = 2 * V * H * 4  # widened head + float32 weight-gradient accumulator
    returned = (V * H + N * H) * 2  # the bf16 gradients of the head and the hidden states
    chunks = 3 * chunk * V * 4
    small = N * (H + HT) * 8  # per-token temporaries
    teacher_fp32 = V * HT * 4  # what a widened teacher head would add
    assert extra < student_fp32 + returned + chunks + small + teacher_fp32 // 2, extra
