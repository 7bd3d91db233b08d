"""fastdistill::distillation: alpha_kl · kl + alpha_ce · ce + alpha_mse · mse in ONE pass over the
student and teacher logits (each read once from memory, the gradient written once).

kl = T² · KL(softmax(t/T) ‖ softmax(s/T)), ``batchmean`` over rows selected by ``mask``;
ce = hard cross-entropy, mean over rows with ``labels != ignore_index`` (skipped without labels);
mse = Σ_j (s_j − t_j)², ``batchmean`` over rows selected by ``mask``.
A term whose alpha is 0 is not computed (its component reads 0): that keeps, e.g., the MSE of
logits with -inf entries from turning the total into NaN when MSE is off. alpha_ce > 0 needs labels.
Outputs: the total (differentiable), the three components (float32, no gradient) and the saved
student gradient of the total.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.ops._common import empty_grad, register_saved_grad_autograd
from fastdistill.ops._fused_logits import Terms, run_fused_logits


@torch.library.custom_op("fastdistill::distillation", mutates_args=())
def distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    alpha_mse: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (total, components [kl, ce, mse], d total/d student_logits or an empty tensor)."""
    terms = Terms(
        kl=alpha_kl > 0,
        ce=alpha_ce > 0,
        mse=alpha_mse > 0,
        w_kl=alpha_kl,
        w_ce=alpha_ce,
        w_mse=alpha_mse,
        norm_kl=_native.NORM_ROWS,
        norm_ce=_native.NORM_ROWS,
        norm_mse=_native.NORM_ROWS,
    )
    res = run_fused_logits(
        "distillation",
        student_logits,
        teacher_logits,
        labels,
        mask,
        terms=terms,
        compute_grad=compute_grad,
        temperature=temperature,
        ignore_index=ignore_index,
    )
    return res.out[0].clone(), res.out[1:].clone(), res.grad


@distillation.register_fake
def _(
    student_logits,
    teacher_logits,
    labels,
    mask,
    temperature,
    alpha_kl,
    alpha_ce,
    alpha_mse,
    ignore_index,
    compute_grad,
):
    f32 = dict(dtype=torch.float32)
    return (
        student_logits.new_empty((), **f32),
        student_logits.new_empty((3,), **f32),
        empty_grad(student_logits, compute_grad),
    )


register_saved_grad_autograd(distillation, num_inputs=10)
