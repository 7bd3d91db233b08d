"""cross_entropy / CrossEntropyLoss / torch.ops.fastdistill.cross_entropy against the float64 oracle
and torch.nn.functional.cross_entropy (ARCHITECTURE.md, "Numerics rules")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _oracle import (
    TORCH_BACKEND_UNSELECTED_NAN_GRAD,
    assert_garbage_ignored,
    check,
    fp16_impl,
    impl_params,
    run_loss,
)

from fastdistill import reference
from fastdistill.losses import CrossEntropyLoss, all_finite, cross_entropy, distillation_loss

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 1271)]


def _fns(labels, reduction, ignore_index=-100):
    def fn(x):
        return cross_entropy(x, labels, ignore_index=ignore_index, reduction=reduction)

    def ref(x64):
        return reference.cross_entropy(x64, labels, ignore_index=ignore_index, reduction=reduction)

    return fn, ref


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, dtype, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the torch backend")
    lead, V = shape[:-1], shape[-1]
    x = rng.logits(*shape, dtype=dtype)
    labels = rng.labels(lead, V)
    all_valid = torch.randint(0, V, lead, generator=rng.gen)
    # A class index as ignore_index (rows labelled 0 are skipped), when there are >= 2 classes.
    custom = (0, torch.where(torch.rand(lead, generator=rng.gen) < 0.3, 0, labels.clamp(min=0)))
    cases = [(all_valid, "mean", -100), *((labels, r, -100) for r in REDUCTIONS)]
    if V > 1:
        cases.append((custom[1], "mean", custom[0]))
    for lab, reduction, ignore in cases:
        fn, ref = _fns(lab, reduction, ignore)
        g = rng.grad_output(_loss_shape(lead, reduction))
        check(
            fn,
            ref,
            x,
            g,
            loss_atol=1e-6 if V == 1 else 1e-10,
            what=f"ce {impl} {dtype} {shape} {reduction} ignore_index={ignore} {rng.tag}",
        )


@pytest.mark.slow
@pytest.mark.parametrize("rows,V", [(41, 32000), (1, 128256), (4096, 24)])
def test_large_matches_oracle(native_isa, rng, rows, V):
    x = rng.logits(rows, V)
    labels = rng.labels((rows,), V)
    fn, ref = _fns(labels, "mean")
    check(fn, ref, x, torch.tensor(0.37), what=f"ce {native_isa} {rows}x{V} {rng.tag}")


@pytest.mark.parametrize("ignore_index", [-100, 3, -1])
def test_matches_torch_cross_entropy(rng, ignore_index):
    x = rng.logits(5, 8, 29)
    labels = rng.labels((5, 8), 29, ignore_index=ignore_index)
    for reduction in REDUCTIONS:
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours = cross_entropy(a, labels, ignore_index=ignore_index, reduction=reduction)
        theirs = F.cross_entropy(
            b.view(-1, 29), labels.view(-1), ignore_index=ignore_index, reduction=reduction
        )
        if reduction == "none":
            theirs = theirs.view(5, 8)
        g = rng.grad_output(tuple(ours.shape))
        ours.backward(g)
        theirs.backward(g)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=rng.tag)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=rng.tag)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_exactly_zero(native_isa, rng, reduction):
    """torch gives NaN for mean over no labels; fastdistill gives 0 (documented deviation)."""
    x = rng.logits(2, 5, 33).requires_grad_(True)
    labels = torch.full((2, 5), -100)
    loss = cross_entropy(x, labels, reduction=reduction)
    shape = (2, 5) if reduction == "none" else ()
    assert loss.shape == shape and torch.equal(loss, torch.zeros(shape)), rng.tag
    loss.backward(torch.full(shape, 0.37))
    assert torch.equal(x.grad, torch.zeros_like(x)), rng.tag
    if reduction == "mean":
        assert torch.isnan(F.cross_entropy(x.detach().view(-1, 33), labels.view(-1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_neg_inf_and_huge_logits(native_isa, rng, dtype):
    """-inf on non-label classes (masked vocabulary) and |logits| up to 1e4."""
    x = rng.uniform(9, 129, low=-1e4, high=1e4, dtype=dtype)
    labels = rng.labels((9,), 129)
    pad = torch.rand(9, 129, generator=rng.gen) < 0.3
    pad[torch.arange(9), labels.clamp(min=0)] = False
    x[pad] = float("-inf")
    for reduction in ("mean", "none"):
        fn, ref = _fns(labels, reduction)
        g = rng.grad_output(_loss_shape((9,), reduction))
        check(fn, ref, x, g, what=f"-inf/huge {dtype} {reduction} {rng.tag}")
        _, grad = run_loss(fn, x, g)
        assert torch.isfinite(grad).all() and torch.equal(grad[pad], torch.zeros_like(grad[pad]))


def test_one_hot_logits_give_zero(rng):
    """The label's logit far above the rest: loss and gradient ~0 (no cancellation noise)."""
    labels = rng.labels((7,), 500, ignore_frac=0.0)
    x = torch.full((7, 500), -1e4)
    x[torch.arange(7), labels] = 1e4
    loss, grad = run_loss(_fns(labels, "sum")[0], x, torch.tensor(1.0))
    assert loss.abs() <= 1e-6 and grad.abs().max() <= 1e-6, rng.tag


_VIEWS = {
    "strided-rows": ((3, 10, 37), lambda x: x[:, ::2], (3, 5)),
    "sliced-last-dim": ((4, 6, 45), lambda x: x[..., :37], (4, 6)),
    "transposed": ((37, 11), lambda x: x.t(), (11,)),
}


@pytest.mark.parametrize("name", list(_VIEWS))
def test_non_contiguous(native_isa, rng, name):
    shape, view, lead = _VIEWS[name]
    leaf = rng.logits(*shape)
    labels = rng.labels(lead, 37)
    strided_labels = rng.labels((lead[0], 2 * lead[-1]), 37)[..., ::2] if len(lead) == 2 else labels
    for lab in (labels, strided_labels):
        for reduction in ("mean", "none"):
            fn, ref = _fns(lab, reduction)
            check(
                fn,
                ref,
                leaf,
                rng.grad_output(_loss_shape(lead, reduction)),
                view=view,
                what=f"{name} {reduction} {rng.tag}",
            )


TORCH_BACKEND_LABEL_CHECK = None  # fixed: the torch path checks label range on CPU too


@pytest.mark.parametrize(
    "labels",
    [[1, 2, 10, 3], [1, -1, 0, 3], [-101, 0, 0, 0]],
    ids=["too-big", "negative", "below-ignore"],
)
@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_LABEL_CHECK))
def test_out_of_range_labels_raise_value_error(switch_impl, impl_name, labels):
    switch_impl(impl_name)
    x = torch.randn(4, 10, requires_grad=True)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(x, torch.tensor(labels))
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(x, torch.randn(4, 10), labels=torch.tensor(labels), alpha_ce=0.5)


def test_label_dtypes(rng):
    x = rng.logits(6, 20)
    labels = rng.labels((6,), 20)
    expected = cross_entropy(x, labels)
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(cross_entropy(x, labels.to(dtype)), expected), dtype
    small = labels.clamp(min=0)
    small[2] = -1
    small = small.to(torch.uint8)  # -1 wraps to 255: out of range, not the ignore_index -1
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(x, small, ignore_index=-1)


@pytest.mark.parametrize("impl_name", impl_params(TORCH_BACKEND_UNSELECTED_NAN_GRAD))
def test_garbage_in_ignored_rows_is_ignored(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    x = rng.logits(3, 4, 30)
    labels = rng.labels((3, 4), 30)
    labels[2, 3] = -100
    ignored = labels == -100
    x_bad = x.clone()
    x_bad[ignored] = float("nan")
    x_bad[2, 3, 5] = float("inf")
    assert_garbage_ignored(
        _fns(labels, "mean")[0], x_bad, _fns(labels, "mean")[0], x, ignored, rng.tag
    )


@pytest.mark.parametrize("impl_name", impl_params())
def test_nan_propagates_only_from_counted_rows(switch_impl, rng, impl_name):
    switch_impl(impl_name)
    x = rng.logits(4, 30)
    labels = torch.tensor([1, 2, -100, 4])
    x[2] = float("nan")  # ignored row
    assert torch.isfinite(cross_entropy(x, labels)), rng.tag
    x[0, 7] = float("nan")
    loss = cross_entropy(x, labels)
    assert torch.isnan(loss) and not bool(all_finite(loss)), rng.tag
    rows = cross_entropy(x, labels, reduction="none")
    assert torch.isnan(rows[0]) and rows[2] == 0 and torch.isfinite(rows[1:]).all()


def test_no_grad_and_second_backward(rng):
    x = rng.logits(5, 40)
    labels = rng.labels((5,), 40)
    plain = cross_entropy(x, labels)
    x.requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(cross_entropy(x, labels), plain)
    loss = cross_entropy(x, labels) * 0.37
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_module_equals_functional(rng):
    x = rng.logits(3, 5, 50)
    labels = rng.labels((3, 5), 50, ignore_index=7)
    for reduction in REDUCTIONS:
        g = rng.grad_output(_loss_shape((3, 5), reduction))
        module = CrossEntropyLoss(ignore_index=7, reduction=reduction)
        a = run_loss(lambda z, m=module: m(z, labels), x, g)
        b = run_loss(_fns(labels, reduction, 7)[0], x, g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), reduction


def _bad_calls():
    x = torch.randn(4, 10)
    lab = torch.tensor([1, 2, -100, 9])
    return [
        ("labels-float", lambda: cross_entropy(x, lab.float()), TypeError, "labels"),
        ("labels-bool", lambda: cross_entropy(x, lab > 0), TypeError, "labels"),
        (
            "labels-shape",
            lambda: cross_entropy(x, torch.zeros(4, 10, dtype=torch.long)),
            ValueError,
            "labels",
        ),
        ("labels-device", lambda: cross_entropy(x, lab.to("meta")), ValueError, "labels"),
        (
            "labels-too-big",
            lambda: cross_entropy(x, torch.tensor([1, 2, 10, 3])),
            ValueError,
            "labels",
        ),
        (
            "labels-negative",
            lambda: cross_entropy(x, torch.tensor([1, -1, 0, 3])),
            ValueError,
            "labels",
        ),
        ("labels-not-tensor", lambda: cross_entropy(x, [1, 2, 3, 4]), TypeError, "labels"),
        ("logits-float64", lambda: cross_entropy(x.double(), lab), TypeError, "logits"),
        ("logits-int", lambda: cross_entropy(x.long(), lab), TypeError, "logits"),
        (
            "ignore-index-float",
            lambda: cross_entropy(x, lab, ignore_index=-100.0),
            TypeError,
            "ignore_index",
        ),
        (
            "ignore-index-bool",
            lambda: cross_entropy(x, lab, ignore_index=False),
            TypeError,
            "ignore_index",
        ),
        (
            "reduction",
            lambda: cross_entropy(x, lab, reduction="batchmean"),
            ValueError,
            "reduction",
        ),
        ("module-reduction", lambda: CrossEntropyLoss(reduction="avg"), ValueError, "reduction"),
        ("module-ignore", lambda: CrossEntropyLoss(ignore_index=None), TypeError, "ignore_index"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_input(case):
    _, call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


def test_opcheck(rng):
    x = rng.logits(3, 4, 17).requires_grad_(True)
    labels = rng.labels((3, 4), 17)
    b = rng.logits(6, 9, dtype=torch.bfloat16).requires_grad_(True)
    for args in [
        (x, labels, -100, "mean", True),
        (x, labels, -100, "none", True),
        (x.detach(), rng.labels((3, 4), 17, ignore_index=3), 3, "sum", False),
        (b, rng.labels((6,), 9), -100, "mean", True),
    ]:
        torch.library.opcheck(torch.ops.fastdistill.cross_entropy.default, args)


def test_compile_matches_eager(rng):
    def f(x, labels):
        return cross_entropy(x, labels) * 0.37

    x, labels = rng.logits(3, 6, 41), rng.labels((3, 6), 41)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lc, le = compiled(a, labels), f(b, labels)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    torch._dynamo.reset()
