"""Backend selection: ``FASTDISTILL_BACKEND`` = ``auto`` | ``torch`` | ``native`` | ``triton``.

- ``torch``: the plain-PyTorch reference (``fastdistill.reference``), on any device.
- ``native``: the compiled core (C++ on CPU; CUDA kernels on GPU once built).
- ``triton``: the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.
- ``auto`` (default): the fastest backend available for the tensor's device.

A forced backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastdistill import _native

BACKENDS = ("auto", "torch", "native", "triton")
ENV_VAR = "FASTDISTILL_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run for this op and device."""


def requested_backend() -> str:
    """The backend named by ``FASTDISTILL_BACKEND`` (read on every call, so tests can switch)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Read once at import: select_backend runs inside torch.compile traces, which cannot call into
# the pybind module (a graph break under fullgraph=True).
_NATIVE_CUDA_BUILT = _native.available() and bool(_native.core().built_with_cuda())


def native_cuda_built() -> bool:
    return _NATIVE_CUDA_BUILT


def _has_triton_kernel(op: str) -> bool:
    try:
        from fastdistill.triton import KERNEL_MODULES
    except ImportError:  # a trimmed install without the package
        return False
    return op in KERNEL_MODULES


def available_backends(op: str, device: torch.device) -> list[str]:
    """Backends that can run ``op`` on ``device``, fastest first."""
    found = []
    if device.type == "cpu":
        if _native.available():
            found.append("native")
        if triton_importable() and triton_interpreting() and _has_triton_kernel(op):
            found.append("triton")
    elif device.type == "cuda":
        if native_cuda_built():
            found.append("native")
        if triton_importable() and _has_triton_kernel(op):
            found.append("triton")
    found.append("torch")
    return found


def select_backend(op: str, device: torch.device) -> str:
    """Resolve ``FASTDISTILL_BACKEND`` for one op on one device."""
    wanted = requested_backend()
    candidates = available_backends(op, device)
    if wanted == "auto":
        # On CPU the interpreter is a test vehicle, never the fast path.
        for name in candidates:
            if not (device.type == "cpu" and name == "triton"):
                return name
    if wanted in candidates:
        return wanted
    reasons = {
        "native": (
            "the compiled core has no kernel for this device"
            if _native.available()
            else "the compiled core fastdistill._C is not importable"
        ),
        "triton": (
            "triton is not installed"
            if not triton_importable()
            else (
                "Triton kernels on CPU tensors run only under TRITON_INTERPRET=1"
                if device.type == "cpu" and not triton_interpreting()
                else f"there is no Triton kernel for {op} yet"
            )
        ),
    }
    raise BackendUnavailableError(
        f"{ENV_VAR}={wanted} cannot run {op} on {device.type} tensors: {reasons.get(wanted, '')}. "
        f"Available here: {', '.join(candidates)}."
    )
