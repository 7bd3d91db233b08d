"""``nn.Module`` wrappers of the functional losses; options are validated in ``__init__``."""

from __future__ import annotations

from torch import Tensor, nn

from fastdistill import ops
from fastdistill.losses import functional as F
from fastdistill.ops._common import check_alphas, check_int, check_reduction, check_temperature


class KLDivLoss(nn.Module):
    """``T² · KL(teacher ‖ student)``; see :func:`fastdistill.losses.kl_div_loss`."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction, ops.kl_div.REDUCTIONS)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None):
        return F.kl_div_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            mask=mask,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class MSELoss(nn.Module):
    """Row-summed squared error; see :func:`fastdistill.losses.mse_loss`."""

    def __init__(self, reduction: str = "batchmean"):
        super().__init__()
        self.reduction = check_reduction(reduction, ops.mse.REDUCTIONS)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None):
        return F.mse_loss(student, teacher, mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CosineLoss(nn.Module):
    """1 − cos(s, t) on hidden states; see :func:`fastdistill.losses.cosine_loss`."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction, ops.cosine.REDUCTIONS)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None):
        return F.cosine_loss(student_hidden, teacher_hidden, mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(nn.Module):
    """Hard-label cross-entropy; see :func:`fastdistill.losses.cross_entropy`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.reduction = check_reduction(reduction, ops.cross_entropy.REDUCTIONS)

    def forward(self, logits: Tensor, labels: Tensor):
        return F.cross_entropy(
            logits, labels, ignore_index=self.ignore_index, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class DistillationLoss(nn.Module):
    """Weighted KL + CE + MSE in one pass; returns ``(total, kl, ce, mse)``.

    See :func:`fastdistill.losses.distillation_loss`.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha_kl: float = 1.0,
        alpha_ce: float = 0.0,
        alpha_mse: float = 0.0,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha_kl, self.alpha_ce, self.alpha_mse = check_alphas(alpha_kl, alpha_ce, alpha_mse)
        self.ignore_index = check_int(ignore_index, "ignore_index")

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ):
        return F.distillation_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            mask=mask,
            temperature=self.temperature,
            alpha_kl=self.alpha_kl,
            alpha_ce=self.alpha_ce,
            alpha_mse=self.alpha_mse,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha_kl={self.alpha_kl}, alpha_ce={self.alpha_ce}, "
            f"alpha_mse={self.alpha_mse}, ignore_index={self.ignore_index}"
        )
