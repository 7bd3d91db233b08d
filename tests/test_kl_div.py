"""kl_div_loss / KLDivLoss / torch.ops.fastdistill.kl_div against the float64 oracle (ARCHITECTURE.md, "Numerics rules")."""

from __future__ import annotations

import math

import pytest
import torch
from _oracle import (
    IMPLS,
    ISAS,
    TORCH_BACKEND_UNSELECTED_NAN_GRAD,
    Rng,
    assert_garbage_ignored,
    check,
    fp16_impl,
    grad_bound,
    impl_params,
    norm,
    oracle,
    run_loss,
    use_impl,
)

from fastdistill import _native, reference
from fastdistill.losses import KLDivLoss, all_finite, kl_div_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none")
TEMPERATURES = (0.05, 1.0, 4.0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Odd shapes (*lead, V): 2-D and 3-D, V = 1, 7, 1271.
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 1271)]


def _fns(t, mask, temperature, reduction):
    """(fastdistill loss, float64 reference) of the student for fixed teacher/mask/options."""

    def fn(s):
        return kl_div_loss(s, t, temperature=temperature, mask=mask, reduction=reduction)

    ref_mask = None if mask is None else mask != 0  # the reference takes bool masks

    def ref(s64):
        return reference.kl_div_loss(
            s64, t.double(), temperature=temperature, mask=ref_mask, reduction=reduction
        )

    return fn, ref


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


# ---- the regular parametrisation: every implementation, dtype, temperature, odd shape ----------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, dtype, temperature, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the torch backend")
    *lead, V = shape
    lead = tuple(lead)
    s = rng.logits(*shape, dtype=dtype)
    t = rng.logits(*shape, dtype=dtype)
    mask = rng.mask(lead)
    # With V = 1 the KL is exactly 0; the kernel's value is a difference of terms of size
    # |logit| * T per row, so allow their fp32 rounding.
    loss_atol = 1e-5 * math.prod(lead) if V == 1 else 1e-10
    for m, reduction in [(None, "batchmean"), *((mask, r) for r in REDUCTIONS)]:
        fn, ref = _fns(t, m, temperature, reduction)
        g = rng.grad_output(_loss_shape(lead, reduction))
        what = (
            f"kl_div {impl} {dtype} T={temperature} shape={shape} {reduction} "
            f"mask={m is not None} {rng.tag}"
        )
        check(fn, ref, s, g, what=what, loss_atol=loss_atol)


_LARGE = [
    # (rows, V, temperature, reduction, masked)
    (1, 32000, 1.0, "batchmean", False),
    (41, 32000, 4.0, "batchmean", True),
    (1, 128256, 0.05, "sum", False),
    (41, 128256, 1.0, "none", True),
    (4096, 24, 4.0, "mean", True),
]


@pytest.fixture(
    scope="module",
    # bf16 skips the largest case (41 x 128256) to save time; it runs 1 x 128256.
    params=[
        (c, d)
        for c in _LARGE
        for d in (torch.float32, torch.bfloat16)
        if d == torch.float32 or c[0] * c[1] < 10**6
    ],
    ids=lambda p: f"{p[0][0]}x{p[0][1]}-{str(p[1]).removeprefix('torch.')}",
)
def large_case(request):
    """Inputs and float64 oracle of one large case, built once and shared by every impl (the
    module scope makes pytest run the impls of one case back to back)."""
    (rows, V, temperature, reduction, masked), dtype = request.param
    rng = Rng()
    s = rng.logits(rows, V, dtype=dtype)
    t = rng.logits(rows, V, dtype=dtype)
    mask = rng.mask((rows,)) if masked else None
    fn, ref = _fns(t, mask, temperature, reduction)
    g = rng.grad_output(_loss_shape((rows,), reduction))
    what = f"{dtype} {rows}x{V} T={temperature} {reduction} {rng.tag}"
    return fn, s, g, oracle(ref, s, g), what


@pytest.mark.slow
def test_large_matches_oracle(impl, large_case):
    """Real vocabulary sizes (32000, 128256) and many rows (4096)."""
    fn, s, g, expected, what = large_case
    if impl == "torch" and s.numel() > 10**6:
        pytest.skip(
            "the torch backend's fp32 softmax over 41 x 128256 lands at 0.3-1.3x the 1e-5 "
            "gradient budget depending on the draw (test_student_close_to_teacher records its "
            "fp32-formula bug deterministically)"
        )
    check(fn, None, s, g, expected=expected, what=f"kl_div {impl} {what}")


# ---- special inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_is_exactly_zero(native_isa, rng, reduction):
    s = rng.logits(2, 5, 33).requires_grad_(True)
    t = rng.logits(2, 5, 33)
    for mask in (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.int64)):
        s.grad = None
        loss = kl_div_loss(s, t, temperature=2.0, mask=mask, reduction=reduction)
        expected_shape = (2, 5) if reduction == "none" else ()
        assert loss.shape == expected_shape and loss.dtype == torch.float32
        assert torch.equal(loss, torch.zeros(expected_shape)), f"{loss} {rng.tag}"
        loss.backward(torch.full(expected_shape, 0.37))
        assert torch.equal(s.grad, torch.zeros_like(s)), f"gradient not exactly 0 {rng.tag}"


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_UNSELECTED_NAN_GRAD))
def test_garbage_in_unselected_rows_is_ignored(switch_impl, rng, impl_name):
    """Selection happens in the kernel: NaN/inf in masked-out rows never reach the loss."""
    switch_impl(impl_name)
    s = rng.logits(6, 50)
    t = rng.logits(6, 50)
    mask = torch.tensor([True, False, True, False, True, False])
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = float("nan")
    t_bad[3] = float("inf")
    s_bad[5] = float("-inf")
    t_bad[5] = float("-inf")
    assert_garbage_ignored(
        _fns(t_bad, mask, 2.0, "batchmean")[0],
        s_bad,
        _fns(t, mask, 2.0, "batchmean")[0],
        s,
        ~mask,
        rng.tag,
    )


def test_int_attention_mask_equals_bool_mask(rng):
    s, t = rng.logits(3, 9, 40), rng.logits(3, 9, 40)
    bool_mask = rng.mask((3, 9))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 9), reduction))
        a = run_loss(_fns(t, bool_mask, 1.5, reduction)[0], s, g)
        b = run_loss(_fns(t, bool_mask.long(), 1.5, reduction)[0], s, g)
        c = run_loss(_fns(t, bool_mask.to(torch.int32), 1.5, reduction)[0], s, g)
        for x in (b, c):
            assert torch.equal(a[0], x[0]) and torch.equal(a[1], x[1]), f"{reduction} {rng.tag}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_neg_inf_logits(native_isa, rng, dtype, temperature):
    """Masked vocabulary: teacher -inf where the student is finite, and both -inf together."""
    s = rng.logits(9, 129, dtype=dtype)
    t = rng.logits(9, 129, dtype=dtype)
    vocab_pad = torch.rand(9, 129, generator=rng.gen) < 0.2
    t[vocab_pad] = float("-inf")  # teacher gives these tokens no mass; the student does
    both = torch.rand(9, 129, generator=rng.gen) < 0.2
    both[:, 0] = False  # keep one finite logit per row
    s[both] = float("-inf")
    t[both] = float("-inf")
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(t, None, temperature, reduction)
        g = rng.grad_output(_loss_shape((9,), reduction))
        check(fn, ref, s, g, what=f"-inf logits {dtype} T={temperature} {reduction} {rng.tag}")
        _, grad = run_loss(fn, s, g)
        assert torch.isfinite(grad).all(), rng.tag
        assert torch.equal(grad[both], torch.zeros_like(grad[both])), rng.tag


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_huge_logits(native_isa, rng, dtype, temperature):
    """|logits| up to 1e4: no overflow in the softmax at any temperature."""
    s = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    t = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    mask = rng.mask((13,))
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(t, mask, temperature, reduction)
        g = rng.grad_output(_loss_shape((13,), reduction))
        check(fn, ref, s, g, what=f"|logits|<=1e4 {dtype} T={temperature} {reduction} {rng.tag}")


# The CPU kernel shifts its exponentials by the maxima of each row's first block (1024 columns on
# AVX-512, 256 elsewhere), not by the row maxima (csrc/cpu/fused_logits.cpp), and runs its sums
# again with the true maxima when a later column lies so far above that an exponential could pass
# 2^64. V = 2500 spans several blocks.
@pytest.mark.parametrize(
    "gap,temperature",
    [(20.0, 2.0), (80.0, 1.0), (300.0, 0.5)],
    ids=["below-limit", "just-above-limit", "far-above-limit"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_row_maximum_far_past_the_first_block(native_isa, rng, gap, temperature, dtype):
    s = rng.logits(6, 2500, dtype=dtype)
    t = rng.logits(6, 2500, dtype=dtype)
    # Peaks after the first block: at the same column in rows 0-2, at different columns in 3-5.
    s[:, 1500] += gap
    t[:3, 1500] += gap
    t[3:, 2400] += gap
    fn, ref = _fns(t, None, temperature, "none")
    g = rng.grad_output((6,))
    check(fn, ref, s, g, what=f"late peak +{gap} {dtype} T={temperature} {rng.tag}")


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_first_block_all_neg_inf(native_isa, rng, temperature):
    """No finite logit in the first block (<= 1024 columns): the kernel falls back to the whole-row
    maxima."""
    s = rng.logits(5, 2100)
    t = rng.logits(5, 2100)
    s[:, :1100] = float("-inf")
    t[:, :1100] = float("-inf")
    fn, ref = _fns(t, None, temperature, "none")
    g = rng.grad_output((5,))
    check(fn, ref, s, g, what=f"-inf first block T={temperature} {rng.tag}")
    _, grad = run_loss(fn, s, g)
    assert torch.equal(grad[:, :1100], torch.zeros_like(grad[:, :1100])), rng.tag


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_student_equals_teacher(native_isa, rng, dtype):
    for scale in (3.0, 1e4):
        x = rng.randn(7, 500, scale=scale, dtype=dtype)
        for temperature in TEMPERATURES:
            for reduction in REDUCTIONS:
                fn, _ = _fns(x.clone(), None, temperature, reduction)
                loss, grad = run_loss(fn, x, rng.grad_output(_loss_shape((7,), reduction)))
                assert loss.abs().max() <= 1e-6, f"loss {loss} T={temperature} {rng.tag}"
                assert grad.abs().max() <= 1e-6, f"grad T={temperature} {reduction} {rng.tag}"


@pytest.mark.slow
@pytest.mark.parametrize("scale,temperature", [(0.5, 4.0), (8.0, 1.0)])
def test_large_vocab_single_row(switch_impl, rng, scale, temperature):
    """One row of 128256: nearly flat (std 0.5 at T=4, where a T^2-scaled error in the
    log-sum-exp shows) and very peaked (std 8, most exponentials far below the running sum)."""
    s = rng.logits(1, 128256, scale=scale)
    t = rng.logits(1, 128256, scale=scale)
    fn, ref = _fns(t, None, temperature, "batchmean")
    g = torch.tensor(0.37)
    expected = oracle(ref, s, g)
    # The torch backend's fp32 formula misses 1e-5 here too (see test_student_close_to_teacher),
    # but not on every draw.
    for impl in IMPLS:
        if impl.startswith("native:"):
            switch_impl(impl)
            check(
                fn,
                None,
                s,
                g,
                expected=expected,
                loss_atol=0,
                what=f"1x128256 std {scale} T={temperature} {impl} {rng.tag}",
            )


TORCH_BACKEND_CANCELLATION = pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "library numerics bug: FASTDISTILL_BACKEND=torch evaluates reference.kl_div_loss in fp32, "
        "pt * (log_pt - log_ps) with log-softmaxes rounded separately; with the student close to the "
        "teacher the loss is off by 1e-2..1 relative (budget 1e-5, ARCHITECTURE.md)"
    ),
)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_CANCELLATION))
def test_student_close_to_teacher(switch_impl, rng, impl_name, temperature):
    """s = t + 1e-3 noise, the regime distillation converges to: the loss is tiny and must not
    come out as a difference of two large log-sum-exps."""
    switch_impl(impl_name)
    t = rng.logits(41, 1271)
    s = t + rng.randn(41, 1271, scale=1e-3)
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(t, None, temperature, reduction)
        check(
            fn,
            ref,
            s,
            rng.grad_output(_loss_shape((41,), reduction)),
            loss_atol=0,
            grad_atol=0,
            what=f"student ~ teacher {impl_name} T={temperature} {reduction} {rng.tag}",
        )


_VIEWS = {
    # name: (leaf shape, view of the leaf with logits shape (..., V), leading shape)
    "strided-rows": ((3, 10, 37), lambda x: x[:, ::2], (3, 5)),
    "sliced-vocab": ((4, 6, 45), lambda x: x[..., :37], (4, 6)),
    "transposed": ((37, 11), lambda x: x.t(), (11,)),
    "sliced-vocab-2d": ((11, 64), lambda x: x[3:, 5:42], (8,)),
}


@pytest.mark.parametrize("name", list(_VIEWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous(native_isa, rng, name, dtype):
    shape, view, lead = _VIEWS[name]
    s_leaf = rng.logits(*shape, dtype=dtype)
    t = view(rng.logits(*shape, dtype=dtype))
    assert not view(s_leaf).is_contiguous() and not t.is_contiguous()
    mask = rng.mask(lead)
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(t, mask, 2.0, reduction)
        g = rng.grad_output(_loss_shape(lead, reduction))
        _, grad = run_loss(fn, s_leaf, g, view)
        check(fn, ref, s_leaf, g, view=view, what=f"{name} {dtype} {reduction} {rng.tag}")
        # Gradient only where the view reads the leaf.
        untouched = torch.ones(shape, dtype=torch.bool)
        view(untouched).fill_(False)
        assert torch.equal(grad[untouched], torch.zeros_like(grad[untouched])), rng.tag


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "impl_name,bad",
    [
        pytest.param(
            i,
            b,
            id=f"{i.replace(':', '-')}-{b}",
            marks=[],
        )
        for i in IMPLS
        for b in ("student-nan", "teacher-nan", "student-inf", "teacher-inf")
    ],
)
def test_nan_propagates(switch_impl, rng, impl_name, bad, reduction):
    switch_impl(impl_name)
    s = rng.logits(2, 4, 30)
    t = rng.logits(2, 4, 30)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    who, what = bad.split("-")
    (s if who == "student" else t)[0, 1, 7] = float(what)
    loss = kl_div_loss(s, t, temperature=2.0, mask=mask, reduction=reduction)
    if reduction == "none":
        assert torch.isnan(loss[0, 1]), f"{bad}: {loss} {rng.tag}"
        others = torch.ones(2, 4, dtype=torch.bool)
        others[0, 1] = False
        assert torch.isfinite(loss[others]).all(), f"{bad}: {loss} {rng.tag}"
    else:
        assert torch.isnan(loss), f"{bad}: NaN hidden, loss={loss} {rng.tag}"
    assert not bool(all_finite(loss)), rng.tag


def test_teacher_gets_no_gradient(rng):
    s = rng.logits(5, 40).requires_grad_(True)
    t = rng.logits(5, 40).requires_grad_(True)
    loss = kl_div_loss(s, t, temperature=2.0)
    assert loss.requires_grad
    (loss * 0.37).backward()
    assert t.grad is None
    assert s.grad is not None


def test_frozen_student_teacher_requires_grad(rng):
    """The loss requires grad through the teacher only: backward must work and give it none."""
    s = rng.logits(5, 40)
    t = rng.logits(5, 40).requires_grad_(True)
    w = torch.ones((), requires_grad=True)
    loss = kl_div_loss(s, t, temperature=2.0) + 0.5 * w  # another term that needs a backward
    loss.backward()
    assert t.grad is None and w.grad == 0.5


def test_without_grad(rng):
    s = rng.logits(5, 40)
    t = rng.logits(5, 40)
    expected = reference.kl_div_loss(s.double(), t.double(), temperature=2.0)
    plain = kl_div_loss(s, t, temperature=2.0)
    assert not plain.requires_grad
    s.requires_grad_(True)
    with torch.no_grad():
        in_no_grad = kl_div_loss(s, t, temperature=2.0)
    assert not in_no_grad.requires_grad
    for loss in (plain, in_no_grad):
        assert loss.dtype == torch.float32
        assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item()), rng.tag


def test_second_backward_raises(rng):
    s = rng.logits(5, 40).requires_grad_(True)
    t = rng.logits(5, 40)
    loss = kl_div_loss(s, t, temperature=2.0) * 0.37
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    with pytest.raises(RuntimeError):
        loss.backward()
    # Whatever the second call did before raising, it must not have corrupted the gradient.
    assert torch.equal(s.grad, first)


def test_gradients_accumulate(rng):
    """Two forwards, two backwards (plain .backward(), the grad_output == 1 path)."""
    s = rng.logits(6, 70).requires_grad_(True)
    t1, t2 = rng.logits(6, 70), rng.logits(6, 70)
    kl_div_loss(s, t1, temperature=2.0).backward()
    kl_div_loss(s, t2, temperature=2.0).backward()
    x = s.detach().double().requires_grad_(True)
    (
        reference.kl_div_loss(x, t1.double(), temperature=2.0)
        + reference.kl_div_loss(x, t2.double(), temperature=2.0)
    ).backward()
    assert norm(s.grad.double() - x.grad) <= grad_bound(x.grad, torch.float32), rng.tag
    # The student used twice in one graph.
    s.grad = None
    (kl_div_loss(s, t1, temperature=2.0) + kl_div_loss(s, t2, temperature=2.0)).backward()
    assert norm(s.grad.double() - x.grad) <= grad_bound(x.grad, torch.float32), rng.tag


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    s = torch.zeros(0, 11, requires_grad=True)
    loss = kl_div_loss(s, torch.zeros(0, 11), reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 11)


def test_module_equals_functional(rng):
    s, t = rng.logits(3, 5, 50), rng.logits(3, 5, 50)
    mask = rng.mask((3, 5))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 5), reduction))
        module = KLDivLoss(temperature=3.0, reduction=reduction)
        a = run_loss(lambda x, m=module: m(x, t, mask), s, g)
        b = run_loss(_fns(t, mask, 3.0, reduction)[0], s, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), reduction
    assert "temperature=3.0" in repr(KLDivLoss(temperature=3.0))


# ---- bad input ---------------------------------------------------------------------------------


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    return [
        ("shape", lambda: kl_div_loss(s, torch.randn(4, 11)), ValueError, "teacher_logits"),
        ("lead-shape", lambda: kl_div_loss(s, torch.randn(2, 2, 10)), ValueError, "shape"),
        ("dtype-mismatch", lambda: kl_div_loss(s, t.bfloat16()), TypeError, "teacher_logits"),
        ("float64", lambda: kl_div_loss(s.double(), t.double()), TypeError, "student_logits"),
        ("int", lambda: kl_div_loss(s.long(), t.long()), TypeError, "student_logits"),
        ("not-tensor", lambda: kl_div_loss(s.tolist(), t), TypeError, "student_logits"),
        ("0-dim", lambda: kl_div_loss(s[0, 0], t[0, 0]), ValueError, "student_logits"),
        ("device", lambda: kl_div_loss(s, t.to("meta")), ValueError, "teacher_logits"),
        ("T=0", lambda: kl_div_loss(s, t, temperature=0), ValueError, "temperature"),
        ("T<0", lambda: kl_div_loss(s, t, temperature=-1.0), ValueError, "temperature"),
        ("T=nan", lambda: kl_div_loss(s, t, temperature=math.nan), ValueError, "temperature"),
        ("T=inf", lambda: kl_div_loss(s, t, temperature=math.inf), ValueError, "temperature"),
        ("T=bool", lambda: kl_div_loss(s, t, temperature=True), TypeError, "temperature"),
        ("T=str", lambda: kl_div_loss(s, t, temperature="2"), TypeError, "temperature"),
        (
            "T=tensor",
            lambda: kl_div_loss(s, t, temperature=torch.tensor(2.0)),
            TypeError,
            "temperature",
        ),
        (
            "mask-shape",
            lambda: kl_div_loss(s, t, mask=torch.ones(5, dtype=torch.bool)),
            ValueError,
            "mask",
        ),
        ("mask-float", lambda: kl_div_loss(s, t, mask=torch.ones(4)), TypeError, "mask"),
        (
            "mask-device",
            lambda: kl_div_loss(s, t, mask=torch.ones(4, dtype=torch.bool, device="meta")),
            ValueError,
            "mask",
        ),
        ("reduction", lambda: kl_div_loss(s, t, reduction="avg"), ValueError, "reduction"),
        ("reduction-case", lambda: kl_div_loss(s, t, reduction="Mean"), ValueError, "reduction"),
        ("module-T", lambda: KLDivLoss(temperature=0.0), ValueError, "temperature"),
        ("module-T-type", lambda: KLDivLoss(temperature=None), TypeError, "temperature"),
        (
            "module-reduction",
            lambda: KLDivLoss(reduction="elementwise_mean"),
            ValueError,
            "reduction",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ---- registration: opcheck and torch.compile ---------------------------------------------------


def _opcheck_samples():
    g = Rng()
    s = g.logits(3, 4, 17).requires_grad_(True)
    t = g.logits(3, 4, 17)
    mask = g.mask((3, 4))
    bs, bt = g.logits(5, 9, dtype=torch.bfloat16).requires_grad_(True), g.logits(5, 9).bfloat16()
    return [
        (s, t, None, 2.0, "batchmean", True),
        (s, t, mask, 0.5, "none", True),
        (s.detach(), t, mask, 1.0, "sum", False),
        (bs, bt, None, 4.0, "mean", True),
        (bs.detach(), bt, g.mask((5,)), 1.0, "none", False),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.fastdistill.kl_div.default, args)


def test_compile_inductor_matches_eager(rng):
    """The default backend (inductor), fullgraph, forward and backward, scalar and per-row."""

    def f(s, t, mask, w):
        a = kl_div_loss(s, t, temperature=2.0, mask=mask) * 0.37
        b = kl_div_loss(s, t, temperature=0.5, mask=mask, reduction="none")
        return a + (b * w).sum()

    s, t = rng.logits(3, 6, 41), rng.logits(3, 6, 41)
    mask, w = rng.mask((3, 6)), rng.randn(3, 6)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x = s.clone().requires_grad_(True)
    y = s.clone().requires_grad_(True)
    lc, le = compiled(x, t, mask, w), f(y, t, mask, w)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


# ---- bf16 gradient rounding: AVX512_BF16 instruction and integer rounding give the same bits ---


@pytest.fixture
def allow_avx512_bf16(monkeypatch):
    """The avx512 variant with the AVX512_BF16 rounding on (conftest restores the variant)."""
    if "avx512" not in ISAS:
        pytest.skip("no AVX-512 variant on this CPU")
    use_impl(monkeypatch, "native:avx512")
    core = _native.core()
    core.allow_avx512_bf16(True)
    if not core.avx512_bf16_in_use():
        pytest.skip("this CPU has no AVX512_BF16: only the integer rounding runs")
    yield core
    core.allow_avx512_bf16(True)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_bf16_gradient_rounding_instruction_equals_integer(allow_avx512_bf16, rng, reduction):
    """Round to nearest even either way; the instruction also flushes denormals to 0."""
    core = allow_avx512_bf16
    s = rng.logits(7, 1500, dtype=torch.bfloat16)
    t = rng.logits(7, 1500, dtype=torch.bfloat16)
    s[0, :40] = float("-inf")  # exact zeros in the gradient
    fn, _ = _fns(t, None, 2.0, reduction)
    g = rng.grad_output(_loss_shape((7,), reduction))
    _, grad_hw = run_loss(fn, s, g)
    core.allow_avx512_bf16(False)
    assert not core.avx512_bf16_in_use()
    _, grad_int = run_loss(fn, s, g)
    normal = grad_int.float().abs() >= torch.finfo(torch.float32).tiny
    assert torch.equal(grad_hw[normal], grad_int[normal]), rng.tag
    assert (grad_hw[~normal] == 0).all(), rng.tag
