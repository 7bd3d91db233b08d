"""cosine_loss / CosineLoss / torch.ops.fastdistill.cosine against the float64 oracle and
nn.CosineEmbeddingLoss (ARCHITECTURE.md, "Numerics rules")."""

from __future__ import annotations

import pytest
import torch
from _oracle import (
    TORCH_BACKEND_UNSELECTED_NAN_GRAD,
    assert_garbage_ignored,
    check,
    fp16_impl,
    impl_params,
    leaf_scale,
    norm,
    run_loss,
)

from fastdistill import reference
from fastdistill.losses import CosineLoss, all_finite, cosine_loss

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 768)]


def _fns(t, mask, reduction):
    ref_mask = None if mask is None else mask != 0

    def fn(s):
        return cosine_loss(s, t, mask=mask, reduction=reduction)

    def ref(s64):
        return reference.cosine_loss(s64, t.double(), mask=ref_mask, reduction=reduction)

    return fn, ref


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, dtype, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the torch backend")
    lead = torch.Size(shape[:-1])
    s = rng.randn(*shape, dtype=dtype)
    t = rng.randn(*shape, dtype=dtype)
    mask = rng.mask(lead)
    for m, reduction in [(None, "mean"), *((mask, r) for r in REDUCTIONS)]:
        fn, ref = _fns(t, m, reduction)
        g = rng.grad_output(_loss_shape(lead, reduction))
        grad_atol = 1e-10
        if shape[-1] == 1:
            # D = 1: cos = ±1 and the exact gradient is ~1e-12, while the kernel's is the fp32
            # cancellation of two terms of size |g| / (|s| rows): allow 1e-5 of those.
            rows = 1 if reduction != "mean" else (lead.numel() if m is None else int(m.sum()))
            terms = leaf_scale(s, g) / s.double().abs() / rows
            grad_atol = 1e-5 * norm(terms * (1 if m is None else m.unsqueeze(-1)))
        check(
            fn,
            ref,
            s,
            g,
            grad_atol=grad_atol,
            what=f"cosine {impl} {dtype} {shape} {reduction} mask={m is not None} {rng.tag}",
        )


def test_matches_cosine_embedding_loss(rng):
    s, t = rng.randn(37, 96), rng.randn(37, 96)
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours = cosine_loss(x, t)
    theirs = torch.nn.CosineEmbeddingLoss()(y, t, torch.ones(37))
    (ours * 0.37).backward()
    (theirs * 0.37).backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_is_exactly_zero(native_isa, rng, reduction):
    s = rng.randn(2, 5, 33).requires_grad_(True)
    t = rng.randn(2, 5, 33)
    shape = (2, 5) if reduction == "none" else ()
    for mask in (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.int64)):
        s.grad = None
        loss = cosine_loss(s, t, mask=mask, reduction=reduction)
        assert loss.shape == shape and torch.equal(loss, torch.zeros(shape)), rng.tag
        loss.backward(torch.full(shape, 0.37))
        assert torch.equal(s.grad, torch.zeros_like(s)), rng.tag


def test_int_attention_mask_equals_bool_mask(rng):
    s, t = rng.randn(3, 9, 40), rng.randn(3, 9, 40)
    mask = rng.mask((3, 9))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 9), reduction))
        a = run_loss(_fns(t, mask, reduction)[0], s, g)
        b = run_loss(_fns(t, mask.long(), reduction)[0], s, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"{reduction} {rng.tag}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_huge_and_zero_rows(native_isa, rng, dtype):
    """|x| up to 1e4, and rows where the student or the teacher is all zeros (the epsilon)."""
    s = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    t = rng.uniform(13, 301, low=-1e4, high=1e4, dtype=dtype)
    s[3] = 0
    t[5] = 0
    mask = rng.mask((13,))
    mask[3] = mask[5] = True
    for reduction in ("mean", "none"):
        fn, ref = _fns(t, mask, reduction)
        check(
            fn,
            ref,
            s,
            rng.grad_output(_loss_shape((13,), reduction)),
            what=f"huge/zero rows {dtype} {reduction} {rng.tag}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_student_equals_teacher(native_isa, rng, dtype):
    for scale in (1.0, 1e4):
        x = rng.randn(7, 500, scale=scale, dtype=dtype)
        for reduction in REDUCTIONS:
            loss, grad = run_loss(
                _fns(x.clone(), None, reduction)[0],
                x,
                rng.grad_output(_loss_shape((7,), reduction)),
            )
            assert loss.abs().max() <= 1e-6, f"{loss} {reduction} {rng.tag}"
            assert grad.abs().max() <= 1e-6, f"{reduction} {rng.tag}"


_VIEWS = {
    "strided-rows": ((3, 10, 37), lambda x: x[:, ::2], (3, 5)),
    "sliced-last-dim": ((4, 6, 45), lambda x: x[..., :37], (4, 6)),
    "transposed": ((37, 11), lambda x: x.t(), (11,)),
}


@pytest.mark.parametrize("name", list(_VIEWS))
def test_non_contiguous(native_isa, rng, name):
    shape, view, lead = _VIEWS[name]
    s_leaf = rng.randn(*shape)
    t = view(rng.randn(*shape))
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


@pytest.mark.parametrize("impl_name", impl_params())
def test_nan_propagates(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.randn(4, 30), rng.randn(4, 30)
    mask = torch.tensor([True, True, False, True])
    s[0, 3] = float("nan")
    t[3, 5] = float("inf")
    loss = cosine_loss(s, t, mask=mask)
    assert torch.isnan(loss) and not bool(all_finite(loss)), f"{loss} {rng.tag}"
    rows = cosine_loss(s, t, mask=mask, reduction="none")
    assert torch.isnan(rows[0]) and torch.isnan(rows[3]), f"{rows} {rng.tag}"
    assert torch.isfinite(rows[1]) and rows[2] == 0, f"{rows} {rng.tag}"


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_UNSELECTED_NAN_GRAD))
def test_garbage_in_unselected_rows_is_ignored(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    s, t = rng.randn(4, 30), rng.randn(4, 30)
    mask = torch.tensor([True, False, True, False])
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = float("nan")
    t_bad[3] = float("inf")
    assert_garbage_ignored(
        _fns(t_bad, mask, "mean")[0], s_bad, _fns(t, mask, "mean")[0], s, ~mask, rng.tag
    )


def test_teacher_gets_no_gradient_and_no_grad_mode(rng):
    s = rng.randn(5, 40).requires_grad_(True)
    t = rng.randn(5, 40).requires_grad_(True)
    (cosine_loss(s, t) * 0.37).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        a = cosine_loss(s, t)
    b = cosine_loss(s.detach(), t.detach())
    assert not a.requires_grad and torch.equal(a, b)


def test_second_backward_raises(rng):
    s = rng.randn(5, 40).requires_grad_(True)
    loss = cosine_loss(s, rng.randn(5, 40)) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_module_equals_functional(rng):
    s, t = rng.randn(3, 5, 50), rng.randn(3, 5, 50)
    mask = rng.mask((3, 5))
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 5), reduction))
        module = CosineLoss(reduction=reduction)
        a = run_loss(lambda x, m=module: m(x, t, mask), s, g)
        b = run_loss(_fns(t, mask, reduction)[0], s, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), reduction


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    return [
        ("shape", lambda: cosine_loss(s, torch.randn(4, 11)), ValueError, "teacher_hidden"),
        ("dtype-mismatch", lambda: cosine_loss(s, t.bfloat16()), TypeError, "teacher_hidden"),
        ("float64", lambda: cosine_loss(s.double(), t.double()), TypeError, "student_hidden"),
        ("device", lambda: cosine_loss(s.to("meta"), t), ValueError, "student_hidden"),
        (
            "mask-shape",
            lambda: cosine_loss(s, t, mask=torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            "mask",
        ),
        ("mask-float", lambda: cosine_loss(s, t, mask=torch.ones(4)), TypeError, "mask"),
        ("reduction", lambda: cosine_loss(s, t, reduction="batchmean"), ValueError, "reduction"),
        ("module-reduction", lambda: CosineLoss(reduction="batchmean"), ValueError, "reduction"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(rng):
    s = rng.randn(3, 4, 17).requires_grad_(True)
    t = rng.randn(3, 4, 17)
    mask = rng.mask((3, 4))
    b = rng.randn(6, 9, dtype=torch.bfloat16).requires_grad_(True)
    for args in [
        (s, t, None, "mean", True),
        (s, t, mask, "none", True),
        (s.detach(), t, mask, "sum", False),
        (b, rng.randn(6, 9, dtype=torch.bfloat16), None, "none", True),
    ]:
        torch.library.opcheck(torch.ops.fastdistill.cosine.default, args)


def test_compile_matches_eager(rng):
    def f(s, t, mask, w):
        return (cosine_loss(s, t, mask=mask, reduction="none") * w).sum()

    s, t, mask, w = rng.randn(3, 6, 41), rng.randn(3, 6, 41), rng.mask((3, 6)), rng.randn(3, 6)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc, le = compiled(x, t, mask, w), f(y, t, mask, w)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
