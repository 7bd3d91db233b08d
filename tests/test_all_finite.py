"""all_finite: one 0-dim bool tensor on the inputs' device, False iff any NaN/±inf anywhere."""

from __future__ import annotations

import pytest
import torch

from fastdistill.losses import all_finite

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BAD = (float("nan"), float("inf"), float("-inf"))
# 100k+ elements: above the kernel's threading threshold (64k), odd, not a multiple of any vector.
BIG = 100_003


def _check(result, expected: bool):
    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.bool and result.shape == () and result.device.type == "cpu"
    assert bool(result) is expected


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", [1, 7, 1000, BIG])
def test_finite_values(native_isa, dtype, size):
    info = torch.finfo(dtype)
    x = torch.randn(size, dtype=torch.float64).to(dtype)
    x[0] = info.max
    x[-1] = -info.max
    if size > 2:
        x[size // 2] = info.tiny / 2  # subnormal (0 for bf16 is fine too)
    _check(all_finite(x), True)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_anywhere(native_isa, dtype, bad, where):
    for size in (9, BIG):
        x = torch.randn(size).to(dtype)
        i = {"first": 0, "middle": size // 2, "last": size - 1}[where]
        x[i] = bad
        _check(all_finite(x), False)
        _check(all_finite(torch.ones(3), x, torch.ones(2)), False)  # among several tensors
        x[i] = 1.0
        _check(all_finite(x), True)


def test_backends_agree(backend):
    x = torch.randn(4, 5)
    _check(all_finite(x, x.bfloat16(), x.half(), x.double()), True)
    y = x.clone()
    y[2, 3] = float("nan")
    _check(all_finite(x, y), False)


def test_integer_and_bool_tensors_are_finite():
    for dtype in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool):
        _check(all_finite(torch.ones(BIG, dtype=dtype)), True)
    _check(all_finite(torch.arange(10), torch.tensor([float("inf")])), False)


def test_complex_tensors():
    z = torch.randn(10, dtype=torch.complex64)
    _check(all_finite(z), True)
    z[3] = complex(1.0, float("nan"))
    _check(all_finite(z), False)


def test_empty_and_zero_dim():
    _check(all_finite(torch.empty(0)), True)
    _check(all_finite(torch.tensor(3.0)), True)
    _check(all_finite(torch.tensor(float("inf"))), False)


def test_none_is_skipped():
    """Gradients of unused parameters are None."""
    _check(all_finite(None, torch.ones(3), None), True)
    _check(all_finite(torch.tensor([float("nan")]), None), False)


def test_non_contiguous_views():
    base = torch.randn(64, 40)
    base[:, 7] = float("nan")
    _check(all_finite(base[:, :5]), True)  # the NaN column is outside the view
    _check(all_finite(base[:, 5:10]), False)
    _check(all_finite(base.t()[6:9]), False)
    _check(all_finite(base[::2, ::3][:, :2]), True)


def test_requires_grad_and_grads():
    w = torch.randn(10, requires_grad=True)
    (w * 2).sum().backward()
    _check(all_finite(w, w.grad), True)
    w.grad[4] = float("inf")
    _check(all_finite(w, w.grad), False)


def test_does_not_modify_inputs():
    x = torch.randn(BIG)
    x[5] = float("nan")
    before = x.clone()
    all_finite(x)
    assert torch.equal(x[~x.isnan()], before[~before.isnan()]) and x.isnan().sum() == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        all_finite()
    with pytest.raises(ValueError, match="at least one"):
        all_finite(None, None)
    with pytest.raises(TypeError, match="torch.Tensor"):
        all_finite(torch.ones(2), [1.0, 2.0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        all_finite(1.0)
    # Mixed devices (meta stands in for a second device on a CPU-only machine).
    with pytest.raises(ValueError, match="device"):
        all_finite(torch.ones(2), torch.ones(2, device="meta"))


def test_opcheck():
    for args in [
        ([torch.randn(5), torch.randn(3, 2).bfloat16()],),
        ([torch.tensor([1.0, float("nan")])],),
        ([torch.arange(4)],),
    ]:
        torch.library.opcheck(torch.ops.fastdistill.all_finite.default, args)
