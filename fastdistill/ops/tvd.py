"""fastdistill::tvd: total variation distance ½ Σ |softmax(t'/T) − softmax(s'/T)| per row, reduced
over masked rows.

Symmetric in student and teacher; x' = the logits after ``logit_scale`` and ``softcap``; times T²
only with ``t2_scale``. Gradient (student only): d/dz_j = p_s,j (g_j − Σ_k p_s,k g_k) with
g = ½ sign(p_s − p_t) (0 at a tie, as torch's abs) for z = s'/T, chained through 1/T and the
transforms, divided by the normaliser; computed in the forward pass. Shapes: logits ``(rows, V)``
views, ``mask`` ``(rows,)`` or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops._common import register_saved_grad_autograd
from fastdistill.ops._divergence import REDUCTIONS, fake_divergence, run_divergence

__all__ = ["REDUCTIONS", "tvd"]


@torch.library.custom_op("fastdistill::tvd", mutates_args=())
def tvd(
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
        "tvd", "tvd", student_logits, teacher_logits, mask,
        temperature=temperature, beta=0.5, t2_scale=t2_scale, logit_scale=logit_scale,
        softcap=softcap, reduction=reduction, normalizer=normalizer, compute_grad=compute_grad,
    )  # fmt: skip


@tvd.register_fake
def _(student_logits, teacher_logits, mask, temperature, t2_scale, logit_scale, softcap,
      reduction, normalizer, compute_grad):  # fmt: skip
    return fake_divergence(student_logits, reduction, compute_grad)


register_saved_grad_autograd(tvd, num_inputs=10)
