"""TRL's generalised JSD loss on the fused op, and TRL's GKD trainer using it.

``generalized_jsd_loss`` has the signature and the value of TRL's
``GKDTrainer.generalized_jsd_loss`` (reductions, ignored labels and ``num_items_in_batch``
included) and the exact gradient with respect to ``student_logits``, computed in one pass that
never materialises the ``(tokens, V)`` log-probabilities, mixture and KL tensors. A GKD user
changes one line::

    from fastdistill.integrations.trl import GKDTrainer   # was: from trl.experimental.gkd import ...

``GKDTrainer`` is TRL's class with this function as its ``generalized_jsd_loss``; everything else
(generation, ``lmbda``, ``seq_kd``, the loss's arguments) is TRL's. Importing this module does not
import TRL; ``GKDTrainer`` does, on first access (``pip install fastdistill[trl]``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

import fastdistill.losses as FL

# GKDTrainer is built on first access (module __getattr__ below).
__all__ = ["generalized_jsd_loss", "GKDTrainer"]  # noqa: F822

# TRL hard-codes the ignored label.
_IGNORE_INDEX = -100


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Tensor | int | float | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD, fused; TRL's function of the same name.

    Per token, with p_s = softmax(s / T), p_t = softmax(t / T) and M = β p_t + (1 − β) p_s:
    JSD = β KL(p_t ‖ M) + (1 − β) KL(p_s ‖ M); β = 0 is KL(p_t ‖ p_s), β = 1 is KL(p_s ‖ p_t).

    Args:
        student_logits, teacher_logits: ``(*lead, V)`` (GKD: ``(batch, seq, V)``), one dtype.
        labels: optional ``lead``-shaped; tokens labelled -100 are left out.
        beta: in [0, 1]. temperature: T > 0, divides both sides (no T² factor).
        reduction: over the summed JSD of the kept tokens, as TRL:
            ``batchmean``: / the number of kept tokens with ``labels`` (0 kept gives 0), else /
            ``student_logits.shape[0]`` (the batch size for 3-d logits, not the token count);
            ``sum``; ``mean``: / (kept tokens · V), NaN when none is kept (``Tensor.mean`` of
            nothing).
        num_items_in_batch: when given, the result is the sum / it, whatever ``reduction``
            (the global token count of gradient accumulation; a tensor stays on the device).

    Returns a 0-dim float32 tensor (fp32 math whatever the input dtype). Differences from TRL,
    all errors where TRL would return NaN, a silent wrong value or a different layout:
    ``reduction="none"`` (TRL's per-vocabulary-entry ``(tokens, V)`` tensor, which a fused op
    never forms) and unknown reductions raise ValueError, as do β outside [0, 1], T ≤ 0 and a
    number ``num_items_in_batch`` ≤ 0; ``teacher_logits`` that require grad raise (the fused op
    gives the teacher no gradient: pass them detached, as GKD does).
    """
    if reduction not in ("batchmean", "sum", "mean") and num_items_in_batch is None:
        raise ValueError(
            f"reduction must be 'batchmean', 'sum' or 'mean', got {reduction!r} ('none' is "
            "TRL's per-vocabulary-entry tensor, which the fused op never forms)"
        )
    if isinstance(teacher_logits, Tensor) and teacher_logits.requires_grad:
        if torch.is_grad_enabled():
            raise ValueError(
                "teacher_logits requires grad, but the fused loss gives the teacher no gradient; "
                "pass teacher_logits.detach() (or compute them under torch.no_grad())"
            )
    kept = None
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
        kept = labels != _IGNORE_INDEX  # TRL uses labels only to select tokens
    jsd = functools.partial(FL.jsd_loss, beta=beta, temperature=temperature, mask=kept)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(student_logits.device)
        return jsd(student_logits, teacher_logits, normalizer=num_items_in_batch)
    if reduction == "batchmean":
        if kept is not None:  # / max(kept tokens, 1): an empty selection gives 0
            return jsd(student_logits, teacher_logits)
        return jsd(student_logits, teacher_logits, normalizer=max(student_logits.shape[0], 1))
    total = jsd(student_logits, teacher_logits, reduction="sum")
    if reduction == "sum":
        return total
    kept_tokens = kept.sum() if kept is not None else student_logits[..., 0].numel()
    return total / (kept_tokens * student_logits.shape[-1])


@functools.cache
def _fused_gkd_trainer() -> type:
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    class GKDTrainer(TRLGKDTrainer):
        """TRL's ``GKDTrainer`` whose ``generalized_jsd_loss`` is fastdistill's fused one
        (``fastdistill.integrations.trl.generalized_jsd_loss``): the same loss and gradient."""

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    GKDTrainer.__module__ = __name__
    GKDTrainer.__qualname__ = "GKDTrainer"
    return GKDTrainer


def __getattr__(name: str):
    # TRL (and, through it, transformers and datasets) is imported only when the trainer is used.
    if name == "GKDTrainer":
        return _fused_gkd_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
