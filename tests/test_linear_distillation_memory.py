"""linear_distillation_loss's working memory: per chunk of C tokens, the native CPU and Triton
kernels write the logits gradient over the student's float32 logits, so one forward + backward
holds at most two (C, V) float32 buffers (student and teacher logits) beyond its inputs, the
weights and the gradients it returns, plus per-token vectors. The CUDA kernel writes the gradient
to a buffer of its own (ops/_fused_logits.py, _IN_PLACE_BACKENDS). The gradients are those of the
float64 oracle either way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _oracle import Rng, assert_loss_close
from test_linear_distillation import DIVERGENCES, _leaves, _problem, check_against_oracle

import fastdistill.losses as FL
from fastdistill import _buffers, reference_linear
from fastdistill.ops import linear_distillation as op_module


def _peak_extra_memory(fn):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from bench.memory import peak_extra_memory
    finally:
        sys.path.pop(0)
    return peak_extra_memory(fn)


# (teacher form, its dtype, the chunk buffers allowed): the teacher's logits need a float32 chunk
# of their own unless they are given in float32; CE alone (alpha_kd = 0) has no teacher.
MEMORY_CASES = [
    ("head", torch.float32, 2),
    ("head", torch.bfloat16, 2),
    ("logits", torch.float32, 1),
    ("logits", torch.bfloat16, 2),
    ("none", torch.float32, 1),
]


@pytest.mark.parametrize(
    "teacher, dtype, chunks",
    MEMORY_CASES,
    ids=[f"{t}-{str(d).removeprefix('torch.')}" for t, d, _ in MEMORY_CASES],
)
def test_working_memory_is_the_chunk_buffers(rng, monkeypatch, teacher, dtype, chunks):
    """Peak memory of one forward + backward (bench/memory.py's counter: torch's CPU allocator and
    the numpy blocks of fastdistill's buffer pool) beyond its inputs and the gradients it returns,
    at a shape where one chunk of logits (16 MiB) dwarfs everything per token (N · H) and per head
    (V · H): at most ``chunks`` chunks of logits plus those. Writing the gradient to a third
    buffer would exceed it by a whole chunk."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", "native")
    n, hs, ht, v, rows = 1024, 16, 16, 8192, 512
    student, t = _problem(rng, n, hs, ht, v, dtype, teacher=teacher)
    labels = rng.labels((n,), v)
    kw = dict(alpha_kd=0.0, alpha_ce=1.0) if teacher == "none" else dict(alpha_ce=0.5)
    h, w, _ = _leaves(student)

    def step():
        total, *_ = FL.linear_distillation_loss(h, w, **t, labels=labels, chunk_size=rows, **kw)
        total.backward()
        return sum(x.grad.numel() * x.grad.element_size() for x in (h, w))

    _buffers.empty_cache()  # a pooled block from an earlier call would make a buffer look free
    mem = _peak_extra_memory(step)
    working = mem.peak_bytes - mem.result
    chunk = rows * v * 4
    per_token = 4 * n * (hs + ht) * 4  # chunk rows of hidden states, selections, d hidden
    # On CPU half-precision heads are widened to float32 (student, teacher) and d W accumulates in
    # float32 before its cast to the returned dtype.
    per_head = 3 * v * max(hs, ht) * 4 if dtype != torch.float32 else 0
    allowed = chunks * chunk + per_token + per_head + (64 << 10)
    assert working <= allowed, (
        f"{working / chunk:.3f} chunks of logits ({working} bytes) > {chunks} chunks + "
        f"{(allowed - chunks * chunk) / chunk:.3f} ({rng.tag})"
    )


def _record_in_place(monkeypatch) -> list[bool]:
    """Whether each fused-kernel run of the linear op wrote its gradient over the logits."""
    seen: list[bool] = []
    original = op_module.run_fused_logits

    def recording(*args, **kw):
        res = original(*args, **kw)
        if kw.get("compute_grad"):
            seen.append(res.in_place)
        return res

    monkeypatch.setattr(op_module, "run_fused_logits", recording)
    return seen


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "logit_scale, softcap", [(None, None), (0.5, None), (1.7, 6.0)], ids=["raw", "scale", "both"]
)
def test_gradient_over_the_logits_matches_the_oracle(
    impl, rng, monkeypatch, divergence, logit_scale, softcap
):
    """CE next to every divergence, a third of the labels ignored, the logit transforms, chunks
    of 8 of 45 tokens: the float64 oracle's values and gradients, with the gradient written over
    the logits by the native CPU and Triton kernels (the torch backend materialises the
    reference)."""
    seen = _record_in_place(monkeypatch)
    student, t = _problem(rng, 45, 24, 40, 131, torch.float32)
    check_against_oracle(
        rng, student, t, labels=rng.labels((45,), 131), divergence=divergence, beta=0.3,
        temperature=2.0, alpha_kd=0.8, alpha_ce=0.4, logit_scale=logit_scale, softcap=softcap,
        chunk_size=8,
    )  # fmt: skip
    if impl == "torch":
        assert not any(seen), seen
    else:
        assert seen and all(seen), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "logit_scale, softcap", [(None, None), (0.5, None), (None, 5.0)], ids=["raw", "scale", "cap"]
)
def test_a_nan_in_the_teachers_row_leaves_the_ce_finite(impl, rng, dtype, logit_scale, softcap):
    """A NaN among a selected row's teacher logits makes the divergence (and the total, and the
    gradients) NaN but not the CE, which reads the student only, as in the reference. (The CPU
    kernel reads that row's label logit after filling its gradient with NaN: over the logits the
    CE would be NaN; the op forms that chunk's CE again. Float32 teacher logits are read where
    they are, bfloat16 ones from a chunk buffer.)"""
    (h, w, b), t = _problem(rng, 20, 8, 8, 37, dtype, teacher="logits")
    labels = rng.labels((20,), 37)
    row = int(torch.nonzero(labels != -100)[0])
    teacher_logits = t["teacher_logits"].clone()
    teacher_logits[row, 5] = float("nan")
    kw = dict(labels=labels, alpha_ce=0.5, logit_scale=logit_scale, softcap=softcap)
    hs, ws, bs = _leaves((h, w, b))
    total, kd, ce = FL.linear_distillation_loss(
        hs, ws, student_bias=bs, teacher_logits=teacher_logits, chunk_size=6, **kw
    )
    total.backward()
    _, _, ref_ce = reference_linear.linear_distillation_loss(
        h.double(), w.double(), student_bias=b.double(), teacher_logits=teacher_logits.double(),
        **kw,
    )  # fmt: skip
    assert torch.isnan(total) and torch.isnan(kd)
    assert_loss_close(ce, ref_ce, what=f"ce {rng.tag}")
    assert torch.isnan(hs.grad[row]).all()


def test_grad_into_must_be_the_student_or_apart_from_it():
    """The kernels trust the destination: a partial overlap with the student, or any with the
    teacher, is refused."""
    from fastdistill.ops._fused_logits import Terms, run_fused_logits

    g = Rng(0)
    s, t = g.randn(6, 10), g.randn(6, 10)
    terms = Terms(kl=True)
    buf = torch.empty(7, 10)
    buf[:6] = s
    for dest, match in ((buf[1:], "overlaps the student"), (t, "overlaps the teacher")):
        with pytest.raises(ValueError, match=match):
            run_fused_logits("distillation_divergence", buf[:6], t, None, None, terms=terms,
                             compute_grad=True, grad_into=dest)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous"):
        run_fused_logits("distillation_divergence", s, t, None, None, terms=terms,
                         compute_grad=True, grad_into=torch.empty(10, 6).t())  # fmt: skip
