"""Fused linear distillation: hidden states and output heads in, the ``(tokens, V)`` logits never
materialised (chunked over tokens). The teacher is dense (its hidden states and head, or its
logits: ``fastdistill::linear_distillation``) or sparse (its stored top-k ids and log-probabilities,
e.g. a teacher cache: ``fastdistill::linear_topk_distillation``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastdistill import ops, reference, reference_linear
from fastdistill.backend import select_backend

# The sparse teacher's checks are topk_distillation_loss's, applied in _check_sparse_teacher to a
# stand-in for the student logits (which never exist here).
from fastdistill.losses.topk import _check_flag, _check_temperatures
from fastdistill.losses.topk import _check_teacher as _check_topk_teacher
from fastdistill.ops._common import (
    check_beta,
    check_float_tensor,
    check_int,
    check_labels,
    check_logit_scale,
    check_mask,
    check_normalizer,
    check_softcap,
    check_temperature,
    check_weight,
    wants_grad,
)
from fastdistill.ops._fused_logits import check_label_range
from fastdistill.ops.linear_topk_distillation import linear_topk_distillation
from fastdistill.ops.topk_kl import check_topk_ids


def _check_head(hidden, weight, bias, prefix: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``hidden (*lead, H)``, ``weight (V, H)``, ``bias (V,)`` of one dtype and device."""
    hidden = check_float_tensor(hidden, f"{prefix}_hidden")
    weight = check_float_tensor(weight, f"{prefix}_weight")
    if hidden.dim() < 2:
        raise ValueError(
            f"{prefix}_hidden must be (*lead, hidden) with at least 2 dims, got shape "
            f"{tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{prefix}_weight must be (vocab, {hidden.shape[-1]}) to match {prefix}_hidden's last "
            f"dim (the output embedding / lm_head weight), got shape {tuple(weight.shape)}"
        )
    for name, x in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if x is None:
            continue
        x = check_float_tensor(x, name)
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {prefix}_hidden is on {hidden.device}")
        if x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} is {x.dtype} but {prefix}_hidden is {hidden.dtype}; pass one dtype (as "
                "F.linear requires)"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    return hidden, weight, bias


def _check_teacher(kd: bool, s_hidden: Tensor, vocab: int, hidden, weight, bias, logits):
    """The teacher as (hidden, weight, bias) or logits, flattened to rows; None when unused."""
    if not kd:
        return None, None, None, None
    if logits is not None and (hidden is not None or weight is not None):
        raise ValueError(
            "pass the teacher either as teacher_hidden + teacher_weight or as teacher_logits, "
            "not both"
        )
    lead = s_hidden.shape[:-1]
    if logits is not None:
        logits = check_float_tensor(logits, "teacher_logits")
        if logits.shape != (*lead, vocab):
            raise ValueError(
                f"teacher_logits must have shape {(*lead, vocab)} (the student's tokens and "
                f"vocabulary), got {tuple(logits.shape)}"
            )
        if logits.device != s_hidden.device:
            raise ValueError(
                f"teacher_logits is on {logits.device} but student_hidden is on {s_hidden.device}"
            )
        return None, None, None, logits.detach().reshape(-1, vocab)
    if hidden is None or weight is None:
        raise ValueError(
            "alpha_kd > 0 needs the teacher: teacher_hidden with teacher_weight (its lm_head), "
            "or teacher_logits"
        )
    hidden, weight, bias = _check_head(hidden, weight, bias, "teacher")
    if hidden.shape[:-1] != lead or hidden.device != s_hidden.device:
        raise ValueError(
            f"teacher_hidden must have the student's leading shape {tuple(lead)} and device, got "
            f"{tuple(hidden.shape[:-1])} on {hidden.device}"
        )
    if weight.shape[0] != vocab:
        raise ValueError(
            f"teacher_weight has {weight.shape[0]} rows but student_weight has {vocab}: the "
            "vocabularies must match"
        )
    bias = bias.detach() if bias is not None else None
    return hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(), bias, None


def _selection_labels(labels, mask, ignore_index: int, lead, device, vocab: int, ce: bool):
    """One int64 label per token: ``ignore_index`` where the token is not selected (its label is
    ``ignore_index`` or ``mask`` is false). Both terms use this one selection."""
    mask = check_mask(mask, lead, device)
    if labels is None:
        if ce:
            raise ValueError("alpha_ce > 0 needs labels (the hard targets of the CE term)")
        if mask is None:
            return None
        keep = 0 if ignore_index != 0 else 1  # any value but ignore_index: CE is off
        return mask.long().mul(keep - ignore_index).add(ignore_index).reshape(-1)
    labels = check_labels(labels, lead, device)
    check_label_range(labels, vocab, ignore_index)
    if mask is not None:
        labels = labels.masked_fill(~mask, ignore_index)
    return labels.reshape(-1)


@dataclass(frozen=True)
class _Common:
    """The arguments both linear losses take, checked."""

    alpha_kd: float
    alpha_ce: float
    ignore_index: int
    logit_scale: float
    softcap: float  # 0.0: none
    chunk_size: int  # 0: automatic
    labels: Tensor | None  # (N,) int64, ignore_index on unselected tokens (_selection_labels)
    normalizer: Tensor | None


def _check_common(s_hidden: Tensor, vocab: int, *, labels, mask, ignore_index, alpha_kd,
                  alpha_ce, logit_scale, softcap, normalizer, chunk_size) -> _Common:  # fmt: skip
    alpha_kd, alpha_ce = check_weight(alpha_kd, "alpha_kd"), check_weight(alpha_ce, "alpha_ce")
    if alpha_kd == 0 and alpha_ce == 0:
        raise ValueError("at least one of alpha_kd, alpha_ce must be > 0")
    ignore_index = check_int(ignore_index, "ignore_index")
    scale = 1.0 if logit_scale is None else check_logit_scale(logit_scale)
    cap = check_softcap(softcap)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")
    device, lead = s_hidden.device, s_hidden.shape[:-1]
    sel_labels = _selection_labels(labels, mask, ignore_index, lead, device, vocab, alpha_ce > 0)
    norm = check_normalizer(normalizer, "batchmean", device)
    return _Common(alpha_kd, alpha_ce, ignore_index, scale, cap, chunk_size or 0, sel_labels, norm)


def _grads_wanted(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    return wants_grad(hidden), wants_grad(weight), bias is not None and wants_grad(bias)


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Distillation loss from hidden states and output heads, without the ``(N, V)`` logits.

    With s = student_hidden · student_weightᵀ + student_bias (``(*lead, Hs)`` and ``(V, Hs)``)
    and t = teacher_hidden · teacher_weightᵀ + teacher_bias (``(*lead, Ht)``, ``(V, Ht)``), or
    t = ``teacher_logits`` ``(*lead, V)`` (raw head outputs: the transforms below apply to them
    too), returns ``(total, kd, ce)``:

        kd = Σ_sel D(t', s') / n,   ce = Σ_sel CE(s', label) / n,
        total = alpha_kd · kd + alpha_ce · ce

    over the tokens selected by ``labels != ignore_index`` and ``mask`` (every token when both
    are None), n = ``normalizer`` if given (e.g. the global ``num_items_in_batch``: a number or a
    0-dim tensor, never read on the host), else the number of selected tokens (at least 1). D is
    ``divergence`` between softmax(s'/T) and softmax(t'/T): ``forward_kl`` KL(teacher ‖ student),
    ``reverse_kl`` KL(student ‖ teacher), ``jsd`` JSD(β) with M = β p_t + (1 − β) p_s, or ``tvd``,
    times T² when ``t2_scale``; CE is the hard cross-entropy of s' at temperature 1. x' = the
    logits after ``logit_scale`` (multiply) and then ``softcap`` (c · tanh(x / c)), on both sides.
    ``kd`` and ``ce`` are detached float32; a term whose alpha is 0 reads 0 (alpha_kd = 0 needs no
    teacher).

    Gradients: exact, w.r.t. student_hidden, student_weight and student_bias (those that require
    grad), in their dtypes; the teacher gets none. The logits are formed chunk by chunk in float32
    (bf16/fp16 inputs are never rounded to their dtype before the softmax), ``chunk_size`` tokens
    at a time (None: from V and the free memory); three float32 ``(chunk_size, V)`` buffers are
    alive at once, whatever the number of tokens. The gradients are computed during the forward
    pass (as by every fused loss here); one backward per forward. Gradient accumulation, DDP and
    FSDP see an ordinary op whose inputs get their gradients through autograd.
    FASTDISTILL_BACKEND=torch runs ``fastdistill.reference.linear_distillation_loss`` instead
    (materialised logits).
    """
    s_hidden, s_weight, s_bias = _check_head(
        student_hidden, student_weight, student_bias, "student"
    )
    vocab = s_weight.shape[0]
    if divergence not in reference.DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, reference.DIVERGENCES))}, "
            f"got {divergence!r}"
        )
    beta = check_beta(beta)
    temperature = check_temperature(temperature)
    t2_scale = _check_flag(t2_scale, "t2_scale")
    c = _check_common(
        s_hidden, vocab, labels=labels, mask=mask, ignore_index=ignore_index, alpha_kd=alpha_kd,
        alpha_ce=alpha_ce, logit_scale=logit_scale, softcap=softcap, normalizer=normalizer,
        chunk_size=chunk_size,
    )  # fmt: skip
    teacher = _check_teacher(
        c.alpha_kd > 0, s_hidden, vocab, teacher_hidden, teacher_weight, teacher_bias,
        teacher_logits,
    )  # fmt: skip
    rows = s_hidden.reshape(-1, s_hidden.shape[-1])
    if select_backend("distillation_divergence", rows.device) == "torch":
        return reference_linear.linear_distillation_loss(
            rows, s_weight, student_bias=s_bias, teacher_hidden=teacher[0],
            teacher_weight=teacher[1], teacher_bias=teacher[2], teacher_logits=teacher[3],
            labels=c.labels, ignore_index=c.ignore_index, divergence=divergence, beta=beta,
            temperature=temperature, t2_scale=t2_scale, alpha_kd=c.alpha_kd, alpha_ce=c.alpha_ce,
            logit_scale=c.logit_scale, softcap=c.softcap or None, normalizer=c.normalizer,
            compute_dtype=torch.float32,
        )  # fmt: skip
    total, parts, *_ = ops.linear_distillation.linear_distillation(
        rows, s_weight, s_bias, *teacher, c.labels, c.normalizer, temperature, c.alpha_kd,
        c.alpha_ce, c.ignore_index, divergence, beta, t2_scale, c.logit_scale, c.softcap,
        c.chunk_size, *_grads_wanted(s_hidden, s_weight, s_bias),
    )  # fmt: skip
    kd, ce = parts.unbind()
    return total, kd, ce


def _check_sparse_teacher(s_hidden: Tensor, vocab: int, ids, logprobs, tail, normalization):
    """topk_distillation_loss's checks of (ids, log-probs, tail) against a student of leading
    shape ``s_hidden.shape[:-1]`` and ``vocab`` columns; errors name student_hidden."""
    stand_in = s_hidden.new_empty(()).expand(*s_hidden.shape[:-1], vocab)
    try:
        _, ids, lp, tail = _check_topk_teacher(stand_in, ids, logprobs, tail, normalization)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("student_logits", "student_hidden")) from None
    k = ids.shape[-1]
    tail = None if tail is None else tail.detach().reshape(-1)
    return ids.detach().reshape(-1, k), lp.detach().reshape(-1, k), tail


def linear_topk_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    student_bias: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Distillation from hidden states and an output head against a sparse top-k teacher (e.g. a
    teacher cache), without the student's ``(N, V)`` logits.

    With s = student_hidden · student_weightᵀ + student_bias (``(*lead, H)``, ``(V, H)``) and x' =
    s after ``logit_scale`` and ``softcap`` (as in ``linear_distillation_loss``), and the teacher
    as ``teacher_ids`` ``(*lead, k)`` (int64/int32/uint16, distinct per token, in [0, V)),
    ``teacher_logprobs`` ``(*lead, k)`` captured at ``capture_temperature`` and, for ``tail``,
    ``teacher_tail`` ``lead`` (the log of the mass outside the ids), returns ``(total, kd, ce)``:

        kd = Σ_sel KL_K(teacher ‖ student) / n,   ce = Σ_sel CE(x', label) / n,
        total = alpha_kd · kd + alpha_ce · ce

    KL_K is ``topk_kl_loss``'s forward KL over the stored support at ``temperature`` (times T²
    when ``t2_scale``) for ``normalization`` ``full`` (the student's softmax over the whole
    vocabulary), ``renormalized`` (both over the ids) or ``tail`` (a (k+1)-th bucket; needs
    temperature == capture_temperature); see ``fastdistill.losses.topk``. Selection and n as in
    ``linear_distillation_loss``: the tokens with ``labels != ignore_index`` and ``mask`` (every
    token when both are None), n = ``normalizer`` or their count (at least 1); unselected tokens'
    ids are not read. ``kd`` and ``ce`` are detached float32.

    Gradients: exact, w.r.t. student_hidden, student_weight and student_bias; the teacher gets
    none. The logits are formed ``chunk_size`` tokens at a time in float32 and each chunk's loss
    is the ``topk_kl`` kernel's (CPU core, Triton or CUDA, as FASTDISTILL_BACKEND selects); two
    float32 ``(chunk_size, V)`` buffers are alive at once, whatever the number of tokens. One
    backward per forward. Ids outside [0, V) or repeated in a selected token raise ValueError on
    CPU; on a GPU (no host sync) that token's loss is NaN. FASTDISTILL_BACKEND=torch runs
    ``fastdistill.reference_linear.linear_topk_distillation_loss`` (materialised logits).
    """
    s_hidden, s_weight, s_bias = _check_head(
        student_hidden, student_weight, student_bias, "student"
    )
    vocab = s_weight.shape[0]
    ids, lp, tail = _check_sparse_teacher(
        s_hidden, vocab, teacher_ids, teacher_logprobs, teacher_tail, normalization
    )
    temperature, capture_temperature = _check_temperatures(
        temperature, capture_temperature, normalization
    )
    t2_scale = _check_flag(t2_scale, "t2_scale")
    c = _check_common(
        s_hidden, vocab, labels=labels, mask=mask, ignore_index=ignore_index, alpha_kd=alpha_kd,
        alpha_ce=alpha_ce, logit_scale=logit_scale, softcap=softcap, normalizer=normalizer,
        chunk_size=chunk_size,
    )  # fmt: skip
    if c.alpha_kd > 0:
        selected = None if c.labels is None else c.labels != c.ignore_index
        check_topk_ids(ids.long(), vocab, selected)
    rows = s_hidden.reshape(-1, s_hidden.shape[-1])
    if select_backend("topk_kl", rows.device) == "torch":
        return reference_linear.linear_topk_distillation_loss(
            rows, s_weight, ids, lp, student_bias=s_bias, teacher_tail=tail, labels=c.labels,
            ignore_index=c.ignore_index, normalization=normalization, temperature=temperature,
            capture_temperature=capture_temperature, t2_scale=t2_scale, alpha_kd=c.alpha_kd,
            alpha_ce=c.alpha_ce, logit_scale=c.logit_scale, softcap=c.softcap or None,
            normalizer=c.normalizer, compute_dtype=torch.float32,
        )  # fmt: skip
    total, parts, *_ = linear_topk_distillation(
        rows, s_weight, s_bias, ids, lp, tail, c.labels, c.normalizer, normalization,
        temperature, capture_temperature, t2_scale, c.alpha_kd, c.alpha_ce, c.ignore_index,
        c.logit_scale, c.softcap, c.chunk_size, *_grads_wanted(s_hidden, s_weight, s_bias),
    )  # fmt: skip
    kd, ce = parts.unbind()
    return total, kd, ce
