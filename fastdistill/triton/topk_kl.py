"""Triton kernel of the sparse-target loss (fastdistill::topk_kl; meaning:
fastdistill/reference.py, topk_kl_rows and topk_distillation_loss). One program per row:

  pass A  m = max_j s_j; for ``tail`` also m_out, the maximum over the columns outside K
  pass B  S = Σ e_j, e_j = exp((s_j − m)/T); S1 = Σ exp(s_j − m) for the CE; S_out = Σ_{j ∉ K}
          exp((s_j − m_out)/T) (``tail``), so log q_tail = (m_out − m)/T + log(S_out / S) is never
          1 − Σ_K q; lane sums in fp32 over a few tiles, the row sums in fp64
  K part  the k teacher and student terms in fp64
  pass C  the gradient: one dense formula for the columns outside K, a barrier, then the K
          columns and the label column overwritten with their own values.

The ids of a row arrive sorted (ops/topk_kl.py): membership of a column in K is a binary search
over them, and a repeated id is equal to its neighbour. A row whose ids repeat or leave [0, V), or
whose label leaves [0, V), gets a NaN loss and gradient (no host sync on a GPU; on CPU tensors the
op raises before the launch). Rows neither term selects get zeros and are not read.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from fastdistill.triton._common import INTERPRETED, num_warps_for, store_output

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))
# Row tile: 4096 fp32 lanes keep pass C at 16 values per thread and input at 8 warps.
MAX_BLOCK = 16384 if INTERPRETED else 4096


@triton.jit
def _in_k(ids_row, k, cols, LOG_K: tl.constexpr):
    """Whether each column of ``cols`` is one of the row's ``k`` sorted ids (binary search)."""
    lo = tl.zeros_like(cols)
    hi = tl.zeros_like(cols) + k
    for _ in tl.static_range(LOG_K):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(ids_row + mid, mask=active, other=0)
        right = v < cols
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    found = tl.load(ids_row + lo, mask=lo < k, other=-1)
    return (lo < k) & (found == cols)


@triton.jit
def _row_max(s_row, ids_row, k, n_cols, n_load, TAIL: tl.constexpr, BLOCK: tl.constexpr,
             LOG_K: tl.constexpr):  # fmt: skip
    m = tl.full((BLOCK,), NEG_INF, tl.float32)
    m_out = tl.full((BLOCK,), NEG_INF, tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(s_row + cols, mask=cols < n_load, other=NEG_INF).to(tl.float32)
        m = tl.maximum(m, x)
        if TAIL:
            m_out = tl.maximum(m_out, tl.where(_in_k(ids_row, k, cols, LOG_K), NEG_INF, x))
    return tl.max(m, 0), tl.max(m_out, 0)


@triton.jit
def _row_sums(s_row, ids_row, k, n_cols, n_load, m, m_out, c_t, TAIL: tl.constexpr,
              CE: tl.constexpr, BLOCK: tl.constexpr, LOG_K: tl.constexpr):  # fmt: skip
    acc = tl.zeros((BLOCK,), tl.float32)
    acc1 = tl.zeros((BLOCK,), tl.float32)
    acc_out = tl.zeros((BLOCK,), tl.float32)
    # (No column outside K with a finite logit: m_out = -inf, and every such term is 0.)
    shift = tl.where(m_out > NEG_INF, m_out, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < n_load
        x = tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32)
        acc += tl.where(inb, tl.exp2((x - m) * c_t), 0.0)
        if CE:
            acc1 += tl.where(inb, tl.exp2((x - m) * LOG2E), 0.0)
        if TAIL:
            out = inb & ~_in_k(ids_row, k, cols, LOG_K)
            acc_out += tl.where(out, tl.exp2((x - shift) * c_t), 0.0)
    f64 = tl.float64
    return tl.sum(acc.to(f64), 0), tl.sum(acc1.to(f64), 0), tl.sum(acc_out.to(f64), 0)


@triton.jit
def _lse(x, valid):
    mx = tl.max(tl.where(valid, x, NEG_INF), 0)
    return mx + tl.log(tl.sum(tl.where(valid, tl.exp(x - mx), 0.0), 0))


@triton.jit
def _k_part(lp, zk, kmask, tail_lp, m, m_out, s_sum, s_out, inv_t, lp_scale, NORM: tl.constexpr):
    """Loss, per-id d KL/dz (gk) and the dense coefficients alpha (of e_j) and beta (of
    exp((s_j − m_out)/T), outside K) of one row; fp64."""
    lse_v = m.to(tl.float64) * inv_t + tl.log(s_sum)
    if NORM == 2:
        logp = lp
    else:
        a = lp * lp_scale
        logp = a - _lse(a, kmask)
    if NORM == 1:
        logq = zk - _lse(zk, kmask)
    else:
        logq = zk - lse_v
    p = tl.where(kmask, tl.exp(logp), 0.0)
    keep = kmask & (p != 0)  # `p != 0`: NaN stays NaN
    loss = tl.sum(tl.where(keep, p * (logp - logq), 0.0), 0)
    q = tl.where(kmask, tl.exp(logq), 0.0)
    alpha = 0.0 * loss
    beta = 0.0 * loss
    if NORM == 0:
        alpha += 1.0 / s_sum
        gk = q - p
    elif NORM == 1:
        gk = q - p
    else:
        p_t = tl.exp(tail_lp)
        log_qt = (m_out.to(tl.float64) - m.to(tl.float64)) * inv_t + tl.log(s_out) - tl.log(s_sum)
        loss += tl.where(p_t != 0, p_t * (tail_lp - log_qt), 0.0)
        total = tl.sum(p, 0) + p_t
        alpha += total / s_sum
        beta += tl.where(s_out > 0, -p_t / s_out, 0.0)
        gk = total * q - p
    return loss, gk, alpha, beta


@triton.jit
def topk_kl_kernel(
    student_ptr, student_row_stride, ids_ptr, lp_ptr, tail_ptr, mask_ptr, labels_ptr,
    scales_ptr, row_kd_ptr, row_ce_ptr, grad_ptr,
    n_cols, k, inv_t, lp_scale, ignore_index,
    NORM: tl.constexpr, USE_KD: tl.constexpr, USE_CE: tl.constexpr, HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, LOG_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_row_stride
    ids_row = ids_ptr + row * k
    kd = row >= 0
    if HAS_MASK:
        kd = tl.load(mask_ptr + row) != 0
    if not USE_KD:
        kd = row < 0
    ce = row < 0
    label = row * 0
    if USE_CE:
        label = tl.load(labels_ptr + row)
        ce = label != ignore_index
    live = kd | ce
    TAIL: tl.constexpr = USE_KD and NORM == 2
    c_t = tl.where(kd, LOG2E * inv_t, LOG2E)  # the CE alone runs at T = 1
    # Vector & scalar masks trip the interpreter: scalar flags become load bounds instead.
    n_live = tl.where(live, n_cols, 0)
    m, m_out = _row_max(s_row, ids_row, k, n_cols, tl.where(kd, n_cols, 0), TAIL, BLOCK, LOG_K)
    if TAIL:
        m_out = tl.where(kd, m_out, NEG_INF)
    m0, _ = _row_max(s_row, ids_row, k, n_cols, tl.where(kd, 0, n_live), False, BLOCK, LOG_K)
    m = tl.maximum(m, m0)
    s_sum, s1, s_out = _row_sums(
        s_row, ids_row, k, n_cols, n_live, m, m_out, c_t, TAIL, USE_CE, BLOCK, LOG_K
    )
    if not USE_CE:
        s1 = s_sum

    offs = tl.arange(0, KB)
    kmask = offs < tl.where(kd, k, 0)
    ids = tl.load(ids_row + offs, mask=kmask, other=0)
    nxt = tl.load(ids_row + offs + 1, mask=kmask & (offs + 1 < k), other=-1)
    bad_id = kmask & ((ids < 0) | (ids >= n_cols) | (ids == nxt))
    bad = tl.sum(bad_id.to(tl.int32), 0) > 0
    safe = tl.where((ids >= 0) & (ids < n_cols), ids, 0)
    lp = tl.load(lp_ptr + row * k + offs, mask=kmask, other=NEG_INF).to(tl.float64)
    xk = tl.load(s_row + safe, mask=kmask, other=NEG_INF).to(tl.float32)
    tail_lp = 0.0
    if TAIL:
        tail_lp = tl.load(tail_ptr + row, mask=kd, other=0.0).to(tl.float64)
    inv_t64 = tl.zeros((), tl.float64) + inv_t  # (a Python float in the interpreter)
    loss, gk, alpha, beta = _k_part(
        lp, xk.to(tl.float64) * inv_t64, kmask, tail_lp, m, m_out, s_sum, s_out, inv_t64,
        lp_scale, NORM,
    )  # fmt: skip
    nan = float("nan")
    alpha = tl.where(bad, nan, tl.where(kd, alpha, 0.0))
    beta = tl.where(kd & ~bad, beta, 0.0)
    if USE_KD:
        tl.store(row_kd_ptr + row, tl.where(bad, nan, tl.where(kd, loss, 0.0)).to(tl.float32))
    label_ok = (label >= 0) & (label < n_cols)
    safe_label = tl.where(ce & label_ok, label, 0)
    x_label = tl.load(s_row + safe_label, mask=ce, other=0.0).to(tl.float32)
    if USE_CE:
        ce_row = m.to(tl.float64) + tl.log(s1) - x_label
        ce_row = tl.where(label_ok, ce_row, nan)
        tl.store(row_ce_ptr + row, tl.where(ce, ce_row, 0.0).to(tl.float32))
    if WRITE_GRAD:
        _write_grad(
            s_row, grad_ptr + row * n_cols, scales_ptr, n_cols, n_live, kd, ce, live, m, m_out, c_t,
            alpha, beta, s1, gk, ids, safe, offs < tl.where(kd & ~bad, k, 0), xk, label, safe_label, label_ok,
            x_label, TAIL, USE_CE, BLOCK,
        )  # fmt: skip


@triton.jit
def _write_grad(s_row, g_row, scales_ptr, n_cols, n_live, kd, ce, live, m, m_out, c_t, alpha, beta, s1,
                gk, ids, safe, kstore, xk, label, safe_label, label_ok, x_label,
                TAIL: tl.constexpr, CE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    c_kd = tl.where(kd, tl.load(scales_ptr).to(tl.float64), 0.0)
    c_ce = tl.where(ce, tl.load(scales_ptr + 1).to(tl.float64), 0.0)
    coef = (c_kd * alpha).to(tl.float32)
    coef_out = (c_kd * beta).to(tl.float32)
    # A label outside [0, V) (no host check on a GPU): the whole gradient row NaN, like the loss.
    ce_coef = tl.where(label_ok, c_ce / s1, float("nan")).to(tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inb = cols < n_cols
        x = tl.load(s_row + cols, mask=cols < n_live, other=0.0).to(tl.float32)
        v = tl.where(coef != 0, coef * tl.exp2((x - m) * c_t), 0.0)  # renormalized: 0
        if CE:
            v += tl.where(ce, ce_coef * tl.exp2((x - m) * LOG2E), 0.0)
        if TAIL:
            v += tl.where(coef_out != 0, coef_out * tl.exp2((x - m_out) * c_t), 0.0)
        store_output(g_row + cols, tl.where(live, v, 0.0), inb)
    # The K and label columns are rewritten below: the dense stores must land first.
    tl.debug_barrier()
    m64 = m.to(tl.float64)
    val = c_kd * gk
    if CE:
        e1 = tl.exp(xk.to(tl.float64) - m64)
        val += tl.where(ce, c_ce * (e1 / s1 - tl.where(ids == label, 1.0, 0.0)), 0.0)
    store_output(g_row + safe, val.to(tl.float32), kstore)
    if CE:
        label_in_k = tl.sum((kstore & (ids == label)).to(tl.int32), 0) > 0
        x = x_label.to(tl.float64)
        kd_part = alpha * tl.exp((x - m64) * (c_t / LOG2E).to(tl.float64))
        if TAIL:
            e_out = tl.exp((x - m_out.to(tl.float64)) * (c_t / LOG2E).to(tl.float64))
            kd_part += tl.where(beta != 0, beta * e_out, 0.0)
        v = c_kd * kd_part + c_ce * (tl.exp(x - m64) / s1 - 1.0)
        store_output(g_row + safe_label, v.to(tl.float32), ce & label_ok & ~label_in_k)


def launch(s2, ids2, lp2, tail1, mask_u8, labels1, scales, row_kd, row_ce, grad, **kw) -> None:
    """``s2``: ``(rows, V)`` with unit column stride; ``ids2`` (sorted per row, int64) and ``lp2``
    (float32): contiguous ``(rows, k)``; ``tail1``, ``mask_u8``, ``labels1``: ``(rows,)`` or None;
    ``scales``: float32 [2] on the device; ``grad``: contiguous ``(rows, V)`` or None."""
    rows, cols = s2.shape
    if rows == 0:
        return
    k = ids2.shape[1]
    block = min(triton.next_power_of_2(cols), MAX_BLOCK)
    temperature = kw["temperature"]
    dummy = scales
    topk_kl_kernel[(rows,)](
        s2, s2.stride(0), ids2, lp2, tail1 if tail1 is not None else dummy,
        mask_u8 if mask_u8 is not None else dummy, labels1 if labels1 is not None else ids2,
        scales, row_kd if row_kd is not None else dummy, row_ce if row_ce is not None else dummy,
        grad if grad is not None else s2,
        cols, k, 1.0 / temperature, kw["capture_temperature"] / temperature, kw["ignore_index"],
        NORM=kw["normalization"], USE_KD=kw["use_kd"], USE_CE=labels1 is not None,
        HAS_MASK=mask_u8 is not None, WRITE_GRAD=grad is not None, BLOCK=block,
        KB=triton.next_power_of_2(k), LOG_K=max(1, math.ceil(math.log2(k + 1))),
        num_warps=num_warps_for(block),
    )  # fmt: skip
