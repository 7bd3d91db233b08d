"""reverse_kl_loss / jsd_loss / tvd_loss and distillation_loss(divergence=...) against the float64
oracle (fastdistill.reference), on every implementation."""

from __future__ import annotations

import importlib.util
import math
import os

import _oracle
import pytest
import torch
from _oracle import (
    Rng,
    assert_garbage_ignored,
    fp16_impl,
    norm,
    oracle,
    run_loss,
)

from fastdistill import reference
from fastdistill.losses import (
    distillation_loss,
    jsd_loss,
    kl_div_loss,
    reverse_kl_loss,
    tvd_loss,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEMPERATURES = (0.05, 1.0, 4.0)
SHAPES = [(41, 1), (3, 7, 7), (41, 1271), (2, 3, 1271)]
REDUCTIONS = ("batchmean", "sum", "none")
# name -> (public function, reference divergence, extra keyword arguments)
LOSSES = {
    "reverse_kl": (reverse_kl_loss, "reverse_kl", {}),
    "jsd": (jsd_loss, "jsd", {"beta": 0.5}),
    "jsd-0.1": (jsd_loss, "jsd", {"beta": 0.1}),
    "jsd-0.9": (jsd_loss, "jsd", {"beta": 0.9}),
    "tvd": (tvd_loss, "tvd", {}),
}
MAIN_LOSSES = ("reverse_kl", "jsd", "tvd")
# The torch backend evaluates the plain reference formulas in fp32 (log M by a logsumexp of
# separately rounded log-softmaxes): its gradients land at 1-3e-5 of the float64 oracle.
TORCH_GRAD_RTOL = 1e-4


def check(*args, **kw):
    """_oracle.check, with the torch backend's gradient budget (see TORCH_GRAD_RTOL)."""
    if os.environ.get("FASTDISTILL_BACKEND") == "torch":
        kw.setdefault("grad_rtol", TORCH_GRAD_RTOL)
    return _oracle.check(*args, **kw)


def _fns(name, t, **kw):
    """(fastdistill loss of the student, float64 reference) for fixed teacher and options."""
    fn, div, extra = LOSSES[name]
    kw = {**extra, **kw}

    def f(s):
        return fn(s, t, **kw)

    ref_kw = dict(kw)
    if isinstance(ref_kw.get("mask"), torch.Tensor):
        ref_kw["mask"] = ref_kw["mask"] != 0
    if isinstance(ref_kw.get("normalizer"), torch.Tensor):
        ref_kw["normalizer"] = ref_kw["normalizer"].double()

    def ref(s64):
        return reference.divergence_loss(s64, t.double(), div, **ref_kw)

    return f, ref


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


# ---- the float64 oracle: every implementation, dtype, temperature, odd shape -------------------


def tvd_ties_apart(s, t, temperatures, *, transform=None):
    """The teacher with its near-ties to the student moved apart, for TVD: its gradient has
    sign(p_s − p_t), which the torch backend takes from two fp32 softmaxes and so resolves only to
    ~1e-7 of d = log p_t − log p_s (the float64 oracle resolves it fully; one flipped column costs
    ~1e-3 of the gradient). Columns with |d| < 1e-4 at any of the temperatures (after `transform`
    of the logits, if given) get t + 0.25, then the check is repeated (the shift moves the row's
    logsumexp a little)."""
    for _ in range(4):
        near = torch.zeros(t.shape, dtype=torch.bool)
        for temperature in temperatures:
            a, b = s.double(), t.double()
            if transform is not None:
                a, b = transform(a), transform(b)
            d = torch.log_softmax(b / temperature, -1) - torch.log_softmax(a / temperature, -1)
            near |= d.abs() < 1e-4  # False where d is NaN or infinite (-inf logits)
        if not near.any():
            return t
        t = torch.where(near, t + 0.25, t)
    return t


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(impl, rng, name, dtype, shape):
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the non-native backends")
    *lead, V = shape
    lead = tuple(lead)
    s = rng.logits(*shape, dtype=dtype)
    t = rng.logits(*shape, dtype=dtype)
    if name == "tvd":
        # TVD's gradient has sign(p_s − p_t): where a 16-bit grid makes s_j = t_j, that sign is
        # the sign of lse(t/T) − lse(s/T), which fp32 sums cannot resolve below ~1e-7 (and the
        # float64 oracle does). Such ties, and near-ties at any temperature, are moved apart.
        t = torch.where(t == s, t + 0.25, t)
        t = tvd_ties_apart(s, t, TEMPERATURES).to(dtype)
    mask = rng.mask(lead)
    loss_atol = 1e-5 * math.prod(lead) if V == 1 else 1e-10
    for i, temperature in enumerate(TEMPERATURES):
        if temperature == 0.05 and impl == "torch":
            continue  # see test_low_temperature
        for m, reduction in [(None, "batchmean"), *((mask, r) for r in REDUCTIONS)]:
            t2 = i == 1  # T² on one temperature (1.0: no effect) and off elsewhere
            fn, ref = _fns(
                name, t, temperature=temperature, mask=m, reduction=reduction, t2_scale=t2
            )
            g = rng.grad_output(_loss_shape(lead, reduction))
            what = (
                f"{name} {impl} {dtype} T={temperature} shape={shape} {reduction} "
                f"mask={m is not None} {rng.tag}"
            )
            # At T = 0.05 the rows are nearly one-hot and the gradients tiny (down to 1e-16):
            # fp32 resolves the p_s (q - qbar) of the top column to ~1e-8 of the weight, in each
            # row independently, so the bound on the norm over rows grows as their square root
            # (a flat 1e-7 failed 1 seed in ~10^3 at 21 rows: 3.4e-7 against |ref| 1.8e-5).
            rows = math.prod(lead)
            grad_atol = 1e-7 * math.sqrt(rows) if temperature == 0.05 else 1e-9
            # At T = 0.05 |s - t| / T reaches ~100: every kernel measures q from the student's
            # most probable column by logit differences (never as a difference of two q rounded
            # at that size), which keeps this regime at the default 1e-5.
            check(fn, ref, s, g, what=what, loss_atol=loss_atol, grad_atol=grad_atol)


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_low_temperature_torch_backend(switch_impl, rng, name):
    """The torch backend (plain fp32 formula) at T = 0.05: the loss to 1e-5; its gradient carries
    the fp32 rounding of log-softmax differences of size ~|logits| / T (the kernels form those
    differences exactly), so it is compared at 1e-3."""
    switch_impl("torch")
    s, t = rng.logits(41, 1271), rng.logits(41, 1271)
    fn, ref = _fns(name, t, temperature=0.05)
    expected = oracle(ref, s, torch.tensor(0.37))
    loss, grad = run_loss(fn, s, torch.tensor(0.37))
    assert abs(loss.item() - expected[0].item()) <= 1e-5 * abs(expected[0].item()), rng.tag
    assert norm(grad.double() - expected[1]) <= 1e-3 * norm(expected[1]) + 1e-7, rng.tag


@pytest.mark.slow
@pytest.mark.parametrize("name", MAIN_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_llm_vocab_matches_oracle(impl, rng, name, dtype):
    """An LLM vocabulary (32000) over several rows, T² on, labels selecting the tokens."""
    if impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("one Triton case per loss at this size (the interpreter is slow)")
    s = rng.logits(5, 32000, dtype=dtype)
    t = rng.logits(5, 32000, dtype=dtype)
    if name == "tvd":
        t = tvd_ties_apart(s, t, (2.0,)).to(dtype)
    labels = rng.labels((5,), 32000)
    fn, ref = _fns(name, t, temperature=2.0, t2_scale=True, labels=labels)
    check(fn, ref, s, torch.tensor(0.37), what=f"{name} {impl} {dtype} 5x32000 {rng.tag}")


# ---- transforms, vocabulary, selection, normaliser -----------------------------------------------


@pytest.mark.parametrize("name", MAIN_LOSSES)
@pytest.mark.parametrize(
    "logit_scale,softcap", [(0.7, None), (1.0, 4.0), (2.5, 3.0)], ids=["scale", "cap", "both"]
)
def test_logit_transforms(impl, rng, name, logit_scale, softcap):
    """logit_scale and softcap on both sides before T: value and exact gradient."""
    s = rng.logits(9, 300, scale=5.0)
    t = rng.logits(9, 300, scale=5.0)
    for reduction in ("batchmean", "none"):
        fn, ref = _fns(
            name, t, temperature=1.5, logit_scale=logit_scale, softcap=softcap, reduction=reduction
        )
        what = f"{name} {impl} scale={logit_scale} cap={softcap} {reduction} {rng.tag}"
        check(fn, ref, s, rng.grad_output(_loss_shape((9,), reduction)), what=what)


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_common_vocab(impl, rng, name):
    """Vocabularies of one family that differ in size: the first min(Vs, Vt) columns."""
    for vs, vt in ((157, 131), (131, 157)):
        s = rng.logits(6, vs)
        t = rng.logits(6, vt)
        fn, ref = _fns(name, t, temperature=2.0, vocab="common")
        check(fn, ref, s, torch.tensor(0.37), what=f"{name} {impl} Vs={vs} Vt={vt} {rng.tag}")
        _, grad = run_loss(fn, s, torch.tensor(0.37))
        extra = grad[:, min(vs, vt) :]
        assert torch.equal(extra, torch.zeros_like(extra)), f"columns past Vt {rng.tag}"


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_labels_and_normalizer(impl, rng, name):
    s, t = rng.logits(3, 8, 97), rng.logits(3, 8, 97)
    labels = rng.labels((3, 8), 97)
    mask = rng.mask((3, 8))
    cases = [
        dict(labels=labels),
        dict(labels=labels, mask=mask),
        dict(labels=rng.labels((3, 8), 97, ignore_index=5), ignore_index=5),
        dict(labels=labels, normalizer=37),
        dict(mask=mask, normalizer=torch.tensor(11.5)),
        dict(labels=labels, normalizer=torch.tensor(64, dtype=torch.int64)),
    ]
    for kw in cases:
        fn, ref = _fns(name, t, temperature=2.0, **kw)
        check(fn, ref, s, torch.tensor(0.37), what=f"{name} {impl} {sorted(kw)} {rng.tag}")


def test_normalizer_equals_sum_divided(rng):
    s, t = rng.logits(20, 50), rng.logits(20, 50)
    mask = rng.mask((20,))
    for name in MAIN_LOSSES:
        fn = LOSSES[name][0]
        a = fn(s, t, mask=mask, reduction="sum") / 123.0
        for normalizer in (123, 123.0, torch.tensor(123.0), torch.tensor(123)):
            b = fn(s, t, mask=mask, normalizer=normalizer)
            assert torch.allclose(a, b, rtol=1e-6, atol=0), f"{name} {normalizer}"


# ---- special inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_student_equals_teacher_is_exactly_zero(impl, rng, name, dtype):
    if impl == "torch":
        pytest.skip(
            "the torch backend evaluates the plain reference formula in fp32, whose rounding "
            "(~1e-8) shows at student == teacher; the kernels form log p_t - log p_s exactly"
        )
    if dtype == torch.float16 and not fp16_impl(impl):
        pytest.skip("fp16 runs on the default CPU variant and the non-native backends")
    for scale in (3.0, 1e4):
        x = rng.randn(7, 500, scale=scale, dtype=dtype)
        for temperature in TEMPERATURES:
            for kw in ({}, {"softcap": 20.0, "logit_scale": 0.5}):
                fn, _ = _fns(name, x.clone(), temperature=temperature, reduction="none", **kw)
                loss, grad = run_loss(fn, x, rng.grad_output((7,)))
                what = f"{name} {impl} T={temperature} {kw} {rng.tag}"
                assert torch.equal(loss, torch.zeros_like(loss)), f"loss {loss} {what}"
                assert torch.equal(grad, torch.zeros_like(grad)), f"gradient {what}"


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_all_masked_is_exactly_zero(impl, rng, name):
    s = rng.logits(2, 5, 33).requires_grad_(True)
    t = rng.logits(2, 5, 33)
    fn = LOSSES[name][0]
    for kw in (
        {"mask": torch.zeros(2, 5, dtype=torch.bool)},
        {"labels": torch.full((2, 5), -100)},
    ):
        for reduction in REDUCTIONS:
            s.grad = None
            loss = fn(s, t, temperature=2.0, reduction=reduction, **kw)
            shape = (2, 5) if reduction == "none" else ()
            assert loss.shape == shape and loss.dtype == torch.float32
            assert torch.equal(loss, torch.zeros(shape)), f"{name} {reduction} {rng.tag}"
            loss.backward(torch.full(shape, 0.37))
            assert torch.equal(s.grad, torch.zeros_like(s)), f"{name} {reduction} {rng.tag}"


@pytest.mark.parametrize("name", MAIN_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_log_probs_below_minus_104(impl, rng, name, dtype):
    """Columns where both log-probabilities are far below -104 (p = 0 in fp32, 1e-46 and less
    in float64): no NaN anywhere, at interior beta too, and the float64 values."""
    s = rng.logits(6, 200, dtype=dtype)
    t = rng.logits(6, 200, dtype=dtype)
    low = torch.rand(6, 200, generator=rng.gen) < 0.3
    low[:, 0] = False
    s[low] = -150.0
    t[low] = (-130.0 - 40.0 * torch.rand(int(low.sum()), generator=rng.gen)).to(dtype)
    for kw in ({}, {"beta": 0.01}, {"beta": 0.99}) if name == "jsd" else ({},):
        fn, ref = _fns(name, t, temperature=1.0, reduction="none", **kw)
        g = rng.grad_output((6,))
        check(fn, ref, s, g, what=f"{name} {impl} {dtype} lp < -104 {kw} {rng.tag}")


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_neg_inf_logits(impl, rng, name):
    """Masked vocabulary entries on both sides together, and a teacher that puts no mass where
    the student does (reverse KL is then +inf, as in the reference; the others stay finite)."""
    s = rng.logits(9, 129)
    t = rng.logits(9, 129)
    both = torch.rand(9, 129, generator=rng.gen) < 0.2
    both[:, :3] = False
    s[both] = float("-inf")
    t[both] = float("-inf")
    student_only = torch.zeros(9, 129, dtype=torch.bool)
    student_only[:, 1] = True  # the student gives these no mass; the teacher does
    s[student_only] = float("-inf")
    # The torch backend's TVD at T = 0.5: rows whose student holds nearly all its mass where
    # sign(p_s - p_t) is +1 have a gradient that the plain fp32 softmax backward forms as a small
    # difference (1.3e-4 against its 1e-4 budget for 2 seeds in ~50); it is held to T = 1 here, as
    # test_divergences_near_teacher.py leaves that regime out for it.
    temperatures = (1.0, 2.0) if impl == "torch" and name == "tvd" else (0.5, 2.0)
    if name == "tvd":
        t = tvd_ties_apart(s, t, (*temperatures, 1.0))
    for temperature in temperatures:
        fn, ref = _fns(name, t, temperature=temperature, reduction="none")
        g = rng.grad_output((9,))
        check(fn, ref, s, g, what=f"{name} {impl} -inf T={temperature} {rng.tag}")
        _, grad = run_loss(fn, s, g)
        assert torch.equal(grad[both], torch.zeros_like(grad[both])), rng.tag
    if name != "reverse_kl":
        teacher_only = t.clone()
        teacher_only[:, 2] = float("-inf")
        fn, ref = _fns(name, teacher_only, temperature=1.0)
        check(fn, ref, s, torch.tensor(0.37), what=f"{name} {impl} teacher -inf {rng.tag}")
    else:
        t_inf = t.clone()
        t_inf[0, 2] = float("-inf")
        loss = reverse_kl_loss(s, t_inf, reduction="none")
        assert loss[0] == float("inf") and torch.isfinite(loss[1:]).all(), rng.tag


def test_jsd_is_never_negative_with_a_bf16_teacher(impl, rng):
    """Student close to a bf16 teacher (rounding-level differences): every row >= 0."""
    t = rng.logits(64, 1000, dtype=torch.bfloat16)
    s = (t.float() + rng.randn(64, 1000, scale=1e-3)).bfloat16()
    for beta in (0.1, 0.5, 0.9):
        for temperature in (0.5, 1.0, 3.0):
            loss = jsd_loss(s, t, beta=beta, temperature=temperature, reduction="none")
            assert (loss >= 0).all(), f"beta={beta} T={temperature} min {loss.min()} {rng.tag}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_jsd_endpoints_are_forward_and_reverse_kl(impl, rng, dtype):
    s, t = rng.logits(11, 400, dtype=dtype), rng.logits(11, 400, dtype=dtype)
    mask = rng.mask((11,))
    g = rng.grad_output((11,))
    for beta, other in (
        (0.0, lambda x: kl_div_loss(x, t, temperature=2.0, mask=mask, reduction="none") / 4.0),
        (1.0, lambda x: reverse_kl_loss(x, t, temperature=2.0, mask=mask, reduction="none")),
    ):
        a = run_loss(lambda x, b=beta: jsd_loss(x, t, beta=b, temperature=2.0, mask=mask,
                                                reduction="none"), s, g)  # fmt: skip
        b = run_loss(other, s, g)
        assert torch.allclose(a[0], b[0], rtol=1e-6, atol=1e-7), f"beta={beta} {rng.tag}"
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert norm(a[1].double() - b[1].double()) <= tol * norm(b[1]) + 1e-9, rng.tag


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_garbage_in_unselected_rows_is_ignored(impl, rng, name):
    s = rng.logits(6, 50)
    t = rng.logits(6, 50)
    mask = torch.tensor([True, False, True, False, True, False])
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = float("nan")
    t_bad[3] = float("inf")
    s_bad[5] = float("-inf")
    t_bad[5] = float("-inf")
    assert_garbage_ignored(
        _fns(name, t_bad, temperature=2.0, mask=mask)[0],
        s_bad,
        _fns(name, t, temperature=2.0, mask=mask)[0],
        s,
        ~mask,
        rng.tag,
    )


@pytest.mark.parametrize("name", MAIN_LOSSES)
def test_nan_propagates(impl, rng, name):
    for who in ("student", "teacher"):
        s, t = rng.logits(3, 30), rng.logits(3, 30)
        (s if who == "student" else t)[1, 7] = float("nan")
        loss = LOSSES[name][0](s, t, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), f"{who} {rng.tag}"


def test_non_contiguous(native_isa, rng):
    s_leaf = rng.logits(3, 10, 45)
    t = rng.logits(3, 10, 45)[:, ::2, :37]

    def view(x):
        return x[:, ::2, :37]

    for name in MAIN_LOSSES:
        fn, ref = _fns(name, t, temperature=2.0, reduction="none")
        check(fn, ref, s_leaf, rng.grad_output((3, 5)), view=view, what=f"{name} {rng.tag}")


def test_teacher_gets_no_gradient_and_no_grad_mode(rng):
    for name in MAIN_LOSSES:
        fn = LOSSES[name][0]
        s = rng.logits(5, 40).requires_grad_(True)
        t = rng.logits(5, 40).requires_grad_(True)
        (fn(s, t, temperature=2.0) * 0.37).backward()
        assert t.grad is None and s.grad is not None, name
        with torch.no_grad():
            assert not fn(s, t).requires_grad, name
        plain = fn(s.detach(), t.detach())
        expected = reference.divergence_loss(s.double(), t.double(), LOSSES[name][1])
        assert abs(plain.item() - expected.item()) <= 1e-5 * abs(expected.item()), name


# ---- distillation_loss(divergence=...) ----------------------------------------------------------


def _distill_fns(t, labels, mask, **kw):
    def fn(s):
        return distillation_loss(s, t, labels=labels, mask=mask, **kw)[0]

    def ref(s64):
        return reference.distillation_loss(s64, t.double(), labels=labels, mask=mask, **kw)[0]

    return fn, ref


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd", "forward_kl"])
def test_distillation_with_divergence(impl, rng, divergence):
    s, t = rng.logits(4, 5, 211), rng.logits(4, 5, 211)
    if divergence == "tvd":
        capped = lambda x: 6.0 * torch.tanh(0.8 * x / 6.0)  # noqa: E731 (the third case's)
        t = tvd_ties_apart(s, t, (2.0,))
        t = tvd_ties_apart(s, t, (2.0,), transform=capped)
    labels, mask = rng.labels((4, 5), 211), rng.mask((4, 5))
    for kw in (
        dict(alpha_kl=1.0, alpha_ce=0.5, alpha_mse=1e-3),
        dict(alpha_kl=0.7, alpha_ce=0.3, t2_scale=False, beta=0.2),
        dict(alpha_kl=1.0, alpha_ce=0.5, softcap=6.0, logit_scale=0.8),
    ):
        fn, ref = _distill_fns(t, labels, mask, temperature=2.0, divergence=divergence, **kw)
        check(fn, ref, s, torch.tensor(0.37), what=f"{divergence} {impl} {kw} {rng.tag}")
        parts = distillation_loss(
            s, t, labels=labels, mask=mask, temperature=2.0, divergence=divergence, **kw
        )
        ref_parts = reference.distillation_loss(
            s.double(), t.double(), labels=labels, mask=mask, temperature=2.0,
            divergence=divergence, **kw,
        )  # fmt: skip
        for got, want in zip(parts[1:], ref_parts[1:], strict=True):
            assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-9, rng.tag


def test_distillation_divergence_equals_the_loss(rng):
    s, t = rng.logits(6, 7, 90), rng.logits(6, 7, 90)
    mask = rng.mask((6, 7))
    for name in MAIN_LOSSES:
        fn, div, extra = LOSSES[name]
        x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        total, kl, ce, mse = distillation_loss(
            x, t, mask=mask, temperature=1.5, divergence=div, t2_scale=False, **extra
        )
        alone = fn(y, t, mask=mask, temperature=1.5, **extra)
        (total * 0.37).backward()
        (alone * 0.37).backward()
        assert torch.allclose(total, alone, rtol=1e-6) and kl.item() == total.item(), name
        assert ce.item() == 0 and mse.item() == 0
        assert norm(x.grad - y.grad) <= 1e-6 * norm(y.grad), name


def test_distillation_common_vocab(impl, rng):
    """Teacher with a smaller vocabulary: divergence over the common columns, CE over all of the
    student's."""
    s, t = rng.logits(3, 4, 160), rng.logits(3, 4, 150)
    labels = rng.labels((3, 4), 160)
    for divergence in ("forward_kl", "jsd"):
        fn, ref = _distill_fns(
            t, labels, None, temperature=2.0, alpha_kl=1.0, alpha_ce=0.5, divergence=divergence,
            vocab="common",
        )  # fmt: skip
        check(fn, ref, s, torch.tensor(0.37), what=f"{divergence} {impl} common vocab {rng.tag}")


def test_distillation_default_is_unchanged(rng):
    """No new argument given: the original op, bit for bit."""
    s, t = rng.logits(4, 60), rng.logits(4, 60)
    labels = rng.labels((4,), 60)
    a = distillation_loss(s, t, labels=labels, alpha_ce=0.5)
    b = distillation_loss(
        s, t, labels=labels, alpha_ce=0.5, divergence="forward_kl", beta=0.5, t2_scale=True
    )
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---- bad input ---------------------------------------------------------------------------------


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    lab = torch.tensor([1, 2, -100, 3])
    return [
        ("beta>1", lambda: jsd_loss(s, t, beta=1.5), ValueError, "beta"),
        ("beta<0", lambda: jsd_loss(s, t, beta=-0.1), ValueError, "beta"),
        ("beta=nan", lambda: jsd_loss(s, t, beta=math.nan), ValueError, "beta"),
        ("beta=str", lambda: jsd_loss(s, t, beta="0.5"), TypeError, "beta"),
        ("softcap<0", lambda: tvd_loss(s, t, softcap=-1.0), ValueError, "softcap"),
        ("softcap=0", lambda: tvd_loss(s, t, softcap=0.0), ValueError, "softcap"),
        ("softcap=nan", lambda: tvd_loss(s, t, softcap=math.nan), ValueError, "softcap"),
        ("scale=0", lambda: reverse_kl_loss(s, t, logit_scale=0.0), ValueError, "logit_scale"),
        (
            "vocab-mismatch",
            lambda: jsd_loss(s, torch.randn(4, 12)),
            ValueError,
            'vocab="common"',
        ),
        ("vocab-value", lambda: jsd_loss(s, t, vocab="pad"), ValueError, "vocab"),
        (
            "distill-vocab-mismatch",
            lambda: distillation_loss(s, torch.randn(4, 12)),
            ValueError,
            'vocab="common"',
        ),
        (
            "distill-vocab-mse",
            lambda: distillation_loss(s, torch.randn(4, 12), vocab="common", alpha_mse=1.0),
            ValueError,
            "alpha_mse",
        ),
        (
            "labels-range",
            lambda: reverse_kl_loss(s, t, labels=torch.tensor([1, 2, 10, 3])),
            ValueError,
            "labels",
        ),
        (
            "labels-negative",
            lambda: tvd_loss(s, t, labels=torch.tensor([1, -5, 0, 3])),
            ValueError,
            "labels",
        ),
        ("labels-float", lambda: jsd_loss(s, t, labels=lab.float()), TypeError, "labels"),
        ("T=0", lambda: jsd_loss(s, t, temperature=0.0), ValueError, "temperature"),
        ("reduction", lambda: jsd_loss(s, t, reduction="mean"), ValueError, "reduction"),
        (
            "normalizer-sum",
            lambda: jsd_loss(s, t, reduction="sum", normalizer=3),
            ValueError,
            "normalizer",
        ),  # fmt: skip
        ("normalizer<=0", lambda: jsd_loss(s, t, normalizer=0), ValueError, "normalizer"),
        (
            "normalizer-1d",
            lambda: jsd_loss(s, t, normalizer=torch.ones(1)),
            ValueError,
            "normalizer",
        ),  # fmt: skip
        ("normalizer-str", lambda: jsd_loss(s, t, normalizer="8"), TypeError, "normalizer"),
        ("t2-str", lambda: jsd_loss(s, t, t2_scale="yes"), TypeError, "t2_scale"),
        (
            "divergence",
            lambda: distillation_loss(s, t, divergence="kl"),
            ValueError,
            "divergence",
        ),  # fmt: skip
        (
            "distill-beta",
            lambda: distillation_loss(s, t, divergence="jsd", beta=2.0),
            ValueError,
            "beta",
        ),  # fmt: skip
        (
            "mask-shape",
            lambda: tvd_loss(s, t, mask=torch.ones(5, dtype=torch.bool)),
            ValueError,
            "mask",
        ),  # fmt: skip
        ("dtype", lambda: tvd_loss(s, t.bfloat16()), TypeError, "teacher_logits"),
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
    n = torch.tensor(7.0, dtype=torch.float64)
    ops = torch.ops.fastdistill
    return [
        (ops.reverse_kl.default, (s, t, None, 2.0, False, 1.0, 0.0, "batchmean", None, True)),
        (ops.reverse_kl.default, (bs, bt, g.mask((5,)), 1.0, True, 0.5, 3.0, "none", None, True)),
        (ops.jsd.default, (s, t, mask, 2.0, 0.3, False, 1.0, 0.0, "batchmean", n, True)),
        (ops.jsd.default, (s.detach(), t, mask, 0.5, 0.5, True, 1.0, 5.0, "sum", None, False)),
        (ops.tvd.default, (s, t, mask, 1.0, False, 2.0, 0.0, "none", None, True)),
        (ops.tvd.default, (bs, bt, None, 4.0, False, 1.0, 0.0, "batchmean", n, True)),
        (
            ops.distillation_divergence.default,
            (
                s,
                t,
                g.labels((3, 4), 17),
                mask,
                2.0,
                0.5,
                0.3,
                0.01,
                -100,
                "jsd",
                0.4,
                True,
                1.0,
                4.0,
                True,
            ),
        ),  # fmt: skip
        (
            ops.distillation_divergence.default,
            (bs, bt, None, None, 1.0, 1.0, 0.0, 0.0, -100, "tvd", 0.5, False, 0.7, 0.0, True),
        ),
    ]


@pytest.mark.parametrize("sample", range(8))
def test_opcheck(sample):
    op, args = _opcheck_samples()[sample]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager(rng):
    def f(s, t, labels, mask, n):
        a = jsd_loss(s, t, beta=0.3, temperature=2.0, labels=labels, normalizer=n) * 0.37
        b = reverse_kl_loss(s, t, mask=mask, reduction="none", softcap=5.0)
        c = tvd_loss(s, t, mask=mask, reduction="sum", logit_scale=0.5)
        d = distillation_loss(s, t, labels=labels, mask=mask, divergence="jsd", alpha_ce=0.5)[0]
        return a + b.sum() * 0.1 + c + d

    s, t = rng.logits(3, 6, 41), rng.logits(3, 6, 41)
    labels, mask = rng.labels((3, 6), 41), rng.mask((3, 6))
    n = torch.tensor(9.0)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc, le = compiled(x, t, labels, mask, n), f(y, t, labels, mask, n)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)
    torch._dynamo.reset()


# ---- TRL's generalized_jsd_loss -----------------------------------------------------------------


def _trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install trl; an optional test dependency)")
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as exc:  # an incompatible trl/transformers pair must not fail the suite
        pytest.skip(f"trl's GKDTrainer is not importable here: {exc!r}")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_trl_generalized_jsd_loss(rng, beta, temperature):
    """Values and gradients of TRL's formula (float64, so the comparison is exact to round-off),
    with ignored labels; and with num_items_in_batch as our normalizer."""
    trl_jsd = _trl_jsd()
    s, t = rng.logits(2, 9, 301), rng.logits(2, 9, 301)
    labels = rng.labels((2, 9), 301)
    for n in (None, torch.tensor(25)):
        x = s.double().requires_grad_(True)
        want = trl_jsd(x, t.double(), labels=labels, beta=beta, temperature=temperature,
                       num_items_in_batch=n)  # fmt: skip
        (want * 0.37).backward()
        y = s.clone().requires_grad_(True)
        got = jsd_loss(y, t, beta=beta, temperature=temperature, labels=labels, normalizer=n)
        (got * 0.37).backward()
        what = f"beta={beta} T={temperature} n={n} {rng.tag}"
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-9, what
        assert norm(y.grad.double() - x.grad) <= 1e-5 * norm(x.grad) + 1e-12, what


def test_oracle_itself_against_naive_formulas(rng):
    """The reference's log-space JSD and guarded KLs equal the textbook formulas in float64."""
    s, t = rng.logits(4, 50).double(), rng.logits(4, 50).double()
    ps, pt = s.softmax(-1), t.softmax(-1)
    m = 0.3 * pt + 0.7 * ps
    naive = {
        "jsd": (0.3 * pt * (pt / m).log() + 0.7 * ps * (ps / m).log()).sum(-1),
        "reverse_kl": (ps * (ps / pt).log()).sum(-1),
        "tvd": 0.5 * (ps - pt).abs().sum(-1),
    }
    for name, want in naive.items():
        got = reference.divergence_rows(s, t, name, beta=0.3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
