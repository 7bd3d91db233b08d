"""Pieces shared by the op files: input validation, row views, the reference fallback and the
autograd rule for ops that compute their gradient during the forward pass."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdistill import _buffers, _native
from fastdistill.backend import BackendUnavailableError

# ---- validation (bad input raises ValueError/TypeError naming the argument) ----------------------


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x: object, name: str) -> Tensor:
    x = check_tensor(x, name)
    if x.dtype not in _native.KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; fastdistill losses take float32, bfloat16 or float16 "
            f"(convert with {name}.float())"
        )
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    return x


def check_pair(student: object, teacher: object, s_name: str, t_name: str) -> tuple[Tensor, Tensor]:
    """Student/teacher tensors of one shape, dtype and device."""
    student = check_float_tensor(student, s_name)
    teacher = check_float_tensor(teacher, t_name)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{s_name} has shape {tuple(student.shape)} but {t_name} has shape "
            f"{tuple(teacher.shape)}; they must match"
        )
    if student.device != teacher.device:
        raise ValueError(f"{s_name} is on {student.device} but {t_name} is on {teacher.device}")
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"{s_name} is {student.dtype} but {t_name} is {teacher.dtype}; pass both in one dtype "
            f"(e.g. {t_name}.to({s_name}.dtype))"
        )
    return student, teacher


def check_pair_vocab(
    student: object, teacher: object, s_name: str, t_name: str, vocab: object
) -> tuple[Tensor, Tensor]:
    """``check_pair`` where the last dims may differ when ``vocab="common"``: then both are cut to
    their first min(Vs, Vt) columns (views; nothing is padded)."""
    if vocab not in ("same", "common"):
        raise ValueError(f"vocab must be 'same' or 'common', got {vocab!r}")
    student = check_float_tensor(student, s_name)
    teacher = check_float_tensor(teacher, t_name)
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vs != vt and student.shape[:-1] == teacher.shape[:-1]:
        if vocab != "common":
            raise ValueError(
                f"{s_name} has {vs} columns but {t_name} has {vt}: the vocabularies differ. Pass "
                'vocab="common" to compare the distributions over the first min(Vs, Vt) tokens '
                "(the shared part of one model family's vocabulary); logits are never zero-padded"
            )
        v = min(vs, vt)
        student, teacher = student[..., :v], teacher[..., :v]
    return check_pair(student, teacher, s_name, t_name)


def check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def check_logit_scale(logit_scale: object) -> float:
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a number, got {type(logit_scale).__name__}")
    logit_scale = float(logit_scale)
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    return logit_scale


def check_softcap(softcap: object) -> float:
    """``None`` (off) or a finite number > 0; returns 0.0 for off, as the kernels take it."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a number > 0, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    return softcap


def check_normalizer(normalizer: object, reduction: str, device: torch.device) -> Tensor | None:
    """``None``, a number > 0 or a 0-dim tensor (e.g. a global token count): what ``batchmean``
    divides the summed loss by instead of the local count. Returned as a 0-dim float64 tensor on
    ``device`` (a tensor's value is never read on the host: no sync)."""
    if normalizer is None:
        return None
    if reduction != "batchmean":
        raise ValueError(
            f"normalizer replaces the token count of reduction='batchmean'; got reduction={reduction!r}"
        )
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(
                f"normalizer must be a 0-dim tensor, got shape {tuple(normalizer.shape)}"
            )
        if normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the logits are on {device}")
        return normalizer.detach().to(device=device, dtype=torch.float64, non_blocking=True)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(
            f"normalizer must be a number or a 0-dim tensor, got {type(normalizer).__name__}"
        )
    if not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer}")
    return torch.full((), float(normalizer), dtype=torch.float64, device=device)


def check_mask(mask: object, lead_shape: torch.Size, device: torch.device, name: str = "mask"):
    """A bool (or integer 0/1, e.g. an attention mask) tensor of the logits' leading shape."""
    if mask is None:
        return None
    mask = check_tensor(mask, name)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"{name} must be bool (or an integer 0/1 tensor such as an attention mask), "
            f"got {mask.dtype}"
        )
    if mask.shape != lead_shape:
        raise ValueError(
            f"{name} must have the leading shape of the inputs {tuple(lead_shape)}, got "
            f"{tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_labels(labels: object, lead_shape: torch.Size, device: torch.device) -> Tensor:
    labels = check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have the leading shape of the logits {tuple(lead_shape)}, got "
            f"{tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
    return labels.long()


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_weight(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_alphas(
    alpha_kl: object, alpha_ce: object, alpha_mse: object
) -> tuple[float, float, float]:
    """The three distillation weights: each finite and >= 0, and not all zero."""
    weights = (
        check_weight(alpha_kl, "alpha_kl"),
        check_weight(alpha_ce, "alpha_ce"),
        check_weight(alpha_mse, "alpha_mse"),
    )
    if not any(weights):
        raise ValueError("at least one of alpha_kl, alpha_ce, alpha_mse must be > 0")
    return weights


def check_reduction(reduction: object, allowed: Sequence[str]) -> str:
    if reduction not in allowed:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}"
        )
    return reduction  # type: ignore[return-value]


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def wants_grad(student: Tensor) -> bool:
    """Whether the forward should produce the student gradient (only when autograd needs it)."""
    return student.requires_grad and torch.is_grad_enabled()


# ---- row views for the compiled core ----------------------------------------------------------


def as_rows(x: Tensor) -> Tensor:
    """``x`` as a 2-D ``(rows, C)`` tensor whose last dim has unit stride (a view when possible).

    The kernels take a row stride, so padded or sliced rows are read in place; only layouts that
    cannot be expressed with one row stride are copied.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def flat_rows(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """A 1-D contiguous per-row tensor (mask, labels), optionally converted."""
    if x is None:
        return None
    x = x.reshape(-1)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous()


def empty_grad(student: Tensor, compute_grad: bool) -> Tensor:
    """Gradient buffer with the student's shape, or an empty placeholder when none is needed.
    (Also the fake/meta implementation: no data access here.)"""
    if not compute_grad:
        return student.new_empty((0,))
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def alloc_grad(student: Tensor, compute_grad: bool) -> Tensor:
    """``empty_grad`` for a kernel about to write it: large CPU buffers come from the reuse pool
    (fastdistill._buffers), which spares each step the page faults of fresh memory."""
    if compute_grad and student.device.type == "cpu":
        return _buffers.empty_cpu(student.shape, student.dtype)
    return empty_grad(student, compute_grad)


def on_device(device: torch.device):
    """Make ``device`` current for a GPU kernel launch: Triton and the CUDA launchers use the
    current device's context and stream, which for tensors on cuda:1 must be cuda:1's."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---- backend errors ----------------------------------------------------------------------------


def unsupported(message: str) -> BackendUnavailableError:
    """The error a raw op raises when the selected backend has no kernel for the device."""
    return BackendUnavailableError(
        f"{message}. The ops run kernels only; FASTDISTILL_BACKEND=torch (and devices without a "
        "kernel) are served by fastdistill.losses, which calls fastdistill.reference directly."
    )


# ---- autograd for ops that return (loss, ..., grad) ------------------------------------------


def register_saved_grad_autograd(op, *, num_inputs: int) -> None:
    """Autograd for an op whose LAST output is d(first output)/d(first input), computed in the
    forward with an upstream gradient of 1. The backward scales it by the real upstream gradient.

    Eager mode keeps the gradient on ``ctx`` and hands it over in the backward (scaled in place),
    so no second logits-sized buffer is ever allocated: not for the scaling, and not by
    AccumulateGrad, which can adopt a gradient that nothing else references but must copy one that
    is still held as a saved tensor. The handover means one backward per forward: a second
    backward through the same node (``retain_graph=True``) raises instead of returning a wrong
    gradient. Traced code (torch.compile, AOT) uses ``save_for_backward`` and an out-of-place
    scale, as the compiler requires.
    """

    def setup_context(ctx, inputs, output):
        grad = output[-1]
        ctx.mark_non_differentiable(*output[1:])
        # Otherwise autograd hands the backward a zero-filled logits-sized tensor as the
        # "gradient" of the saved-gradient output: a full extra allocation and write.
        ctx.set_materialize_grads(False)
        ctx.loss_ndim = output[0].dim()
        # compute_grad is every op's last input; without it (frozen student, teacher requiring
        # grad) the student simply gets no gradient.
        ctx.compute_grad = bool(inputs[-1])
        ctx.traced = type(grad) is not torch.Tensor
        if ctx.traced:
            ctx.save_for_backward(grad)
        else:
            ctx.fused_grad = grad

    def backward(ctx, grad_loss, *_unused):
        no_grads = (None,) * num_inputs
        if not ctx.compute_grad or grad_loss is None:
            return no_grads
        if ctx.traced:
            (grad,) = ctx.saved_tensors
        else:
            grad = getattr(ctx, "fused_grad", None)
            if grad is None:
                raise RuntimeError(
                    "fastdistill losses support one backward pass per forward pass (the gradient "
                    "computed in the forward is handed over, not copied); recompute the loss for "
                    "a second backward"
                )
            del ctx.fused_grad
        scale = grad_loss if ctx.loss_ndim == 0 else grad_loss.unsqueeze(-1)
        if ctx.traced or torch.compiler.is_compiling():
            # Traced (fake/functional tensors): no mutation of a forward output in the backward
            # graph; the compiler plans the buffers.
            grad_student = grad * scale
        elif grad.device.type == "cpu" and ctx.loss_ndim == 0 and float(grad_loss) == 1.0:
            # loss.backward() on CPU: skip a full pass over the gradient. Reading a CPU scalar is
            # a memory load, not a device sync; on accelerators this branch is never taken.
            grad_student = grad
        else:
            grad_student = grad.mul_(scale)
        return (grad_student,) + (None,) * (num_inputs - 1)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
