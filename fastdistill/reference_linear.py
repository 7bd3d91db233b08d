"""Plain-PyTorch meaning of ``fastdistill::linear_distillation`` and
``fastdistill::linear_topk_distillation`` (materialised logits): the oracle of their tests and the
eager baseline of their benchmarks. It lives beside
``fastdistill/reference.py`` (whose conventions it follows and whose row formulas it uses) to keep
that module within the repository's module-size rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdistill.reference import (
    cross_entropy_rows,
    divergence_rows,
    reduce_rows,
    select_rows,
    token_selection,
    topk_distillation_loss,
    transform_logits,
)


def _head(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The materialised logits ``hidden · weightᵀ + bias`` in ``dtype``."""
    return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _normaliser(normalizer, selected: Tensor | None, rows: int, dtype: torch.dtype):
    """What the sums are divided by: ``normalizer``, else max(#selected, 1)."""
    if normalizer is not None:
        return normalizer.to(dtype) if isinstance(normalizer, Tensor) else normalizer
    if selected is None:
        return float(max(rows, 1))
    return selected.sum().to(dtype).clamp_min(1.0)


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, kd, ce)`` with s = student_hidden · student_weightᵀ + student_bias and
    t = teacher_hidden · teacher_weightᵀ + teacher_bias (or ``teacher_logits``), both ``(*lead, V)``
    and materialised, x' = ``transform_logits(x)``:

        kd = Σ_sel D(t', s') (· T² with t2_scale) / n,  ce = Σ_sel CE(s', label) / n,
        total = alpha_kd · kd + alpha_ce · ce,

    D = ``divergence_rows`` at temperature T (forward_kl = KL(teacher ‖ student)); sel = tokens
    with ``mask`` true and ``labels != ignore_index`` (each optional); n = ``normalizer`` or
    max(#sel, 1). ``compute_dtype`` (default: the inputs' dtype, promoted to at least float32)
    is the dtype of the GEMMs and everything after them. The teacher gets no gradient.
    """
    logit_scale = 1.0 if logit_scale is None else logit_scale
    dtype = compute_dtype or torch.promote_types(student_hidden.dtype, torch.float32)

    s = _head(student_hidden, student_weight, student_bias, dtype)
    zero = s.new_zeros(())
    selected = token_selection(None if mask is None else mask.bool(), labels, ignore_index)
    n = _normaliser(normalizer, selected, s[..., 0].numel(), dtype)
    kd = ce = zero
    if alpha_kd > 0:
        if teacher_logits is not None:
            t = teacher_logits.detach().to(dtype)
        else:
            with torch.no_grad():
                t = _head(teacher_hidden, teacher_weight, teacher_bias, dtype)
        s_sel = transform_logits(select_rows(s, selected), logit_scale, softcap)
        t_sel = transform_logits(select_rows(t, selected), logit_scale, softcap)
        row = divergence_rows(s_sel, t_sel, divergence, temperature=temperature, beta=beta)
        if t2_scale:
            row = row * (temperature * temperature)
        kd = reduce_rows(row, selected, "sum", s.shape[-1]) / n
    if alpha_ce > 0:
        if labels is None:
            raise ValueError("alpha_ce > 0 needs labels")
        lab = labels if mask is None else labels.masked_fill(~mask.bool(), ignore_index)
        row, valid = cross_entropy_rows(
            transform_logits(s, logit_scale, softcap), lab, ignore_index
        )
        ce = reduce_rows(row, valid, "sum", 1) / n
    total = alpha_kd * kd + alpha_ce * ce
    return total, kd.detach(), ce.detach()


def linear_topk_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_tail: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    logit_scale: float | None = None,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, kd, ce)`` with s = student_hidden · student_weightᵀ + student_bias materialised,
    x' = ``transform_logits(s)`` and the sparse teacher (ids, log-probs, tail) of
    ``fastdistill.reference.topk_distillation_loss``:

        kd = Σ_sel topk_kl_rows(x', ids, ℓ, tail) (· T² with t2_scale) / n,
        ce = Σ_sel CE(x', label) / n,   total = alpha_kd · kd + alpha_ce · ce,

    sel = tokens with ``mask`` true and ``labels != ignore_index`` (each optional; both terms
    take this one selection), n = ``normalizer`` or max(#sel, 1). ``compute_dtype`` as in
    ``linear_distillation_loss``. The teacher gets no gradient.
    """
    logit_scale = 1.0 if logit_scale is None else logit_scale
    dtype = compute_dtype or torch.promote_types(student_hidden.dtype, torch.float32)
    s = _head(student_hidden, student_weight, student_bias, dtype)
    selected = token_selection(None if mask is None else mask.bool(), labels, ignore_index)
    n = _normaliser(normalizer, selected, s[..., 0].numel(), dtype)
    if alpha_ce > 0 and labels is None:
        raise ValueError("alpha_ce > 0 needs labels")
    # Unselected rows zeroed before the transforms: garbage there reaches no gradient.
    x = transform_logits(select_rows(s, selected), logit_scale, softcap)
    tail = None if teacher_tail is None else teacher_tail.to(dtype)
    return topk_distillation_loss(
        x, teacher_ids, teacher_logprobs.to(dtype), teacher_tail=tail,
        labels=None if labels is None else labels.masked_fill(~selected, ignore_index),
        mask=selected, normalization=normalization, temperature=temperature,
        capture_temperature=capture_temperature, t2_scale=t2_scale, alpha_kd=alpha_kd,
        alpha_ce=alpha_ce, ignore_index=ignore_index, normalizer=n,
    )  # fmt: skip
