"""The ``squad`` task's loss.

Loss, per feature (one question–context window), as in the DistilBERT SQuAD distillation script:

    alpha_kl · (KL_start + KL_end) / 2 + alpha_squad · (CE_start + CE_end) / 2

where KL_x = T² · KL(softmax(t_x / T) ‖ softmax(s_x / T)) over the positions of the window
(:func:`fastdistill.losses.kl_div_loss`, which includes the T²), and CE_x is the cross-entropy of
the student's start (end) logits with the gold start (end) token: the model's own QA loss. The
script calls the first weight ``alpha_ce``; here it is ``alpha_kl`` as for the other tasks. Both
terms are means over the step's features (the trainer's normalisation).

``mask_question_and_padding`` (off by default, as in the script): the question, separator and padding
positions are set to -inf in the student's and the teacher's logits before both losses, so the
softmaxes run over the context tokens and [CLS] only (the positions an answer can take; [CLS] is
the no-answer of SQuAD v2.0). A -inf teacher entry has probability 0 and adds nothing to the KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdistill import losses as FL
from fastdistill.train.tasks.squad.features import SquadBatch


def answer_logits(cfg, out, batch: SquadBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits ``(B, L)``, with the non-answer positions at -inf when
    ``cfg.options.mask_question_and_padding`` (module doc)."""
    start, end = out.start_logits, out.end_logits
    if cfg.options.mask_question_and_padding:
        blocked = ~batch.answer_mask
        start = start.masked_fill(blocked, float("-inf"))
        end = end.masked_fill(blocked, float("-inf"))
    return start, end


def squad_loss(
    cfg, s_out, t_out, batch: SquadBatch, w: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kl, qa) of one micro-batch; ``w`` as in :meth:`fastdistill.train.tasks.base.Task.loss`
    (``w["kl"]``/``w["ce"]``: this micro-batch's share of the step's features, ``w["world"]``).
    ``kl`` and ``qa`` come back detached, as shares of the step's means (for logging)."""
    world = w["world"]
    s_start, s_end = answer_logits(cfg, s_out, batch)
    zero = s_start.new_zeros((), dtype=torch.float32)
    kl = zero
    total = None
    a_kl = cfg.alpha_kl * w["kl"] * world if t_out is not None else 0.0
    a_qa = cfg.options.alpha_squad * w["ce"] * world
    if cfg.loss_impl == "eager":
        t_logits = None if t_out is None else answer_logits(cfg, t_out, batch)
        return seed_squad_losses(cfg, (s_start, s_end), t_logits, batch, a_kl, a_qa, w)
    if a_kl > 0:
        t_start, t_end = answer_logits(cfg, t_out, batch)
        T = cfg.temperature
        kl = (
            FL.kl_div_loss(s_start, t_start, temperature=T)
            + FL.kl_div_loss(s_end, t_end, temperature=T)
        ) / 2
        total = kl * a_kl
    qa = (
        FL.cross_entropy(s_start, batch.start_positions)
        + FL.cross_entropy(s_end, batch.end_positions)
    ) / 2
    if a_qa > 0:
        total = qa * a_qa if total is None else total + qa * a_qa
    if total is None:
        total = s_start.sum() * 0.0
    return total, kl.detach() * w["kl"], qa.detach() * w["ce"]


def seed_squad_losses(cfg, s_logits, t_logits, batch, a_kl, a_qa, w):
    """The DistilBERT SQuAD script's eager formulas (run_squad_w_distillation.py), for ``loss_impl: eager``:
    ``nn.KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) · T²`` on start and end, averaged,
    and the model's QA loss (CrossEntropyLoss on start and end, averaged)."""
    T = cfg.temperature
    total = s_logits[0].new_zeros((), dtype=torch.float32)
    kl = total.detach()
    if t_logits is not None and a_kl > 0:
        kls = [
            nn.KLDivLoss(reduction="batchmean")(
                F.log_softmax(s.float() / T, dim=-1), F.softmax(t.float() / T, dim=-1)
            )
            * T**2
            for s, t in zip(s_logits, t_logits, strict=True)
        ]
        kl = (kls[0] + kls[1]) / 2
        total = total + a_kl * kl
    qa = (
        nn.CrossEntropyLoss()(s_logits[0].float(), batch.start_positions)
        + nn.CrossEntropyLoss()(s_logits[1].float(), batch.end_positions)
    ) / 2
    if a_qa > 0:
        total = total + a_qa * qa
    return total, kl.detach().float() * w["kl"], qa.detach().float() * w["ce"]
