"""fastdistill equals the DistilBERT seed trainer's loss expressions, loss and gradient (fp32).

The seed (transformers/examples/research_projects/distillation/distiller.py) selects tokens with
``masked_select`` copies of the full logits; fastdistill selects rows inside the kernel. Both must
give the same numbers for the same attention mask / labels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _oracle import norm

from fastdistill.losses import (
    cosine_loss,
    cross_entropy,
    distillation_loss,
    kl_div_loss,
    mse_loss,
)

B, L, V, DIM = 3, 11, 301, 48
RTOL = 1e-5


def _attention_mask(rng) -> torch.Tensor:
    """int64 (B, L) attention mask: right padding, every sequence at least one token long."""
    lengths = torch.randint(1, L + 1, (B,), generator=rng.gen)
    lengths[0] = L
    return (torch.arange(L)[None, :] < lengths[:, None]).long()


def _mlm_labels(rng, attention_mask) -> torch.Tensor:
    """MLM labels: -100 except on ~15% of the real tokens (at least one)."""
    labels = torch.randint(0, V, (B, L), generator=rng.gen)
    picked = (torch.rand(B, L, generator=rng.gen) < 0.15) & attention_mask.bool()
    picked[0, 0] = True
    return torch.where(picked, labels, -100)


def _compare(ours_fn, seed_fn, student, rng, what):
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    ours, theirs = ours_fn(a), seed_fn(b)
    (ours * 0.37).backward()
    (theirs * 0.37).backward()
    err = abs(ours.item() - theirs.item())
    assert err <= RTOL * abs(theirs.item()), (
        f"{what}: {ours.item()} vs seed {theirs.item()} {rng.tag}"
    )
    gerr = norm(a.grad - b.grad)
    assert gerr <= RTOL * norm(b.grad), f"{what}: gradient error {gerr:.3e} {rng.tag}"


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_kl(rng, temperature):
    s_logits, t_logits = rng.logits(B, L, V), rng.logits(B, L, V)
    attention_mask = _attention_mask(rng)

    def seed(s):
        mask = attention_mask.bool().unsqueeze(-1).expand_as(s)
        s_slct = torch.masked_select(s, mask).view(-1, s.size(-1))
        t_slct = torch.masked_select(t_logits, mask).view(-1, s.size(-1))
        ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        return (
            ce_loss_fct(
                F.log_softmax(s_slct / temperature, dim=-1), F.softmax(t_slct / temperature, dim=-1)
            )
            * temperature**2
        )

    def ours(s):
        return kl_div_loss(s, t_logits, mask=attention_mask, temperature=temperature)

    _compare(ours, seed, s_logits, rng, f"loss_ce T={temperature}")


def test_logit_mse(rng):
    s_logits, t_logits = rng.logits(B, L, V), rng.logits(B, L, V)
    attention_mask = _attention_mask(rng)

    def seed(s):
        mask = attention_mask.bool().unsqueeze(-1).expand_as(s)
        s_slct = torch.masked_select(s, mask).view(-1, s.size(-1))
        t_slct = torch.masked_select(t_logits, mask).view(-1, s.size(-1))
        return nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)

    _compare(lambda s: mse_loss(s, t_logits, mask=attention_mask), seed, s_logits, rng, "loss_mse")


def test_hidden_cosine(rng):
    s_hidden, t_hidden = rng.randn(B, L, DIM), rng.randn(B, L, DIM)
    attention_mask = _attention_mask(rng)

    def seed(s):
        mask = attention_mask.unsqueeze(-1).expand_as(s).bool()
        dim = s.size(-1)
        s_h = torch.masked_select(s, mask).view(-1, dim)
        t_h = torch.masked_select(t_hidden, mask).view(-1, dim)
        target = s_h.new(s_h.size(0)).fill_(1)
        return nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, target)

    _compare(
        lambda s: cosine_loss(s, t_hidden, mask=attention_mask), seed, s_hidden, rng, "loss_cos"
    )


def test_mlm(rng):
    s_logits = rng.logits(B, L, V)
    lm_labels = _mlm_labels(rng, _attention_mask(rng))

    def seed(s):
        return nn.CrossEntropyLoss(ignore_index=-100)(s.view(-1, s.size(-1)), lm_labels.view(-1))

    _compare(lambda s: cross_entropy(s, lm_labels), seed, s_logits, rng, "loss_mlm")


def test_clm_shifted(rng):
    """The causal-LM loss on shifted (non-contiguous) logits and labels."""
    s_logits = rng.logits(B, L, V)
    attention_mask = _attention_mask(rng)
    lm_labels = torch.where(
        attention_mask.bool(), torch.randint(0, V, (B, L), generator=rng.gen), -100
    )

    def seed(s):
        shift_logits = s[..., :-1, :].contiguous()
        shift_labels = lm_labels[..., 1:].contiguous()
        return nn.CrossEntropyLoss(ignore_index=-100)(
            shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
        )

    _compare(
        lambda s: cross_entropy(s[..., :-1, :], lm_labels[..., 1:]), seed, s_logits, rng, "loss_clm"
    )


@pytest.mark.parametrize("alphas", [(5.0, 2.0, 0.0), (0.5, 0.5, 1e-3), (1.0, 0.0, 0.0)])
def test_total_mlm_distillation(rng, alphas):
    """The seed's total alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_mse * loss_mse."""
    alpha_ce, alpha_mlm, alpha_mse = alphas
    temperature = 2.0
    s_logits, t_logits = rng.logits(B, L, V), rng.logits(B, L, V)
    attention_mask = _attention_mask(rng)
    lm_labels = _mlm_labels(rng, attention_mask)

    def seed(s):
        mask = attention_mask.bool().unsqueeze(-1).expand_as(s)
        s_slct = torch.masked_select(s, mask).view(-1, s.size(-1))
        t_slct = torch.masked_select(t_logits, mask).view(-1, s.size(-1))
        loss_ce = (
            nn.KLDivLoss(reduction="batchmean")(
                F.log_softmax(s_slct / temperature, dim=-1), F.softmax(t_slct / temperature, dim=-1)
            )
            * temperature**2
        )
        loss = alpha_ce * loss_ce
        if alpha_mlm > 0.0:
            loss = loss + alpha_mlm * nn.CrossEntropyLoss(ignore_index=-100)(
                s.view(-1, s.size(-1)), lm_labels.view(-1)
            )
        if alpha_mse > 0.0:
            loss = loss + alpha_mse * nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)
        return loss

    def ours(s):
        return distillation_loss(
            s,
            t_logits,
            labels=lm_labels,
            mask=attention_mask,
            temperature=temperature,
            alpha_kl=alpha_ce,
            alpha_ce=alpha_mlm,
            alpha_mse=alpha_mse,
        )[0]

    _compare(ours, seed, s_logits, rng, f"total {alphas}")
