"""topk_kl_loss / topk_distillation_loss / torch.ops.fastdistill.topk_kl (a sparse top-k teacher)
against the float64 oracle (fastdistill.reference), on every implementation."""

from __future__ import annotations

import math
import os

import _oracle
import pytest
import torch
from _oracle import Rng, fp16_impl, norm, run_loss

from fastdistill import reference
from fastdistill.losses import kl_div_loss, topk_distillation_loss, topk_kl_loss

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NORMALIZATIONS = ("full", "renormalized", "tail")
# (*lead, V, k): k = 1, k = V, odd sizes.
SHAPES = [(41, 1, 1), (3, 7, 7, 3), (41, 1271, 64), (2, 3, 1271, 7), (5, 300, 300)]


# The torch backend evaluates the reference formulas in fp32: in the tail mode a small KL is the
# difference of logsumexps of ~1 (measured: 1.1e-5 relative on a KL of 0.04 at T = 4).
TORCH_RTOL = 1e-4
# ... and it cannot resolve anything below fp32's rounding of its own log-softmax of s / T,
# eps max|s| / T: not the loss, nor a gradient entry q - p of two probabilities near 1 (each the
# exponential of a log-probability rounded that much). At T = 0.05, a row whose student and
# teacher put nearly all their top-k mass on the same id has a KL of ~1e-6 and a gradient of the
# same order (measured: errors of the whole 9.9e-7 of the loss and 71% of the gradient, against
# eps max|s| / T = 1.5e-5).
TORCH_FLOOR = 4.0 * 2.0**-24


def check(fn, ref_fn, student, grad_out, *, what, temperature=1.0):
    """_oracle.check, with the torch backend's budget (see TORCH_RTOL and TORCH_FLOOR)."""
    if os.environ.get("FASTDISTILL_BACKEND") != "torch":
        return _oracle.check(fn, ref_fn, student, grad_out, what=what)
    expected = _oracle.oracle(ref_fn, student, grad_out)
    sqrt_rows = math.sqrt(student.numel() // max(student.shape[-1], 1))
    floor = TORCH_FLOOR * float(student.abs().max()) / temperature * sqrt_rows
    loss_floor, grad_floor = floor, floor * float(grad_out.abs().max())
    return _oracle.check(
        fn, ref_fn, student, grad_out, what=what, expected=expected,
        loss_atol=TORCH_RTOL * norm(expected[0]) + loss_floor, grad_rtol=TORCH_RTOL,
        grad_atol=grad_floor,
    )  # fmt: skip


def teacher(rng: Rng, lead, v, k, *, capture_temperature=1.0, lp_dtype=torch.float32):
    """What a teacher cache stores: the top-k ids of a random teacher (in random order), their
    log-probabilities at T_c (rounded to ``lp_dtype``) and the log of the mass left outside."""
    t = rng.logits(*lead, v, dtype=torch.float64)
    logp = torch.log_softmax(t / capture_temperature, -1)
    lp, ids = logp.topk(k, -1)
    perm = torch.argsort(torch.rand(*lead, k, generator=rng.gen), -1)
    lp, ids = lp.gather(-1, perm), ids.gather(-1, perm)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.logsumexp(torch.where(outside, logp, -math.inf), -1)
    return ids, lp.to(lp_dtype), tail.float(), t


def _fns(fn_kw, ids, lp, tail, **kw):
    """(fastdistill loss of the student, float64 reference) for a fixed teacher and options."""

    def f(s):
        return topk_kl_loss(s, ids, lp, teacher_tail=tail, **kw, **fn_kw)

    ref_kw = dict(kw)
    if isinstance(ref_kw.get("mask"), torch.Tensor):
        ref_kw["mask"] = ref_kw["mask"] != 0

    def ref(s64):
        return reference.topk_kl_loss(
            s64, ids, lp.double(), teacher_tail=tail.double(), **ref_kw, **fn_kw
        )

    return f, ref


def _temps(normalization, temperature):
    return temperature if normalization == "tail" else 1.5


# ---- the float64 oracle: every implementation, dtype, normalisation, temperature, shape --------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("temperature", (0.05, 1.0, 4.0))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_oracle(impl, rng, dtype, normalization, temperature, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the other backends")
    if impl == "triton" and shape[0] == 41 and temperature != 1.0:
        pytest.skip("one temperature for 41 rows under the Triton interpreter (slow)")
    *lead, v, k = shape
    tc = _temps(normalization, temperature)
    ids, lp, tail, _ = teacher(rng, lead, v, k, capture_temperature=tc, lp_dtype=dtype)
    s = rng.logits(*lead, v, dtype=dtype)
    mask = rng.mask(tuple(lead))
    for reduction in ("batchmean", "none"):
        f, ref = _fns(
            dict(normalization=normalization, temperature=temperature, capture_temperature=tc),
            ids, lp, tail, mask=mask, reduction=reduction, t2_scale=reduction == "none",
        )  # fmt: skip
        g = rng.grad_output(tuple(lead) if reduction == "none" else ())
        what = f"{impl} {normalization} T={temperature} {reduction} {rng.tag}"
        check(f, ref, s, g, what=what, temperature=temperature)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_ids_dtypes_and_sum(impl, rng, normalization):
    """int32/uint16 ids, bf16 log-probs with fp32 logits, no mask, ``sum``."""
    ids, lp, tail, _ = teacher(rng, (4, 5), 97, 11, lp_dtype=torch.bfloat16)
    s = rng.logits(4, 5, 97)
    for id_dtype in (torch.int32, torch.uint16):
        f, ref = _fns(
            dict(normalization=normalization), ids.to(id_dtype), lp, tail, reduction="sum"
        )
        check(f, ref, s, torch.tensor(0.37), what=f"{impl} {id_dtype} {rng.tag}")


def test_tail_close_to_one(impl, rng):
    """A student whose top-k mass is 1 − 1e-6: q_tail must come from the logits outside K, not
    from 1 − Σ_K q in fp32 (which would be off by ~10%)."""
    ids, lp, tail, _ = teacher(rng, (6,), 500, 16)
    s = torch.full((6, 500), -8.0)
    s.scatter_(-1, ids, rng.uniform(6, 16, low=3.0, high=6.0))
    f, ref = _fns(dict(normalization="tail"), ids, lp, tail, reduction="none")
    check(f, ref, s, rng.grad_output((6,)), what=f"{impl} {rng.tag}")


def test_neg_inf(impl, rng):
    """-inf teacher log-probs are probability 0 (also where the student's logit is -inf); -inf
    student logits outside K."""
    ids, lp, tail, _ = teacher(rng, (9,), 61, 10)
    lp = lp.clone()
    lp[:, 7:] = -math.inf
    s = rng.logits(9, 61)
    s.scatter_(-1, ids[:, 8:], -math.inf)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s[:4] = torch.where(
        outside[:4] & (torch.rand(4, 61, generator=rng.gen) < 0.5), -math.inf, s[:4]
    )
    for normalization in NORMALIZATIONS:
        f, ref = _fns(dict(normalization=normalization), ids, lp, tail, reduction="none")
        check(f, ref, s, rng.grad_output((9,)), what=f"{impl} {normalization} {rng.tag}")


def test_k_equals_v_is_the_dense_kl(impl, rng):
    """k = V, ℓ = log_softmax(t/T_c): full and renormalized are the dense forward KL at T
    (kl_div_loss carries T², so t2_scale=True)."""
    v = 37
    ids, lp, _, t = teacher(rng, (5, 3), v, v, capture_temperature=2.0)
    s = rng.logits(5, 3, v)
    for normalization in ("full", "renormalized"):
        x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = topk_kl_loss(
            x, ids, lp, normalization=normalization, temperature=0.7, capture_temperature=2.0,
            t2_scale=True,
        )  # fmt: skip
        # p ∝ exp(ℓ · T_c / T) = softmax(t / T): the teacher's logits at the training temperature
        b = kl_div_loss(y, t.float(), temperature=0.7)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-5, atol=1e-7)


def test_empty_selection(impl, rng):
    ids, lp, tail, _ = teacher(rng, (4, 3), 50, 5)
    s = rng.logits(4, 3, 50)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    labels = torch.full((4, 3), -100)
    for normalization in NORMALIZATIONS:
        for kw in (dict(mask=mask), dict(labels=labels), dict(mask=mask, reduction="sum")):
            loss, grad = run_loss(
                lambda x, kw=dict(kw, normalization=normalization): topk_kl_loss(
                    x, ids, lp, teacher_tail=tail, **kw
                ),
                s,
                torch.tensor(1.0),
            )
            assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0, f"{impl} {kw}"


def test_unselected_rows_are_not_read(impl, rng):
    """Garbage ids (out of range, repeated), NaN log-probs and NaN logits in unselected rows
    change nothing and get zero gradient."""
    ids, lp, tail, _ = teacher(rng, (6,), 40, 4)
    s = rng.logits(6, 40)
    mask = torch.tensor([True, False, True, True, False, True])
    ids_bad, lp_bad, s_bad = ids.clone(), lp.clone(), s.clone()
    ids_bad[1] = torch.tensor([3, 3, -5, 99])
    lp_bad[4] = math.nan
    s_bad[4] = math.nan
    one = torch.tensor(1.0)
    for normalization in NORMALIZATIONS:
        kw = dict(normalization=normalization, mask=mask)
        loss, grad = run_loss(
            lambda x, kw=kw: topk_kl_loss(x, ids_bad, lp_bad, teacher_tail=tail, **kw), s_bad, one
        )
        ref, ref_grad = run_loss(
            lambda x, kw=kw: topk_kl_loss(x, ids, lp, teacher_tail=tail, **kw), s, one
        )
        torch.testing.assert_close(loss, ref)
        assert torch.count_nonzero(grad[~mask]) == 0
        torch.testing.assert_close(grad, ref_grad)


def test_nan_in_a_selected_row_is_not_hidden(impl, rng):
    ids, lp, tail, _ = teacher(rng, (3,), 30, 4)
    s = rng.logits(3, 30)
    s[1, 5] = math.nan
    loss = topk_kl_loss(s, ids, lp, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


# ---- topk_distillation_loss: KD and CE in one pass ----------------------------------------------


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_distillation_oracle(impl, rng, normalization, dtype):
    lead, v, k = ((2, 4) if impl == "triton" else (3, 9)), 211, 13
    temperature = 2.0
    tc = temperature if normalization == "tail" else 1.0
    ids, lp, tail, _ = teacher(rng, lead, v, k, capture_temperature=tc)
    s = rng.logits(*lead, v, dtype=dtype)
    labels, mask = rng.labels(lead, v), rng.mask(lead)
    labels[0, 1] = ids[0, 1, 2]  # a label inside K
    common = dict(
        teacher_tail=tail, labels=labels, mask=mask, normalization=normalization,
        temperature=temperature, capture_temperature=tc, t2_scale=True,
    )  # fmt: skip
    for alpha_kd, alpha_ce, normalizer in ((0.7, 0.4, None), (1.0, 0.0, 29.0), (0.0, 1.0, None)):
        kw = dict(common, alpha_kd=alpha_kd, alpha_ce=alpha_ce, normalizer=normalizer)
        kw_ref = dict(kw, teacher_tail=tail.double())
        expected = reference.topk_distillation_loss(s.double(), ids, lp.double(), **kw_ref)
        check(
            lambda x, kw=kw: topk_distillation_loss(x, ids, lp, **kw)[0],
            lambda x64, kw=kw_ref: reference.topk_distillation_loss(x64, ids, lp.double(), **kw)[0],
            s,
            torch.tensor(0.37),
            what=f"{impl} {alpha_kd} {alpha_ce} {normalizer} {rng.tag}",
        )
        total, kd, ce = topk_distillation_loss(s, ids, lp, **kw)
        for got, want in ((kd, expected[1]), (ce, expected[2])):
            assert got.dtype == torch.float32 and not got.requires_grad
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_teacher_gets_no_gradient(impl, rng):
    ids, lp, tail, _ = teacher(rng, (4,), 20, 3)
    lp = lp.clone().requires_grad_(True)
    s = rng.logits(4, 20).requires_grad_(True)
    topk_kl_loss(s, ids, lp).backward()
    assert lp.grad is None and s.grad is not None


# ---- bad input ------------------------------------------------------------------------------


def _bad_calls():
    g = Rng(0)
    ids, lp, tail, _ = teacher(g, (4,), 30, 5)
    s = g.logits(4, 30)
    dup = ids.clone()
    dup[2, 3] = dup[2, 0]
    out = ids.clone()
    out[1, 4] = 30
    neg = ids.clone()
    neg[3, 0] = -1
    f, d = topk_kl_loss, topk_distillation_loss
    return [
        ("duplicate", lambda: f(s, dup, lp), ValueError, "appears twice|repeated"),
        ("out of range", lambda: f(s, out, lp), ValueError, "teacher_ids"),
        ("negative", lambda: f(s, neg, lp), ValueError, "teacher_ids"),
        ("dup in distillation", lambda: d(s, dup, lp), ValueError, "teacher_ids"),
        ("k > V", lambda: f(s[:, :4], ids, lp), ValueError, "vocabulary"),
        ("ids float", lambda: f(s, ids.float(), lp), TypeError, "teacher_ids"),
        ("lp int", lambda: f(s, ids, ids), TypeError, "teacher_logprobs"),
        ("lp shape", lambda: f(s, ids, lp[:, :3]), ValueError, "teacher_logprobs"),
        ("ids lead", lambda: f(s, ids[:3], lp[:3]), ValueError, "teacher_ids"),
        ("k = 0", lambda: f(s, ids[:, :0], lp[:, :0]), ValueError, "k >= 1"),
        ("normalization", lambda: f(s, ids, lp, normalization="x"), ValueError, "normalization"),
        ("tail missing", lambda: f(s, ids, lp, normalization="tail"), ValueError, "teacher_tail"),
        ("tail shape", lambda: f(s, ids, lp, teacher_tail=tail[:2], normalization="tail"),
         ValueError, "teacher_tail"),
        ("tail T != Tc", lambda: f(s, ids, lp, teacher_tail=tail, normalization="tail",
                                   temperature=2.0), ValueError, "capture_temperature"),
        ("temperature", lambda: f(s, ids, lp, temperature=0.0), ValueError, "temperature"),
        ("capture_temperature", lambda: f(s, ids, lp, capture_temperature=-1.0), ValueError,
         "capture_temperature"),
        ("reduction", lambda: f(s, ids, lp, reduction="mean"), ValueError, "reduction"),
        ("normalizer with sum", lambda: f(s, ids, lp, reduction="sum", normalizer=3.0),
         ValueError, "normalizer"),
        ("mask shape", lambda: f(s, ids, lp, mask=torch.ones(3, dtype=torch.bool)), ValueError,
         "mask"),
        ("t2_scale", lambda: f(s, ids, lp, t2_scale=1), TypeError, "t2_scale"),
        ("student int", lambda: f(ids, ids, lp), TypeError, "student_logits"),
        ("alpha_ce without labels", lambda: d(s, ids, lp, alpha_ce=1.0), ValueError, "labels"),
        ("labels out of range", lambda: d(s, ids, lp, labels=torch.full((4,), 30), alpha_ce=1.0),
         ValueError, "labels"),
        ("alphas zero", lambda: d(s, ids, lp, alpha_kd=0.0), ValueError, "alpha"),
        ("alpha negative", lambda: d(s, ids, lp, alpha_kd=-1.0), ValueError, "alpha_kd"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(impl, case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_raw_op_checks_ids(impl):
    """The op itself (without the public checks) refuses ids the kernel would read out of
    bounds, on CPU tensors."""
    if impl == "torch":
        pytest.skip("the torch backend is served by fastdistill.losses, not the op")
    ids, lp, _, _ = teacher(Rng(1), (3,), 20, 4)
    ids[0, 0] = 20
    with pytest.raises(ValueError, match="teacher_ids"):
        torch.ops.fastdistill.topk_kl(
            Rng(2).logits(3, 20), ids, lp, None, None, None, "full", 1.0, 1.0, False, 1.0, 0.0,
            -100, "batchmean", None, False,
        )  # fmt: skip


# ---- registration: opcheck and torch.compile ---------------------------------------------------


def _opcheck_samples():
    g = Rng()
    ids, lp, tail, _ = teacher(g, (3, 4), 17, 5, lp_dtype=torch.bfloat16)
    s = g.logits(3, 4, 17).requires_grad_(True)
    bs = g.logits(5, 9, dtype=torch.bfloat16).requires_grad_(True)
    bids, blp, btail, _ = teacher(g, (5,), 9, 9)
    mask, labels = g.mask((3, 4)), g.labels((3, 4), 17)
    n = torch.tensor(7.0, dtype=torch.float64)
    op = torch.ops.fastdistill.topk_kl.default
    return [
        (op, (s, ids, lp, None, mask, None, "full", 2.0, 1.0, False, 1.0, 0.0, -100,
              "batchmean", None, True)),
        (op, (s, ids.int(), lp, tail, None, labels, "tail", 1.0, 1.0, True, 0.5, 0.3, -100,
              "batchmean", n, True)),
        (op, (bs, bids, blp, btail, None, None, "renormalized", 0.5, 2.0, True, 1.0, 0.0, -100,
              "none", None, True)),
        (op, (s.detach(), ids, lp, None, mask, labels, "full", 1.0, 1.0, False, 1.0, 1.0, -100,
              "batchmean", None, False)),
    ]  # fmt: skip


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    op, args = _opcheck_samples()[sample]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager(rng):
    ids, lp, tail, _ = teacher(rng, (3, 6), 41, 8, capture_temperature=2.0)
    labels, mask = rng.labels((3, 6), 41), rng.mask((3, 6))

    def f(s, n):
        a = (
            topk_kl_loss(
                s,
                ids,
                lp,
                temperature=2.0,
                capture_temperature=2.0,
                labels=labels,
                normalizer=n,
                normalization="renormalized",
            )
            * 0.37
        )
        b = topk_kl_loss(
            s,
            ids,
            lp,
            teacher_tail=tail,
            normalization="tail",
            mask=mask,
            temperature=2.0,
            capture_temperature=2.0,
            reduction="none",
        )
        c = topk_distillation_loss(
            s,
            ids,
            lp,
            labels=labels,
            mask=mask,
            temperature=1.5,
            capture_temperature=2.0,
            t2_scale=True,
            alpha_ce=0.5,
        )[0]
        return a + b.sum() * 0.1 + c  # fmt: skip

    s = rng.logits(3, 6, 41)
    n = torch.tensor(9.0)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc, le = compiled(x, n), f(y, n)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


def test_non_contiguous(impl, rng):
    """Logits rows with a stride of their own (a slice of wider rows), ids and log-probs as
    transposed views: read in place or copied, same values."""
    ids, lp, tail, _ = teacher(rng, (5, 4), 90, 6)
    wide = rng.logits(5, 4, 100)
    s = wide[..., 3:93]
    ids_t = ids.transpose(0, 1).contiguous().transpose(0, 1)
    lp_t = lp.transpose(0, 1).contiguous().transpose(0, 1)
    assert not s.is_contiguous() and not ids_t.is_contiguous()
    for normalization in NORMALIZATIONS:
        f, ref = _fns(dict(normalization=normalization), ids_t, lp_t, tail, reduction="sum")
        check(f, ref, s.contiguous(), torch.tensor(0.37), what=f"{impl} {rng.tag}")
        got = topk_kl_loss(s, ids_t, lp_t, teacher_tail=tail, normalization=normalization)
        want = topk_kl_loss(s.contiguous(), ids, lp, teacher_tail=tail, normalization=normalization)
        torch.testing.assert_close(got, want)


def test_renormalized_reads_only_k(impl, rng):
    """renormalized (without CE) depends on the K columns only: NaN or +inf logits elsewhere
    change nothing and get zero gradient, as in the reference."""
    ids, lp, _, _ = teacher(rng, (4,), 50, 6)
    s = rng.logits(4, 50)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s_bad = s.clone()
    s_bad[0][outside[0]] = math.nan
    s_bad[2][outside[2]] = math.inf
    kw = dict(normalization="renormalized", reduction="none")
    loss, grad = run_loss(lambda x: topk_kl_loss(x, ids, lp, **kw), s_bad, torch.ones(4))
    ref, ref_grad = run_loss(lambda x: topk_kl_loss(x, ids, lp, **kw), s, torch.ones(4))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.count_nonzero(grad[outside]) == 0
