"""fastdistill::cross_entropy: hard-label loss logsumexp(x) − x[label] per row, rows with
``label == ignore_index`` skipped. Gradient: (softmax(x) − onehot(label)) / normaliser, computed in
the forward pass. Labels outside [0, C) that are not ``ignore_index`` raise ValueError."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import _native
from fastdistill.ops._common import empty_grad, register_saved_grad_autograd
from fastdistill.ops._fused_logits import Terms, run_fused_logits

REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("fastdistill::cross_entropy", mutates_args=())
def cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d logits or an empty tensor)."""
    norm = _native.NORM_ROWS if reduction == "mean" else _native.NORM_SUM
    res = run_fused_logits(
        "cross_entropy",
        logits,
        None,
        labels,
        None,
        terms=Terms(ce=True, norm_ce=norm),
        compute_grad=compute_grad,
        ignore_index=ignore_index,
        want_rows=reduction == "none",
    )
    loss = res.row_ce if reduction == "none" else res.out[2].clone()
    return loss, res.grad


@cross_entropy.register_fake
def _(logits, labels, ignore_index, reduction, compute_grad):
    lead = logits.shape[:-1] if reduction == "none" else ()
    return logits.new_empty(lead, dtype=torch.float32), empty_grad(logits, compute_grad)


register_saved_grad_autograd(cross_entropy, num_inputs=5)
