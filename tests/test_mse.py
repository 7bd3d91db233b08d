"""mse_loss / MSELoss / torch.ops.fastdistill.mse against the float64 oracle (ARCHITECTURE.md, "Numerics rules")."""

from __future__ import annotations

import pytest
import torch
from _oracle import (
    TORCH_BACKEND_UNSELECTED_NAN_GRAD,
    assert_garbage_ignored,
    check,
    fp16_impl,
    impl_params,
    run_loss,
)

from fastdistill import reference
from fastdistill.losses import MSELoss, all_finite, mse_loss

REDUCTIONS = ("batchmean", "sum", "mean", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 1271)]


def _fns(t, mask, reduction):
    ref_mask = None if mask is None else mask != 0

    def fn(s):
        return mse_loss(s, t, mask=mask, reduction=reduction)

    def ref(s64):
        return reference.mse_loss(s64, t.double(), mask=ref_mask, reduction=reduction)

    return fn, ref


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, dtype, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the torch backend")
    lead = shape[:-1]
    s = rng.logits(*shape, dtype=dtype)
    t = rng.logits(*shape, dtype=dtype)
    mask = rng.mask(lead)
    for m, reduction in [(None, "batchmean"), (None, "mean"), *((mask, r) for r in REDUCTIONS)]:
        fn, ref = _fns(t, m, reduction)
        g = rng.grad_output(_loss_shape(lead, reduction))
        check(
            fn,
            ref,
            s,
            g,
            what=f"mse {impl} {dtype} {shape} {reduction} mask={m is not None} {rng.tag}",
        )


@pytest.mark.slow
@pytest.mark.parametrize("rows,V", [(1, 128256), (4096, 24)])
def test_large_matches_oracle(native_isa, rng, rows, V):
    s, t = rng.logits(rows, V), rng.logits(rows, V)
    mask = rng.mask((rows,))
    fn, ref = _fns(t, mask, "batchmean")
    check(fn, ref, s, torch.tensor(0.37), what=f"mse {native_isa} {rows}x{V} {rng.tag}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_is_exactly_zero(native_isa, rng, reduction):
    s = rng.logits(2, 5, 33).requires_grad_(True)
    t = rng.logits(2, 5, 33)
    shape = (2, 5) if reduction == "none" else ()
    for mask in (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.int64)):
        s.grad = None
        loss = mse_loss(s, t, mask=mask, reduction=reduction)
        assert loss.shape == shape and torch.equal(loss, torch.zeros(shape)), rng.tag
        loss.backward(torch.full(shape, 0.37))
        assert torch.equal(s.grad, torch.zeros_like(s)), rng.tag


def test_int_attention_mask_equals_bool_mask(rng):
    s, t = rng.logits(3, 9, 40), rng.logits(3, 9, 40)
    mask = rng.mask((3, 9))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 9), reduction))
        a = run_loss(_fns(t, mask, reduction)[0], s, g)
        b = run_loss(_fns(t, mask.long(), reduction)[0], s, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"{reduction} {rng.tag}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_huge_values(native_isa, rng, dtype):
    s = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    t = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    mask = rng.mask((13,))
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(t, mask, reduction)
        check(
            fn,
            ref,
            s,
            rng.grad_output(_loss_shape((13,), reduction)),
            what=f"|x|<=1e4 {dtype} {reduction} {rng.tag}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_student_equals_teacher(rng, dtype):
    x = rng.randn(7, 500, scale=1e4, dtype=dtype)
    for reduction in REDUCTIONS:
        loss, grad = run_loss(
            _fns(x.clone(), None, reduction)[0], x, rng.grad_output(_loss_shape((7,), reduction))
        )
        assert loss.abs().max() == 0 and grad.abs().max() == 0, f"{reduction} {rng.tag}"


_VIEWS = {
    "strided-rows": ((3, 10, 37), lambda x: x[:, ::2], (3, 5)),
    "sliced-last-dim": ((4, 6, 45), lambda x: x[..., :37], (4, 6)),
    "transposed": ((37, 11), lambda x: x.t(), (11,)),
}


@pytest.mark.parametrize("name", list(_VIEWS))
def test_non_contiguous(native_isa, rng, name):
    shape, view, lead = _VIEWS[name]
    s_leaf = rng.logits(*shape)
    t = view(rng.logits(*shape))
    mask = rng.mask(lead)
    for reduction in ("mean", "none"):
        fn, ref = _fns(t, mask, reduction)
        check(
            fn,
            ref,
            s_leaf,
            rng.grad_output(_loss_shape(lead, reduction)),
            view=view,
            what=f"{name} {reduction} {rng.tag}",
        )


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_UNSELECTED_NAN_GRAD))
def test_garbage_in_unselected_rows_is_ignored(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.logits(2, 3, 30), rng.logits(2, 3, 30)
    mask = rng.mask((2, 3))
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = float("nan")
    t_bad[~mask] = float("-inf")
    assert_garbage_ignored(
        _fns(t_bad, mask, "batchmean")[0], s_bad, _fns(t, mask, "batchmean")[0], s, ~mask, rng.tag
    )


@pytest.mark.parametrize("impl_name", impl_params())
def test_nan_propagates_and_unselected_rows_are_ignored(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.logits(4, 30), rng.logits(4, 30)
    mask = torch.tensor([True, True, False, True])
    s[0, 3] = float("nan")
    t[2, :] = float("nan")  # unselected
    loss = mse_loss(s, t, mask=mask)
    assert torch.isnan(loss) and not bool(all_finite(loss)), rng.tag
    rows = mse_loss(s, t, mask=mask, reduction="none")
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1:]).all(), f"{rows} {rng.tag}"
    assert rows[2] == 0


def test_teacher_gets_no_gradient_and_no_grad_mode(rng):
    s = rng.logits(5, 40).requires_grad_(True)
    t = rng.logits(5, 40).requires_grad_(True)
    (mse_loss(s, t) * 0.37).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        a = mse_loss(s, t)
    b = mse_loss(s.detach(), t.detach())
    assert not a.requires_grad and not b.requires_grad and torch.equal(a, b)
    expected = reference.mse_loss(s.double(), t.double())
    assert abs(a.item() - expected.item()) <= 1e-5 * expected.item(), rng.tag


def test_second_backward_raises(rng):
    s = rng.logits(5, 40).requires_grad_(True)
    loss = mse_loss(s, rng.logits(5, 40), reduction="none")
    loss.backward(torch.ones(5), retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward(torch.ones(5))


def test_module_equals_functional(rng):
    s, t = rng.logits(3, 5, 50), rng.logits(3, 5, 50)
    mask = rng.mask((3, 5))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 5), reduction))
        module = MSELoss(reduction=reduction)
        a = run_loss(lambda x, m=module: m(x, t, mask), s, g)
        b = run_loss(_fns(t, mask, reduction)[0], s, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), reduction


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    return [
        ("shape", lambda: mse_loss(s, torch.randn(4, 11)), ValueError, "teacher"),
        ("dtype-mismatch", lambda: mse_loss(s, t.half()), TypeError, "teacher"),
        ("float64", lambda: mse_loss(s.double(), t.double()), TypeError, "student"),
        ("not-tensor", lambda: mse_loss(s, 1.0), TypeError, "teacher"),
        ("device", lambda: mse_loss(s, t.to("meta")), ValueError, "teacher"),
        (
            "mask-shape",
            lambda: mse_loss(s, t, mask=torch.ones(4, 10, dtype=torch.bool)),
            ValueError,
            "mask",
        ),
        (
            "mask-float",
            lambda: mse_loss(s, t, mask=torch.ones(4, dtype=torch.float16)),
            TypeError,
            "mask",
        ),
        ("reduction", lambda: mse_loss(s, t, reduction="elementwise"), ValueError, "reduction"),
        ("reduction-None", lambda: mse_loss(s, t, reduction=None), ValueError, "reduction"),
        ("module-reduction", lambda: MSELoss(reduction="avg"), ValueError, "reduction"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(rng):
    s = rng.logits(3, 4, 17).requires_grad_(True)
    t = rng.logits(3, 4, 17)
    mask = rng.mask((3, 4))
    h = rng.logits(6, 9, dtype=torch.float16).requires_grad_(True)
    for args in [
        (s, t, None, "batchmean", True),
        (s, t, mask, "none", True),
        (s.detach(), t, mask, "mean", False),
        (h, rng.logits(6, 9, dtype=torch.float16), None, "sum", True),
    ]:
        torch.library.opcheck(torch.ops.fastdistill.mse.default, args)


def test_compile_matches_eager(rng):
    def f(s, t, mask):
        return mse_loss(s, t, mask=mask, reduction="mean") * 0.37

    s, t, mask = rng.logits(3, 6, 41), rng.logits(3, 6, 41), rng.mask((3, 6))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc, le = compiled(x, t, mask), f(y, t, mask)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)
    torch._dynamo.reset()
