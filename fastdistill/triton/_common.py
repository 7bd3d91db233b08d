"""Small pieces the Triton kernels share."""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
# Elements per program (ROWS x BLOCK) when rows are shorter than a kernel's largest row tile, and
# the most rows per program: every per-row statistic is a ROWS-vector, and 128 rows of the
# three-term logits kernel spilled (tools/gpu/triton_compile_check.py); 16 do not. The interpreter
# pays a Python overhead per operation instead, so it takes far larger programs.
TILE_ELEMENTS = 65536 if INTERPRETED else 4096
MAX_ROWS = 4096 if INTERPRETED else 16

# The Triton interpreter (TRITON_INTERPRET=1, how the kernels are tested without a GPU) converts
# float32 to bfloat16 by truncation; compiled kernels round to nearest even. Rounding by hand in
# the interpreter keeps the tested results equal to what a GPU writes (within the ARCHITECTURE.md
# bound, which truncation exceeds by ~2x).
ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


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


def tile_shape(rows: int, cols: int, max_block: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of one program: a row tile of up to ``max_block`` columns, and as many rows
    as fill TILE_ELEMENTS when rows are short (small vocabularies, hidden sizes), so that short
    rows do not leave most of a program's threads idle."""
    block = min(triton.next_power_of_2(cols), max_block)
    per_program = max(1, min(TILE_ELEMENTS // block, MAX_ROWS))
    return min(per_program, triton.next_power_of_2(max(rows, 1))), block
