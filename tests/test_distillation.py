"""distillation_loss / DistillationLoss / torch.ops.fastdistill.distillation: the float64 oracle,
and equality with kl_div_loss + cross_entropy + mse_loss computed separately (ARCHITECTURE.md, "Numerics rules")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _oracle import (
    TORCH_BACKEND_HIDES_TEACHER_NAN,
    TORCH_BACKEND_UNSELECTED_NAN_GRAD,
    Rng,
    assert_garbage_ignored,
    check,
    fp16_impl,
    impl_params,
    norm,
    oracle,
    run_loss,
)

from fastdistill import reference
from fastdistill.losses import (
    DistillationLoss,
    all_finite,
    cross_entropy,
    distillation_loss,
    kl_div_loss,
    mse_loss,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEMPERATURES = (0.05, 1.0, 4.0)
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 1271)]
# (alpha_kl, alpha_ce, alpha_mse); the MSE weight is small because it is a sum over V.
ALPHAS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.01), (0.5, 0.5, 0.0), (0.7, 0.2, 1e-3)]


def _fns(t, labels, mask, temperature, alphas, ignore_index=-100):
    a_kl, a_ce, a_mse = alphas
    ref_mask = None if mask is None else mask != 0
    kw = dict(
        labels=labels,
        temperature=temperature,
        alpha_kl=a_kl,
        alpha_ce=a_ce,
        alpha_mse=a_mse,
        ignore_index=ignore_index,
    )

    def fn(s):
        return distillation_loss(s, t, mask=mask, **kw)[0]

    def ref(s64):
        return reference.distillation_loss(s64, t.double(), mask=ref_mask, **kw)[0]

    return fn, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, dtype, temperature, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the torch backend")
    lead, V = shape[:-1], shape[-1]
    s = rng.logits(*shape, dtype=dtype)
    t = rng.logits(*shape, dtype=dtype)
    labels = rng.labels(lead, V)
    mask = rng.mask(lead)
    for i, alphas in enumerate(ALPHAS):
        m = mask if i % 2 else mask.long() if i == 4 else None
        fn, ref = _fns(t, labels, m, temperature, alphas)
        check(
            fn,
            ref,
            s,
            torch.tensor(0.37),
            loss_atol=1e-5 * math.prod(lead) if V == 1 else 1e-10,
            what=f"distillation {impl} {dtype} T={temperature} {shape} alphas={alphas} "
            f"mask={m is not None} {rng.tag}",
        )
        # The components, against the reference's.
        _, kl, ce, mse = distillation_loss(
            s,
            t,
            labels=labels,
            mask=m,
            temperature=temperature,
            alpha_kl=alphas[0],
            alpha_ce=alphas[1],
            alpha_mse=alphas[2],
        )
        ref_parts = reference.distillation_loss(
            s.double(),
            t.double(),
            labels=labels,
            mask=None if m is None else m != 0,
            temperature=temperature,
            alpha_kl=alphas[0],
            alpha_ce=alphas[1],
            alpha_mse=alphas[2],
        )
        for name, got, want in zip(("kl", "ce", "mse"), (kl, ce, mse), ref_parts[1:], strict=True):
            atol = 1e-5 * math.prod(lead) if V == 1 else 1e-10
            assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + atol, (
                f"component {name}: {got.item()} vs {want.item()} {impl} {alphas} {rng.tag}"
            )


_LARGE = [
    # (rows, V, temperature, alphas)
    (41, 32000, 2.0, (0.5, 0.3, 1e-3)),
    (1, 128256, 1.0, (1.0, 0.5, 0.0)),
    (4096, 24, 4.0, (0.7, 0.2, 0.1)),
]


@pytest.fixture(
    scope="module",
    params=[(c, d) for c in _LARGE for d in (torch.float32, torch.bfloat16)],
    ids=lambda p: f"{p[0][0]}x{p[0][1]}-{str(p[1]).removeprefix('torch.')}",
)
def large_case(request):
    """Inputs and float64 oracle of one large case, shared by every impl (module scope)."""
    (rows, V, temperature, alphas), dtype = request.param
    rng = Rng()
    s = rng.logits(rows, V, dtype=dtype)
    t = rng.logits(rows, V, dtype=dtype)
    labels = rng.labels((rows,), V)
    mask = rng.mask((rows,))
    fn, ref = _fns(t, labels, mask, temperature, alphas)
    g = torch.tensor(0.37)
    return fn, s, g, oracle(ref, s, g), f"{dtype} {rows}x{V} T={temperature} {alphas} {rng.tag}"


@pytest.mark.slow
def test_large_matches_oracle(impl, large_case):
    fn, s, g, expected, what = large_case
    check(fn, None, s, g, expected=expected, what=f"distillation {impl} {what}")


# ---- equal to the three losses computed separately ---------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize(
    "alphas", [a for a in itertools.product((0.0, 0.7), (0.0, 0.4), (0.0, 0.01)) if any(a)]
)
def test_equals_weighted_sum_of_parts(rng, alphas, masked, temperature):
    a_kl, a_ce, a_mse = alphas
    s, t = rng.logits(3, 5, 113), rng.logits(3, 5, 113)
    mask = rng.mask((3, 5)) if masked else None
    label_options = [rng.labels((3, 5), 113)] + ([None] if a_ce == 0 else [])
    for labels in label_options:
        x = s.clone().requires_grad_(True)
        total, kl, ce, mse = distillation_loss(
            x,
            t,
            labels=labels,
            mask=mask,
            temperature=temperature,
            alpha_kl=a_kl,
            alpha_ce=a_ce,
            alpha_mse=a_mse,
        )
        (total * 0.37).backward()
        y = s.clone().requires_grad_(True)
        zero = torch.zeros(())
        p_kl = kl_div_loss(y, t, temperature=temperature, mask=mask) if a_kl else zero
        p_ce = cross_entropy(y, labels) if a_ce else zero
        p_mse = mse_loss(y, t, mask=mask) if a_mse else zero
        parts = a_kl * p_kl + a_ce * p_ce + a_mse * p_mse
        (parts * 0.37).backward()
        what = f"alphas={alphas} mask={masked} T={temperature} labels={labels is not None}"
        assert abs(total.item() - parts.item()) <= 1e-5 * abs(parts.item()), f"{what} {rng.tag}"
        assert norm(x.grad - y.grad) <= 1e-5 * norm(y.grad), f"{what} {rng.tag}"
        for name, comp, part in (("kl", kl, p_kl), ("ce", ce, p_ce), ("mse", mse, p_mse)):
            assert comp.dtype == torch.float32 and comp.shape == ()
            assert not comp.requires_grad and comp.grad_fn is None, f"{name} not detached"
            assert abs(comp.item() - part.item()) <= 1e-5 * abs(part.item()), (
                f"{name}: {comp.item()} vs {part.item()} {what} {rng.tag}"
            )
            if part is zero:
                assert comp.item() == 0.0, f"{name} must read 0 when its alpha is 0"


def test_ce_uses_labels_not_mask(rng):
    """The mask selects KL/MSE rows only; CE rows are those with a label (as in the reference)."""
    s, t = rng.logits(6, 40), rng.logits(6, 40)
    labels = rng.labels((6,), 40, ignore_frac=0.0)
    mask = torch.zeros(6, dtype=torch.bool)
    fn, ref = _fns(t, labels, mask, 2.0, (1.0, 1.0, 0.1))
    check(fn, ref, s, torch.tensor(0.37), what=f"all rows masked, CE on {rng.tag}")
    _, kl, ce, mse = distillation_loss(s, t, labels=labels, mask=mask, alpha_ce=1.0, alpha_mse=0.1)
    assert kl.item() == 0 and mse.item() == 0 and ce.item() > 0


def test_all_masked_and_all_ignored_is_exactly_zero(native_isa, rng):
    s = rng.logits(2, 5, 33).requires_grad_(True)
    t = rng.logits(2, 5, 33)
    for mask in (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.int64)):
        s.grad = None
        out = distillation_loss(
            s,
            t,
            labels=torch.full((2, 5), -100),
            mask=mask,
            alpha_kl=1.0,
            alpha_ce=0.5,
            alpha_mse=0.1,
        )
        for x in out:
            assert torch.equal(x, torch.zeros(())), f"{out} {rng.tag}"
        (out[0] * 0.37).backward()
        assert torch.equal(s.grad, torch.zeros_like(s)), rng.tag


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_neg_inf_logits(native_isa, rng, dtype):
    """Masked vocabulary: finite with alpha_mse = 0 (MSE not computed), non-finite with it on."""
    s, t = rng.logits(9, 129, dtype=dtype), rng.logits(9, 129, dtype=dtype)
    labels = rng.labels((9,), 129)
    t[torch.rand(9, 129, generator=rng.gen) < 0.2] = float("-inf")
    both = torch.rand(9, 129, generator=rng.gen) < 0.2
    both[torch.arange(9), labels.clamp(min=0)] = False
    s[both] = t[both] = float("-inf")
    for temperature in TEMPERATURES:
        fn, ref = _fns(t, labels, None, temperature, (0.6, 0.4, 0.0))
        check(fn, ref, s, torch.tensor(0.37), what=f"-inf {dtype} T={temperature} {rng.tag}")
    out = distillation_loss(s, t, labels=labels, alpha_mse=0.1)
    assert not bool(all_finite(out[0])) and not bool(all_finite(out[3])), rng.tag


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_huge_logits_and_student_equals_teacher(native_isa, rng, dtype):
    s = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    t = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    labels, mask = rng.labels((13,), 301), rng.mask((13,))
    for temperature in TEMPERATURES:
        fn, ref = _fns(t, labels, mask, temperature, (0.5, 0.5, 1e-6))
        check(fn, ref, s, torch.tensor(0.37), what=f"huge {dtype} T={temperature} {rng.tag}")
        fn, _ = _fns(s.clone(), None, None, temperature, (1.0, 0.0, 0.5))
        loss, grad = run_loss(fn, s, torch.tensor(0.37))
        assert loss.abs() <= 1e-6 and grad.abs().max() <= 1e-6, f"s == t: {loss} {rng.tag}"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_row_maximum_far_past_the_first_block(native_isa, rng, temperature):
    """The CE exponentials (at temperature 1) overflow first when the row maximum lies far past
    the first block of columns, which set the kernel's shift (see test_kl_div.py)."""
    s = rng.logits(6, 2500)
    t = rng.logits(6, 2500)
    s[:3, 1500] += 60.0  # 2^(60 log2 e) = 2^87 > 2^64 for CE, below it for KL at T = 2
    s[3:, 2000] += 30.0
    t[:, 1500] += 45.0
    labels = rng.labels((6,), 2500)
    labels[0] = 1500
    fn, ref = _fns(t, labels, None, temperature, (0.7, 0.2, 1e-3))
    check(fn, ref, s, torch.tensor(0.37), what=f"late peak T={temperature} {rng.tag}")


@pytest.mark.parametrize("alphas", [(1.0, 0.0, 0.0), (0.5, 0.5, 1e-3)])
def test_student_close_to_teacher(native_isa, rng, alphas):
    t = rng.logits(41, 1271)
    s = t + rng.randn(41, 1271, scale=1e-3)
    labels = rng.labels((41,), 1271)
    for temperature in (1.0, 4.0):
        fn, ref = _fns(t, labels, None, temperature, alphas)
        check(
            fn,
            ref,
            s,
            torch.tensor(0.37),
            loss_atol=0,
            grad_atol=0,
            what=f"student ~ teacher {native_isa} T={temperature} {alphas} {rng.tag}",
        )


def test_non_contiguous(native_isa, rng):
    leaf = rng.logits(3, 10, 45)

    def view(x):
        return x[:, ::2, :37]

    t = view(rng.logits(3, 10, 45))
    labels = rng.labels((3, 10), 37)[:, ::2]
    mask = rng.mask((3, 10))[:, ::2]
    fn, ref = _fns(t, labels, mask, 2.0, (0.6, 0.3, 0.01))
    check(fn, ref, leaf, torch.tensor(0.37), view=view, what=f"strided {rng.tag}")


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_UNSELECTED_NAN_GRAD))
def test_garbage_in_unselected_rows_is_ignored(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.logits(6, 30), rng.logits(6, 30)
    mask = torch.tensor([True, False, True, False, True, False])
    labels = torch.tensor([3, -100, -100, -100, 7, 1])  # row 5: CE only; rows 1, 3: nothing
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = float("nan")
    t_bad[3] = float("inf")
    t_bad[5] = float("nan")  # the teacher is not read for a CE-only row
    alphas = (0.6, 0.3, 0.01)
    assert_garbage_ignored(
        _fns(t_bad, labels, mask, 2.0, alphas)[0],
        s_bad,
        _fns(t, labels, mask, 2.0, alphas)[0],
        s,
        torch.tensor([False, True, False, True, False, False]),
        rng.tag,
    )


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_HIDES_TEACHER_NAN))
def test_nan_propagates(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.logits(4, 30), rng.logits(4, 30)
    labels = torch.tensor([1, 2, -100, 4])
    mask = torch.tensor([True, True, False, True])
    s[2] = float("nan")  # unselected and unlabelled: ignored
    total, kl, ce, mse = distillation_loss(
        s, t, labels=labels, mask=mask, alpha_ce=0.5, alpha_mse=0.1
    )
    assert bool(all_finite(total, kl, ce, mse)), rng.tag
    t[1, 3] = float("nan")
    out = distillation_loss(s, t, labels=labels, mask=mask, alpha_ce=0.5, alpha_mse=0.1)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and not bool(all_finite(out[0])), rng.tag


@pytest.mark.parametrize("impl_name", impl_params())
def test_nan_teacher_leaves_ce_finite(switch_impl, rng, impl_name):
    """CE reads only the student: a NaN in the teacher makes kl (and the total) NaN, not ce."""
    switch_impl(impl_name)
    s, t = rng.logits(3, 11), rng.logits(3, 11)
    t[1, 4] = float("nan")
    labels = torch.tensor([1, 2, 3])
    total, kl, ce, mse = distillation_loss(s, t, labels=labels, alpha_ce=0.5, alpha_mse=0.1)
    ref = reference.cross_entropy(s.double(), labels)
    assert torch.isnan(total) and torch.isnan(kl) and torch.isnan(mse), rng.tag
    assert abs(float(ce) - float(ref)) <= 1e-5 * abs(float(ref)), (float(ce), float(ref), rng.tag)


def test_teacher_no_grad_no_grad_mode_second_backward(rng):
    s = rng.logits(5, 40).requires_grad_(True)
    t = rng.logits(5, 40).requires_grad_(True)
    labels = rng.labels((5,), 40)
    total = distillation_loss(s, t, labels=labels, alpha_ce=0.5)[0] * 0.37
    total.backward(retain_graph=True)
    assert t.grad is None and s.grad is not None
    with pytest.raises(RuntimeError):
        total.backward()
    with torch.no_grad():
        a = distillation_loss(s, t, labels=labels, alpha_ce=0.5)
    b = distillation_loss(s.detach(), t.detach(), labels=labels, alpha_ce=0.5)
    assert not a[0].requires_grad and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_module_equals_functional(rng):
    s, t = rng.logits(3, 5, 50), rng.logits(3, 5, 50)
    labels, mask = rng.labels((3, 5), 50), rng.mask((3, 5))
    module = DistillationLoss(temperature=3.0, alpha_kl=0.6, alpha_ce=0.3, alpha_mse=0.01)
    a = module(s, t, labels, mask)
    b = distillation_loss(
        s, t, labels=labels, mask=mask, temperature=3.0, alpha_kl=0.6, alpha_ce=0.3, alpha_mse=0.01
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ga = run_loss(lambda x: module(x, t, labels, mask)[0], s, torch.tensor(0.37))
    gb = run_loss(_fns(t, labels, mask, 3.0, (0.6, 0.3, 0.01))[0], s, torch.tensor(0.37))
    assert torch.equal(ga[1], gb[1])


# ---- bad input ---------------------------------------------------------------------------------


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    lab = torch.tensor([1, 2, -100, 9])

    def d(**kw):
        return lambda: distillation_loss(s, t, **kw)

    return [
        ("shape", lambda: distillation_loss(s, t[:, :9]), ValueError, "teacher_logits"),
        ("dtype", lambda: distillation_loss(s, t.half()), TypeError, "teacher_logits"),
        ("float64", lambda: distillation_loss(s.double(), t.double()), TypeError, "student_logits"),
        ("T=0", d(temperature=0.0), ValueError, "temperature"),
        ("T=nan", d(temperature=math.nan), ValueError, "temperature"),
        ("T=bool", d(temperature=False), TypeError, "temperature"),
        ("alpha-negative", d(alpha_kl=-0.1), ValueError, "alpha_kl"),
        ("alpha-nan", d(alpha_mse=math.nan), ValueError, "alpha_mse"),
        ("alpha-inf", d(alpha_kl=math.inf), ValueError, "alpha_kl"),
        ("alpha-bool", d(alpha_ce=True, labels=lab), TypeError, "alpha_ce"),
        ("alpha-str", d(alpha_kl="1"), TypeError, "alpha_kl"),
        ("all-alphas-zero", d(alpha_kl=0.0), ValueError, "alpha"),
        ("ce-without-labels", d(alpha_ce=0.5), ValueError, "labels"),
        ("labels-float", d(labels=lab.float(), alpha_ce=0.5), TypeError, "labels"),
        ("labels-shape", d(labels=lab[:3], alpha_ce=0.5), ValueError, "labels"),
        ("labels-range", d(labels=torch.tensor([1, 2, 3, 10]), alpha_ce=0.5), ValueError, "labels"),
        ("mask-shape", d(mask=torch.ones(4, 10, dtype=torch.bool)), ValueError, "mask"),
        ("mask-float", d(mask=torch.ones(4)), TypeError, "mask"),
        ("ignore-index", d(ignore_index=-100.0), TypeError, "ignore_index"),
        ("module-alphas-zero", lambda: DistillationLoss(alpha_kl=0.0), ValueError, "alpha"),
        ("module-alpha", lambda: DistillationLoss(alpha_ce=-1.0), ValueError, "alpha_ce"),
        ("module-T", lambda: DistillationLoss(temperature=-2.0), ValueError, "temperature"),
        ("module-ignore", lambda: DistillationLoss(ignore_index=1.5), TypeError, "ignore_index"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ---- registration ------------------------------------------------------------------------------


def test_opcheck(rng):
    s = rng.logits(3, 4, 17).requires_grad_(True)
    t = rng.logits(3, 4, 17)
    labels, mask = rng.labels((3, 4), 17), rng.mask((3, 4))
    b = rng.logits(6, 9, dtype=torch.bfloat16).requires_grad_(True)
    bt = rng.logits(6, 9, dtype=torch.bfloat16)
    for args in [
        (s, t, labels, mask, 2.0, 0.5, 0.3, 0.01, -100, True),
        (s, t, None, None, 1.0, 1.0, 0.0, 0.0, -100, True),
        (s.detach(), t, labels, None, 4.0, 0.0, 1.0, 0.1, -100, False),
        (b, bt, rng.labels((6,), 9), rng.mask((6,)), 0.5, 1.0, 1.0, 0.0, -100, True),
    ]:
        torch.library.opcheck(torch.ops.fastdistill.distillation.default, args)


def test_compile_matches_eager(rng):
    def f(s, t, labels, mask):
        total, kl, ce, mse = distillation_loss(
            s,
            t,
            labels=labels,
            mask=mask,
            temperature=2.0,
            alpha_kl=0.5,
            alpha_ce=0.5,
            alpha_mse=0.01,
        )
        return total * 0.37, kl, ce, mse

    s, t = rng.logits(3, 6, 41), rng.logits(3, 6, 41)
    labels, mask = rng.labels((3, 6), 41), rng.mask((3, 6))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    oc, oe = compiled(x, t, labels, mask), f(y, t, labels, mask)
    oc[0].backward()
    oe[0].backward()
    for a, b in zip(oc, oe, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)
    torch._dynamo.reset()
