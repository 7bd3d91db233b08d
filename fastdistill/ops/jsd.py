"""fastdistill::jsd: the generalised Jensen-Shannon divergence JSD(β) per row, reduced over masked
rows.

With p_s = softmax(s'/T), p_t = softmax(t'/T) and M = β p_t + (1 − β) p_s:
JSD(β) = β KL(p_t ‖ M) + (1 − β) KL(p_s ‖ M) (GKD's on-policy distillation loss; ≥ 0). β = 0 is
exactly the forward KL(teacher ‖ student) and β = 1 the reverse KL(student ‖ teacher), the
convention of TRL's generalized_jsd_loss, Liger-Kernel and axolotl. log M is formed in log space
from d = log p_t − log p_s, so log-probabilities far below −104 (0 in fp32) give no NaN.
x' = the logits after ``logit_scale`` and ``softcap``; times T² only with ``t2_scale``. Gradient
(student only): d/dz_j = (1 − β) p_s,j (log(p_s,j / M_j) − KL(p_s ‖ M)) for z = s'/T, chained
through 1/T and the transforms, divided by the normaliser; computed in the forward pass.
Shapes: logits ``(rows, V)`` views, ``mask`` ``(rows,)`` or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops._common import register_saved_grad_autograd
from fastdistill.ops._divergence import REDUCTIONS, fake_divergence, run_divergence

__all__ = ["REDUCTIONS", "jsd"]


@torch.library.custom_op("fastdistill::jsd", mutates_args=())
def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    beta: float,
    t2_scale: bool,
    logit_scale: float,
    softcap: float,
    reduction: str,
    normalizer: Tensor | None,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d student_logits or an empty tensor)."""
    return run_divergence(
        "jsd", "jsd", student_logits, teacher_logits, mask,
        temperature=temperature, beta=beta, t2_scale=t2_scale, logit_scale=logit_scale,
        softcap=softcap, reduction=reduction, normalizer=normalizer, compute_grad=compute_grad,
    )  # fmt: skip


@jsd.register_fake
def _(student_logits, teacher_logits, mask, temperature, beta, t2_scale, logit_scale, softcap,
      reduction, normalizer, compute_grad):  # fmt: skip
    return fake_divergence(student_logits, reduction, compute_grad)


register_saved_grad_autograd(jsd, num_inputs=11)
