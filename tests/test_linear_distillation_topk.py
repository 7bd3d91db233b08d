"""linear_topk_distillation_loss (fastdistill::linear_topk_distillation): hidden states and an
output head in, a sparse top-k teacher (ids, log-probabilities, tail) as the target, the logits
formed chunk by chunk. The oracle is fastdistill/reference_linear.py in float64 on the same, already
rounded, inputs; values and the gradients w.r.t. the student's hidden states, head weight and bias
are compared for every normalisation, dtype and chunking, on every implementation (native core,
torch reference, Triton interpreted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from _oracle import Rng, assert_grad_close, assert_loss_close
from test_linear_distillation import _leaves, assert_compiled_matches_eager
from test_topk_kl import teacher as sparse_teacher

import fastdistill.losses as FL
from fastdistill import reference_linear

NORMALIZATIONS = ("full", "renormalized", "tail")
DTYPES = (torch.float32, torch.bfloat16)
# The torch backend evaluates the reference formulas in fp32; in the tail mode a small KL is a
# difference of logsumexps near 1 (tests/test_topk_kl.py measured 1.1e-5 relative at T = 4).
TORCH_RTOL = 1e-4


def _problem(rng: Rng, lead, h, v, k, dtype, *, capture_temperature=1.0, bias=True):
    """Student (hidden, weight, bias) in ``dtype`` and the sparse teacher kwargs."""
    hidden = rng.randn(*lead, h, dtype=dtype)
    weight = rng.randn(v, h, scale=h**-0.5 * 2, dtype=dtype)
    b = rng.randn(v, scale=0.5, dtype=dtype) if bias else None
    ids, lp, tail, _ = sparse_teacher(
        rng, lead, v, k, capture_temperature=capture_temperature, lp_dtype=dtype
    )
    return (hidden, weight, b), dict(teacher_ids=ids, teacher_logprobs=lp, teacher_tail=tail)


def _loss(student, teacher, **kw):
    h, w, b = student
    ids, lp = teacher["teacher_ids"], teacher["teacher_logprobs"]
    rest = {k: v for k, v in teacher.items() if k not in ("teacher_ids", "teacher_logprobs")}
    return FL.linear_topk_distillation_loss(h, w, ids, lp, student_bias=b, **rest, **kw)


def check_against_oracle(rng, student, teacher, grad_out=0.37, **kw):
    """Run the loss and the float64 oracle; compare (total, kd, ce) and the three gradients."""
    dtype = student[0].dtype
    leaves = _leaves(student)
    total, kd, ce = _loss(leaves, teacher, **kw)
    (total * grad_out).backward()
    h6, w6, b6 = _leaves(student, torch.float64)
    ref_kw = {k: val for k, val in kw.items() if k != "chunk_size"}
    tail = teacher["teacher_tail"]
    ref = reference_linear.linear_topk_distillation_loss(
        h6, w6, teacher["teacher_ids"], teacher["teacher_logprobs"].double(), student_bias=b6,
        teacher_tail=None if tail is None else tail.double(), **ref_kw,
    )  # fmt: skip
    (ref[0] * grad_out).backward()
    rtol = TORCH_RTOL if os.environ.get("FASTDISTILL_BACKEND") == "torch" else 1e-5
    for name, x, r in zip(("total", "kd", "ce"), (total, kd, ce), ref, strict=True):
        assert_loss_close(x, r, what=f"{name} {rng.tag}", rtol=rtol)
    assert not kd.requires_grad and not ce.requires_grad
    scale = torch.tensor(grad_out, dtype=torch.float64)
    for name, x, x6 in zip(("hidden", "weight", "bias"), leaves, (h6, w6, b6), strict=True):
        if x is not None:
            assert_grad_close(
                x.grad, x6.grad, dtype, what=f"d {name} {rng.tag}", scale=scale, rtol=rtol
            )
    return total, kd, ce


def _temperatures(normalization):
    """(T, T_c): re-tempered targets except in the tail mode, which needs T = T_c."""
    return (2.0, 2.0) if normalization == "tail" else (2.0, 1.5)


# ---- the float64 oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_matches_oracle(impl, rng, normalization, dtype):
    # 45 tokens in chunks of 8: five full chunks and a partial one; a third of the labels ignored.
    t, tc = _temperatures(normalization)
    student, teacher = _problem(rng, (45,), 24, 131, 9, dtype, capture_temperature=tc)
    check_against_oracle(
        rng, student, teacher, labels=rng.labels((45,), 131), normalization=normalization,
        temperature=t, capture_temperature=tc, alpha_kd=0.8, alpha_ce=0.4, chunk_size=8,
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 1000])
def test_chunk_sizes(rng, chunk_size):
    """Non-divisible chunks, one row per chunk, exactly divisible, N smaller than one chunk."""
    student, teacher = _problem(rng, (48,), 16, 97, 5, torch.float32)
    check_against_oracle(rng, student, teacher, labels=rng.labels((48,), 97), alpha_ce=1.0,
                         chunk_size=chunk_size)  # fmt: skip


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize(
    "logit_scale, softcap", [(0.5, None), (None, 3.0), (1.7, 10.0)], ids=["scale", "cap", "both"]
)
def test_logit_transforms(impl, rng, normalization, logit_scale, softcap):
    """The transforms are applied outside the topk kernel and chained into its gradient."""
    student, teacher = _problem(rng, (19,), 12, 53, 6, torch.float32)
    check_against_oracle(
        rng, student, teacher, labels=rng.labels((19,), 53), normalization=normalization,
        alpha_ce=0.5, logit_scale=logit_scale, softcap=softcap, chunk_size=5,
    )  # fmt: skip


@pytest.mark.parametrize("t2_scale", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0])
def test_temperatures(rng, temperature, t2_scale):
    student, teacher = _problem(rng, (21,), 8, 37, 4, torch.float32)
    check_against_oracle(rng, student, teacher, temperature=temperature, t2_scale=t2_scale,
                         capture_temperature=1.3, chunk_size=6)  # fmt: skip


def test_mask_and_batch_shape(impl, rng):
    """``(B, T, H)`` hidden states with an attention-style 0/1 mask and ignored labels; a mask
    without labels; int32 and uint16 ids (what a teacher cache stores)."""
    student, teacher = _problem(rng, (3, 11), 16, 61, 7, torch.float32)
    mask = rng.mask((3, 11)).long()
    check_against_oracle(rng, student, teacher, labels=rng.labels((3, 11), 61), mask=mask,
                         alpha_ce=0.3, chunk_size=4)  # fmt: skip
    for ids_dtype in (torch.int32, torch.uint16):
        narrow = dict(teacher, teacher_ids=teacher["teacher_ids"].to(ids_dtype))
        check_against_oracle(rng, student, narrow, mask=mask.bool(), normalization="tail",
                             chunk_size=5)  # fmt: skip


@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer(rng, as_tensor):
    student, teacher = _problem(rng, (30,), 8, 41, 3, torch.float32)
    labels = rng.labels((30,), 41)
    n = torch.tensor(57.0) if as_tensor else 57
    _, kd, ce = check_against_oracle(rng, student, teacher, labels=labels, normalizer=n,
                                     alpha_ce=0.5, chunk_size=7)  # fmt: skip
    _, kd_mean, ce_mean = _loss(student, teacher, labels=labels, alpha_ce=0.5)
    count = (labels != -100).sum()
    torch.testing.assert_close(kd * 57, kd_mean * count, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce * 57, ce_mean * count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization", ["full", "renormalized"])
def test_k_equal_to_v_is_the_dense_forward_kl(rng, normalization):
    """All V log-probabilities stored: the dense teacher of linear_distillation_loss."""
    (h, w, b), _ = _problem(rng, (26,), 12, 33, 1, torch.float32)
    t = rng.logits(26, 33)
    lp, ids = torch.log_softmax(t / 1.5, -1).topk(33, -1)
    labels = rng.labels((26,), 33)
    kw = dict(labels=labels, temperature=2.0, t2_scale=True, alpha_ce=0.5, chunk_size=9)
    leaves = _leaves((h, w, b))
    sparse = _loss(leaves, dict(teacher_ids=ids, teacher_logprobs=lp), capture_temperature=1.5,
                   normalization=normalization, **kw)  # fmt: skip
    sparse[0].backward()
    dense_leaves = _leaves((h, w, b))
    hd, wd, bd = dense_leaves
    dense = FL.linear_distillation_loss(hd, wd, student_bias=bd, teacher_logits=t, **kw)
    dense[0].backward()
    for x, y in zip(sparse, dense, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(leaves, dense_leaves, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


def test_all_ignored_is_exactly_zero(rng):
    student, teacher = _problem(rng, (10,), 8, 17, 4, torch.float32)
    leaves = _leaves(student)
    total, kd, ce = _loss(leaves, teacher, labels=torch.full((10,), -100), alpha_ce=1.0,
                          chunk_size=3)  # fmt: skip
    total.backward()
    assert total.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    for x in leaves:
        assert torch.count_nonzero(x.grad) == 0


def test_garbage_in_unselected_rows_is_ignored(rng):
    """NaN hidden states, out-of-range and repeated ids and NaN log-probabilities in padding rows
    reach neither the loss nor any gradient (also through the softcap's chain rule)."""
    student, teacher = _problem(rng, (14,), 8, 29, 5, torch.float32)
    labels = rng.labels((14,), 29)
    ignored = labels == -100
    assert ignored.any()
    h = torch.where(ignored.unsqueeze(1), float("nan"), student[0])
    ids = torch.where(ignored.unsqueeze(1), 10**6, teacher["teacher_ids"])
    lp = torch.where(ignored.unsqueeze(1), float("nan"), teacher["teacher_logprobs"])
    leaves = _leaves((h, *student[1:]))
    bad = dict(teacher, teacher_ids=ids, teacher_logprobs=lp)
    total, *_ = _loss(leaves, bad, labels=labels, alpha_ce=1.0, softcap=5.0, chunk_size=4)
    total.backward()
    assert torch.isfinite(total)
    hs, ws, bs = leaves
    assert torch.isfinite(ws.grad).all() and torch.isfinite(bs.grad).all()
    assert torch.isfinite(hs.grad).all() and torch.count_nonzero(hs.grad[ignored]) == 0


def test_frozen_head_and_no_grad(rng):
    student, teacher = _problem(rng, (16,), 8, 19, 4, torch.float32)
    labels = rng.labels((16,), 19)
    h, w, b = _leaves(student)
    w.requires_grad_(False)
    total, *_ = _loss((h, w, b), teacher, labels=labels, chunk_size=5)
    total.backward()
    assert h.grad is not None and b.grad is not None and w.grad is None
    with torch.no_grad():
        value, *_ = _loss(_leaves(student), teacher, labels=labels)
    torch.testing.assert_close(value, total.detach())
    assert not value.requires_grad
    total, *_ = _loss(_leaves(student), teacher, labels=labels)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


# ---- memory: the (tokens, V) logits are never formed -------------------------------------------


def test_peak_memory_does_not_grow_like_tokens_times_vocab(rng):
    """The extra memory of a call beyond the gradients it returns (bench/memory.py's counter:
    every allocation of torch's CPU allocator and every numpy buffer) stays a few chunks of
    logits as the tokens grow 8x; the materialised reference holds several (N, V) tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from bench.memory import peak_extra_memory
    finally:
        sys.path.pop(0)
    v, chunk = 1024, 64

    def working_bytes(n, fn):
        student, teacher = _problem(Rng(rng.seed + n), (n,), 16, v, 8, torch.float32)
        labels = Rng(rng.seed).labels((n,), v)

        def step():
            leaves = _leaves(student)
            fn(leaves, teacher, labels=labels, normalization="tail", alpha_ce=0.5,
               chunk_size=chunk)[0].backward()  # fmt: skip
            return sum(x.grad.numel() * 4 for x in leaves)

        mem = peak_extra_memory(step)
        return mem.peak_bytes - mem.result

    fused = {n: working_bytes(n, _loss) for n in (1024, 8192)}
    logits = 8192 * v * 4
    assert fused[8192] <= 0.1 * logits, fused
    assert fused[8192] - fused[1024] <= 0.05 * (8192 - 1024) * v * 4, fused
    materialised = working_bytes(8192, _reference_loss)
    assert materialised >= 2 * logits, materialised  # the counter sees what the fused path avoids


def _reference_loss(student, teacher, *, chunk_size, **kw):
    h, w, b = student
    return reference_linear.linear_topk_distillation_loss(
        h, w, teacher["teacher_ids"], teacher["teacher_logprobs"], student_bias=b,
        teacher_tail=teacher["teacher_tail"], **kw,
    )  # fmt: skip


# ---- registration: opcheck and torch.compile ---------------------------------------------------


def _opcheck_samples():
    g = Rng()
    h, w, b = (g.randn(9, 8).requires_grad_(), g.randn(13, 8).requires_grad_(),
               g.randn(13).requires_grad_())  # fmt: skip
    ids, lp, tail, _ = sparse_teacher(g, (9,), 13, 4)
    labels = g.labels((9,), 13)
    n = torch.tensor(4.0, dtype=torch.float64)
    hb, wb = g.randn(5, 4, dtype=torch.bfloat16).requires_grad_(), g.randn(7, 4).bfloat16()
    ids_b, lp_b, tail_b, _ = sparse_teacher(g, (5,), 7, 3, lp_dtype=torch.bfloat16)
    common = (2.0, 1.5, True, 0.7, 0.3, -100, 1.0, 0.0, 4)
    return [
        (h, w, b, ids, lp, None, labels, None, "full", *common, True, True, True),
        (h, w, None, ids.int(), lp, tail, labels, n, "tail", 1.5, 1.5, False, 1.0, 0.5, -100,
         1.3, 6.0, 0, True, False, False),
        (hb, wb, None, ids_b, lp_b, tail_b, None, None, "renormalized", *common[:4], 0.0,
         -100, 1.0, 3.0, 2, True, False, False),
        (h.detach(), w.detach(), None, ids, lp, None, labels, None, "full", *common,
         False, False, False),
    ]  # fmt: skip


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.fastdistill.linear_topk_distillation.default, args)


def test_compile_fullgraph_matches_eager(rng):
    student, teacher = _problem(rng, (14,), 8, 23, 5, torch.float32)
    labels = rng.labels((14,), 23)

    def f(h, w, b):
        total, kd, ce = _loss(
            (h, w, b), teacher, labels=labels, normalization="tail", alpha_ce=0.5, softcap=4.0,
            normalizer=torch.tensor(9.0), chunk_size=4,
        )  # fmt: skip
        return total * 0.37 + kd.sum() * 0

    assert_compiled_matches_eager(f, student)


# ---- bad input: a clear error naming the argument ------------------------------------------------


def _bad_calls():
    g = Rng(0)
    h, w = g.randn(4, 8), g.randn(11, 8)
    ids, lp, tail, _ = sparse_teacher(g, (4,), 11, 3)
    loss = FL.linear_topk_distillation_loss
    lab = g.labels((4,), 11)
    far = ids.clone()
    far[1, 2] = 11
    twice = ids.clone()
    twice[2, 1] = twice[2, 0]
    return [
        ("hidden 1-d", lambda: loss(h[0], w, ids[0], lp[0]), ValueError, "student_hidden"),
        ("weight shape", lambda: loss(h, w[:, :5], ids, lp), ValueError, "student_weight"),
        ("ids rows", lambda: loss(h, w, ids[:3], lp[:3]), ValueError, "teacher_ids"),
        ("ids dtype", lambda: loss(h, w, ids.float(), lp), TypeError, "teacher_ids"),
        ("logprobs shape", lambda: loss(h, w, ids, lp[:, :2]), ValueError, "teacher_logprobs"),
        ("logprobs dtype", lambda: loss(h, w, ids, lp.long()), TypeError, "teacher_logprobs"),
        ("k > V", lambda: loss(h, w[:2], ids, lp), ValueError, "vocabulary has 2"),
        ("id out of range", lambda: loss(h, w, far, lp), ValueError, "id 11 .*row 1"),
        ("id repeated", lambda: loss(h, w, twice, lp), ValueError, "appears twice .*row 2"),
        ("tail missing", lambda: loss(h, w, ids, lp, normalization="tail"), ValueError,
         "teacher_tail"),
        ("tail shape", lambda: loss(h, w, ids, lp, teacher_tail=tail[:2], normalization="tail"),
         ValueError, "teacher_tail"),
        ("tail temperature", lambda: loss(h, w, ids, lp, teacher_tail=tail, normalization="tail",
                                          temperature=2.0), ValueError, "capture_temperature"),
        ("normalization", lambda: loss(h, w, ids, lp, normalization="top"), ValueError,
         "normalization"),
        ("capture_temperature", lambda: loss(h, w, ids, lp, capture_temperature=0), ValueError,
         "capture_temperature"),
        ("alphas zero", lambda: loss(h, w, ids, lp, alpha_kd=0), ValueError, "alpha"),
        ("ce without labels", lambda: loss(h, w, ids, lp, alpha_ce=1), ValueError, "labels"),
        ("labels range", lambda: loss(h, w, ids, lp, labels=lab + 11, alpha_ce=1), ValueError,
         "labels"),
        ("softcap", lambda: loss(h, w, ids, lp, softcap=-1.0), ValueError, "softcap"),
        ("chunk_size", lambda: loss(h, w, ids, lp, chunk_size=0), ValueError, "chunk_size"),
        ("normalizer", lambda: loss(h, w, ids, lp, normalizer=0), ValueError, "normalizer"),
        ("t2_scale", lambda: loss(h, w, ids, lp, t2_scale=1), TypeError, "t2_scale"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()
