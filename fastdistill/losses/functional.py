"""Functional distillation losses: validate, then call the registered ops.

Every loss returns a float32 tensor (fp32 math whatever the input dtype), gives the teacher no
gradient and the student the exact gradient of the returned value. Shapes: ``(*lead, C)`` inputs;
``mask`` (bool, or an integer 0/1 tensor such as an attention mask) and ``labels`` have shape
``lead``. Nothing here synchronises with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdistill import ops, reference
from fastdistill.backend import select_backend
from fastdistill.ops._common import (
    check_alphas,
    check_beta,
    check_float_tensor,
    check_int,
    check_labels,
    check_logit_scale,
    check_mask,
    check_normalizer,
    check_pair,
    check_pair_vocab,
    check_reduction,
    check_softcap,
    check_temperature,
    wants_grad,
)
from fastdistill.ops._fused_logits import check_label_range


def _use_reference(op: str, x: Tensor) -> bool:
    """FASTDISTILL_BACKEND=torch, or a device with no kernel: run fastdistill.reference directly
    (fp32 math, plain autograd, traceable by torch.compile) instead of the op."""
    return select_backend(op, x.device) == "torch"


def kl_div_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """Soft-target loss T² · KL(softmax(t/T) ‖ softmax(s/T)), fused (one read of each input).

    Direction: KL(teacher ‖ student) = Σ p_t (log p_t − log p_s), what
    ``nn.KLDivLoss(reduction)(log_softmax(s/T), softmax(t/T)) * T**2`` computes.

    Args:
        student_logits, teacher_logits: ``(*lead, V)``, same shape and dtype (fp32/bf16/fp16).
        temperature: T > 0.
        mask: optional ``lead``-shaped selection of rows (tokens).
        reduction: ``batchmean`` (sum over selected rows / max(#selected, 1)), ``sum``,
            ``mean`` (sum / (max(#selected, 1) · V), as nn.KLDivLoss), ``none`` (per row, 0 where
            unselected).

    With ``mask`` = the attention mask and ``batchmean`` this equals the DistilBERT trainer's
    ``loss_ce`` on ``masked_select``-ed logits.
    """
    s, t = check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    temperature = check_temperature(temperature)
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.kl_div.REDUCTIONS)
    if _use_reference("kl_div", s):
        return reference.kl_div_loss(
            s.float(), t.float(), temperature=temperature, mask=mask, reduction=reduction
        )
    loss, _ = ops.kl_div.kl_div(s, t, mask, temperature, reduction, wants_grad(s))
    return loss


def mse_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "batchmean",
) -> Tensor:
    """Squared error Σ_j (s_j − t_j)² per selected row, reduced over rows.

    ``batchmean``: / max(#selected, 1), the DistilBERT logit MSE (``MSELoss(sum) / #rows``);
    ``mean``: / (max(#selected, 1) · D), ``nn.MSELoss()`` on the selected rows (hidden states);
    ``sum``; ``none`` (per row, 0 where unselected).
    """
    s, t = check_pair(student, teacher, "student", "teacher")
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.mse.REDUCTIONS)
    if _use_reference("mse", s):
        return reference.mse_loss(s.float(), t.float(), mask=mask, reduction=reduction)
    loss, _ = ops.mse.mse(s, t, mask, reduction, wants_grad(s))
    return loss


def cosine_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """1 − cos(s, t) per selected row of hidden states ``(*lead, D)``, reduced over rows.

    Equal to ``nn.CosineEmbeddingLoss()(s_sel, t_sel, ones)`` on the selected rows, including its
    epsilon (cos = <s,t> / sqrt((|s|² + 1e-12)(|t|² + 1e-12))). ``mean`` (over selected rows),
    ``sum``, ``none``.
    """
    s, t = check_pair(student_hidden, teacher_hidden, "student_hidden", "teacher_hidden")
    mask = check_mask(mask, s.shape[:-1], s.device)
    reduction = check_reduction(reduction, ops.cosine.REDUCTIONS)
    if _use_reference("cosine", s):
        return reference.cosine_loss(s.float(), t.float(), mask=mask, reduction=reduction)
    loss, _ = ops.cosine.cosine(s, t, mask, reduction, wants_grad(s))
    return loss


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Hard-label cross-entropy (the MLM/CLM loss) on ``(*lead, V)`` logits and ``lead`` labels.

    ``mean`` is over rows whose label is not ``ignore_index`` and is 0 (not NaN, unlike
    ``F.cross_entropy``) when every label is ignored. Labels outside ``[0, V)`` raise ValueError on
    CPU. No class weights or label smoothing.
    """
    x = check_float_tensor(logits, "logits")
    labels = check_labels(labels, x.shape[:-1], x.device)
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction, ops.cross_entropy.REDUCTIONS)
    if _use_reference("cross_entropy", x):
        check_label_range(labels, x.shape[-1], ignore_index)
        return reference.cross_entropy(
            x.float(), labels, ignore_index=ignore_index, reduction=reduction
        )
    loss, _ = ops.cross_entropy.cross_entropy(x, labels, ignore_index, reduction, wants_grad(x))
    return loss


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
    """The DistilBERT logit losses in one pass: returns ``(total, kl, ce, mse)``.

    total = alpha_kl · kl + alpha_ce · ce + alpha_mse · mse, where kl = the ``divergence``
    (default ``forward_kl``: ``kl_div_loss``, KL(teacher ‖ student); or ``reverse_kl``, ``jsd``
    with ``beta``, ``tvd``, as ``reverse_kl_loss``/``jsd_loss``/``tvd_loss``) at temperature T,
    times T² when ``t2_scale`` (default on, the DistilBERT recipe), batchmean over rows selected by
    ``mask``; ce = ``cross_entropy`` (mean over ``labels != ignore_index``), mse = ``mse_loss``
    (batchmean over ``mask``). ``logit_scale``/``softcap`` transform the logits every term sees.
    Student and teacher logits are each read once and the gradient written once. ``kl``, ``ce``,
    ``mse`` are detached float32 scalars for logging; a term with alpha 0 is not computed and
    reads 0. ``vocab="common"`` (student and teacher of different V) takes the divergence over the
    first min(Vs, Vt) columns and the CE over the student's whole vocabulary (then in two passes;
    MSE needs one vocabulary).
    """
    if divergence not in reference.DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, reference.DIVERGENCES))}, "
            f"got {divergence!r}"
        )
    beta = check_beta(beta)
    t2_scale = _check_flag(t2_scale, "t2_scale")
    logit_scale = check_logit_scale(logit_scale)
    cap = check_softcap(softcap)
    full_student = student_logits
    s, t = check_pair_vocab(
        student_logits, teacher_logits, "student_logits", "teacher_logits", vocab
    )
    vocab_differs = teacher_logits.shape[-1] != full_student.shape[-1]
    split_vocab = s.shape[-1] != full_student.shape[-1]  # the student has columns of its own
    temperature = check_temperature(temperature)
    alpha_kl, alpha_ce, alpha_mse = check_alphas(alpha_kl, alpha_ce, alpha_mse)
    ignore_index = check_int(ignore_index, "ignore_index")
    mask = check_mask(mask, s.shape[:-1], s.device)
    if labels is not None:
        labels = check_labels(labels, s.shape[:-1], s.device)
    if alpha_ce > 0 and labels is None:
        raise ValueError("alpha_ce > 0 needs labels (the hard targets for the cross-entropy term)")
    if vocab_differs and alpha_mse > 0:
        raise ValueError(
            'alpha_mse > 0 needs student and teacher logits of one vocabulary; with vocab="common" '
            "set alpha_mse=0"
        )
    default = divergence == "forward_kl" and t2_scale and logit_scale == 1.0 and not cap
    if _use_reference("distillation", s):
        if labels is not None and alpha_ce > 0:
            check_label_range(labels, full_student.shape[-1], ignore_index)
        return reference.distillation_loss(
            full_student.float(), t.float(), labels=labels, mask=mask, temperature=temperature,
            alpha_kl=alpha_kl, alpha_ce=alpha_ce, alpha_mse=alpha_mse, ignore_index=ignore_index,
            divergence=divergence, beta=beta, t2_scale=t2_scale, logit_scale=logit_scale,
            softcap=cap or None, vocab=vocab,
        )  # fmt: skip
    if default and not vocab_differs:
        total, components, _ = ops.distillation.distillation(
            s, t, labels, mask, temperature, alpha_kl, alpha_ce, alpha_mse, ignore_index,
            wants_grad(s),
        )  # fmt: skip
        kl, ce, mse = components.unbind()
        return total, kl, ce, mse
    grad = wants_grad(s)
    op = ops.distillation_divergence.distillation_divergence
    options = (divergence, beta, t2_scale, logit_scale, cap, grad)
    if not split_vocab:
        total, components, _ = op(
            s, t, labels, mask, temperature, alpha_kl, alpha_ce, alpha_mse, ignore_index, *options
        )
        kl, ce, mse = components.unbind()
        return total, kl, ce, mse
    return _distillation_two_vocabularies(
        full_student, s, t, labels, mask, temperature, alpha_kl, alpha_ce, ignore_index, options
    )


def _distillation_two_vocabularies(
    full_student, s, t, labels, mask, temperature, alpha_kl, alpha_ce, ignore_index, options
):
    """distillation_loss when the student has columns the teacher lacks: the divergence over the
    common columns (``s``, ``t``) and the CE over the student's own, one pass each (the CE pass
    reads the student only)."""
    op = ops.distillation_divergence.distillation_divergence
    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    total, kl, ce = zero, zero, zero
    if alpha_kl > 0:
        total, parts, _ = op(
            s, t, None, mask, temperature, alpha_kl, 0.0, 0.0, ignore_index, *options
        )
        kl = parts[0]
    if alpha_ce > 0:
        x = full_student
        ce_total, parts, _ = op(x, x, labels, None, 1.0, 0.0, alpha_ce, 0.0, ignore_index, *options)
        total, ce = total + ce_total, parts[1]
    return total, kl, ce, zero


# ---- LLM divergences -----------------------------------------------------------------------------


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _token_selection(mask, labels, ignore_index, s: Tensor, vocab_size: int):
    """The rows a divergence loss takes: ``mask`` and/or ``labels != ignore_index`` (O(rows))."""
    mask = check_mask(mask, s.shape[:-1], s.device)
    if labels is None:
        return mask
    labels = check_labels(labels, s.shape[:-1], s.device)
    check_label_range(labels, vocab_size, ignore_index)
    selected = labels != ignore_index
    return selected if mask is None else selected & mask


def _divergence_loss(
    divergence: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float,
    temperature: float,
    t2_scale: bool,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
    reduction: str,
    normalizer: float | Tensor | None,
    logit_scale: float,
    softcap: float | None,
    vocab: str,
) -> Tensor:
    vocab_size = student_logits.shape[-1] if isinstance(student_logits, Tensor) else 0
    s, t = check_pair_vocab(
        student_logits, teacher_logits, "student_logits", "teacher_logits", vocab
    )
    temperature = check_temperature(temperature)
    t2_scale = _check_flag(t2_scale, "t2_scale")
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction, ops.reverse_kl.REDUCTIONS)
    logit_scale = check_logit_scale(logit_scale)
    cap = check_softcap(softcap)
    selected = _token_selection(mask, labels, ignore_index, s, vocab_size)
    norm = check_normalizer(normalizer, reduction, s.device)
    if _use_reference(divergence, s):
        return reference.divergence_loss(
            s.float(), t.float(), divergence, beta=beta, temperature=temperature,
            t2_scale=t2_scale, mask=selected, reduction=reduction, normalizer=norm,
            logit_scale=logit_scale, softcap=cap or None,
        )  # fmt: skip
    args = (temperature, t2_scale, logit_scale, cap, reduction, norm, wants_grad(s))
    if divergence == "jsd":
        loss, _ = ops.jsd.jsd(s, t, selected, temperature, beta, *args[1:])
    else:
        op = {"reverse_kl": ops.reverse_kl.reverse_kl, "tvd": ops.tvd.tvd}[divergence]
        loss, _ = op(s, t, selected, *args)
    return loss


_DIVERGENCE_ARGS_DOC = """
    Args:
        student_logits, teacher_logits: ``(*lead, V)`` in one dtype (fp32/bf16/fp16); fp32 math.
        temperature: T > 0, divides both sides' logits.
        t2_scale: multiply by T² (off by default for the LLM losses, as in TRL).
        mask: optional ``lead``-shaped bool/0-1 selection of tokens.
        labels, ignore_index: optional ``lead``-shaped labels; tokens whose label is
            ``ignore_index`` are left out (with ``mask`` as well: both must select a token).
            Labels outside ``[0, Vs)`` raise ValueError on CPU.
        reduction: ``batchmean`` (sum over selected tokens / their count), ``sum``, ``none``
            (per token, 0 where unselected).
        normalizer: with ``batchmean``, a number or 0-dim tensor that replaces the local count
            (e.g. the global ``num_items_in_batch`` under gradient accumulation or data
            parallelism); a tensor is used on the device, never read on the host.
        logit_scale, softcap: transforms of both sides' logits before the temperature:
            ``x * logit_scale``, then ``softcap * tanh(x / softcap)`` (None: off); the gradient
            goes through them.
        vocab: ``"same"`` (default: the last dims must match) or ``"common"``: student and
            teacher may differ in V, and both distributions are taken over the first
            min(Vs, Vt) columns (the student's other columns get zero gradient).

    Unselected tokens contribute 0 and get zero gradient; an empty selection gives 0. The teacher
    gets no gradient; the student the exact gradient of the returned float32 value.
"""


def reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
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
    """Reverse KL, fused: KL(student ‖ teacher) = Σ p_s (log p_s − log p_t) per token, with
    p_s = softmax(s'/T), p_t = softmax(t'/T) (x': the transformed logits). Mode-seeking: the
    direction TRL's DistillationTrainer uses by default.
    """
    return _divergence_loss(
        "reverse_kl", student_logits, teacher_logits, beta=0.5, temperature=temperature,
        t2_scale=t2_scale, mask=mask, labels=labels, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, logit_scale=logit_scale, softcap=softcap,
        vocab=vocab,
    )  # fmt: skip


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
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
    """Generalised Jensen-Shannon divergence JSD(β), fused: with M = β p_t + (1 − β) p_s,
    β KL(p_t ‖ M) + (1 − β) KL(p_s ‖ M) per token (≥ 0). β = 0 is exactly the forward
    KL(teacher ‖ student) and β = 1 the reverse KL(student ‖ teacher), as TRL's
    ``generalized_jsd_loss`` (which this equals, reductions included, with ``labels``). The mixture
    is formed in log space: no NaN where both log-probabilities are far below −104.

        beta: the teacher's weight in M, in [0, 1].
    """
    beta = check_beta(beta)
    return _divergence_loss(
        "jsd", student_logits, teacher_logits, beta=beta, temperature=temperature,
        t2_scale=t2_scale, mask=mask, labels=labels, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, logit_scale=logit_scale, softcap=softcap,
        vocab=vocab,
    )  # fmt: skip


def tvd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
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
    """Total variation distance, fused: ½ Σ |p_t − p_s| per token (symmetric, in [0, 1]); the
    gradient uses sign(0) = 0 at ties, as torch's ``abs``.
    """
    return _divergence_loss(
        "tvd", student_logits, teacher_logits, beta=0.5, temperature=temperature,
        t2_scale=t2_scale, mask=mask, labels=labels, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, logit_scale=logit_scale, softcap=softcap,
        vocab=vocab,
    )  # fmt: skip


for _fn in (reverse_kl_loss, jsd_loss, tvd_loss):
    _fn.__doc__ += _DIVERGENCE_ARGS_DOC


def all_finite(*tensors: Tensor | None) -> Tensor:
    """0-dim bool tensor on the tensors' device: True when no element is NaN or ±inf.

    No host sync: gate an optimizer step with it on the device. ``None`` entries (e.g. missing
    ``.grad``) are skipped; integer tensors count as finite.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("all_finite needs at least one tensor")
    for i, t in enumerate(present):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"all_finite argument {i} must be a torch.Tensor, got {type(t).__name__}"
            )
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"all_finite got tensors on {device} and {t.device}; use one device")
    with torch.no_grad():
        if _use_reference("all_finite", present[0]):
            floats = ops.all_finite.float_tensors(present)
            if not floats:
                return torch.ones((), dtype=torch.bool, device=device)
            return reference.all_finite(*floats)
        return ops.all_finite.all_finite([t.detach() for t in present])
