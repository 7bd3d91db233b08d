"""Access to the compiled core ``fastdistill._C`` (torch-independent C++ kernels).

Python owns validation and allocation; the core receives raw pointers. This module converts
tensors into what the core expects (dtype codes, row strides, thread counts) so op files do not.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

try:
    from fastdistill import _C
except ImportError as exc:  # exercised on a source tree without a build, or a broken install
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


def _diagnose(exc: ImportError | None) -> str | None:
    """Why the core did not import, and the fix (Python's own message for a package without
    ``_C`` blames a circular import, which is never the cause here)."""
    if exc is None:
        return None
    pkg = Path(__file__).resolve().parent
    if not any(pkg.glob("_C*.so")) and not any(pkg.glob("_C*.pyd")):
        if (pkg.parent / "pyproject.toml").is_file():
            return (
                f"{pkg} is a source tree with no compiled core, imported instead of the installed "
                "package because the current directory (or PYTHONPATH) comes first on sys.path: "
                "run from another directory, or build it in place with `make install` "
                "(pip install --no-build-isolation -e .)"
            )
        return f"{pkg} holds no compiled core: reinstall fastdistill (pip install .)"
    return f"the compiled core failed to load ({exc}): reinstall fastdistill (pip install .)"


IMPORT_PROBLEM = _diagnose(_IMPORT_ERROR)
if IMPORT_PROBLEM and os.environ.get("FASTDISTILL_BACKEND", "auto").strip().lower() != "torch":
    # Once, at import (not inside ops: they run under torch.compile traces).
    warnings.warn(
        f"fastdistill: {IMPORT_PROBLEM}. Until then the 'auto' backend runs the plain-PyTorch "
        "reference on CPU tensors, many times slower (FASTDISTILL_BACKEND=torch chooses it "
        "knowingly and silences this warning).",
        RuntimeWarning,
        stacklevel=2,
    )

# Must match csrc/cpu/simd_math.h (enum DType); 3 = float64 is understood by all_finite only.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Normaliser codes, csrc/cpu/kernels.h (enum Norm).
NORM_SUM = 0
NORM_ROWS = 1
NORM_ROWS_COLS = 2
NORM_GIVEN = 3

# Divergence codes, csrc/cpu/kernels.h (enum Divergence).
FORWARD_KL = 0
DIVERGENCE_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": 1, "jsd": 2, "tvd": 3}


def available() -> bool:
    return _C is not None


def core():
    """The compiled module; raises a clear error when the build is missing."""
    if _C is None:
        raise RuntimeError(
            f"fastdistill's compiled core (fastdistill._C) is not importable: {IMPORT_PROBLEM}; "
            "or use FASTDISTILL_BACKEND=torch"
        )
    return _C


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def num_threads() -> int:
    # ARCHITECTURE.md ("Layers"): the core uses as many threads as torch does.
    return max(1, torch.get_num_threads())
