"""pytest-benchmark suite of the fused linear distillation (``linear_distillation_loss``): hidden
states and lm_head weights in, forward + backward, against the baselines of
bench/baselines_linear.py (eager on materialised logits, TRL-style chunked eager, Liger's
``LigerFusedLinearJSDLoss`` when importable, ``F.linear_cross_entropy`` for CE only) and the bare
GEMMs as the floor, all in one run. Every case records its best time, its ratio to the GEMMs of
the same configuration and its peak extra memory (bench/memory.py) in extra_info and in the
summary printed at the end.

Sparse teacher rows: ``fastdistill_topk`` is ``linear_topk_distillation_loss`` against the
teacher's top-``TOPK`` log-probabilities ("full" normalisation, what a teacher cache holds; taken
from the same teacher head once, outside the timing), ``topk_logits`` the same targets through
``topk_distillation_loss`` on the materialised student logits. Neither runs a teacher GEMM, so
their ratio to the GEMMs row (four GEMMs, the teacher's forward among them) flatters them by one
GEMM of four.

    pytest bench/test_bench_linear.py -q                        # the 32k-vocabulary configs
    FASTDISTILL_BENCH_LINEAR=speed-32k,memory-2k pytest bench/test_bench_linear.py -q
    FASTDISTILL_BENCH_LINEAR=all pytest bench/test_bench_linear.py -q  # includes V = 128,256
    FASTDISTILL_BENCH_LINEAR=smoke pytest bench/test_bench_linear.py -q -k topk  # seconds
    FASTDISTILL_BENCH_DEVICE=cuda pytest bench/test_bench_linear.py -q  # GPU rows (not run yet)

"Working" memory = peak extra memory minus the gradients the call returns (d hidden, d W): what
the loss needs beyond its inputs, weights and the weight gradient.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

import fastdistill.losses as FL
from fastdistill import _buffers

from . import baselines_linear as B
from . import harness
from .memory import peak_extra_memory

BETA, TEMPERATURE = 0.5, 1.0
TOPK = 64


@dataclass(frozen=True)
class Config:
    name: str
    rows: int
    hidden: int
    vocab: int
    impls: tuple[str, ...]
    rounds: int = 2
    default: bool = True


_JSD = ("gemms", "fastdistill", "eager", "trl_chunked", "liger")
_CE = ("fastdistill_ce", "eager_ce", "linear_ce", "linear_ce_chunked")
_TOPK = ("fastdistill_topk", "topk_logits")
_MEMORY = ("fastdistill", "eager", "trl_chunked", "liger")
CONFIGS = {
    c.name: c
    for c in (
        Config("speed-32k", 2048, 1024, 32_000, _JSD + _CE + _TOPK),
        Config("memory-2k", 2048, 256, 32_000, _MEMORY + _TOPK),
        Config("memory-8k", 8192, 256, 32_000, _MEMORY + _TOPK),
        Config("memory-32k", 32_768, 256, 32_000, ("fastdistill",), rounds=1, default=False),
        Config(
            "speed-128k",
            2048,
            1024,
            128_256,
            ("gemms", "fastdistill", "fastdistill_ce"),
            rounds=1,
            default=False,
        ),  # fmt: skip
        Config("smoke", 96, 32, 500, _JSD + _CE + _TOPK, default=False),
        Config("memory-128k", 2048, 256, 128_256, ("fastdistill",), rounds=1, default=False),
    )
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = torch.device(os.environ.get("FASTDISTILL_BENCH_DEVICE", "cpu"))


def _selected() -> list[Config]:
    wanted = os.environ.get("FASTDISTILL_BENCH_LINEAR", "default")
    if wanted == "all":
        return list(CONFIGS.values())
    if wanted == "default":
        return [c for c in CONFIGS.values() if c.default]
    return [CONFIGS[name] for name in wanted.split(",")]


def _dtypes(cfg: Config) -> list[str]:
    return ["fp32", "bf16"] if cfg.name.startswith(("speed", "smoke")) else ["fp32"]


CASES = [
    pytest.param(cfg, dt, impl, id=f"{cfg.name}-{dt}-{impl}")
    for cfg in _selected()
    for dt in _dtypes(cfg)
    for impl in cfg.impls
]
_INPUTS: dict = {}
_BEST: dict = {}  # (config, dtype, impl) -> best seconds, for the ratios in the summary


def _inputs(cfg: Config, dtype: torch.dtype):
    key = (cfg.name, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()  # one configuration at a time: the large ones take GBs
        g = torch.Generator().manual_seed(cfg.rows + cfg.vocab)
        n, h, v = cfg.rows, cfg.hidden, cfg.vocab
        hs = torch.randn(n, h, generator=g)
        # Teacher hidden states correlated with the student's, heads of realistic logit spread.
        ht = hs * 0.8 + 0.6 * torch.randn(n, h, generator=g)
        w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
        wt = w * 0.9 + torch.randn(v, h, generator=g) * (1.0 / h**0.5)
        labels = torch.randint(0, v, (n,), generator=g)
        labels[::8] = B.IGNORE
        _INPUTS[key] = tuple(x.to(DEVICE, dtype) for x in (hs, w, ht, wt)) + (labels.to(DEVICE),)
    return _INPUTS[key]


def _step(impl: str, h, w, th, tw, labels):
    """One forward + backward of ``impl``; returns the loss and the gradients it produced."""
    out = _run(impl, h, w, th, tw, labels)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)  # time the work, not its launch
    return out


def _peak(fn):
    """(peak extra bytes, result): bench/memory.py on CPU, the caching allocator's peak on GPU."""
    if DEVICE.type != "cuda":
        _buffers.empty_cache()  # so that the buffers the call takes from the pool count
        mem = peak_extra_memory(fn)
        return mem.peak_bytes, mem.result
    torch.cuda.synchronize(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    result = fn()
    return torch.cuda.max_memory_allocated(DEVICE) - before, result


_TARGETS: dict = {}  # the sparse teacher of the current inputs


def _topk_targets(th, tw):
    """The teacher's top-TOPK (ids, log-probabilities) per token at T = 1, formed chunk by chunk
    once per configuration (what --write-teacher-cache stores)."""
    key = (th.data_ptr(), tw.data_ptr())
    if key not in _TARGETS:
        _TARGETS.clear()
        ids, lp = [], []
        for part in th.split(1024):
            top = torch.log_softmax((part @ tw.t()).float(), -1).topk(TOPK, -1)
            ids.append(top.indices)
            lp.append(top.values)
        _TARGETS[key] = torch.cat(ids), torch.cat(lp)
    return _TARGETS[key]


def _topk_loss(impl: str, hs, ws, th, tw, labels):
    ids, lp = _topk_targets(th, tw)
    if impl == "fastdistill_topk":
        loss, _, _ = FL.linear_topk_distillation_loss(
            hs, ws, ids, lp, labels=labels, temperature=TEMPERATURE
        )
        return loss
    keep = labels != B.IGNORE
    loss, _, _ = FL.topk_distillation_loss(
        (hs @ ws.t()).float(), ids, lp, mask=keep, temperature=TEMPERATURE
    )
    return loss


def _run(impl: str, h, w, th, tw, labels):
    if impl == "gemms":
        return None, B.gemms(h, w, th, tw)
    hs, ws = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    if impl == "fastdistill":
        loss, _, _ = FL.linear_distillation_loss(
            hs, ws, teacher_hidden=th, teacher_weight=tw, labels=labels, divergence="jsd",
            beta=BETA, temperature=TEMPERATURE,
        )  # fmt: skip
    elif impl in _TOPK:
        loss = _topk_loss(impl, hs, ws, th, tw, labels)
    elif impl == "fastdistill_ce":
        loss, _, _ = FL.linear_distillation_loss(hs, ws, labels=labels, alpha_kd=0, alpha_ce=1)
    elif impl == "eager_ce":
        loss = torch.nn.functional.cross_entropy((hs @ ws.t()).float(), labels)
    elif impl in ("linear_ce", "linear_ce_chunked"):
        loss = getattr(B, impl)(hs, ws, labels)
    else:
        loss = getattr(B, impl)(hs, ws, th, tw, labels, beta=BETA, temperature=TEMPERATURE)
    loss.backward()
    return loss.detach(), (hs.grad, ws.grad)


@pytest.mark.parametrize("cfg, dtype_name, impl", CASES)
def test_linear(benchmark, cfg: Config, dtype_name: str, impl: str):
    if impl == "liger" and (reason := B.liger_status()):
        pytest.skip(reason)
    dtype = DTYPES[dtype_name]
    h, w, th, tw, labels = _inputs(cfg, dtype)
    start = time.perf_counter()
    _step(impl, h, w, th, tw, labels)  # warm-up (compiles Liger's chunk function)
    warm = time.perf_counter() - start
    peak, (loss, grads) = _peak(lambda: _step(impl, h, w, th, tw, labels))
    grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
    if impl == "gemms":
        grad_bytes = 0  # its outputs are the GEMM results, not gradients
    del grads  # the gradients of the profiled call: not alive while timing
    benchmark.group = f"linear {cfg.name} {dtype_name}"
    benchmark.pedantic(lambda: _step(impl, h, w, th, tw, labels), rounds=cfg.rounds, iterations=1)
    best = benchmark.stats.stats.min
    _BEST[(cfg.name, dtype_name, impl)] = best
    floor = _BEST.get((cfg.name, dtype_name, "gemms"))
    logits_chunk = 4 * cfg.vocab  # bytes of one fp32 logits row
    working = peak - grad_bytes
    benchmark.extra_info.update(
        impl=impl, rows=cfg.rows, hidden=cfg.hidden, vocab=cfg.vocab, dtype=dtype_name,
        loss=None if loss is None else float(loss), warmup_s=round(warm, 2),
        peak_extra_bytes=peak, working_bytes=working, grad_bytes=grad_bytes,
        x_gemms=None if floor is None else round(best / floor, 3),
        loadavg_1m=round(os.getloadavg()[0], 2),
    )  # fmt: skip
    harness.SUMMARY_LINES.append(
        f"linear {cfg.name} N={cfg.rows} H={cfg.hidden} V={cfg.vocab} {dtype_name} {impl:18s} "
        f"best {best:7.3f} s" + (f" ({best / floor:5.2f}x GEMMs)" if floor else "")
        + f", peak extra {peak / 2**20:8.1f} MiB, working {working / 2**20:8.1f} MiB"
        f" (= {working / (logits_chunk * cfg.rows):.2f} logits), loss "
        + ("-" if loss is None else f"{float(loss):.6f}")
        + f", load {os.getloadavg()[0]:.1f}"
    )  # fmt: skip
