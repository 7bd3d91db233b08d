"""fastdistill::cosine: 1 − cos(s, t) per selected row of hidden states, reduced over rows
(``mean`` = over selected rows, as ``CosineEmbeddingLoss(target=1)``), with torch's epsilon:
cos = <s,t> / sqrt((|s|² + 1e-12)(|t|² + 1e-12)). Gradient (student only), computed in the forward:
−(t / denom − cos · s / (|s|² + eps)) / normaliser."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.backend import select_backend
from fastdistill.ops._common import (
    alloc_grad,
    as_rows,
    check_mask,
    check_pair,
    empty_grad,
    flat_rows,
    on_device,
    register_saved_grad_autograd,
    unsupported,
)
from fastdistill.ops._fused_logits import device_divisor

REDUCTIONS = ("mean", "sum", "none")


def _norm(reduction: str) -> int:
    # "mean" is over selected rows (CosineEmbeddingLoss), not rows x D.
    return _native.NORM_ROWS if reduction == "mean" else _native.NORM_SUM


def _checked_rows(student, teacher, mask):
    """Validated ``(rows, D)`` views and the uint8 row mask for a kernel. Raw-op callers skip the
    public checks and the kernels trust their pointers (see _fused_logits._checked_rows)."""
    check_pair(student, teacher, "student_hidden", "teacher_hidden")
    mask1 = flat_rows(check_mask(mask, student.shape[:-1], student.device))
    return (
        as_rows(student),
        as_rows(teacher),
        mask1.view(torch.uint8) if mask1 is not None else None,
    )


def _cosine_native(student, teacher, mask, reduction, grad):
    s2, t2, mask_u8 = _checked_rows(student, teacher, mask)
    out = torch.empty(1, dtype=torch.float32)
    row_loss = torch.empty(student.shape[:-1], dtype=torch.float32) if reduction == "none" else None
    _native.core().cosine(
        student=s2.data_ptr(),
        student_row_stride=s2.stride(0),
        teacher=t2.data_ptr(),
        teacher_row_stride=t2.stride(0),
        mask=_native.ptr(mask_u8),
        rows=s2.shape[0],
        cols=s2.shape[1],
        dtype=_native.DTYPE_CODES[student.dtype],
        norm=_norm(reduction),
        row_loss=_native.ptr(row_loss),
        out=out.data_ptr(),
        grad=grad.data_ptr() if grad.numel() else 0,
        num_threads=_native.num_threads(),
    )
    return (row_loss if reduction == "none" else out[0].clone()), grad


def _cosine_gpu(launch, student, teacher, mask, reduction, grad):
    """Triton or CUDA kernel: per-row losses and the gradient; the reduction is a device op."""
    s2, t2, mask_u8 = _checked_rows(student, teacher, mask)
    rows, cols = s2.shape
    n_sel = mask_u8.sum(dtype=torch.float64) if mask_u8 is not None else rows
    divisor = device_divisor(_norm(reduction), n_sel, cols, student.device)
    scale = (1.0 / divisor).to(torch.float32).reshape(1)
    row_loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    with on_device(student.device):
        launch(s2, t2, mask_u8, scale, row_loss, grad.view(s2.shape) if grad.numel() else None)
    if reduction == "none":
        return row_loss.view(student.shape[:-1]), grad
    return (row_loss.sum(dtype=torch.float64) / divisor).to(torch.float32), grad


def _launch_triton(s2, t2, mask_u8, scale, row_loss, grad):
    from fastdistill.triton import cosine as kernel  # import only when used: needs triton

    kernel.launch(s2, t2, mask_u8, scale, row_loss, grad)


def _launch_cuda(s2, t2, mask_u8, scale, row_loss, grad):
    _native.core().cosine_cuda(
        student=s2.data_ptr(),
        student_row_stride=s2.stride(0),
        teacher=t2.data_ptr(),
        teacher_row_stride=t2.stride(0),
        mask=_native.ptr(mask_u8),
        rows=s2.shape[0],
        cols=s2.shape[1],
        dtype=_native.DTYPE_CODES[s2.dtype],
        scale=scale.data_ptr(),
        row_loss=row_loss.data_ptr(),
        grad=_native.ptr(grad),
        stream=torch.cuda.current_stream(s2.device).cuda_stream,
    )


@torch.library.custom_op("fastdistill::cosine", mutates_args=())
def cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d student_hidden or an empty tensor)."""
    backend = select_backend("cosine", student_hidden.device)
    device = student_hidden.device.type
    args = (student_hidden, teacher_hidden, mask, reduction)
    if backend == "native" and device == "cpu":
        return _cosine_native(*args, alloc_grad(student_hidden, compute_grad))
    if backend == "native" and device == "cuda":
        return _cosine_gpu(_launch_cuda, *args, empty_grad(student_hidden, compute_grad))
    if backend == "triton":
        return _cosine_gpu(_launch_triton, *args, alloc_grad(student_hidden, compute_grad))
    raise unsupported(f"cosine has no {backend} kernel for {device}")


@cosine.register_fake
def _(student_hidden, teacher_hidden, mask, reduction, compute_grad):
    lead = student_hidden.shape[:-1] if reduction == "none" else ()
    return (
        student_hidden.new_empty(lead, dtype=torch.float32),
        empty_grad(student_hidden, compute_grad),
    )


register_saved_grad_autograd(cosine, num_inputs=5)
