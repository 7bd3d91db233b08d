"""Functional distillation losses: validate, then call the registered ops.

Every loss returns a float32 tensor (fp32 math whatever the input dtype), gives the teacher no
gradient and the student the exact gradient of the returned value. Shapes: ``(*lead, C)`` inputs;
``mask`` (bool, or an integer 0/1 tensor such as an attention mask) and ``labels`` have shape
``lead``. Nothing here synchronises with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import ops, reference
from fastdistill.backend import select_backend
from fastdistill.ops._common import (
    check_alphas,
    check_float_tensor,
    check_int,
    check_labels,
    check_mask,
    check_pair,
    check_reduction,
    check_temperature,
    wants_grad,
)
from fastdistill.ops._fused_logits import check_label_range


def _use_reference(op: str, x: Tensor) -> bool:
    """FASTDISTILL_BACKEND=torch, or a device with no kernel: run fastdistill.reference directly
    (fp32 math, plain autograd, traceable by torch.compile) instead of the op."""
    return select_backend(op, x.device) == "torch"


def kl_div_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """Soft-target loss T² · KL(softmax(t/T) ‖ softmax(s/T)), fused (one read of each input).

    Direction: KL(teacher ‖ student) = Σ p_t (log p_t − log p_s), what
    ``nn.KLDivLoss(reduction)(log_softmax(s/T), softmax(t/T)) * T**2`` computes.

    Args:
        student_logits, teacher_logits: ``(*lead, V)``, same shape and dtype (fp32/bf16/fp16).
        temperature: T > 0.
        mask: optional ``lead``-shaped selection of rows (tokens).
        reduction: ``batchmean`` (sum over selected rows / max(#selected, 1)), ``sum``,
            ``mean`` (sum / (max(#selected, 1) · V), as nn.KLDivLoss), ``none`` (per row, 0 where
            unselected).

    With ``mask`` = the attention mask and ``batchmean`` this equals the DistilBERT trainer's
    ``loss_ce`` on ``masked_select``-ed logits.
    """
    s, t = check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    temperature = check_temperature(temperature)
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.kl_div.REDUCTIONS)
    if _use_reference("kl_div", s):
        return reference.kl_div_loss(
            s.float(), t.float(), temperature=temperature, mask=mask, reduction=reduction
        )
    loss, _ = ops.kl_div.kl_div(s, t, mask, temperature, reduction, wants_grad(s))
    return loss


def mse_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """Squared error Σ_j (s_j − t_j)² per selected row, reduced over rows.

    ``batchmean``: / max(#selected, 1), the DistilBERT logit MSE (``MSELoss(sum) / #rows``);
    ``mean``: / (max(#selected, 1) · D), ``nn.MSELoss()`` on the selected rows (hidden states);
    ``sum``; ``none`` (per row, 0 where unselected).
    """
    s, t = check_pair(student, teacher, "student", "teacher")
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.mse.REDUCTIONS)
    if _use_reference("mse", s):
        return reference.mse_loss(s.float(), t.float(), mask=mask, reduction=reduction)
    loss, _ = ops.mse.mse(s, t, mask, reduction, wants_grad(s))
    return loss


def cosine_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """1 − cos(s, t) per selected row of hidden states ``(*lead, D)``, reduced over rows.

    Equal to ``nn.CosineEmbeddingLoss()(s_sel, t_sel, ones)`` on the selected rows, including its
    epsilon (cos = <s,t> / sqrt((|s|² + 1e-12)(|t|² + 1e-12))). ``mean`` (over selected rows),
    ``sum``, ``none``.
    """
    s, t = check_pair(student_hidden, teacher_hidden, "student_hidden", "teacher_hidden")
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.cosine.REDUCTIONS)
    if _use_reference("cosine", s):
        return reference.cosine_loss(s.float(), t.float(), mask=mask, reduction=reduction)
    loss, _ = ops.cosine.cosine(s, t, mask, reduction, wants_grad(s))
    return loss


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Hard-label cross-entropy (the MLM/CLM loss) on ``(*lead, V)`` logits and ``lead`` labels.

    ``mean`` is over rows whose label is not ``ignore_index`` and is 0 (not NaN, unlike
    ``F.cross_entropy``) when every label is ignored. Labels outside ``[0, V)`` raise ValueError on
    CPU. No class weights or label smoothing.
    """
    x = check_float_tensor(logits, "logits")
    labels = check_labels(labels, x.shape[:-1], x.device)
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction, ops.cross_entropy.REDUCTIONS)
    if _use_reference("cross_entropy", x):
        check_label_range(labels, x.shape[-1], ignore_index)
        return reference.cross_entropy(
            x.float(), labels, ignore_index=ignore_index, reduction=reduction
        )
    loss, _ = ops.cross_entropy.cross_entropy(x, labels, ignore_index, reduction, wants_grad(x))
    return loss


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 2.0,
    alpha_kl: float = 1.0,
    alpha_ce: float = 0.0,
    alpha_mse: float = 0.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The DistilBERT logit losses in one pass: returns ``(total, kl, ce, mse)``.

    total = alpha_kl · kl + alpha_ce · ce + alpha_mse · mse, where kl = ``kl_div_loss`` (batchmean,
    rows selected by ``mask``, temperature T), ce = ``cross_entropy`` (mean over ``labels !=
    ignore_index``), mse = ``mse_loss`` (batchmean over ``mask``). Student and teacher logits are
    each read once and the gradient written once. ``kl``, ``ce``, ``mse`` are detached float32
    scalars for logging; a term with alpha 0 is not computed and reads 0.
    """
    s, t = check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    temperature = check_temperature(temperature)
    alpha_kl, alpha_ce, alpha_mse = check_alphas(alpha_kl, alpha_ce, alpha_mse)
    ignore_index = check_int(ignore_index, "ignore_index")
    mask = check_mask(mask, s.shape[:-1], s.device)
    if labels is not None:
        labels = check_labels(labels, s.shape[:-1], s.device)
    if alpha_ce > 0 and labels is None:
        raise ValueError("alpha_ce > 0 needs labels (the hard targets for the cross-entropy term)")
    if _use_reference("distillation", s):
        if labels is not None and alpha_ce > 0:
            check_label_range(labels, s.shape[-1], ignore_index)
        return reference.distillation_loss(
            s.float(),
            t.float(),
            labels=labels,
            mask=mask,
            temperature=temperature,
            alpha_kl=alpha_kl,
            alpha_ce=alpha_ce,
            alpha_mse=alpha_mse,
            ignore_index=ignore_index,
        )
    total, components, _ = ops.distillation.distillation(
        s, t, labels, mask, temperature, alpha_kl, alpha_ce, alpha_mse, ignore_index, wants_grad(s)
    )
    kl, ce, mse = components.unbind()
    return total, kl, ce, mse


def all_finite(*tensors: Tensor | None) -> Tensor:
    """0-dim bool tensor on the tensors' device: True when no element is NaN or ±inf.

    No host sync: gate an optimizer step with it on the device. ``None`` entries (e.g. missing
    ``.grad``) are skipped; integer tensors count as finite.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("all_finite needs at least one tensor")
    for i, t in enumerate(present):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"all_finite argument {i} must be a torch.Tensor, got {type(t).__name__}"
            )
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"all_finite got tensors on {device} and {t.device}; use one device")
    with torch.no_grad():
        if _use_reference("all_finite", present[0]):
            floats = ops.all_finite.float_tensors(present)
            if not floats:
                return torch.ones((), dtype=torch.bool, device=device)
            return reference.all_finite(*floats)
        return ops.all_finite.all_finite([t.detach() for t in present])
