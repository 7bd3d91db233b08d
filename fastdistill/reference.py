"""Plain-PyTorch meaning of every fastdistill op: the oracle for tests and benchmarks.

Each function computes in the dtype it is given (tests pass float64 copies of the rounded inputs;
the ``torch`` backend passes float32) and is written for clarity, not speed. Shapes: logits and
hidden states are ``(*lead, C)``; ``mask`` and ``labels`` have shape ``lead``. The teacher never
receives a gradient. The conventions shared by all ops:

- ``mask`` (bool) selects rows; unselected rows contribute 0 and get zero gradient.
- reductions over rows: ``sum``; ``batchmean`` = sum / max(#selected, 1); ``mean`` = sum /
  (max(#selected, 1) * C) for kl/mse (as ``nn.KLDivLoss``/``nn.MSELoss``) and sum / max(#selected, 1)
  for cosine and cross-entropy; ``none`` = per-row values with the leading shape, 0 where unselected.
- an empty selection gives 0, never NaN (``nn.CrossEntropyLoss`` gives NaN there; we do not).
- counts stay tensors: nothing here syncs with the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torch's cosine_embedding_loss adds this to both squared norms.
COSINE_EPS = 1e-12


def select_rows(x: Tensor, selected: Tensor | None) -> Tensor:
    """``x`` with unselected rows replaced by zeros, so that NaN/inf data in padding rows can
    reach neither the loss nor (through 0 * NaN in a backward) the gradient."""
    if selected is None:
        return x
    return torch.where(selected.unsqueeze(-1), x, 0.0)


def reduce_rows(row: Tensor, mask: Tensor | None, reduction: str, cols: int) -> Tensor:
    """Apply a row reduction to per-row values ``row`` (shape ``lead``)."""
    if mask is not None:
        row = torch.where(mask, row, 0.0)
        count = mask.sum()
    else:
        count = torch.tensor(row.numel(), device=row.device)
    count = count.clamp(min=1).to(row.dtype)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if reduction == "batchmean":
        return row.sum() / count
    if reduction == "mean":
        return row.sum() / (count * cols)
    raise ValueError(f"unknown reduction {reduction!r}")


def kl_div_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-row T² · KL(softmax(t/T) ‖ softmax(s/T)) = T² Σ_j p_t (log p_t − log p_s)."""
    t = teacher_logits.detach()
    log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    pt = log_pt.exp()
    # 0 · log 0 = 0 where the teacher gives a token no mass, even where the student's is -inf
    # (nn.KLDivLoss would produce NaN there). `pt == 0`, not `pt > 0`: NaN must stay NaN.
    elem = torch.where(pt == 0, 0.0, pt * (log_pt - log_ps))
    return elem.sum(-1) * (temperature * temperature)


def kl_div_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """T² · KL(teacher ‖ student) at temperature T, reduced over the selected rows."""
    s, t = select_rows(student_logits, mask), select_rows(teacher_logits, mask)
    row = kl_div_rows(s, t, temperature)
    return reduce_rows(row, mask, reduction, student_logits.shape[-1])


# ---- LLM divergences (reverse KL, JSD(beta), TVD) and their shared options --------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def transform_logits(x: Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> Tensor:
    """The model-side logit transforms, applied before the temperature: ``x * logit_scale``, then
    ``softcap * tanh(x / softcap)`` (Gemma-style final-logit softcapping) when ``softcap`` is set."""
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x


def common_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits restricted to their first min(Vs, Vt) columns (views, never padded)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def token_selection(mask: Tensor | None, labels: Tensor | None, ignore_index: int):
    """The selected tokens: ``mask`` and/or ``labels != ignore_index`` (None: every token)."""
    selected = None if labels is None else labels != ignore_index
    if mask is not None:
        selected = mask if selected is None else selected & mask
    return selected


def _masked(x: Tensor, zero: Tensor) -> Tensor:
    # where() on the inputs as well as the output: the backward of p * (a - b) at p = 0 with an
    # infinite a - b would be 0 * inf = NaN even though the forward where() discards the product.
    return torch.where(zero, 0.0, x)


def divergence_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Per-row divergence between p_s = softmax(s/T) and p_t = softmax(t/T) (no T² factor).

    forward_kl: KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s);  reverse_kl: KL(p_s ‖ p_t);
    jsd: β KL(p_t ‖ M) + (1 − β) KL(p_s ‖ M) with M = β p_t + (1 − β) p_s, log M formed in log
    space; β = 0 is forward_kl and β = 1 reverse_kl exactly (the TRL/Liger convention);
    tvd: ½ Σ |p_t − p_s|. A zero probability contributes 0 whatever the other side's log-probability.
    """
    t = teacher_logits.detach()
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(t / temperature, dim=-1)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    # `p == 0`, not `p > 0`: NaN must stay NaN.
    zs, zt = ps == 0, pt == 0
    if divergence == "forward_kl":
        elem = torch.where(zt, 0.0, pt * (_masked(lt, zt) - _masked(ls, zt)))
    elif divergence == "reverse_kl":
        elem = torch.where(zs, 0.0, ps * (_masked(ls, zs) - _masked(lt, zs)))
    elif divergence == "jsd":
        # (Columns where both sides are -inf enter the logsumexp as 0: its backward would
        # produce NaN there, and their terms are 0 anyway.)
        both = zs & zt
        lt_m, ls_m = _masked(lt, both), _masked(ls, both)
        log_m = torch.logsumexp(torch.stack([lt_m + math.log(beta), ls_m + math.log1p(-beta)]), 0)
        kl_t = torch.where(zt, 0.0, pt * (_masked(lt, zt) - _masked(log_m, zt)))
        kl_s = torch.where(zs, 0.0, ps * (_masked(ls, zs) - _masked(log_m, zs)))
        # Each column's β·kl_t + (1 − β)·kl_s is >= 0 (log-sum inequality); clamp its rounding.
        elem = (beta * kl_t + (1.0 - beta) * kl_s).clamp_min(0.0)
    elif divergence == "tvd":
        elem = 0.5 * (ps - pt).abs()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return elem.sum(-1)


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scale: bool = False,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    normalizer: float | Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab: str = "same",
) -> Tensor:
    """``divergence`` per selected token (times T² with ``t2_scale``), reduced: ``batchmean``
    (sum / #selected, or sum / ``normalizer`` when given), ``sum``, ``none``. ``vocab="common"``:
    both sides restricted to their first min(Vs, Vt) columns."""
    if vocab == "common":
        student_logits, teacher_logits = common_vocab(student_logits, teacher_logits)
    selected = token_selection(mask, labels, ignore_index)
    s = transform_logits(select_rows(student_logits, selected), logit_scale, softcap)
    t = transform_logits(select_rows(teacher_logits, selected), logit_scale, softcap)
    row = divergence_rows(s, t, divergence, temperature=temperature, beta=beta)
    if t2_scale:
        row = row * (temperature * temperature)
    if normalizer is not None and reduction == "batchmean":
        total = reduce_rows(row, selected, "sum", s.shape[-1])
        return total / (
            normalizer.to(total.dtype) if isinstance(normalizer, Tensor) else normalizer
        )
    return reduce_rows(row, selected, reduction, s.shape[-1])


def reverse_kl_loss(student_logits: Tensor, teacher_logits: Tensor, **kw) -> Tensor:
    """KL(student ‖ teacher) = Σ p_s (log p_s − log p_t); options as ``divergence_loss``."""
    return divergence_loss(student_logits, teacher_logits, "reverse_kl", **kw)


def jsd_loss(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, **kw) -> Tensor:
    """Generalised JSD(β) = β KL(p_t ‖ M) + (1 − β) KL(p_s ‖ M), M = β p_t + (1 − β) p_s."""
    return divergence_loss(student_logits, teacher_logits, "jsd", beta=beta, **kw)


def tvd_loss(student_logits: Tensor, teacher_logits: Tensor, **kw) -> Tensor:
    """Total variation distance ½ Σ |p_t − p_s|; options as ``divergence_loss``."""
    return divergence_loss(student_logits, teacher_logits, "tvd", **kw)


def mse_rows(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-row Σ_j (s_j − t_j)²."""
    return (student - teacher.detach()).square().sum(-1)


def mse_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, reduction: str = "batchmean"
) -> Tensor:
    """Squared error summed over the last dim and the selected rows, then reduced."""
    row = mse_rows(select_rows(student, mask), select_rows(teacher, mask))
    return reduce_rows(row, mask, reduction, student.shape[-1])


def cosine_rows(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """Per-row 1 − cos(s, t) with torch's cosine_embedding_loss epsilon handling."""
    t = teacher_hidden.detach()
    dot = (student_hidden * t).sum(-1)
    ss = (student_hidden * student_hidden).sum(-1) + COSINE_EPS
    tt = (t * t).sum(-1) + COSINE_EPS
    return 1 - dot / torch.sqrt(ss * tt)


def cosine_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Mean (or sum/none) over selected rows of 1 − cos(s, t)."""
    row = cosine_rows(select_rows(student_hidden, mask), select_rows(teacher_hidden, mask))
    # For cosine "mean" is per row, like CosineEmbeddingLoss: the row count, not rows * C.
    return reduce_rows(row, mask, "batchmean" if reduction == "mean" else reduction, 1)


def cross_entropy_rows(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row logsumexp(x) − x[label] (0 where ignored) and the selection mask."""
    valid = labels != ignore_index
    logits = select_rows(logits, valid)
    safe = torch.where(valid, labels, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    row = torch.logsumexp(logits, dim=-1) - picked
    return row, valid


def cross_entropy(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Hard-label cross-entropy; ``mean`` over non-ignored rows (0 when there are none)."""
    row, valid = cross_entropy_rows(logits, labels, ignore_index)
    return reduce_rows(row, valid, "batchmean" if reduction == "mean" else reduction, 1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 2.0,
    alpha_kl: float = 1.0,
    alpha_ce: float = 0.0,
    alpha_mse: float = 0.0,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    t2_scale: bool = True,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab: str = "same",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha_kl · kl + alpha_ce · ce + alpha_mse · mse and the three (detached) components.

    kl: the ``divergence`` (default forward KL, ``kl_div_loss``; times T² with ``t2_scale``),
    batchmean over rows selected by ``mask``; ce: ``cross_entropy(mean)`` over rows with
    ``labels != ignore_index`` (0 without labels); mse: ``mse_loss(batchmean)`` over the rows
    selected by ``mask`` (the seed's ``MSELoss(sum) / #rows``). ``logit_scale``/``softcap`` transform
    the logits every term sees; ``vocab="common"`` takes the divergence over the first
    min(Vs, Vt) columns and the CE over the student's whole vocabulary (no MSE then). A term whose
    alpha is 0 is not computed and its component is 0, so an unused MSE of ``-inf`` logits cannot
    poison the total.
    """
    zero = torch.zeros(
        (),
        dtype=torch.promote_types(student_logits.dtype, torch.float32),
        device=student_logits.device,
    )
    kl = ce = mse = zero
    total = zero
    if alpha_kl > 0:
        kl = divergence_loss(
            student_logits,
            teacher_logits,
            divergence,
            beta=beta,
            temperature=temperature,
            t2_scale=t2_scale,
            mask=mask,
            logit_scale=logit_scale,
            softcap=softcap,
            vocab=vocab,
        )
        total = total + alpha_kl * kl
    if alpha_ce > 0:
        if labels is None:
            raise ValueError("alpha_ce > 0 needs labels")
        x = transform_logits(student_logits, logit_scale, softcap)
        ce = cross_entropy(x, labels, ignore_index=ignore_index)
        total = total + alpha_ce * ce
    if alpha_mse > 0:
        s = transform_logits(student_logits, logit_scale, softcap)
        t = transform_logits(teacher_logits, logit_scale, softcap)
        mse = mse_loss(s, t, mask=mask)
        total = total + alpha_mse * mse
    return total, kl.detach(), ce.detach(), mse.detach()


def all_finite(*tensors: Tensor) -> Tensor:
    """0-dim bool: no NaN or ±inf in any of the tensors."""
    checks = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(checks).all()


# ---- sparse (top-k) teacher targets ----------------------------------------------------------

TOPK_NORMALIZATIONS = ("full", "renormalized", "tail")


def _log1mexp_rows(z: Tensor, ids: Tensor, skip: Tensor) -> Tensor:
    """log Σ_{j ∉ K} softmax(z)_j per row = logsumexp over the columns outside ``ids`` minus the
    full logsumexp: never 1 − Σ_K q in finite precision. Rows in ``skip`` get a constant input
    (their term is discarded; a logsumexp of nothing but -inf would make the backward NaN)."""
    outside = torch.ones_like(z, dtype=torch.bool).scatter(-1, ids, False)
    z_out = torch.where(outside, z, -math.inf)
    z_out = torch.where(skip.unsqueeze(-1), 0.0, z_out)
    return torch.logsumexp(z_out, -1) - torch.logsumexp(z, -1)


def topk_kl_rows(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor | None,
    normalization: str,
    temperature: float,
    capture_temperature: float,
) -> Tensor:
    """Per-row forward KL(p ‖ q) over a teacher's stored top-k support K (no T² factor).

    Shapes: logits ``(*lead, V)``; ids and log-probs ``(*lead, k)``; tail ``lead``. With z = s/T:

    - teacher targets, ``full``/``renormalized``: p_i = softmax_K(ℓ_i · T_c / T) (re-tempered
      from the capture temperature T_c to T, normalised over K);
    - ``full``: log q_i = z_i − logsumexp_V(z); ``renormalized``: log q_i = z_i − logsumexp_K(z);
    - ``tail`` (T = T_c): p_i = exp(ℓ_i) as stored, plus the bucket p_tail = exp(tail);
      log q_i = z_i − logsumexp_V(z), log q_tail = logsumexp_{V∖K}(z) − logsumexp_V(z).

    Value: Σ_K p_i (log p_i − log q_i) (+ p_tail (tail − log q_tail)); a bucket with p = 0
    contributes 0 whatever q is. The teacher gets no gradient.
    """
    ids = teacher_ids.long()
    lp = teacher_logprobs.detach().to(student_logits.dtype)
    z = student_logits / temperature
    zk = z.gather(-1, ids)
    if normalization == "tail":
        log_p = lp
        log_q = zk - torch.logsumexp(z, -1, keepdim=True)
    else:
        a = lp * (capture_temperature / temperature)
        log_p = a - torch.logsumexp(a, -1, keepdim=True)
        norm_z = z if normalization == "full" else zk
        log_q = zk - torch.logsumexp(norm_z, -1, keepdim=True)
    p = log_p.exp()
    zero = p == 0  # `p == 0`, not `p > 0`: NaN must stay NaN
    row = torch.where(zero, 0.0, p * (_masked(log_p, zero) - _masked(log_q, zero))).sum(-1)
    if normalization == "tail":
        tail = teacher_tail.detach().to(student_logits.dtype)
        p_t = tail.exp()
        zt = p_t == 0
        log_qt = _log1mexp_rows(z, ids, zt)
        row = row + torch.where(zt, 0.0, p_t * (_masked(tail, zt) - _masked(log_qt, zt)))
    return row


def _topk_select(student_logits, teacher_ids, teacher_logprobs, teacher_tail, selected):
    """Inputs with unselected rows replaced by harmless values (ids 0, zeros) so that garbage in
    padding rows reaches neither the loss nor the gradient."""
    if selected is None:
        return student_logits, teacher_ids.long(), teacher_logprobs, teacher_tail
    sel = selected.unsqueeze(-1)
    ids = torch.where(sel, teacher_ids.long(), 0)
    lp = torch.where(sel, teacher_logprobs, 0.0)
    tail = None if teacher_tail is None else torch.where(selected, teacher_tail, 0.0)
    return select_rows(student_logits, selected), ids, lp, tail


def topk_kl_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    normalizer: float | Tensor | None = None,
    t2_scale: bool = False,
) -> Tensor:
    """``topk_kl_rows`` per token selected by ``mask`` and/or ``labels != ignore_index`` (times T²
    with ``t2_scale``), reduced: ``batchmean`` (/ #selected or / ``normalizer``), ``sum``,
    ``none``."""
    selected = token_selection(mask, labels, ignore_index)
    s, ids, lp, tail = _topk_select(
        student_logits, teacher_ids, teacher_logprobs, teacher_tail, selected
    )
    row = topk_kl_rows(s, ids, lp, tail, normalization, temperature, capture_temperature)
    if t2_scale:
        row = row * (temperature * temperature)
    if normalizer is not None and reduction == "batchmean":
        total = reduce_rows(row, selected, "sum", 1)
        return total / (
            normalizer.to(total.dtype) if isinstance(normalizer, Tensor) else normalizer
        )
    return reduce_rows(row, selected, reduction, 1)


def topk_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    normalization: str = "full",
    temperature: float = 1.0,
    capture_temperature: float = 1.0,
    t2_scale: bool = False,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """alpha_kd · kd + alpha_ce · ce and the two (detached) components: kd = ``topk_kl_loss``
    batchmean over the rows ``mask`` selects (or / ``normalizer``), ce = ``cross_entropy`` (at
    temperature 1) mean over ``labels != ignore_index``, also / ``normalizer`` when given. A term
    whose alpha is 0 is not computed and reads 0."""
    zero = torch.zeros(
        (),
        dtype=torch.promote_types(student_logits.dtype, torch.float32),
        device=student_logits.device,
    )
    kd = ce = total = zero
    if alpha_kd > 0:
        kd = topk_kl_loss(
            student_logits, teacher_ids, teacher_logprobs, teacher_tail=teacher_tail,
            normalization=normalization, temperature=temperature,
            capture_temperature=capture_temperature, mask=mask, normalizer=normalizer,
            t2_scale=t2_scale,
        )  # fmt: skip
        total = total + alpha_kd * kd
    if alpha_ce > 0:
        if labels is None:
            raise ValueError("alpha_ce > 0 needs labels")
        row, valid = cross_entropy_rows(student_logits, labels, ignore_index)
        if normalizer is not None:
            ce = reduce_rows(row, valid, "sum", 1) / (
                normalizer.to(row.dtype) if isinstance(normalizer, Tensor) else normalizer
            )
        else:
            ce = reduce_rows(row, valid, "batchmean", 1)
        total = total + alpha_ce * ce
    return total, kd.detach(), ce.detach()
