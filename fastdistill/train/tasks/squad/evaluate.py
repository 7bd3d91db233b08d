"""The ``squad`` task's evaluation: run the model over every window of the held-out questions,
decode the answers (:mod:`.decode`) and score them with the official metrics (:mod:`.metrics`);
write ``predictions.json``, ``nbest_predictions.json``, ``null_odds.json`` (v2.0) and
``results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdistill.train.tasks.squad.decode import Decoded, decode_predictions
from fastdistill.train.tasks.squad.features import SquadFeatures, collate_features
from fastdistill.train.tasks.squad.metrics import squad_v1_evaluate, squad_v2_evaluate

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
        n_best_size=cfg.options.n_best_size,
        max_answer_length=cfg.options.max_answer_length,
        null_score_diff_threshold=cfg.options.null_score_diff_threshold,
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
