"""Loss pieces shared by the tasks: the logit terms (KL at T, hard CE, logit MSE) and the
hidden-state terms (cosine, MSE), each fused (:mod:`fastdistill.losses`) or, for
``loss_impl: eager``, the DistilBERT scripts' own PyTorch formulas (``masked_select`` of the
full-vocabulary logits, ``nn.KLDivLoss``...), kept to measure the difference.

Weights arrive already scaled by the caller's share of the step's mean (see
:mod:`fastdistill.train.tasks.base`); the returned terms are unscaled means, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdistill import losses as FL
from fastdistill.train.tasks.text_data import IGNORE_INDEX


def hidden_of(out) -> torch.Tensor:
    """The last hidden states of a model output (bare encoders: ``last_hidden_state``)."""
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out.hidden_states[-1]


def add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def logit_losses(cfg, s_logits, t_logits, labels, kl_mask, a_kl, a_ce, a_mse):
    """``(total or None, kl, ce, mse)`` of the logit terms of one micro-batch: KL(teacher ‖
    student) at ``cfg.temperature`` (× T²) and MSE on ``kl_mask``'s rows, hard CE on ``labels``.
    ``t_logits`` may be ``None`` (no teacher: CE only)."""
    if cfg.loss_impl == "eager":
        return eager_logit_losses(cfg, s_logits, t_logits, labels, kl_mask, a_kl, a_ce, a_mse)
    zero = s_logits.new_zeros((), dtype=torch.float32)
    if not (a_kl > 0 or a_ce > 0 or a_mse > 0):
        return None, zero, zero, zero
    total, kl, ce, mse = FL.distillation_loss(
        s_logits,
        t_logits if t_logits is not None else s_logits.detach(),
        labels=labels,
        mask=kl_mask,
        temperature=cfg.temperature,
        alpha_kl=a_kl,
        alpha_ce=a_ce,
        alpha_mse=a_mse,
        ignore_index=IGNORE_INDEX,
    )
    return total, kl, ce, mse


def eager_logit_losses(cfg, s_logits, t_logits, labels, kl_mask, a_kl, a_ce, a_mse):
    """The DistilBERT scripts' eager formulas: masked_select of the full-vocabulary logits,
    nn.KLDivLoss(batchmean) on log_softmax/softmax × T², CrossEntropyLoss, MSELoss(sum) / rows."""
    V = s_logits.size(-1)
    T = cfg.temperature
    total = s_logits.new_zeros((), dtype=torch.float32)
    kl = mse = total.detach()
    if t_logits is not None and (a_kl > 0 or a_mse > 0):
        sel = kl_mask.bool().unsqueeze(-1).expand_as(s_logits)
        s_sel = torch.masked_select(s_logits, sel).view(-1, V)
        t_sel = torch.masked_select(t_logits, sel).view(-1, V)
        if a_kl > 0:
            kl = (
                nn.KLDivLoss(reduction="batchmean")(
                    F.log_softmax(s_sel / T, dim=-1), F.softmax(t_sel / T, dim=-1)
                )
                * T**2
            )
            total = total + a_kl * kl
        if a_mse > 0:
            mse = nn.MSELoss(reduction="sum")(s_sel, t_sel) / s_sel.size(0)
            total = total + a_mse * mse
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(s_logits.view(-1, V), labels.view(-1))
    if a_ce > 0:
        total = total + a_ce * ce
    return total, kl.detach().float(), ce.detach().float(), mse.detach().float()


def cosine_term(cfg, s_h, t_h, attn) -> torch.Tensor:
    """1 − cos(s, t) averaged over the attended tokens (``CosineEmbeddingLoss(target=1)``)."""
    if cfg.loss_impl != "eager":
        return FL.cosine_loss(s_h, t_h, mask=attn)
    dim = s_h.size(-1)
    sel = attn.bool().unsqueeze(-1).expand_as(s_h)
    s_sel = torch.masked_select(s_h, sel).view(-1, dim)
    t_sel = torch.masked_select(t_h, sel).view(-1, dim)
    target = s_sel.new_ones(s_sel.size(0))
    return nn.CosineEmbeddingLoss(reduction="mean")(s_sel, t_sel, target)
