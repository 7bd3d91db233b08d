"""fastdistill::reverse_kl: KL(softmax(s'/T) ‖ softmax(t'/T)) per row, reduced over masked rows.

Direction: KL(student ‖ teacher) = Σ p_s (log p_s − log p_t), the mode-seeking divergence (TRL's
DistillationTrainer default). x' = the logits after ``logit_scale`` and ``softcap``; times T² only
with ``t2_scale``. Gradient (student only): d/dz_j = p_s,j (log(p_s,j / p_t,j) − KL) for
z = s'/T, chained through 1/T and the transforms, divided by the normaliser; computed in the
forward pass. Shapes: logits ``(rows, V)`` views, ``mask`` ``(rows,)`` or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops._common import register_saved_grad_autograd
from fastdistill.ops._divergence import REDUCTIONS, fake_divergence, run_divergence

__all__ = ["REDUCTIONS", "reverse_kl"]


@torch.library.custom_op("fastdistill::reverse_kl", mutates_args=())
def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    t2_scale: bool,
    logit_scale: float,
    softcap: float,
    reduction: str,
    normalizer: Tensor | None,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d student_logits or an empty tensor)."""
    return run_divergence(
        "reverse_kl", "reverse_kl", student_logits, teacher_logits, mask,
        temperature=temperature, beta=0.5, t2_scale=t2_scale, logit_scale=logit_scale,
        softcap=softcap, reduction=reduction, normalizer=normalizer, compute_grad=compute_grad,
    )  # fmt: skip


@reverse_kl.register_fake
def _(student_logits, teacher_logits, mask, temperature, t2_scale, logit_scale, softcap,
      reduction, normalizer, compute_grad):  # fmt: skip
    return fake_divergence(student_logits, reduction, compute_grad)


register_saved_grad_autograd(reverse_kl, num_inputs=10)
