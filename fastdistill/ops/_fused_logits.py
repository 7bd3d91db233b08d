"""Host side of the fused logits kernel (csrc/cpu/fused_logits.cpp), shared by the kl_div,
cross_entropy, mse and distillation ops: they are one row loop with different terms switched on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.ops._common import (
    as_rows,
    check_float_tensor,
    check_labels,
    check_mask,
    check_pair,
    flat_rows,
)


@dataclass(frozen=True)
class Terms:
    """Which loss terms to compute, their weights in the total and their normalisers."""

    kl: bool = False
    ce: bool = False
    mse: bool = False
    w_kl: float = 1.0
    w_ce: float = 1.0
    w_mse: float = 1.0
    norm_kl: int = _native.NORM_ROWS
    norm_ce: int = _native.NORM_ROWS
    norm_mse: int = _native.NORM_ROWS


@dataclass
class FusedResult:
    out: Tensor  # float32 [total, kl, ce, mse], normalised
    row_kl: Tensor | None  # float32, leading shape, when rows were requested
    row_ce: Tensor | None
    row_mse: Tensor | None
    grad: Tensor  # student-shaped gradient of out[0], or an empty placeholder


def fused_logits_native(
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    terms: Terms,
    temperature: float = 1.0,
    ignore_index: int = -100,
    want_rows: bool = False,
    grad: Tensor,
) -> FusedResult:
    """Run the CPU kernel. ``grad`` is a buffer of the student's shape (written) or empty (skipped)."""
    # The raw ops (torch.ops.fastdistill.*) are callable without the public API's checks, and the
    # kernel trusts its pointers: re-check what would make it read out of bounds (cheap, O(1)).
    if teacher is not None:
        check_pair(student, teacher, "student", "teacher")
    else:
        check_float_tensor(student, "student")
    lead = student.shape[:-1]
    mask = check_mask(mask, lead, student.device)
    if labels is not None:
        labels = check_labels(labels, lead, student.device)
    C = _native.core()
    s2 = as_rows(student)
    t2 = as_rows(teacher) if teacher is not None else None
    labels1 = flat_rows(labels, torch.int64)
    mask1 = flat_rows(mask)
    mask_u8 = mask1.view(torch.uint8) if mask1 is not None else None
    rows, cols = s2.shape
    f32 = dict(dtype=torch.float32, device=student.device)
    out = torch.empty(4, **f32)
    row_kl = torch.empty(lead, **f32) if want_rows and terms.kl else None
    row_ce = torch.empty(lead, **f32) if want_rows and terms.ce else None
    row_mse = torch.empty(lead, **f32) if want_rows and terms.mse else None
    C.fused_logits(
        student=s2.data_ptr(),
        student_row_stride=s2.stride(0),
        teacher=_native.ptr(t2),
        teacher_row_stride=t2.stride(0) if t2 is not None else 0,
        labels=_native.ptr(labels1),
        mask=_native.ptr(mask_u8),
        rows=rows,
        cols=cols,
        dtype=_native.DTYPE_CODES[student.dtype],
        temperature=temperature,
        ignore_index=ignore_index,
        use_kl=terms.kl,
        use_ce=terms.ce,
        use_mse=terms.mse,
        w_kl=terms.w_kl,
        w_ce=terms.w_ce,
        w_mse=terms.w_mse,
        norm_kl=terms.norm_kl,
        norm_ce=terms.norm_ce,
        norm_mse=terms.norm_mse,
        row_kl=_native.ptr(row_kl),
        row_ce=_native.ptr(row_ce),
        row_mse=_native.ptr(row_mse),
        out=out.data_ptr(),
        grad=grad.data_ptr() if grad.numel() else 0,
        num_threads=_native.num_threads(),
    )
    return FusedResult(out, row_kl, row_ce, row_mse, grad)


def norm_code(reduction: str) -> int:
    """Normaliser code for a row reduction (see fastdistill.reference.reduce_rows)."""
    return {
        "none": _native.NORM_SUM,
        "sum": _native.NORM_SUM,
        "batchmean": _native.NORM_ROWS,
        "mean": _native.NORM_ROWS_COLS,
    }[reduction]
