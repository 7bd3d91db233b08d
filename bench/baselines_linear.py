"""Baselines of the fused linear distillation benchmark (bench/test_bench_linear.py): what people
run today to distil from hidden states and an lm_head, each returning the loss of one batch
(mean over tokens whose label is not -100) so that ``loss.backward()`` gives the gradients.

- ``eager``: materialised logits, s = h Wᵀ and t = h_t W_tᵀ in the input dtype, upcast to fp32
  (as Hugging Face models upcast their logits), then the generalised JSD in TRL's expressions
  (``generalized_jsd_loss``: a logsumexp of the two shifted log-softmaxes and two
  ``F.kl_div(log_target=True)``).
- ``trl_chunked``: the same per chunk of 256 tokens under ``torch.utils.checkpoint`` (the chunk's
  logits are recomputed in the backward), the chunked path TRL's trainers offer.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, ``torch.compile``d per chunk),
  when ``liger_kernel`` is importable.
- ``linear_ce`` / ``linear_ce_chunked``: ``F.linear_cross_entropy`` (PyTorch 2.13) without and
  with its chunking options, the CE-only comparison.
- ``gemms``: the bare GEMMs (student forward, teacher forward, the two backward GEMMs) in the
  input dtype, the floor of any implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _jsd_sum(s_logits, t_logits, labels, beta: float, temperature: float):
    """Σ over tokens with a label of JSD(β) between softmax(t/T) and softmax(s/T), TRL's way."""
    s_lp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t_lp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        mix = torch.logsumexp(
            torch.stack([s_lp + math.log(1 - beta), t_lp + math.log(beta)]), dim=0
        )
        kl_t = F.kl_div(mix, t_lp, reduction="none", log_target=True)
        kl_s = F.kl_div(mix, s_lp, reduction="none", log_target=True)
        jsd = beta * kl_t + (1 - beta) * kl_s
    keep = (labels != IGNORE).unsqueeze(-1)
    return jsd.masked_fill(~keep, 0.0).sum()


def _count(labels):
    return (labels != IGNORE).sum().clamp_min(1)


def eager(h, w, th, tw, labels, *, beta=0.5, temperature=1.0):
    s = h @ w.t()
    with torch.no_grad():
        t = th @ tw.t()
    return _jsd_sum(s, t, labels, beta, temperature) / _count(labels)


def trl_chunked(h, w, th, tw, labels, *, beta=0.5, temperature=1.0, chunk=256):
    def piece(hc, w, thc, lc):
        with torch.no_grad():
            t = thc @ tw.t()
        return _jsd_sum(hc @ w.t(), t, lc, beta, temperature)

    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        sl = slice(i, i + chunk)
        total = total + checkpoint(piece, h[sl], w, th[sl], labels[sl], use_reentrant=False)
    return total / _count(labels)


def liger_status() -> str | None:
    """None when Liger's chunked JSD is importable, else why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as exc:  # not installed, or its import fails on this machine
        return f"liger_kernel not importable: {type(exc).__name__}: {exc}"
    return None


_LIGER = {}


def liger(h, w, th, tw, labels, *, beta=0.5, temperature=1.0, chunk=1024):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    key = (beta, temperature, chunk)
    if key not in _LIGER:
        _LIGER[key] = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature,
            compiled=True, chunk_size=chunk,
        )  # fmt: skip
    return _LIGER[key](h, w, th, tw, labels)


def linear_ce(h, w, labels):
    return F.linear_cross_entropy(h, w, labels)


def linear_ce_chunked(h, w, labels):
    return F.linear_cross_entropy(h, w, labels, options=torch.nn.LinearCrossEntropyOptions())


def gemms(h, w, th, tw):
    """Student and teacher forward GEMMs and the two backward GEMMs (d h = G W, d W = Gᵀ h),
    with the student logits standing in for G."""
    s = h @ w.t()
    t = th @ tw.t()
    d_h = s @ w
    d_w = s.t() @ h
    return s, t, d_h, d_w
