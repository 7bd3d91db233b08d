"""FASTDISTILL_BACKEND (auto | torch | native | triton), read at call time: selection, errors, and
the torch backend giving the same results as the native one for every op."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _oracle import Rng, norm, run_loss

from fastdistill import backend
from fastdistill.backend import BackendUnavailableError, select_backend
from fastdistill.losses import (
    all_finite,
    cosine_loss,
    cross_entropy,
    distillation_loss,
    kl_div_loss,
    mse_loss,
)

CPU = torch.device("cpu")
OPS = ("kl_div", "mse", "cosine", "cross_entropy", "distillation", "all_finite")


def _calls(rng: Rng):
    """op name -> (function of the student returning the loss, student)."""
    s, t = rng.logits(3, 5, 67), rng.logits(3, 5, 67)
    mask, labels = rng.mask((3, 5)), rng.labels((3, 5), 67)
    return {
        "kl_div": (lambda x: kl_div_loss(x, t, temperature=2.0, mask=mask), s),
        "kl_div-none": (lambda x: kl_div_loss(x, t, mask=mask, reduction="none"), s),
        "mse": (lambda x: mse_loss(x, t, mask=mask, reduction="mean"), s),
        "cosine": (lambda x: cosine_loss(x, t, mask=mask), s),
        "cross_entropy": (lambda x: cross_entropy(x, labels), s),
        "distillation": (
            lambda x: distillation_loss(
                x, t, labels=labels, mask=mask, alpha_ce=0.5, alpha_mse=0.01
            )[0],
            s,
        ),
        "all_finite": (lambda x: all_finite(x, t), s),
    }


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("value", ["bogus", "cuda", "native,torch"])
def test_unknown_backend_raises(monkeypatch, rng, value):
    monkeypatch.setenv("FASTDISTILL_BACKEND", value)
    for fn, s in _calls(rng).values():
        with pytest.raises(ValueError, match="FASTDISTILL_BACKEND"):
            fn(s)


def test_read_at_call_time(monkeypatch, rng):
    fn, s = _calls(rng)["kl_div"]
    fn(s)
    monkeypatch.setenv("FASTDISTILL_BACKEND", "bogus")
    with pytest.raises(ValueError):
        fn(s)
    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    fn(s)


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, "native"),
        ("auto", "native"),
        ("", "native"),
        ("  AUTO ", "native"),
        ("native", "native"),
        ("Native", "native"),
        ("torch", "torch"),
        ("TORCH", "torch"),
    ],
)
def test_select_backend_on_cpu(monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("FASTDISTILL_BACKEND", value)
    for op in OPS:
        assert select_backend(op, CPU) == expected, op
    assert backend.available_backends("kl_div", CPU)[0] == "native"
    assert backend.available_backends("kl_div", CPU)[-1] == "torch"


@pytest.mark.parametrize("interpret", [False, True], ids=["plain", "TRITON_INTERPRET=1"])
def test_triton_on_cpu_is_a_clear_error(monkeypatch, rng, interpret):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert issubclass(BackendUnavailableError, RuntimeError)
    for name, (fn, s) in _calls(rng).items():
        op = name.removesuffix("-none")
        if interpret and backend._has_triton_kernel(op):
            continue  # the kernel exists: covered by the numerics tests under make test-triton
        with pytest.raises(
            BackendUnavailableError,
            match="TRITON_INTERPRET|no Triton kernel|triton is not installed",
        ) as e:
            fn(s)
        assert "FASTDISTILL_BACKEND=triton" in str(e.value), str(e.value)
        if not interpret and backend.triton_importable():
            assert "TRITON_INTERPRET" in str(e.value)


@pytest.mark.parametrize(
    "name",
    ["kl_div", "kl_div-none", "mse", "cosine", "cross_entropy", "distillation", "all_finite"],
)
def test_torch_backend_equals_native(monkeypatch, rng, name):
    fn, s = _calls(rng)[name]
    g = rng.grad_output((3, 5) if name.endswith("-none") else ())
    results = {}
    for value in ("native", "torch", "auto"):
        monkeypatch.setenv("FASTDISTILL_BACKEND", value)
        if name == "all_finite":
            assert bool(fn(s)) is True
            s_bad = s.clone()
            s_bad[1, 2, 3] = float("nan")
            assert bool(fn(s_bad)) is False
            continue
        loss, grad = run_loss(fn, s, g)
        assert loss.dtype == torch.float32
        results[value] = (loss, grad)
    if name == "all_finite":
        return
    (ln, gn), (lt, gt), (la, ga) = results["native"], results["torch"], results["auto"]
    assert torch.equal(ln, la) and torch.equal(gn, ga), "auto must be native on CPU"
    assert norm(ln - lt) <= 1e-5 * norm(lt), f"{name}: {ln} vs {lt} {rng.tag}"
    assert norm(gn - gt) <= 1e-5 * norm(gt), f"{name}: gradients differ {rng.tag}"


def test_torch_backend_computes_gradients(monkeypatch, rng):
    """The torch backend is a full backend: gradients through every differentiable op."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", "torch")
    for name, (fn, s) in _calls(rng).items():
        if name == "all_finite":
            continue
        x = s.clone().requires_grad_(True)
        loss = fn(x)
        assert loss.requires_grad, name
        loss.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


_TORCH_BACKEND_TRACED = r"""
import os
import sys

os.environ["FASTDISTILL_BACKEND"] = "torch"
import torch

from fastdistill.losses import cosine_loss, cross_entropy, distillation_loss, kl_div_loss, mse_loss

s, t = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
mask, labels = torch.rand(3, 4) < 0.7, torch.randint(0, 17, (3, 4))
ops = torch.ops.fastdistill
CASES = [  # cross_entropy last: it used to crash the interpreter
    ("kl_div", ops.kl_div.default, (mask, 2.0, "batchmean"),
     lambda x: kl_div_loss(x, t, temperature=2.0, mask=mask)),
    ("mse", ops.mse.default, (mask, "mean"), lambda x: mse_loss(x, t, mask=mask)),
    ("cosine", ops.cosine.default, (mask, "mean"), lambda x: cosine_loss(x, t, mask=mask)),
    ("distillation", ops.distillation.default, (labels, mask, 2.0, 0.5, 0.5, 0.01, -100),
     lambda x: distillation_loss(x, t, labels=labels, mask=mask, alpha_ce=0.5)[0]),
    ("cross_entropy", ops.cross_entropy.default, None, lambda x: cross_entropy(x, labels)),
]
failed = 0
for name, op, extra, fn in CASES:
    for what in ("raw-op", "compile"):
        try:
            x = s.clone().requires_grad_(True)
            if what == "raw-op":
                # The ops run kernels only; the torch backend lives in fastdistill.losses.
                from fastdistill.backend import BackendUnavailableError

                args = (x, labels, -100, "mean", True) if extra is None else (x, t, *extra, True)
                try:
                    op(*args)
                except BackendUnavailableError:
                    pass
                else:
                    raise AssertionError("the raw op ran under FASTDISTILL_BACKEND=torch")
            else:
                torch._dynamo.reset()
                y = s.clone().requires_grad_(True)
                compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
                (compiled(x) * 0.37).backward()
                (fn(y) * 0.37).backward()
                torch.testing.assert_close(x.grad, y.grad)
            print(f"PASS {name} {what}", flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL {name} {what}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
sys.exit(1 if failed else 0)
"""


def test_torch_backend_raw_ops_and_compile():
    """Under FASTDISTILL_BACKEND=torch the public losses compile with backward and match eager,
    and the raw ops refuse clearly. In a subprocess: a crash must not take the session down."""
    env = {k: v for k, v in os.environ.items() if k != "FASTDISTILL_BACKEND"}
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_BACKEND_TRACED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, (
        f"exit status {proc.returncode}\n{out}"
    )
