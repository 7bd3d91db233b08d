"""Small pieces the Triton kernels share."""

from __future__ import annotations

import triton
import triton.language as tl

# The Triton interpreter (TRITON_INTERPRET=1, how the kernels are tested without a GPU) converts
# float32 to bfloat16 by truncation; compiled kernels round to nearest even. Rounding by hand in
# the interpreter keeps the tested results equal to what a GPU writes (within the DESIGN.md §5
# bound, which truncation exceeds by ~2x).
ROUND_BF16_BY_HAND = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def store_output(ptr, x, mask):
    """Store fp32 ``x`` in ``ptr``'s dtype, rounded to nearest even."""
    if ROUND_BF16_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Round to nearest even on the 16 dropped bits; NaN and ±inf keep their top half.
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def num_warps_for(block: int) -> int:
    """Warps per program for a row tile of ``block`` elements: 8 for the large tiles (16 fp32
    values per thread per input at 4096), 4 below 2048 elements, where more threads would idle."""
    return 8 if block >= 2048 else 4
