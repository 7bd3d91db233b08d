"""linear_distillation_loss (fastdistill::linear_distillation): hidden states and output heads
in, logits formed chunk by chunk. The oracle is fastdistill/reference_linear.py in float64 on the
same, already rounded, inputs (tests/_oracle.py); values and the gradients w.r.t. the student's
hidden states, head weight and bias are compared for every divergence, dtype, chunking and
teacher form, on every implementation (native core, torch reference, Triton interpreted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _oracle import Rng, assert_grad_close, assert_loss_close

import fastdistill.losses as FL
from fastdistill import reference_linear
from fastdistill.ops import linear_distillation as op_module

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
DTYPES = (torch.float32, torch.bfloat16)


def _problem(rng: Rng, n, hs, ht, v, dtype, *, lead=None, bias=True, teacher="head"):
    """Student (hidden, weight, bias) leaves and the teacher kwargs, all in ``dtype``."""
    lead = lead or (n,)
    h = rng.randn(*lead, hs, dtype=dtype)
    w = rng.randn(v, hs, scale=hs**-0.5 * 2, dtype=dtype)
    b = rng.randn(v, scale=0.5, dtype=dtype) if bias else None
    th = rng.randn(*lead, ht, dtype=dtype)
    tw = rng.randn(v, ht, scale=ht**-0.5 * 2, dtype=dtype)
    tb = rng.randn(v, scale=0.5, dtype=dtype) if bias else None
    if teacher == "head":
        t = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    elif teacher == "logits":
        t = dict(teacher_logits=F.linear(th.float(), tw.float(), tb.float()).to(dtype))
    else:
        t = {}
    return (h, w, b), t


def _leaves(student, dtype=None):
    return [
        None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_(True)
        for x in student
    ]


def _double(kw: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kw.items()}  # fmt: skip


def check_against_oracle(rng, student, teacher, grad_out=0.37, **kw):
    """Run the loss and the float64 oracle; compare (total, kd, ce) and the three gradients."""
    dtype = student[0].dtype
    h, w, b = _leaves(student)
    total, kd, ce = FL.linear_distillation_loss(h, w, student_bias=b, **teacher, **kw)
    (total * grad_out).backward()
    h6, w6, b6 = _leaves(student, torch.float64)
    ref_kw = {k: val for k, val in kw.items() if k != "chunk_size"}
    ref = reference_linear.linear_distillation_loss(
        h6, w6, student_bias=b6, **_double(teacher), **_double(ref_kw)
    )
    (ref[0] * grad_out).backward()
    for name, x, r in zip(("total", "kd", "ce"), (total, kd, ce), ref, strict=True):
        assert_loss_close(x, r, what=f"{name} {rng.tag}")
    assert not kd.requires_grad and not ce.requires_grad
    scale = torch.tensor(grad_out, dtype=torch.float64)
    for name, x, x6 in (("hidden", h, h6), ("weight", w, w6), ("bias", b, b6)):
        if x is not None:
            assert_grad_close(x.grad, x6.grad, dtype, what=f"d {name} {rng.tag}", scale=scale)
    return total, kd, ce


# ---- the float64 oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("teacher", ["head", "logits"])
def test_matches_oracle(impl, rng, divergence, dtype, teacher):
    # 45 tokens in chunks of 8: five full chunks and a partial one; a third of the labels ignored.
    student, t = _problem(rng, 45, 24, 40, 131, dtype, teacher=teacher)
    labels = rng.labels((45,), 131)
    check_against_oracle(
        rng, student, t, labels=labels, divergence=divergence, beta=0.3, temperature=2.0,
        alpha_kd=0.8, alpha_ce=0.4, chunk_size=8,
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 64, 1000])
def test_chunk_sizes(rng, chunk_size):
    """Non-divisible chunks, one row per chunk, exactly divisible, N smaller than one chunk."""
    student, t = _problem(rng, 48, 16, 16, 97, torch.float32)
    labels = rng.labels((48,), 97)
    check_against_oracle(rng, student, t, labels=labels, divergence="jsd", alpha_ce=1.0,
                         chunk_size=chunk_size)  # fmt: skip


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "logit_scale, softcap", [(0.5, None), (None, 3.0), (1.7, 10.0)], ids=["scale", "cap", "both"]
)
def test_logit_transforms(impl, rng, divergence, logit_scale, softcap):
    student, t = _problem(rng, 19, 12, 20, 53, torch.float32)
    check_against_oracle(
        rng, student, t, labels=rng.labels((19,), 53), divergence=divergence, alpha_ce=0.5,
        logit_scale=logit_scale, softcap=softcap, chunk_size=5,
    )  # fmt: skip


@pytest.mark.parametrize("t2_scale", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0])
def test_temperatures(rng, temperature, t2_scale):
    student, t = _problem(rng, 21, 8, 8, 37, torch.float32)
    check_against_oracle(rng, student, t, divergence="forward_kl", temperature=temperature,
                         t2_scale=t2_scale, chunk_size=6)  # fmt: skip


def test_mask_and_batch_shape(impl, rng):
    """``(B, T, H)`` hidden states with an attention-style 0/1 mask and ignored labels."""
    student, t = _problem(rng, 0, 16, 12, 61, torch.float32, lead=(3, 11))
    mask = rng.mask((3, 11)).long()
    check_against_oracle(rng, student, t, labels=rng.labels((3, 11), 61), mask=mask,
                         divergence="reverse_kl", alpha_ce=0.3, chunk_size=4)  # fmt: skip
    check_against_oracle(rng, student, t, mask=mask.bool(), divergence="tvd", chunk_size=5)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer(rng, as_tensor):
    student, t = _problem(rng, 30, 8, 8, 41, torch.float32)
    labels = rng.labels((30,), 41)
    n = torch.tensor(57.0) if as_tensor else 57
    total, kd, ce = check_against_oracle(rng, student, t, labels=labels, normalizer=n,
                                         alpha_ce=0.5, chunk_size=7)  # fmt: skip
    _, kd_mean, ce_mean = FL.linear_distillation_loss(
        student[0], student[1], student_bias=student[2], **t, labels=labels, alpha_ce=0.5
    )
    count = (labels != -100).sum()
    torch.testing.assert_close(kd * 57, kd_mean * count, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce * 57, ce_mean * count, rtol=1e-5, atol=1e-6)


def test_ce_only_needs_no_teacher_and_equals_torch(rng):
    """alpha_kd = 0: hard CE only, equal to F.cross_entropy on materialised logits and to
    F.linear_cross_entropy."""
    (h, w, b), _ = _problem(rng, 33, 16, 16, 71, torch.float32, teacher="none")
    labels = rng.labels((33,), 71)
    check_against_oracle(rng, (h, w, b), {}, labels=labels, alpha_kd=0.0, alpha_ce=1.0,
                         chunk_size=10)  # fmt: skip
    total, kd, ce = FL.linear_distillation_loss(h, w, labels=labels, alpha_kd=0, alpha_ce=1)
    torch.testing.assert_close(total, F.cross_entropy(h @ w.T, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, F.linear_cross_entropy(h, w, labels), rtol=1e-5, atol=1e-6)
    assert kd.item() == 0.0 and ce.item() == total.item()


def test_all_ignored_is_exactly_zero(rng):
    student, t = _problem(rng, 10, 8, 8, 17, torch.float32)
    h, w, b = _leaves(student)
    labels = torch.full((10,), -100)
    total, kd, ce = FL.linear_distillation_loss(h, w, student_bias=b, **t, labels=labels,
                                                alpha_ce=1.0, chunk_size=3)  # fmt: skip
    total.backward()
    assert total.item() == 0.0 and kd.item() == 0.0 and ce.item() == 0.0
    for x in (h, w, b):
        assert torch.count_nonzero(x.grad) == 0


def test_student_equals_teacher_is_zero(rng):
    (h, w, b), _ = _problem(rng, 12, 8, 8, 23, torch.float32)
    hs, ws, bs = _leaves((h, w, b))
    total, *_ = FL.linear_distillation_loss(
        hs, ws, student_bias=bs, teacher_hidden=h, teacher_weight=w, teacher_bias=b,
        divergence="jsd", chunk_size=5,
    )  # fmt: skip
    total.backward()
    assert abs(total.item()) < 1e-6
    assert hs.grad.abs().max() < 1e-6 and ws.grad.abs().max() < 1e-6


def test_garbage_in_unselected_rows_is_ignored(rng):
    student, t = _problem(rng, 14, 8, 8, 29, torch.float32)
    labels = rng.labels((14,), 29)
    ignored = labels == -100
    assert ignored.any()
    h, w, b = student
    h = torch.where(ignored.unsqueeze(1), float("nan"), h)
    th = torch.where(ignored.unsqueeze(1), float("inf"), t["teacher_hidden"])
    hs, ws, bs = _leaves((h, w, b))
    total, *_ = FL.linear_distillation_loss(hs, ws, student_bias=bs, **{**t, "teacher_hidden": th},
                                            labels=labels, alpha_ce=1.0, chunk_size=4)  # fmt: skip
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(ws.grad).all() and torch.isfinite(bs.grad).all()
    assert torch.isfinite(hs.grad).all() and torch.count_nonzero(hs.grad[ignored]) == 0


# ---- autograd: which inputs get gradients, accumulation, no_grad, one backward -----------------


def test_frozen_head_and_frozen_hidden(rng):
    """Only the tensors that require grad get one (a frozen lm_head is the LoRA case)."""
    student, t = _problem(rng, 16, 8, 8, 19, torch.float32)
    labels = rng.labels((16,), 19)
    h, w, b = _leaves(student)
    w.requires_grad_(False)
    b.requires_grad_(False)
    total, *_ = FL.linear_distillation_loss(h, w, student_bias=b, **t, labels=labels, chunk_size=5)
    total.backward()
    h2, w2, b2 = _leaves(student)
    ref, *_ = FL.linear_distillation_loss(h2, w2, student_bias=b2, **t, labels=labels)
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad)
    assert w.grad is None and b.grad is None
    h3, w3, _ = _leaves(student)
    h3.requires_grad_(False)
    total, *_ = FL.linear_distillation_loss(h3, w3, **t, labels=labels, chunk_size=5)
    total.backward()
    assert h3.grad is None and w3.grad is not None
    with torch.no_grad():
        value, *_ = FL.linear_distillation_loss(h2, w2, student_bias=b2, **t, labels=labels)
    torch.testing.assert_close(value, ref.detach())
    assert not value.requires_grad


def test_gradient_accumulation_and_tied_weight(rng):
    """Two micro-batches normalised by the global count accumulate to the whole batch's gradient;
    the head weight also used elsewhere in the graph (tied embeddings) sums both gradients."""
    (h, w, b), t = _problem(rng, 20, 8, 8, 31, torch.float32, bias=False)
    labels = rng.labels((20,), 31)
    n = (labels != -100).sum()
    ws = w.clone().requires_grad_(True)
    for part in (slice(0, 9), slice(9, 20)):
        tp = {k: v[part] if k == "teacher_hidden" else v for k, v in t.items()}
        emb = ws[labels[part].clamp_min(0)]  # an embedding lookup through the tied weight
        total, *_ = FL.linear_distillation_loss(h[part] + emb, ws, **tp, labels=labels[part],
                                                normalizer=n, chunk_size=4)  # fmt: skip
        total.backward()
    w6 = w.double().requires_grad_(True)
    ref_total = 0
    for part in (slice(0, 9), slice(9, 20)):
        tp = {k: v[part] if k == "teacher_hidden" else v for k, v in _double(t).items()}
        emb = w6[labels[part].clamp_min(0)]
        ref_total = (
            ref_total
            + reference_linear.linear_distillation_loss(
                h[part].double() + emb, w6, **tp, labels=labels[part], normalizer=n
            )[0]
        )
    ref_total.backward()
    assert_grad_close(ws.grad, w6.grad, torch.float32, what=f"tied weight {rng.tag}")


def test_second_backward_raises(rng):
    student, t = _problem(rng, 6, 4, 4, 9, torch.float32)
    h, w, b = _leaves(student)
    total, *_ = FL.linear_distillation_loss(h, w, student_bias=b, **t)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


def test_auto_chunk_size_is_bounded():
    cpu = torch.device("cpu")
    assert op_module.auto_chunk_size(10, 128_256, cpu) <= 10
    rows = op_module.auto_chunk_size(1_000_000, 32_000, cpu)
    assert 1 <= rows and rows * 32_000 * 4 <= op_module.CPU_CHUNK_BYTES
    assert op_module.auto_chunk_size(1_000_000, 10**9, cpu) == 1


# ---- registration: opcheck and torch.compile ---------------------------------------------------


def _opcheck_samples():
    g = Rng()
    h, w, b = (g.randn(9, 8).requires_grad_(), g.randn(13, 8).requires_grad_(),
               g.randn(13).requires_grad_())  # fmt: skip
    th, tw = g.randn(9, 6), g.randn(13, 6)
    labels = g.labels((9,), 13)
    hb, wb = g.randn(5, 4, dtype=torch.bfloat16).requires_grad_(), g.randn(7, 4).bfloat16()
    n = torch.tensor(4.0, dtype=torch.float64)
    common = (2.0, 0.7, 0.3, -100, "jsd", 0.4, False, 1.0, 0.0, 4)
    return [
        (h, w, b, th, tw, None, None, labels, None, *common, True, True, True),
        (h, w, None, None, None, None, g.randn(9, 13), labels, n, *common, True, False, False),
        (hb, wb, None, None, None, None, g.randn(5, 7, dtype=torch.bfloat16), None, None,
         1.0, 1.0, 0.0, -100, "tvd", 0.5, True, 0.5, 3.0, 0, True, False, False),
        (h.detach(), w.detach(), None, th, tw, None, None, labels, None, *common,
         False, False, False),
    ]  # fmt: skip


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.fastdistill.linear_distillation.default, args)


def test_compile_fullgraph_matches_eager(rng):
    student, t = _problem(rng, 14, 8, 10, 23, torch.float32)
    labels = rng.labels((14,), 23)

    def f(h, w, b):
        total, kd, ce = FL.linear_distillation_loss(
            h, w, student_bias=b, **t, labels=labels, divergence="jsd", alpha_ce=0.5,
            softcap=4.0, normalizer=torch.tensor(9.0), chunk_size=4,
        )  # fmt: skip
        return total * 0.37 + kd.sum() * 0

    assert_compiled_matches_eager(f, student)


def assert_compiled_matches_eager(f, student):
    """``torch.compile(f, fullgraph=True)`` on fresh leaves of ``student``: eager's value and
    gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    a, e = _leaves(student), _leaves(student)
    lc, le = compiled(*a), f(*e)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for x, y in zip(a, e, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)


# ---- bad input: a clear error naming the argument ------------------------------------------------


def _bad_calls():
    g = Rng(0)
    h, w, th, tw = g.randn(4, 8), g.randn(11, 8), g.randn(4, 6), g.randn(11, 6)
    lab = g.labels((4,), 11)
    loss = FL.linear_distillation_loss
    head = dict(teacher_hidden=th, teacher_weight=tw)
    return [
        ("hidden type", lambda: loss(h.numpy(), w, **head), TypeError, "student_hidden"),
        ("hidden int", lambda: loss(h.long(), w, **head), TypeError, "student_hidden"),
        ("hidden 1-d", lambda: loss(h[0], w, **head), ValueError, "student_hidden"),
        ("weight shape", lambda: loss(h, w[:, :5], **head), ValueError, "student_weight"),
        ("weight dtype", lambda: loss(h, w.bfloat16(), **head), TypeError, "student_weight"),
        ("bias shape", lambda: loss(h, w, student_bias=g.randn(3), **head), ValueError,
         "student_bias"),
        ("no teacher", lambda: loss(h, w), ValueError, "teacher"),
        ("two teachers", lambda: loss(h, w, **head, teacher_logits=g.randn(4, 11)), ValueError,
         "teacher_logits"),
        ("teacher head only", lambda: loss(h, w, teacher_hidden=th), ValueError, "teacher_weight"),
        ("teacher vocab", lambda: loss(h, w, teacher_hidden=th, teacher_weight=tw[:5]),
         ValueError, "teacher_weight"),
        ("teacher rows", lambda: loss(h, w, teacher_hidden=th[:3], teacher_weight=tw),
         ValueError, "teacher_hidden"),
        ("teacher logits shape", lambda: loss(h, w, teacher_logits=g.randn(4, 12)), ValueError,
         "teacher_logits"),
        ("divergence", lambda: loss(h, w, **head, divergence="kl"), ValueError, "divergence"),
        ("beta", lambda: loss(h, w, **head, beta=1.5), ValueError, "beta"),
        ("beta nan", lambda: loss(h, w, **head, beta=float("nan")), ValueError, "beta"),
        ("temperature", lambda: loss(h, w, **head, temperature=0), ValueError, "temperature"),
        ("alphas zero", lambda: loss(h, w, **head, alpha_kd=0), ValueError, "alpha"),
        ("alpha negative", lambda: loss(h, w, **head, alpha_ce=-1), ValueError, "alpha_ce"),
        ("ce without labels", lambda: loss(h, w, **head, alpha_ce=1), ValueError, "labels"),
        ("labels range", lambda: loss(h, w, **head, labels=lab + 11, alpha_ce=1), ValueError,
         "labels"),
        ("labels shape", lambda: loss(h, w, **head, labels=lab[:3]), ValueError, "labels"),
        ("mask float", lambda: loss(h, w, **head, mask=g.randn(4)), TypeError, "mask"),
        ("softcap", lambda: loss(h, w, **head, softcap=-1.0), ValueError, "softcap"),
        ("logit_scale", lambda: loss(h, w, **head, logit_scale=0), ValueError, "logit_scale"),
        ("normalizer", lambda: loss(h, w, **head, normalizer=0), ValueError, "normalizer"),
        ("chunk_size", lambda: loss(h, w, **head, chunk_size=0), ValueError, "chunk_size"),
        ("t2_scale", lambda: loss(h, w, **head, t2_scale=1), TypeError, "t2_scale"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()
