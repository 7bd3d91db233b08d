"""fastdistill::mse: Σ_j (s_j − t_j)² per selected row, reduced over rows (``batchmean``: by the
number of selected rows, the seed's logit MSE; ``mean``: by rows × C, the hidden-state MSE).
Gradient (student only): 2 (s − t) / normaliser, computed in the forward pass."""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill.ops._common import empty_grad, register_saved_grad_autograd
from fastdistill.ops._fused_logits import Terms, norm_code, run_fused_logits

REDUCTIONS = ("batchmean", "sum", "mean", "none")


@torch.library.custom_op("fastdistill::mse", mutates_args=())
def mse(
    student: Tensor, teacher: Tensor, mask: Tensor | None, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    """Returns (loss in float32, d loss/d student or an empty tensor)."""
    res = run_fused_logits(
        "mse",
        student,
        teacher,
        None,
        mask,
        terms=Terms(mse=True, norm_mse=norm_code(reduction)),
        compute_grad=compute_grad,
        want_rows=reduction == "none",
    )
    loss = res.row_mse if reduction == "none" else res.out[3].clone()
    return loss, res.grad


@mse.register_fake
def _(student, teacher, mask, reduction, compute_grad):
    lead = student.shape[:-1] if reduction == "none" else ()
    return student.new_empty(lead, dtype=torch.float32), empty_grad(student, compute_grad)


register_saved_grad_autograd(mse, num_inputs=5)
