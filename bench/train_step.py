"""One distillation training step, fused losses vs the seed's eager formulas.

A BERT-vocabulary (V = 30,522) MLM student and teacher built from configs (no downloads), one
batch, the DistilBERT loss mix (alpha_kl 5, alpha_mlm 2, alpha_cos 1, T = 2, KL over the attention
mask): teacher forward under inference mode, student forward + backward, AdamW step. The two loss
implementations are interleaved and the best of ``--reps`` is reported, with the share of the step
that the loss (forward + backward on the logits) takes in each.

    python -m bench.train_step [--reps 5] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

import fastdistill.losses as FL

from . import shapes

T = 2.0
ALPHA_KL, ALPHA_MLM, ALPHA_COS = 5.0, 2.0, 1.0


def eager_loss(s_logits, t_logits, s_hidden, t_hidden, labels, attn):
    """The seed's distiller.py formulas: masked_select of the full logits, KLDivLoss x T^2,
    CrossEntropyLoss for MLM, CosineEmbeddingLoss on masked hidden states."""
    V = s_logits.size(-1)
    mask = attn.bool().unsqueeze(-1).expand_as(s_logits)
    s_sel = torch.masked_select(s_logits, mask).view(-1, V)
    t_sel = torch.masked_select(t_logits, mask).view(-1, V)
    kl = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_sel / T, dim=-1), F.softmax(t_sel / T, dim=-1)
    ) * (T * T)
    mlm = nn.CrossEntropyLoss(ignore_index=-100)(s_logits.view(-1, V), labels.view(-1))
    D = s_hidden.size(-1)
    hmask = attn.bool().unsqueeze(-1).expand_as(s_hidden)
    sh = torch.masked_select(s_hidden, hmask).view(-1, D)
    th = torch.masked_select(t_hidden, hmask).view(-1, D)
    cos = nn.CosineEmbeddingLoss(reduction="mean")(sh, th, sh.new_ones(sh.size(0)))
    return ALPHA_KL * kl + ALPHA_MLM * mlm + ALPHA_COS * cos


def fused_loss(s_logits, t_logits, s_hidden, t_hidden, labels, attn):
    total, _, _, _ = FL.distillation_loss(
        s_logits,
        t_logits,
        labels=labels,
        mask=attn,
        temperature=T,
        alpha_kl=ALPHA_KL,
        alpha_ce=ALPHA_MLM,
    )
    return total + ALPHA_COS * FL.cosine_loss(s_hidden, t_hidden, mask=attn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    V = shapes.BERT.vocab
    cfg = dict(vocab_size=V, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    teacher = BertForMaskedLM(BertConfig(num_hidden_layers=4, **cfg)).eval()
    student = BertForMaskedLM(BertConfig(num_hidden_layers=2, **cfg))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(1000, V, (args.batch, args.seq))
    attn = torch.ones_like(ids)
    attn[:, args.seq * 3 // 4 :] = 0  # a padded quarter, as in length-grouped batches
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    labels[attn == 0] = -100

    def step(loss_fn):
        with torch.inference_mode():
            t_out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        t_logits, t_hidden = t_out.logits.clone(), t_out.hidden_states[-1].clone()
        s_out = student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        loss = loss_fn(s_out.logits, t_logits, s_out.hidden_states[-1], t_hidden, labels, attn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def loss_only(loss_fn):
        s = torch.randn(args.batch, args.seq, V, requires_grad=True)
        t = torch.randn(args.batch, args.seq, V)
        sh = torch.randn(args.batch, args.seq, 256, requires_grad=True)
        th = torch.randn(args.batch, args.seq, 256)
        return lambda: loss_fn(s, t, sh, th, labels, attn).backward()

    impls = {"eager": eager_loss, "fused": fused_loss}
    best = {k: float("inf") for k in impls}
    best_loss = {k: float("inf") for k in impls}
    runners = {k: loss_only(f) for k, f in impls.items()}
    for k, f in impls.items():  # warm-up
        step(f)
        runners[k]()
    for _ in range(args.reps):
        for k, f in impls.items():
            t0 = time.perf_counter()
            step(f)
            best[k] = min(best[k], time.perf_counter() - t0)
            t0 = time.perf_counter()
            runners[k]()
            best_loss[k] = min(best_loss[k], time.perf_counter() - t0)
    print(
        f"BERT-vocab step: batch {args.batch} x {args.seq} tokens, V={V}, student 2x256, "
        f"teacher 4x256, torch threads {torch.get_num_threads()}, best of {args.reps}"
    )
    for k in impls:
        print(
            f"  {k:5s}: step {best[k] * 1e3:8.1f} ms, loss fwd+bwd {best_loss[k] * 1e3:7.1f} ms "
            f"(~{100 * best_loss[k] / best[k]:.0f}% of the step)"
        )
    print(f"  fused step is {best['eager'] / best['fused']:.2f}x faster than eager")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
