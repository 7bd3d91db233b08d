"""What the reverse_kl, jsd and tvd ops share: one run of the fused logits kernel with the
divergence term switched to theirs (csrc/cpu/kernels.h, enum Divergence), and their fake impl.

Per selected row, with p_s = softmax(s'/T), p_t = softmax(t'/T) and x' = the logits after
``logit_scale`` and ``softcap`` (both sides, before the temperature): the divergence, times T² when
``t2_scale``; reduced by ``batchmean`` (sum / #selected, or / ``normalizer`` when given), ``sum`` or
``none``. The gradient of the returned value w.r.t. the student's raw logits is computed in the
forward pass, through the transforms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.ops._common import empty_grad
from fastdistill.ops._fused_logits import Terms, Transform, norm_code, run_fused_logits

REDUCTIONS = ("batchmean", "sum", "none")


def divergence_code(divergence: str, beta: float) -> int:
    """Kernel code of a divergence; JSD at beta = 0 and 1 is exactly forward and reverse KL."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    return _native.DIVERGENCE_CODES[divergence]


def run_divergence(
    op: str,
    divergence: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    *,
    temperature: float,
    beta: float,
    t2_scale: bool,
    logit_scale: float,
    softcap: float,
    reduction: str,
    normalizer: Tensor | None,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss in float32, d loss/d student_logits or an empty tensor)."""
    given = normalizer is not None and reduction == "batchmean"
    terms = Terms(
        kl=True,
        norm_kl=_native.NORM_GIVEN if given else norm_code(reduction),
        divergence=divergence_code(divergence, beta),
        beta=beta,
        t2_scale=t2_scale,
    )
    res = run_fused_logits(
        op,
        student_logits,
        teacher_logits,
        None,
        mask,
        terms=terms,
        compute_grad=compute_grad,
        temperature=temperature,
        want_rows=reduction == "none",
        transform=Transform(logit_scale, softcap),
        normalizer=normalizer if given else None,
    )
    loss = res.row_kl if reduction == "none" else res.out[1].clone()
    return loss, res.grad


def fake_divergence(student_logits: Tensor, reduction: str, compute_grad: bool):
    lead = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(lead, dtype=torch.float32)
    return loss, empty_grad(student_logits, compute_grad)
