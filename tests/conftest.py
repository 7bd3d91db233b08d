"""Fixtures shared by the op tests: fresh seeded data, backend and CPU-variant selection.

- ``rng``: an ``_oracle.Rng`` with a fresh seed per test (``FASTDISTILL_TEST_SEED`` replays one).
- ``impl``: every implementation a numerics test must cover (``_oracle.IMPLS``): the native core
  on EVERY CPU variant this machine runs, the ``torch`` backend, and ``triton`` (interpreted).
- ``native_isa``: the native backend on every CPU variant.
- ``switch_impl``: select an implementation inside a test (to share one float64 oracle).

Tests that use none of these run under whatever FASTDISTILL_BACKEND the environment sets (``auto``
by default), so ``make test-triton`` runs the behaviour tests on the Triton kernels as well.
"""

from __future__ import annotations

import os
import sys

# The compiled core links the system libgomp while torch ships its own: two OpenMP runtimes whose
# idle threads spin (the default wait policy) and starve each other on a small machine, making
# every torch op after a fastdistill call (and vice versa) 10-100x slower. Passive waiting keeps
# the suite fast; it must be set before torch is imported. (Reported upstream as a library issue.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The Triton kernels run on CPU tensors through the Triton interpreter (ARCHITECTURE.md, "Numerics rules").
# Triton reads this when a kernel module is imported, so it is set before anything imports one.
# A GPU run (tools/gpu/gpu_check.sh) sets TRITON_INTERPRET=0 to compile them for the device
# instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from _oracle import IMPLS, ISAS, Rng, use_impl  # noqa: E402

from fastdistill import _native  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_isa():
    """Every test leaves the compiled core's CPU variant as it found it."""
    if not _native.available():
        yield
        return
    before = _native.core().isa()
    yield
    _native.core().set_isa(before)


@pytest.fixture
def rng() -> Rng:
    return Rng()


@pytest.fixture(params=IMPLS, ids=lambda name: name.replace(":", "-"))
def impl(request, monkeypatch) -> str:
    use_impl(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=ISAS)
def native_isa(request, monkeypatch) -> str:
    use_impl(monkeypatch, f"native:{request.param}")
    return request.param


@pytest.fixture
def switch_impl(monkeypatch):
    return lambda impl: use_impl(monkeypatch, impl)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the trainer tests use it): with tiny matrices OpenMP
    hand-offs cost more than the math, and far more on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
