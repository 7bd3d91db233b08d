"""The sparse-target loss on CPU: fastdistill's topk_kl_loss against the eager PyTorch formula a
user would write for a top-k teacher (log_softmax of the whole student row, a gather of the k
stored ids, the re-tempered teacher softmax over K) and torch.compile of that formula.

Forward + backward of the ``full`` normalisation (the student's whole-vocabulary normaliser) at
2048 tokens x 32,000 classes, k = 64, T = 2, T_c = 1, fp32 and bf16 logits; fastdistill's ``tail``
and ``renormalized`` modes and ``topk_distillation_loss`` (KD + CE in one pass) alongside. Every
implementation is checked against the float64 reference before it is timed. Times are the best
and the median of ``--reps`` calls after warm-up; implementations are interleaved per repetition
so that load from other processes on a shared machine hits them alike.

    python -m bench.topk_kl [--rows 2048 --vocab 32000 --k 64 --reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Before torch loads its OpenMP runtime: two runtimes spinning on 2 cores starve each other
# (fastdistill/__init__.py sets the same, but torch is imported first here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fastdistill import reference  # noqa: E402
from fastdistill.losses import topk_distillation_loss, topk_kl_loss  # noqa: E402

from .harness import machine_info  # noqa: E402

T, TC = 2.0, 1.0


def eager_full(s, ids, lp):
    """The formula as written in PyTorch: q over the whole vocabulary, p re-tempered over K."""
    log_q = torch.log_softmax(s.float() / T, dim=-1).gather(-1, ids)
    log_p = torch.log_softmax(lp.float() * (TC / T), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def inputs(rows, vocab, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, vocab, generator=g) * 3
    logp = torch.log_softmax(t / TC, -1)
    lp, ids = logp.topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-7))
    s = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    return s, ids, lp, tail, labels


def impls(ids, lp, tail, labels):
    compiled = torch.compile(eager_full)
    return {
        "fastdistill full": lambda x: topk_kl_loss(x, ids, lp, temperature=T),
        "eager full": lambda x: eager_full(x, ids, lp),
        "torch.compile full": lambda x: compiled(x, ids, lp),
        "fastdistill renormalized": lambda x: topk_kl_loss(
            x, ids, lp, normalization="renormalized", temperature=T
        ),
        "fastdistill tail (T = T_c = 1)": lambda x: topk_kl_loss(
            x, ids, lp, teacher_tail=tail, normalization="tail"
        ),
        "fastdistill kd + ce": lambda x: topk_distillation_loss(
            x, ids, lp, labels=labels, temperature=T, alpha_ce=0.5
        )[0],
    }


def step(fn, s):
    x = s.detach().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def check(fn, s, ids, lp, name):
    """Loss and gradient of the ``full`` implementations against the float64 reference."""
    if "full" not in name:
        return ""
    loss, grad = step(fn, s)
    x = s.double().requires_grad_(True)
    ref = reference.topk_kl_loss(x, ids, lp.double(), temperature=T, capture_temperature=TC)
    ref.backward()
    rel_l = abs(float(loss) - float(ref)) / abs(float(ref))
    rel_g = float((grad.double() - x.grad).norm() / x.grad.norm())
    return f"loss rel err {rel_l:.1e}, grad rel err {rel_g:.1e}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args(argv)
    info = machine_info()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        s, ids, lp, tail, labels = inputs(args.rows, args.vocab, args.k, dtype)
        fns = impls(ids, lp, tail, labels)
        notes = {}
        for name, fn in fns.items():
            notes[name] = check(fn, s, ids, lp, name)
            step(fn, s)  # warm-up (and torch.compile's compilation)
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                step(fn, s)
                times[name].append((time.perf_counter() - t0) * 1e3)
        base = min(times["fastdistill full"])
        print(f"\n{dname}, {args.rows} x {args.vocab}, k = {args.k}, fwd+bwd, {args.reps} reps")
        print("| implementation | best ms | median ms | / fastdistill full | check |")
        print("|---|---:|---:|---:|---|")
        for name, ts in times.items():
            best = min(ts)
            print(
                f"| {name} | {best:.1f} | {statistics.median(ts):.1f} | "
                f"{best / base:.2f} | {notes[name]} |"
            )
    print(f"\nloadavg_1m after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
