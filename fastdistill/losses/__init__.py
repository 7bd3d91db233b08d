"""Fused distillation losses: drop-in replacements for the usual PyTorch loss formulas.

Functional: kl_div_loss, reverse_kl_loss, jsd_loss, tvd_loss, mse_loss, cosine_loss,
cross_entropy, distillation_loss, all_finite;
linear_distillation_loss (hidden states and output heads in, no logits),
linear_topk_distillation_loss (the same against a sparse top-k teacher);
topk_kl_loss, topk_distillation_loss (a sparse top-k teacher, e.g. from a teacher cache).
Modules: KLDivLoss, MSELoss, CosineLoss, CrossEntropyLoss, DistillationLoss.
Backend: FASTDISTILL_BACKEND = auto | torch | native | triton (see fastdistill.backend).
"""

from fastdistill.losses.functional import (
    all_finite,
    cosine_loss,
    cross_entropy,
    distillation_loss,
    jsd_loss,
    kl_div_loss,
    mse_loss,
    reverse_kl_loss,
    tvd_loss,
)
from fastdistill.losses.linear import linear_distillation_loss, linear_topk_distillation_loss
from fastdistill.losses.modules import (
    CosineLoss,
    CrossEntropyLoss,
    DistillationLoss,
    KLDivLoss,
    MSELoss,
)
from fastdistill.losses.topk import topk_distillation_loss, topk_kl_loss

__all__ = [
    "all_finite",
    "cosine_loss",
    "cross_entropy",
    "distillation_loss",
    "jsd_loss",
    "kl_div_loss",
    "linear_distillation_loss",
    "linear_topk_distillation_loss",
    "mse_loss",
    "reverse_kl_loss",
    "topk_distillation_loss",
    "topk_kl_loss",
    "tvd_loss",
    "CosineLoss",
    "CrossEntropyLoss",
    "DistillationLoss",
    "KLDivLoss",
    "MSELoss",
]
