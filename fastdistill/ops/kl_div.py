"""fastdistill::kl_div: T² · KL(softmax(t/T) ‖ softmax(s/T)) per row, reduced over masked rows.

Direction: KL(teacher ‖ student) = Σ p_t (log p_t − log p_s), what
``nn.KLDivLoss()(log_softmax(s/T), softmax(t/T))`` computes. Gradient (student only):
d/ds [T² KL] = T (softmax(s/T) − softmax(t/T)) / normaliser, computed in the forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops._common import empty_grad, register_saved_grad_autograd
from fastdistill.ops._fused_logits import Terms, norm_code, run_fused_logits

REDUCTIONS = ("batchmean", "sum", "mean", "none")


@torch.library.custom_op("fastdistill::kl_div", mutates_args=())
def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d student_logits or an empty tensor)."""
    res = run_fused_logits(
        "kl_div",
        student_logits,
        teacher_logits,
        None,
        mask,
        terms=Terms(kl=True, norm_kl=norm_code(reduction)),
        compute_grad=compute_grad,
        temperature=temperature,
        want_rows=reduction == "none",
    )
    loss = res.row_kl if reduction == "none" else res.out[1].clone()
    return loss, res.grad


@kl_div.register_fake
def _(student_logits, teacher_logits, mask, temperature, reduction, compute_grad):
    lead = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(lead, dtype=torch.float32)
    return loss, empty_grad(student_logits, compute_grad)


register_saved_grad_autograd(kl_div, num_inputs=6)
