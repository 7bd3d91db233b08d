"""Triton kernel for the hidden-state cosine loss, 1 − cos(s, t) per selected row, with torch's
cosine_embedding_loss epsilon: cos = <s,t> / sqrt((|s|² + 1e-12)(|t|² + 1e-12)).

A program takes ROWS rows × BLOCK columns (several short rows, or one long one; int64 offsets). Pass A accumulates <s,t>, |s|², |t|² in fp32 lanes over tiles
of BLOCK elements; the per-row scalars are finished in fp64 (as the CPU kernel does); pass B
writes the gradient d(1 − cos)/ds = −(t / denom − cos · s / (|s|² + eps)), times ``scale``
(1 / normaliser, a device scalar). Hidden sizes up to 4096 fit one tile: pass B then reuses the
registers and the row is read once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdistill.triton._common import INTERPRETED, num_warps_for, store_output, tile_shape

EPS = tl.constexpr(1e-12)  # torch's EPSILON in cosine_embedding_loss
# Three fp32 accumulators per lane: 4096 keeps them at 16 per thread (8192 took 174 registers).
MAX_BLOCK = 16384 if INTERPRETED else 4096


@triton.jit
def _load_tiles(s_rows, t_rows, row_ok, cols, n_cols):
    """The (ROWS, BLOCK) student and teacher tiles in fp32 (0 outside the rows) and the lanes in
    them."""
    in_tile = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(s_rows + cols[None, :], mask=in_tile, other=0.0).to(tl.float32)
    y = tl.load(t_rows + cols[None, :], mask=in_tile, other=0.0).to(tl.float32)
    return x, y, in_tile


@triton.jit
def cosine_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    mask_ptr, scale_ptr, row_loss_ptr, grad_ptr,
    n_rows, n_cols,
    HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    s_rows = (student_ptr + rows * student_row_stride)[:, None]
    t_rows = (teacher_ptr + rows * teacher_row_stride)[:, None]
    g_rows = (grad_ptr + rows * n_cols)[:, None]
    cols0 = tl.arange(0, BLOCK)
    selected = row_ok
    if HAS_MASK:
        selected = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0

    dot = tl.zeros((ROWS, BLOCK), tl.float32)
    ss = tl.zeros((ROWS, BLOCK), tl.float32)
    tt = tl.zeros((ROWS, BLOCK), tl.float32)
    if SINGLE:
        x, y, in_tile = _load_tiles(s_rows, t_rows, row_ok, cols0, n_cols)
        dot = x * y
        ss = x * x
        tt = y * y
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            xb, yb, in_tile = _load_tiles(s_rows, t_rows, row_ok, cols, n_cols)
            dot += xb * yb
            ss += xb * xb
            tt += yb * yb
    ms = tl.sum(ss, axis=1).to(tl.float64) + EPS
    denom = tl.sqrt(ms * (tl.sum(tt, axis=1).to(tl.float64) + EPS))
    cos = tl.sum(dot, axis=1).to(tl.float64) / denom
    row_loss = tl.where(selected, (1.0 - cos).to(tl.float32), 0.0)
    tl.store(row_loss_ptr + rows, row_loss, mask=row_ok)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr).to(tl.float64)
        # Unselected rows get exact zeros, also where their data is NaN.
        ct = tl.where(selected, (-scale / denom).to(tl.float32), 0.0)[:, None]
        cs = tl.where(selected, (scale * cos / ms).to(tl.float32), 0.0)[:, None]
        sel = selected[:, None]
        if SINGLE:
            store_output(g_rows + cols0[None, :], tl.where(sel, ct * y + cs * x, 0.0), in_tile)
        else:
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                xb, yb, in_tile = _load_tiles(s_rows, t_rows, row_ok, cols, n_cols)
                g = tl.where(sel, ct * yb + cs * xb, 0.0)
                store_output(g_rows + cols[None, :], g, in_tile)


def launch(student, teacher, mask_u8, scale, row_loss, grad) -> None:
    """2-D ``(rows, cols)`` views with unit column stride; ``scale``: float32 [1] on the device;
    ``row_loss``: float32 ``(rows,)``; ``grad``: contiguous ``(rows, cols)`` or None."""
    rows, cols = student.shape
    if rows == 0:
        return
    rows_per_program, block = tile_shape(rows, cols, MAX_BLOCK)
    cosine_kernel[(triton.cdiv(rows, rows_per_program),)](
        student, student.stride(0),
        teacher, teacher.stride(0),
        mask_u8 if mask_u8 is not None else scale,
        scale, row_loss,
        grad if grad is not None else student,
        rows, cols,
        HAS_MASK=mask_u8 is not None,
        WRITE_GRAD=grad is not None,
        SINGLE=cols <= block,
        ROWS=rows_per_program,
        BLOCK=block,
        num_warps=num_warps_for(rows_per_program * block),
    )  # fmt: skip
