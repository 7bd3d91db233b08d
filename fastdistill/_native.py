"""Access to the compiled core ``fastdistill._C`` (torch-independent C++ kernels).

Python owns validation and allocation; the core receives raw pointers. This module converts
tensors into what the core expects (dtype codes, row strides, thread counts) so op files do not.
"""

from __future__ import annotations

import torch

try:
    from fastdistill import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

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
            "fastdistill's compiled core (fastdistill._C) could not be imported "
            f"({_IMPORT_ERROR}). Reinstall with `pip install .` from the source tree, or use "
            "FASTDISTILL_BACKEND=torch."
        )
    return _C


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def num_threads() -> int:
    # DESIGN.md §3: the core uses as many threads as torch does.
    return max(1, torch.get_num_threads())
