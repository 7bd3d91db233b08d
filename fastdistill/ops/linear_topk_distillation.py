"""fastdistill::linear_topk_distillation: distillation from hidden states and an output head
against a sparse teacher (its top-k ids and log-probabilities per token, e.g. a teacher cache),
chunked over tokens so that the student's ``(tokens, V)`` logits are never materialised.

For N tokens, s = h Wᵀ + b (``(N, H) x (V, H)ᵀ``) and x' = s after ``logit_scale`` and
``softcap``. Per token selected by the labels (label != ``ignore_index``; every token without
labels):

    total = (alpha_kd · Σ_sel KL_K(p ‖ q(x')) + alpha_ce · Σ_sel CE(x', label)) / n

with KL_K the forward KL over the stored support of ``fastdistill.reference.topk_kl_rows``
(``normalization`` full, renormalized or tail; temperature T, capture temperature T_c; times T²
when ``t2_scale``) and n = ``normalizer`` when given, else max(#selected, 1). Outputs as
``fastdistill::linear_distillation``'s: total, [kd, ce] (float32, no gradient) and the gradients
of the total w.r.t. student_hidden, student_weight and student_bias (each empty when not
requested), computed in the forward pass.

How: the chunk loop of ops/linear_distillation.py (``run_linear_chunks``: the student's chunk of
logits by one float32 GEMM, d hidden and d W accumulated by two more) with, as the chunk's loss,
``fastdistill::topk_kl`` on the chunk's rows of ids, log-probabilities and tail, so the CPU core,
Triton or CUDA kernel runs as FASTDISTILL_BACKEND selects. The topk kernels take untransformed
logits: ``logit_scale`` and ``softcap`` are applied to the chunk's float32 logits in place here,
and the kernel's gradient is chained through them (x' = c · tanh(a · s / c), dx'/ds =
a · (1 − (x'/c)²)) in that same buffer. Alive at once: the chunk's logits and their gradient,
2 · C · V floats, whatever N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops.linear_distillation import (
    chunk_rows,
    fake_linear_outputs,
    register_linear_autograd,
    run_linear_chunks,
)
from fastdistill.ops.topk_kl import topk_kl


def _transform_(logits: Tensor, logit_scale: float, softcap: float) -> None:
    """logits ← softcap · tanh(logit_scale · logits / softcap), in place (softcap 0: none)."""
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)


def _chain_(grad: Tensor, transformed: Tensor, selected, logit_scale: float, softcap: float):
    """grad ← grad · dx'/ds, from the transformed logits x' (overwritten with the factor)."""
    if softcap:
        if selected is not None:
            # Their gradient is 0, but a NaN in a padding row's logits would make 0 · NaN.
            transformed.masked_fill_(~selected.unsqueeze(1), 0.0)
        grad.mul_(transformed.div_(softcap).square_().neg_().add_(1.0))
    if logit_scale != 1.0:
        grad.mul_(logit_scale)


@torch.library.custom_op("fastdistill::linear_topk_distillation", mutates_args=())
def linear_topk_distillation(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor | None,
    labels: Tensor | None,
    normalizer: Tensor | None,
    normalization: str,
    temperature: float,
    capture_temperature: float,
    t2_scale: bool,
    alpha_kd: float,
    alpha_ce: float,
    ignore_index: int,
    logit_scale: float,
    softcap: float,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shapes: student_hidden ``(N, H)``, student_weight ``(V, H)``, student_bias ``(V,)``;
    teacher_ids ``(N, k)`` int64/int32/uint16, teacher_logprobs ``(N, k)`` float, teacher_tail
    ``(N,)`` (read in ``tail`` mode only); labels ``(N,)`` int64; normalizer a 0-dim float64
    tensor; softcap 0 = none; chunk_size 0 = automatic. Returns (total, [kd, ce], d hidden,
    d weight, d bias)."""
    n, v = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    kd, ce = alpha_kd > 0, alpha_ce > 0
    rows = chunk_rows(chunk_size, n, v, device)
    tail = teacher_tail if normalization == "tail" else None
    # The topk op divides its sums by this 1; run_linear_chunks divides the total by n.
    unnormalised = torch.ones((), dtype=torch.float64, device=device)

    def chunk_loss(s, sl, lab, sel, compute_grad):
        _transform_(s, logit_scale, softcap)
        loss, parts, grad = topk_kl(
            s, teacher_ids[sl], teacher_logprobs[sl], None if tail is None else tail[sl],
            sel if kd else None, lab if ce else None, normalization, temperature,
            capture_temperature, t2_scale, alpha_kd, alpha_ce, ignore_index, "batchmean",
            unnormalised, compute_grad,
        )  # fmt: skip
        if compute_grad:
            _chain_(grad, s, sel, logit_scale, softcap)
        return torch.cat([loss.view(1), parts]), grad if compute_grad else None

    return run_linear_chunks(
        student_hidden, student_weight, student_bias, labels, normalizer, ignore_index, rows,
        (grad_hidden, grad_weight, grad_bias), chunk_loss,
    )  # fmt: skip


@linear_topk_distillation.register_fake
def _(student_hidden, student_weight, student_bias, teacher_ids, teacher_logprobs, teacher_tail,
      labels, normalizer, normalization, temperature, capture_temperature, t2_scale, alpha_kd,
      alpha_ce, ignore_index, logit_scale, softcap, chunk_size, grad_hidden, grad_weight,
      grad_bias):  # fmt: skip
    wanted = (grad_hidden, grad_weight, grad_bias)
    return fake_linear_outputs(student_hidden, student_weight, wanted)


register_linear_autograd(linear_topk_distillation, num_inputs=21)
