"""Sparse-target distillation losses: the teacher as its stored top-k ids and log-probabilities
(a teacher cache), not as logits. Validate, then call ``fastdistill::topk_kl``.

K = a token's stored ids, ℓ their log-probabilities captured at temperature T_c, s the student
logits, T the training temperature, z = s/T. Teacher targets re-tempered and normalised over K,
p_i ∝ exp(ℓ_i · T_c / T), except in ``tail`` mode. ``normalization``:

- ``"full"``: q = softmax(z) over the whole vocabulary; loss = Σ_K p_i (log p_i − log q_i);
- ``"renormalized"``: q = softmax over K of z_i; loss as above;
- ``"tail"`` (requires T = T_c): p_i = exp(ℓ_i) as stored plus the bucket p_tail =
  exp(teacher_tail); q_i = softmax(z)_i plus q_tail = Σ_{j ∉ K} softmax(z)_j, formed as
  logsumexp over the columns outside K minus the full logsumexp (never 1 − Σ_K q); KL over the
  k + 1 buckets.

The direction is KL(teacher ‖ student). With k = V and ℓ = log_softmax(t / T_c), ``full`` and
``renormalized`` equal the dense forward KL at temperature T. Nothing synchronises with the host;
on CPU tensors bad ids raise ValueError, on GPUs they make that token's loss and gradient NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import ops, reference
from fastdistill.backend import select_backend
from fastdistill.ops._common import (
    check_float_tensor,
    check_int,
    check_labels,
    check_mask,
    check_normalizer,
    check_reduction,
    check_temperature,
    check_tensor,
    check_weight,
    wants_grad,
)
from fastdistill.ops._fused_logits import check_label_range
from fastdistill.ops.topk_kl import ID_DTYPES, check_topk_ids

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _check_teacher(student_logits, teacher_ids, teacher_logprobs, teacher_tail, normalization):
    """The student logits and the sparse teacher, checked against each other."""
    s = check_float_tensor(student_logits, "student_logits")
    ids = check_tensor(teacher_ids, "teacher_ids")
    lp = check_tensor(teacher_logprobs, "teacher_logprobs")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"teacher_ids must be int64, int32 or uint16, got {ids.dtype}")
    if lp.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_logprobs must be float32, bfloat16 or float16, got {lp.dtype}")
    lead, v = s.shape[:-1], s.shape[-1]
    if ids.dim() != s.dim() or ids.shape[:-1] != lead or ids.shape[-1] < 1:
        raise ValueError(
            f"teacher_ids must have shape (*lead, k) with k >= 1 and the student's lead "
            f"{tuple(lead)}, got {tuple(ids.shape)}"
        )
    if lp.shape != ids.shape:
        raise ValueError(
            f"teacher_logprobs has shape {tuple(lp.shape)} but teacher_ids has {tuple(ids.shape)}"
        )
    if ids.shape[-1] > v:
        raise ValueError(
            f"teacher_ids has {ids.shape[-1]} ids per token but the student's vocabulary has {v}"
        )
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", lp)):
        if x.device != s.device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {s.device}")
    if normalization not in reference.TOPK_NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of "
            f"{', '.join(map(repr, reference.TOPK_NORMALIZATIONS))}, got {normalization!r}"
        )
    tail = None
    if normalization == "tail":
        if teacher_tail is None:
            raise ValueError(
                'normalization="tail" needs teacher_tail, the log of the teacher mass outside '
                "the stored ids"
            )
        tail = check_tensor(teacher_tail, "teacher_tail")
        if not tail.dtype.is_floating_point or tail.shape != lead or tail.device != s.device:
            raise ValueError(
                f"teacher_tail must be a float tensor of shape {tuple(lead)} on {s.device}, got "
                f"{tail.dtype} {tuple(tail.shape)} on {tail.device}"
            )
    return s, ids, lp, tail


def _check_temperatures(temperature, capture_temperature, normalization):
    temperature = check_temperature(temperature)
    try:
        capture_temperature = check_temperature(capture_temperature)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("temperature", "capture_temperature", 1)) from None
    if normalization == "tail" and temperature != capture_temperature:
        raise ValueError(
            f'normalization="tail" needs temperature == capture_temperature (the stored tail '
            f"mass cannot be re-tempered); got temperature={temperature}, "
            f"capture_temperature={capture_temperature}"
        )
    return temperature, capture_temperature


def _use_reference(x: Tensor) -> bool:
    return select_backend("topk_kl", x.device) == "torch"


def topk_kl_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    normalizer: float | Tensor | None = None,
    t2_scale: bool = False,
) -> Tensor:
    """Forward KL(teacher ‖ student) over the teacher's stored top-k support, fused.

    Args:
        student_logits: ``(*lead, V)``, fp32/bf16/fp16 (fp32 math).
        teacher_ids: ``(*lead, k)`` int64/int32/uint16, distinct per token, in [0, V).
        teacher_logprobs: ``(*lead, k)`` fp32/bf16/fp16; ``-inf`` = probability 0.
        teacher_tail: ``lead``, log of the teacher mass outside the ids (``tail`` only).
        normalization: ``"full"``, ``"renormalized"`` or ``"tail"`` (module docstring).
        temperature, capture_temperature: T and T_c > 0 (equal for ``tail``).
        mask, labels, ignore_index: the tokens taken: ``mask`` and/or ``labels != ignore_index``.
        reduction: ``batchmean`` (/ #selected, or / ``normalizer``), ``sum``, ``none`` (per token,
            0 where unselected).
        normalizer: with ``batchmean``, a number or 0-dim tensor replacing the count.
        t2_scale: multiply by T².

    Returns float32. Unselected tokens contribute 0 and get zero gradient (their ids are not
    read); an empty selection gives 0. The student gets the exact gradient; the teacher none.
    """
    s, ids, lp, tail = _check_teacher(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail, normalization
    )
    temperature, capture_temperature = _check_temperatures(
        temperature, capture_temperature, normalization
    )
    t2_scale = _check_flag(t2_scale, "t2_scale")
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction, ops.topk_kl.REDUCTIONS)
    selected = check_mask(mask, s.shape[:-1], s.device)
    if labels is not None:
        kept = check_labels(labels, s.shape[:-1], s.device) != ignore_index
        selected = kept if selected is None else selected & kept
    norm = check_normalizer(normalizer, reduction, s.device)
    if _use_reference(s):
        rows = ids.reshape(-1, ids.shape[-1]).long()
        check_topk_ids(rows, s.shape[-1], None if selected is None else selected.reshape(-1))
        return reference.topk_kl_loss(
            s.float(), ids, lp.float(), teacher_tail=None if tail is None else tail.float(),
            normalization=normalization, temperature=temperature,
            capture_temperature=capture_temperature, mask=selected, reduction=reduction,
            normalizer=norm, t2_scale=t2_scale,
        )  # fmt: skip
    loss, _, _ = ops.topk_kl.topk_kl(
        s, ids, lp, tail, selected, None, normalization, temperature, capture_temperature,
        t2_scale, 1.0, 0.0, ignore_index, reduction, norm, wants_grad(s),
    )  # fmt: skip
    return loss


def topk_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, kd, ce)`` in one pass over the student logits: total = alpha_kd · kd +
    alpha_ce · ce, kd = ``topk_kl_loss`` (arguments as there) batchmean over the tokens ``mask``
    selects (None: all), ce = hard cross-entropy of the student at temperature 1, mean over
    ``labels != ignore_index``; both divided by ``normalizer`` instead of their own counts when it
    is given (e.g. the step's global token count). ``kd`` and ``ce`` are detached float32; a term
    whose alpha is 0 is not computed and reads 0. Labels outside [0, V) raise ValueError on CPU.
    """
    s, ids, lp, tail = _check_teacher(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail, normalization
    )
    temperature, capture_temperature = _check_temperatures(
        temperature, capture_temperature, normalization
    )
    t2_scale = _check_flag(t2_scale, "t2_scale")
    alpha_kd, alpha_ce = check_weight(alpha_kd, "alpha_kd"), check_weight(alpha_ce, "alpha_ce")
    if alpha_kd == 0 and alpha_ce == 0:
        raise ValueError("at least one of alpha_kd, alpha_ce must be > 0")
    ignore_index = check_int(ignore_index, "ignore_index")
    mask = check_mask(mask, s.shape[:-1], s.device)
    if labels is not None:
        labels = check_labels(labels, s.shape[:-1], s.device)
    if alpha_ce > 0:
        if labels is None:
            raise ValueError("alpha_ce > 0 needs labels (the hard targets of the CE term)")
        check_label_range(labels, s.shape[-1], ignore_index)
    norm = check_normalizer(normalizer, "batchmean", s.device)
    if _use_reference(s):
        if alpha_kd > 0:
            rows = ids.reshape(-1, ids.shape[-1]).long()
            check_topk_ids(rows, s.shape[-1], None if mask is None else mask.reshape(-1))
        return reference.topk_distillation_loss(
            s.float(), ids, lp.float(), teacher_tail=None if tail is None else tail.float(),
            labels=labels, mask=mask, normalization=normalization, temperature=temperature,
            capture_temperature=capture_temperature, t2_scale=t2_scale, alpha_kd=alpha_kd,
            alpha_ce=alpha_ce, ignore_index=ignore_index, normalizer=norm,
        )  # fmt: skip
    total, components, _ = ops.topk_kl.topk_kl(
        s, ids, lp, tail, mask, labels, normalization, temperature, capture_temperature,
        t2_scale, alpha_kd, alpha_ce, ignore_index, "batchmean", norm, wants_grad(s),
    )  # fmt: skip
    kd, ce = components.unbind()
    return total, kd, ce
