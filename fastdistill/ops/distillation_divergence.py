"""fastdistill::distillation_divergence: ``distillation`` with any divergence and the logit
transforms: alpha_kl · div + alpha_ce · ce + alpha_mse · mse in ONE pass over the logits.

div = the divergence (forward_kl, reverse_kl, jsd with beta, tvd; see the ops of those names)
between softmax(s'/T) and softmax(t'/T), times T² when ``t2_scale``, ``batchmean`` over rows
selected by ``mask``; ce = hard cross-entropy of s' (at temperature 1), mean over rows with
``labels != ignore_index``; mse = Σ_j (s'_j − t'_j)², ``batchmean`` over rows selected by ``mask``.
x' = the logits after ``logit_scale`` and ``softcap``: every term sees them, and the gradient goes
through them. A term whose alpha is 0 is not computed (its component reads 0). Outputs: the total,
the three components (float32, no gradient) and the saved student gradient of the total.
``fastdistill::distillation`` is this op at its defaults (forward KL, T², no transforms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.ops._common import empty_grad, register_saved_grad_autograd
from fastdistill.ops._divergence import divergence_code
from fastdistill.ops._fused_logits import Terms, Transform, run_fused_logits


@torch.library.custom_op("fastdistill::distillation_divergence", mutates_args=())
def distillation_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    alpha_mse: float,
    ignore_index: int,
    divergence: str,
    beta: float,
    t2_scale: bool,
    logit_scale: float,
    softcap: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (total, components [div, ce, mse], d total/d student_logits or an empty tensor)."""
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
        divergence=divergence_code(divergence, beta),
        beta=beta,
        t2_scale=t2_scale,
    )
    res = run_fused_logits(
        "distillation_divergence",
        student_logits,
        teacher_logits,
        labels,
        mask,
        terms=terms,
        compute_grad=compute_grad,
        temperature=temperature,
        ignore_index=ignore_index,
        transform=Transform(logit_scale, softcap),
    )
    return res.out[0].clone(), res.out[1:].clone(), res.grad


@distillation_divergence.register_fake
def _(student_logits, teacher_logits, labels, mask, temperature, alpha_kl, alpha_ce, alpha_mse,
      ignore_index, divergence, beta, t2_scale, logit_scale, softcap, compute_grad):  # fmt: skip
    f32 = dict(dtype=torch.float32)
    return (
        student_logits.new_empty((), **f32),
        student_logits.new_empty((3,), **f32),
        empty_grad(student_logits, compute_grad),
    )


register_saved_grad_autograd(distillation_divergence, num_inputs=15)
