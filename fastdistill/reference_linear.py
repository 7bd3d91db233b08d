"""Plain-PyTorch meaning of ``fastdistill::linear_distillation`` (materialised logits): the
oracle of its tests and the eager baseline of its benchmarks. It lives beside
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
    transform_logits,
)


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

    def head(h, w, b):
        return F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))

    s = head(student_hidden, student_weight, student_bias)
    zero = s.new_zeros(())
    selected = None if mask is None else mask.bool()
    if labels is not None:
        valid = labels != ignore_index
        selected = valid if selected is None else valid & selected
    if normalizer is not None:
        n = normalizer.to(dtype) if isinstance(normalizer, Tensor) else normalizer
    elif selected is None:
        n = float(max(s[..., 0].numel(), 1))
    else:
        n = selected.sum().to(dtype).clamp_min(1.0)
    kd = ce = zero
    if alpha_kd > 0:
        if teacher_logits is not None:
            t = teacher_logits.detach().to(dtype)
        else:
            with torch.no_grad():
                t = head(teacher_hidden, teacher_weight, teacher_bias)
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
