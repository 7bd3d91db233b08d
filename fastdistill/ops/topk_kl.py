"""fastdistill::topk_kl: forward KL to a sparse (top-k) teacher and hard cross-entropy, one pass.

Meaning: ``fastdistill.reference.topk_kl_rows`` / ``topk_distillation_loss``. Per row of the
student logits s ``(rows, V)`` with the teacher's stored ids K and log-probs ℓ ``(rows, k)``
(and, for ``tail``, the log of the mass outside K, ``(rows,)``):

- kd = KL(p ‖ q) over K (+ the tail bucket), z = s/T, as the reference defines per
  ``normalization`` (``full``, ``renormalized``, ``tail``); times T² when ``t2_scale``; on rows
  ``kd_mask`` selects; reduced by ``reduction`` (``batchmean``: / #selected or / ``normalizer``;
  ``sum``; ``none``: per row);
- ce = logsumexp(s) − s[label] on rows with ``labels != ignore_index``, mean over them (or /
  ``normalizer``); only when ``alpha_ce > 0``.

Outputs: alpha_kd · kd + alpha_ce · ce (per row for ``none``), the components [kd, ce] (float32,
no gradient) and the student gradient of the first output, computed in the forward pass when
``compute_grad``. Gradient w.r.t. z: q_j P − p_j [j ∈ K] (− p_tail q_j / q_tail outside K for
``tail``), chained through 1/T; the teacher gets none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.backend import select_backend
from fastdistill.ops._common import (
    alloc_grad,
    as_rows,
    check_float_tensor,
    check_labels,
    check_mask,
    empty_grad,
    flat_rows,
    on_device,
    register_saved_grad_autograd,
    unsupported,
)
from fastdistill.ops._fused_logits import _device_scalar, check_label_range

REDUCTIONS = ("batchmean", "sum", "none")
# csrc/cpu/topk_kl.h, enum TopkNormalization.
NORMALIZATION_CODES = {"full": 0, "renormalized": 1, "tail": 2}
ID_DTYPES = (torch.int64, torch.int32, torch.uint16)


def check_topk_ids(ids: Tensor, vocab_size: int, selected: Tensor | None) -> None:
    """Ids of the selected rows ``(rows, k)`` in [0, V) and distinct within each row; a
    ValueError naming the first bad row otherwise. CPU tensors only: on an accelerator the check
    would need a host sync (the GPU kernels make such a row's loss and gradient NaN instead)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    rows = ids if selected is None else ids[selected]
    out = (rows < 0) | (rows >= vocab_size)
    if bool(out.any()):
        r, i = (int(x) for x in out.nonzero()[0])
        raise ValueError(
            f"invalid teacher_ids: id {int(rows[r, i])} (position {i} of selected row {r}) is "
            f"outside [0, {vocab_size}), the student's vocabulary"
        )
    srt = rows.sort(-1).values
    dup = srt[:, 1:] == srt[:, :-1]
    if bool(dup.any()):
        r, i = (int(x) for x in dup.nonzero()[0])
        raise ValueError(
            f"invalid teacher_ids: id {int(srt[r, i])} appears twice in selected row {r}; the "
            "stored ids of a token must be distinct"
        )


def _rows(student, teacher_ids, teacher_logprobs, teacher_tail, kd_mask, labels, tail_mode):
    """Validated row views: what the kernels rely on (they trust shapes and pointers)."""
    check_float_tensor(student, "student_logits")
    lead, device = student.shape[:-1], student.device
    if teacher_ids.dim() != student.dim() or teacher_ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids must have shape (*lead, k) with lead {tuple(lead)}, got "
            f"{tuple(teacher_ids.shape)}"
        )
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)} but teacher_ids has "
            f"shape {tuple(teacher_ids.shape)}; they must match"
        )
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {device}")
    if tail_mode and (teacher_tail is None or teacher_tail.shape != lead):
        raise ValueError(f'normalization="tail" needs teacher_tail of shape {tuple(lead)}')
    k = teacher_ids.shape[-1]
    mask = check_mask(kd_mask, lead, device)
    s2 = as_rows(student)
    ids2 = teacher_ids.reshape(-1, k).to(torch.int64).contiguous()
    lp2 = teacher_logprobs.reshape(-1, k).to(torch.float32).contiguous()
    tail1 = flat_rows(teacher_tail, torch.float32) if tail_mode else None
    mask1 = flat_rows(mask)
    labels1 = (
        flat_rows(check_labels(labels, lead, device), torch.int64) if labels is not None else None
    )
    return s2, ids2, lp2, tail1, mask1, labels1


def _launch_native_cpu(s2, ids2, lp2, tail1, mask_u8, labels1, scales, row_kd, row_ce, grad, **kw):
    rows, cols = s2.shape
    _native.core().topk_kl(
        student=s2.data_ptr(), student_row_stride=s2.stride(0), ids=ids2.data_ptr(),
        logprobs=lp2.data_ptr(), tail=_native.ptr(tail1), k=ids2.shape[1],
        kd_mask=_native.ptr(mask_u8), labels=_native.ptr(labels1), rows=rows, cols=cols,
        dtype=_native.DTYPE_CODES[s2.dtype], normalization=kw["normalization"],
        temperature=kw["temperature"], capture_temperature=kw["capture_temperature"],
        ignore_index=kw["ignore_index"], use_kd=kw["use_kd"], use_ce=labels1 is not None,
        scales=scales.data_ptr(), row_kd=_native.ptr(row_kd), row_ce=_native.ptr(row_ce),
        grad=_native.ptr(grad), num_threads=_native.num_threads(),
    )  # fmt: skip


def _sorted_ids(ids2: Tensor, lp2: Tensor) -> tuple[Tensor, Tensor]:
    """The GPU kernels take each row's ids in ascending order (with their log-probs permuted
    alike): repeated ids are then neighbours, and membership of a column is a binary search."""
    ids_sorted, order = ids2.sort(-1)
    return ids_sorted.contiguous(), lp2.gather(-1, order).contiguous()


def _launch_triton(s2, ids2, lp2, tail1, mask_u8, labels1, scales, row_kd, row_ce, grad, **kw):
    from fastdistill.triton import topk_kl as kernel  # import only when used: needs triton

    ids2, lp2 = _sorted_ids(ids2, lp2)
    kernel.launch(s2, ids2, lp2, tail1, mask_u8, labels1, scales, row_kd, row_ce, grad, **kw)


def _launch_cuda(s2, ids2, lp2, tail1, mask_u8, labels1, scales, row_kd, row_ce, grad, **kw):
    ids2, lp2 = _sorted_ids(ids2, lp2)
    rows, cols = s2.shape
    _native.core().topk_kl_cuda(
        student=s2.data_ptr(), student_row_stride=s2.stride(0), ids=ids2.data_ptr(),
        logprobs=lp2.data_ptr(), tail=_native.ptr(tail1), k=ids2.shape[1],
        kd_mask=_native.ptr(mask_u8), labels=_native.ptr(labels1), rows=rows, cols=cols,
        dtype=_native.DTYPE_CODES[s2.dtype], normalization=kw["normalization"],
        temperature=kw["temperature"], capture_temperature=kw["capture_temperature"],
        ignore_index=kw["ignore_index"], use_kd=kw["use_kd"], scales=scales.data_ptr(),
        row_kd=_native.ptr(row_kd), row_ce=_native.ptr(row_ce), grad=_native.ptr(grad),
        stream=torch.cuda.current_stream(s2.device).cuda_stream,
    )  # fmt: skip


def _launcher(student: Tensor, compute_grad: bool):
    backend = select_backend("topk_kl", student.device)
    device = student.device.type
    if backend == "native" and device == "cpu":
        return _launch_native_cpu, alloc_grad(student, compute_grad)
    if backend == "native" and device == "cuda":
        return _launch_cuda, empty_grad(student, compute_grad)
    if backend == "triton":
        return _launch_triton, alloc_grad(student, compute_grad)
    raise unsupported(f"topk_kl has no {backend} kernel for {device}")


@torch.library.custom_op("fastdistill::topk_kl", mutates_args=())
def topk_kl(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor | None,
    kd_mask: Tensor | None,
    labels: Tensor | None,
    normalization: str,
    temperature: float,
    capture_temperature: float,
    t2_scale: bool,
    alpha_kd: float,
    alpha_ce: float,
    ignore_index: int,
    reduction: str,
    normalizer: Tensor | None,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss in float32, components [kd, ce], d loss/d student_logits or empty)."""
    use_kd, use_ce = alpha_kd > 0, alpha_ce > 0
    launcher, grad = _launcher(student_logits, compute_grad)
    s2, ids2, lp2, tail1, mask1, labels1 = _rows(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail, kd_mask,
        labels if use_ce else None, normalization == "tail",
    )  # fmt: skip
    device, (rows, cols) = student_logits.device, s2.shape
    if launcher is _launch_triton:
        check_topk_ids(ids2, cols, mask1 if use_kd else ids2.new_zeros(rows, dtype=torch.bool))
    if labels1 is not None:
        check_label_range(labels1, cols, ignore_index)
    f64 = dict(dtype=torch.float64)
    n_kd = mask1.sum(**f64) if mask1 is not None else _device_scalar(rows, device)
    n_ce = (labels1 != ignore_index).sum(**f64) if use_ce else _device_scalar(1.0, device)
    given = normalizer is not None
    one = _device_scalar(1.0, device)
    if reduction == "batchmean":
        d_kd = normalizer.to(torch.float64) if given else n_kd.clamp_min(1.0)
    else:
        d_kd = one
    d_ce = normalizer.to(torch.float64) if given else n_ce.clamp_min(1.0)
    t2 = temperature * temperature if t2_scale else 1.0
    chain = temperature if t2_scale else 1.0 / temperature  # d(t2 · KL(z))/ds, z = s/T
    scales = torch.stack([alpha_kd * chain / d_kd, alpha_ce / d_ce]).to(torch.float32)
    f32 = dict(dtype=torch.float32, device=device)
    row_kd = torch.empty(rows, **f32) if use_kd else None
    row_ce = torch.empty(rows, **f32) if use_ce else None
    with on_device(device):
        launcher(
            s2, ids2, lp2, tail1, mask1.view(torch.uint8) if mask1 is not None else None,
            labels1, scales, row_kd, row_ce, grad.view(rows, cols) if grad.numel() else None,
            normalization=NORMALIZATION_CODES[normalization], temperature=temperature,
            capture_temperature=capture_temperature, ignore_index=ignore_index, use_kd=use_kd,
        )  # fmt: skip
    zero = _device_scalar(0.0, device)
    kd = row_kd.sum(**f64) * t2 / d_kd if use_kd else zero
    ce = row_ce.sum(**f64) / d_ce if use_ce else zero
    components = torch.stack([kd, ce]).to(torch.float32)
    if reduction == "none":
        loss = (row_kd * (alpha_kd * t2)).view(student_logits.shape[:-1])
    else:
        loss = (alpha_kd * kd + alpha_ce * ce).to(torch.float32)
    return loss, components, grad


@topk_kl.register_fake
def _(student_logits, teacher_ids, teacher_logprobs, teacher_tail, kd_mask, labels,
      normalization, temperature, capture_temperature, t2_scale, alpha_kd, alpha_ce,
      ignore_index, reduction, normalizer, compute_grad):  # fmt: skip
    lead = student_logits.shape[:-1] if reduction == "none" else ()
    f32 = dict(dtype=torch.float32)
    return (
        student_logits.new_empty(lead, **f32),
        student_logits.new_empty((2,), **f32),
        empty_grad(student_logits, compute_grad),
    )


register_saved_grad_autograd(topk_kl, num_inputs=16)
