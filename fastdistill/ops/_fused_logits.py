"""Host side of the fused logits kernel (csrc/cpu/fused_logits.cpp), shared by the kl_div,
cross_entropy, mse and distillation ops: they are one row loop with different terms switched on."""

from __future__ import annotations

from dataclasses import dataclass

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
    check_pair,
    empty_grad,
    flat_rows,
    on_device,
    unsupported,
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
    # What the "kl" term computes (fastdistill._native.DIVERGENCE_CODES) and whether it is
    # multiplied by T²; beta is JSD's teacher weight, 0 < beta < 1 (the ops map 0 and 1 to the
    # forward and reverse KL).
    divergence: int = _native.FORWARD_KL
    beta: float = 0.5
    t2_scale: bool = True


@dataclass(frozen=True)
class Transform:
    """The logit transforms applied in the kernel to both sides before the temperature:
    x · logit_scale, then softcap · tanh(x / softcap) when softcap > 0."""

    logit_scale: float = 1.0
    softcap: float = 0.0

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap == 0.0


@dataclass
class FusedResult:
    out: Tensor  # float32 [total, kl, ce, mse], normalised
    row_kl: Tensor | None  # float32, leading shape, when rows were requested
    row_ce: Tensor | None
    row_mse: Tensor | None
    grad: Tensor  # student-shaped gradient of out[0], or an empty placeholder
    # The gradient was written over the student's logits (run_fused_logits, grad_into): they are
    # gone, and grad is the student tensor's memory.
    in_place: bool = False


def _checked_rows(student, teacher, labels, mask):
    """Validated ``(rows, cols)`` views and flat per-row tensors for a kernel.

    The raw ops (torch.ops.fastdistill.*) are callable without the public API's checks, and the
    kernels trust their pointers: re-check what would make them read out of bounds (cheap, O(1)).
    """
    if teacher is not None:
        check_pair(student, teacher, "student", "teacher")
    else:
        check_float_tensor(student, "student")
    lead = student.shape[:-1]
    mask = check_mask(mask, lead, student.device)
    if labels is not None:
        labels = check_labels(labels, lead, student.device)
    s2 = as_rows(student)
    t2 = as_rows(teacher) if teacher is not None else None
    labels1 = flat_rows(labels, torch.int64)
    mask1 = flat_rows(mask)
    mask_u8 = mask1.view(torch.uint8) if mask1 is not None else None
    return s2, t2, labels1, mask_u8


def _row_outputs(terms: Terms, rows: int, device: torch.device):
    f32 = dict(dtype=torch.float32, device=device)
    return tuple(torch.empty(rows, **f32) if on else None for on in (terms.kl, terms.ce, terms.mse))


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
    transform: Transform = Transform(),
    normalizer: Tensor | None = None,
    grad: Tensor,
) -> FusedResult:
    """Run the CPU kernel. ``grad`` is a buffer of the student's shape (written) or empty (skipped).
    ``normalizer`` (a CPU 0-dim tensor: reading it is a load, not a device sync) divides the
    divergence term when ``terms.norm_kl`` is NORM_GIVEN."""
    s2, t2, labels1, mask_u8 = _checked_rows(student, teacher, labels, mask)
    lead = student.shape[:-1]
    rows, cols = s2.shape
    out = torch.empty(4, dtype=torch.float32, device=student.device)
    row_kl, row_ce, row_mse = (
        _row_outputs(terms, rows, student.device) if want_rows else (None, None, None)
    )
    _native.core().fused_logits(
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
        divergence=terms.divergence,
        beta=terms.beta,
        one_minus_beta=1.0 - terms.beta,
        t2_scale=terms.t2_scale,
        logit_scale=transform.logit_scale,
        softcap=transform.softcap,
        normalizer=float(normalizer) if normalizer is not None else 1.0,
    )
    return FusedResult(
        out,
        *(r.view(lead) if r is not None else None for r in (row_kl, row_ce, row_mse)),
        grad,
    )


# ---- GPU kernels (Triton on any device, CUDA from the compiled core) ----------------------------
#
# The GPU kernels write per-row values and the gradient; counts, normalisers and the reduction over
# rows are small torch ops on the device, so nothing waits for the host: the gradient weights
# reach the kernel as a device tensor, never as a Python float read back from the GPU.


def _device_scalar(x, device: torch.device) -> Tensor:
    """A float64 0-dim tensor on ``device``. Python numbers are filled in on the device (a
    torch.tensor(x, device=cuda) would be a blocking host-to-device copy)."""
    if isinstance(x, Tensor):
        return x.to(torch.float64)
    return torch.full((), float(x), dtype=torch.float64, device=device)


def device_divisor(norm: int, count, cols: int, device: torch.device, given=None) -> Tensor:
    """What a term's sum over rows is divided by (csrc/cpu/kernels.h, enum Norm), on the device;
    ``count`` (selected rows) is a device tensor or a Python number, ``given`` the normaliser of
    NORM_GIVEN."""
    if norm == _native.NORM_GIVEN:
        return _device_scalar(given, device)
    if norm == _native.NORM_SUM:
        return _device_scalar(1.0, device)
    count = _device_scalar(count, device).clamp_min(1.0)
    return count * cols if norm == _native.NORM_ROWS_COLS else count


def _launch_triton(s2, t2, labels1, mask_u8, scales, row_kl, row_ce, row_mse, grad, **kw):
    from fastdistill.triton import fused_logits as kernel  # import only when used: needs triton

    kernel.launch(s2, t2, labels1, mask_u8, scales, row_kl, row_ce, row_mse, grad, **kw)


def _launch_cuda(s2, t2, labels1, mask_u8, scales, row_kl, row_ce, row_mse, grad, **kw):
    # The divergence's and transforms' scalars travel as arguments (Python floats: no device
    # read); the kernel reads only the three gradient weights of ``scales``.
    rows, cols = s2.shape
    _native.core().fused_logits_cuda(
        student=s2.data_ptr(),
        student_row_stride=s2.stride(0),
        teacher=_native.ptr(t2),
        teacher_row_stride=t2.stride(0) if t2 is not None else 0,
        labels=_native.ptr(labels1),
        mask=_native.ptr(mask_u8),
        rows=rows,
        cols=cols,
        dtype=_native.DTYPE_CODES[s2.dtype],
        temperature=kw["temperature"],
        ignore_index=kw["ignore_index"],
        use_kl=kw["kl"],
        use_ce=kw["ce"],
        use_mse=kw["mse"],
        scales=scales.data_ptr(),
        row_kl=_native.ptr(row_kl),
        row_ce=_native.ptr(row_ce),
        row_mse=_native.ptr(row_mse),
        grad=_native.ptr(grad),
        stream=torch.cuda.current_stream(s2.device).cuda_stream,
        divergence=kw["divergence"],
        beta=kw["beta"],
        one_minus_beta=1.0 - kw["beta"],
        t2_scale=kw["t2_scale"],
        logit_scale=kw["logit_scale"],
        softcap=kw["softcap"],
    )


def check_label_range(labels: Tensor, classes: int, ignore_index: int) -> None:
    """Out-of-range labels are a ValueError on CPU tensors. On an accelerator the check would need
    a host sync: there the kernels make the row's loss (and gradient) NaN instead."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return  # (a data-dependent branch would break a fullgraph trace)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= classes))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"invalid labels: value {first} is outside [0, {classes}) and not ignore_index "
            f"({ignore_index})"
        )


def fused_logits_gpu(
    launcher,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    terms: Terms,
    temperature: float,
    ignore_index: int,
    transform: Transform = Transform(),
    normalizer: Tensor | None = None,
    grad: Tensor,
) -> FusedResult:
    """Run a GPU-style kernel (``_launch_triton`` or ``_launch_cuda``): same result as
    ``fused_logits_native``, with per-row values always produced."""
    s2, t2, labels1, mask_u8 = _checked_rows(student, teacher, labels, mask)
    if terms.ce:
        check_label_range(labels1, s2.shape[1], ignore_index)
    device = student.device
    rows, cols = s2.shape
    n_sel = mask_u8.sum(dtype=torch.float64) if mask_u8 is not None else rows
    n_lab = (labels1 != ignore_index).sum(dtype=torch.float64) if terms.ce else rows
    d_kl = device_divisor(terms.norm_kl, n_sel, cols, device, normalizer)
    d_ce = device_divisor(terms.norm_ce, n_lab, cols, device)
    d_mse = device_divisor(terms.norm_mse, n_sel, cols, device)
    # d(total)/d(term) / normaliser, with d(T² D)/ds = T dD/dz (1/T without T²; z = s/T) and
    # d(Σ(s−t)²)/ds = 2(s − t).
    kl_chain = temperature if terms.t2_scale else 1.0 / temperature
    weights = [terms.w_kl * kl_chain / d_kl, terms.w_ce / d_ce, 2.0 * terms.w_mse / d_mse]
    # The Triton kernel reads the divergence's and transforms' scalars after the weights.
    options = (terms.beta, 1.0 - terms.beta, transform.logit_scale, transform.softcap or 1.0)
    scales = torch.stack(weights + [_device_scalar(v, device) for v in options]).to(torch.float32)
    row_kl, row_ce, row_mse = _row_outputs(terms, rows, device)
    with on_device(device):
        launcher(
            s2, t2, labels1, mask_u8, scales, row_kl, row_ce, row_mse,
            grad.view(rows, cols) if grad.numel() else None,
            temperature=temperature, ignore_index=ignore_index,
            kl=terms.kl, ce=terms.ce, mse=terms.mse,
            divergence=terms.divergence, beta=terms.beta, t2_scale=terms.t2_scale,
            logit_scale=transform.logit_scale, softcap=transform.softcap,
        )  # fmt: skip
    # Deterministic reduction over rows (no atomics), in float64 like the CPU kernel.
    zero = _device_scalar(0.0, device)
    kl = row_kl.sum(dtype=torch.float64) / d_kl if terms.kl else zero
    ce = row_ce.sum(dtype=torch.float64) / d_ce if terms.ce else zero
    mse = row_mse.sum(dtype=torch.float64) / d_mse if terms.mse else zero
    total = zero
    for on, w, value in (
        (terms.kl, terms.w_kl, kl),
        (terms.ce, terms.w_ce, ce),
        (terms.mse, terms.w_mse, mse),
    ):
        if on:
            total = total + w * value
    out = torch.stack([total, kl, ce, mse]).to(torch.float32)
    lead = student.shape[:-1]
    return FusedResult(
        out,
        *(r.view(lead) if r is not None else None for r in (row_kl, row_ce, row_mse)),
        grad,
    )


# Backends whose kernel may write the gradient over the student's logits. In the CPU kernel
# (csrc/cpu/fused_logits.cpp) one thread owns a row and every read of a student element precedes
# the write of its gradient (maxima, pass 2 and the label's logit before pass 3/4, and before a
# row whose sums are not finite is filled with NaN; the MSE term's re-read in the same loop
# iteration or tile as that element's write; softcap reads the row into scratch first); pass 2's
# touch of the next row, another thread's, reads a value it discards. In the Triton kernel
# (fastdistill/triton/fused_logits.py) one program owns a row: the reference column and the
# label's logit are read before any gradient is stored, and each tile's gradient after that
# tile's loads. The CUDA kernel reads the label's logit in every thread after the last barrier
# before pass 2 writes the row (rows without a row-sum divergence: another warp may have written
# it): it writes to a buffer of its own.
_IN_PLACE_BACKENDS = frozenset({("native", "cpu"), ("triton", "cpu"), ("triton", "cuda")})


def _span(x: Tensor) -> tuple[int, int]:
    """The byte range [start, end) that ``x``'s elements lie in."""
    last = sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True))
    return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _gradient_destination(
    student: Tensor, teacher: Tensor | None, grad_into: Tensor, in_place_ok: bool
) -> tuple[Tensor | None, bool]:
    """(``grad_into``, whether it is the student's memory) if the kernel can write there, else
    (None, False): a buffer of its own. The kernels write row r of the gradient at r · cols of a
    contiguous buffer and trust it not to overlap what they read: ``grad_into`` is the student
    itself (contiguous) or apart from both inputs."""
    if (
        grad_into.shape != student.shape
        or grad_into.dtype != student.dtype
        or grad_into.device != student.device
        or not grad_into.is_contiguous()
    ):
        raise ValueError(
            f"grad_into must be a contiguous {student.dtype} tensor of the student's shape "
            f"{tuple(student.shape)} on {student.device}; got {grad_into.dtype} "
            f"{tuple(grad_into.shape)} on {grad_into.device}"
        )
    if teacher is not None and _overlaps(grad_into, teacher):
        raise ValueError("grad_into overlaps the teacher's logits")
    if not _overlaps(grad_into, student):
        return grad_into, False
    if grad_into.data_ptr() != student.data_ptr() or not student.is_contiguous():
        raise ValueError("grad_into overlaps the student's logits without being the same tensor")
    return (grad_into, True) if in_place_ok else (None, False)


def run_fused_logits(
    op: str,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    terms: Terms,
    compute_grad: bool,
    temperature: float = 1.0,
    ignore_index: int = -100,
    want_rows: bool = False,
    transform: Transform = Transform(),
    normalizer: Tensor | None = None,
    grad_into: Tensor | None = None,
) -> FusedResult:
    """Run ``op``'s terms on the backend FASTDISTILL_BACKEND selects for the student's device.

    ``grad_into`` (with ``compute_grad``): where to write the gradient instead of a new buffer. It
    may be the student itself: on the backends whose kernel allows it (_IN_PLACE_BACKENDS) the
    gradient then overwrites the logits (``result.in_place``); the others write a new buffer."""
    backend = select_backend(op, student.device)
    device = student.device.type
    dest, in_place = None, False
    if compute_grad and grad_into is not None:
        in_place_ok = (backend, device) in _IN_PLACE_BACKENDS
        dest, in_place = _gradient_destination(student, teacher, grad_into, in_place_ok)
    kw = dict(
        terms=terms,
        temperature=temperature,
        ignore_index=ignore_index,
        transform=transform,
        normalizer=normalizer,
    )
    if backend == "native" and device == "cpu":
        grad = dest if dest is not None else alloc_grad(student, compute_grad)
        res = fused_logits_native(
            student, teacher, labels, mask, want_rows=want_rows, grad=grad, **kw
        )
    elif backend == "native" and device == "cuda":
        grad = dest if dest is not None else empty_grad(student, compute_grad)
        res = fused_logits_gpu(_launch_cuda, student, teacher, labels, mask, grad=grad, **kw)
    elif backend == "triton":
        grad = dest if dest is not None else alloc_grad(student, compute_grad)
        res = fused_logits_gpu(_launch_triton, student, teacher, labels, mask, grad=grad, **kw)
    else:
        raise unsupported(f"{op} has no {backend} kernel for {device}")
    res.in_place = in_place
    return res


def norm_code(reduction: str) -> int:
    """Normaliser code for a row reduction (see fastdistill.reference.reduce_rows)."""
    return {
        "none": _native.NORM_SUM,
        "sum": _native.NORM_SUM,
        "batchmean": _native.NORM_ROWS,
        "mean": _native.NORM_ROWS_COLS,
    }[reduction]
