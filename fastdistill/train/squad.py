"""The ``squad`` task: its loss and its evaluation (the loop in :mod:`fastdistill.train.loop` runs
it like the other tasks).

Loss, per feature (one question–context window), as in the seed's SQuAD distillation:

    alpha_kl · (KL_start + KL_end) / 2 + alpha_squad · (CE_start + CE_end) / 2

where KL_x = T² · KL(softmax(t_x / T) ‖ softmax(s_x / T)) over the positions of the window
(:func:`fastdistill.losses.kl_div_loss`, which includes the T²), and CE_x is the cross-entropy of
the student's start (end) logits with the gold start (end) token: the model's own QA loss. The
seed calls the first weight ``alpha_ce``; here it is ``alpha_kl`` as for the other tasks. Both
terms are means over the step's features (the loop's normalisation).

``mask_question_and_padding`` (off by default, as in the seed): the question, separator and padding
positions are set to -inf in the student's and the teacher's logits before both losses, so the
softmaxes run over the context tokens and [CLS] only (the positions an answer can take; [CLS] is
the no-answer of SQuAD v2.0). A -inf teacher entry has probability 0 and adds nothing to the KL.

Evaluation runs the model over every window of the held-out questions, decodes the answers
(:mod:`fastdistill.train.squad_decode`) and scores them with the official metrics
(:mod:`fastdistill.train.squad_metrics`); it writes ``predictions.json``,
``nbest_predictions.json``, ``null_odds.json`` (v2.0) and ``results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdistill import losses as FL
from fastdistill.train.squad_data import SquadBatch, SquadFeatures, collate_features
from fastdistill.train.squad_decode import Decoded, decode_predictions
from fastdistill.train.squad_metrics import squad_v1_evaluate, squad_v2_evaluate


def answer_logits(cfg, out, batch: SquadBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits ``(B, L)``, with the non-answer positions at -inf when
    ``cfg.mask_question_and_padding`` (module doc)."""
    start, end = out.start_logits, out.end_logits
    if cfg.mask_question_and_padding:
        blocked = ~batch.answer_mask
        start = start.masked_fill(blocked, float("-inf"))
        end = end.masked_fill(blocked, float("-inf"))
    return start, end


def squad_loss(
    cfg, s_out, t_out, batch: SquadBatch, w: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kl, qa) of one micro-batch; ``w`` as in :func:`fastdistill.train.loop.compute_loss`
    (``w["kl"]``/``w["ce"]``: this micro-batch's share of the step's features, ``w["world"]``).
    ``kl`` and ``qa`` come back detached, as shares of the step's means (for logging)."""
    world = w["world"]
    s_start, s_end = answer_logits(cfg, s_out, batch)
    zero = s_start.new_zeros((), dtype=torch.float32)
    kl = zero
    total = None
    a_kl = cfg.alpha_kl * w["kl"] * world if t_out is not None else 0.0
    a_qa = cfg.alpha_squad * w["ce"] * world
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
    """The seed's eager formulas (run_squad_w_distillation.py), for ``loss_impl: eager``:
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


# ---- evaluation -------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_logits(
    model, data: SquadFeatures, device, *, batch_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(features, max_length)`` float32 start and end logits of ``model`` on every window."""
    was_training = model.training
    model.eval()
    starts, ends = [], []
    try:
        for first in range(0, len(data), batch_size):
            idx = list(range(first, min(len(data), first + batch_size)))
            batch = collate_features(data, idx, pad_id=pad_id).to(device)
            out = model(**batch.model_inputs(model))
            starts.append(out.start_logits.float().cpu().numpy())
            ends.append(out.end_logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(starts), np.concatenate(ends)


def score_predictions(data: SquadFeatures, decoded: Decoded) -> dict[str, Any]:
    """Official v1.1 (keys ``exact``, ``f1``) or v2.0 metrics (with ``null_odds`` as the no-answer
    probabilities: adds the ``best_*`` thresholds) of decoded predictions."""
    gold = {ex.qid: [text for text, _ in ex.answers] for ex in data.examples}
    if data.v2:
        return squad_v2_evaluate(gold, decoded.predictions, decoded.null_odds)
    m = squad_v1_evaluate(gold, decoded.predictions)
    return {"exact": m["exact_match"], "f1": m["f1"], "total": len(gold)}


def write_predictions(out_dir: Path, decoded: Decoded, metrics: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "predictions.json": decoded.predictions,
        "nbest_predictions.json": decoded.nbest,
        "results.json": metrics,
    }
    if decoded.null_odds is not None:
        files["null_odds.json"] = decoded.null_odds
    for name, value in files.items():
        (out_dir / name).write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def evaluate_model(
    cfg, model, data: SquadFeatures, device, *, pad_id: int, out_dir: Path | None
) -> dict[str, Any]:
    """Decode and score ``model``'s answers on ``data``; write the files to ``out_dir`` if given."""
    start, end = predict_logits(model, data, device, batch_size=cfg.batch_size, pad_id=pad_id)
    decoded = decode_predictions(
        data,
        start,
        end,
        n_best_size=cfg.n_best_size,
        max_answer_length=cfg.max_answer_length,
        null_score_diff_threshold=cfg.null_score_diff_threshold,
    )
    metrics = score_predictions(data, decoded)
    if out_dir is not None:
        write_predictions(out_dir, decoded, metrics)
    return metrics


def evaluate_squad(
    cfg,
    student,
    teacher,
    data: SquadFeatures | None,
    device,
    *,
    pad_id: int,
    out_dir: Path | None,
    teacher_dir: Path | None = None,
) -> dict[str, Any]:
    """The student's metrics; with a teacher also the teacher's, as ``teacher_<metric>``."""
    if data is None or len(data) == 0:
        return {}
    result = evaluate_model(cfg, student, data, device, pad_id=pad_id, out_dir=out_dir)
    if teacher is not None:
        t = evaluate_model(cfg, teacher, data, device, pad_id=pad_id, out_dir=teacher_dir)
        result.update({f"teacher_{k}": v for k, v in t.items()})
    return result
