"""Triton kernel for the logits losses: KL at temperature T (× T²), hard cross-entropy and logit
MSE, any subset in one row loop. Serves the kl_div, cross_entropy, mse and distillation ops, as
csrc/cpu/fused_logits.cpp does on the CPU (ARCHITECTURE.md, "Layers": a loss term is a small function inside
one shared row loop, not a copy of the kernel).

Per row (a program takes ROWS rows × BLOCK columns at a time: one row of a large vocabulary, or
several short rows; int64 row offsets):
  pass A  one read of the row in tiles of BLOCK elements: online maxima and softmax sums
          (rescaled when a maximum moves) of s/T, t/T and, for CE at T != 1, of s; the sum of
          squares for MSE; and dz = z_s - z_t accumulated term by term (see below);
  pass B  a second read: each row's KL and the gradient, written once in the input dtype.
When the row fits one tile (SINGLE), pass B reuses pass A's registers and the row is read once.

Precision where distillation converges (student ≈ teacher): with v = log p_s − log p_t,
  KL = Σ p_t (e^v − 1 − v)  (each term ≥ 0, series for small |v|),  p_s − p_t = p_t · expm1(v),
and v needs δ = log(z_s / z_t) = log1p(dz / z_t) to ~1e-10, which the difference of two
logsumexps cannot give. dz is kept online: a tile adds Σ e_t · expm1(u) (u = log(e_s / e_t)), and
when the maxima move by factors a (student) and b (teacher), dz ← a·dz + (a − b)·z_t, with
a − b = b · expm1(log a − log b) computed without cancellation.

Maxima are kept in logit units; every exponential is one exp2 of (x − max) · log2(e)/T.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdistill.triton._common import INTERPRETED, num_warps_for, store_output, tile_shape
from fastdistill.triton.divergences import (
    _expm1_small,
    _is_small,
    _log1p,
    _series_e_minus_1_minus_x,
    divergence_terms,
    reference_consts,
    two_diff,
)

# Module constants read inside kernels must be tl.constexpr (compiled Triton rejects plain globals).
LOG2E = tl.constexpr(1.4426950408889634)
# Largest row tile: 4096 fp32 lanes per input keep 16 values per thread per input at 8 warps,
# below the size where published softmax kernels start spilling registers (8–16k elements).
# The interpreter (tests without a GPU) pays a Python overhead per operation instead: larger tiles,
# still small enough that V = 32000 and 128256 run the multi-tile loop.
MAX_BLOCK = 16384 if INTERPRETED else 4096


@triton.jit
def _finite_or_zero(m):
    # A running maximum of -inf (nothing seen yet, or an all -inf prefix) must not turn
    # x − m into NaN for the -inf entries of x: shift by 0 instead (exp2(-inf) = 0 either way).
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale(m_old, m_new, scale):
    # exp2((m_old − m_new) · scale), 1 when unchanged (also when both are -inf).
    return tl.where(m_old == m_new, 1.0, tl.exp2((m_old - m_new) * scale))


@triton.jit
def _transform(x, logit_scale, softcap, TRANSFORM: tl.constexpr):
    """The logit transforms (0: none, 1: × logit_scale, 2: then softcap · tanh(x / softcap)) and
    their derivative dx'/dx (returned as x itself, unused, for TRANSFORM = 0)."""
    if TRANSFORM == 0:
        return x, x
    if TRANSFORM == 1:
        return x * logit_scale, tl.zeros_like(x) + logit_scale
    y = x * (logit_scale / softcap)
    a = 2.0 * tl.abs(y)
    # e^-a − 1 by its series for small a (tanh y ≈ y there: 1 − e^-a would cancel).
    em1 = tl.where(a < 0.25, _expm1_small(-a), tl.exp(-a) - 1.0)
    th = -em1 / (2.0 + em1)  # tanh |y|; ±inf give 1, NaN stays NaN
    e = em1 + 1.0
    return softcap * tl.where(y < 0.0, -th, th), logit_scale * 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _load_tiles(
    s_rows, t_rows, row_ok, cols, n_cols, logit_scale, softcap,
    KL: tl.constexpr, MSE: tl.constexpr, TRANSFORM: tl.constexpr,
):  # fmt: skip
    """The (ROWS, BLOCK) student tile and, for KL/MSE, the teacher tile, in fp32 and transformed;
    lanes outside the rows read -inf (no probability mass). Returns (xs, xt, in_tile, dfac); xt is
    xs without KL/MSE, dfac the student's dx'/dx (xs itself without a transform)."""
    in_tile = row_ok[:, None] & (cols < n_cols)[None, :]
    xs = tl.load(s_rows[:, None] + cols[None, :], mask=in_tile, other=float("-inf"))
    xs, dfac = _transform(xs.to(tl.float32), logit_scale, softcap, TRANSFORM)
    if TRANSFORM != 0:
        xs = tl.where(in_tile, xs, float("-inf"))  # softcap maps -inf to -softcap
    xt = xs
    if KL or MSE:
        xt = tl.load(t_rows[:, None] + cols[None, :], mask=in_tile, other=float("-inf"))
        xt, _unused = _transform(xt.to(tl.float32), logit_scale, softcap, TRANSFORM)
        if TRANSFORM != 0:
            xt = tl.where(in_tile, xt, float("-inf"))
    return xs, xt, in_tile, dfac


@triton.jit
def _tile_stats(
    xs, xt, in_tile, c_t, inv_t,
    ms, zs, mt, zt, dz, m1, z1, sq,
    KL: tl.constexpr, CE: tl.constexpr, MSE: tl.constexpr, SHARE: tl.constexpr,
):  # fmt: skip
    """Fold one (ROWS, BLOCK) tile into the running per-row statistics (pass A)."""
    if KL:
        ms_new = tl.maximum(ms, tl.max(xs, axis=1))
        mt_new = tl.maximum(mt, tl.max(xt, axis=1))
        a = _rescale(ms, ms_new, c_t)
        b = _rescale(mt, mt_new, c_t)
        # a − b without cancellation when both maxima moved alike (student ≈ teacher).
        d = ((ms - ms_new) - (mt - mt_new)) * inv_t
        a_minus_b = tl.where(_is_small(d), b * _expm1_small(d), a - b)
        ms_safe = _finite_or_zero(ms_new)
        mt_safe = _finite_or_zero(mt_new)
        es = tl.exp2((xs - ms_safe[:, None]) * c_t)
        et = tl.exp2((xt - mt_safe[:, None]) * c_t)
        # log(es / et). Differences of logits come before the scaling: s − t is exact when they
        # are close, while s/T − t/T would carry the rounding of each product (~1e-7 · |s|/T),
        # which is all of u when the student is close to the teacher.
        u = ((xs - xt) - (ms_safe - mt_safe)[:, None]) * inv_t
        dz_terms = tl.where(_is_small(u), et * _expm1_small(u), es - et)
        dz = a * dz + a_minus_b * zt + tl.sum(tl.where(in_tile, dz_terms, 0.0), axis=1)
        zs = a * zs + tl.sum(es, axis=1)
        zt = b * zt + tl.sum(et, axis=1)
        ms = ms_new
        mt = mt_new
    if CE:
        if not SHARE:
            m1_new = tl.maximum(m1, tl.max(xs, axis=1))
            e1 = tl.exp2((xs - _finite_or_zero(m1_new)[:, None]) * LOG2E)
            z1 = _rescale(m1, m1_new, LOG2E) * z1 + tl.sum(e1, axis=1)
            m1 = m1_new
    if MSE:
        diff = tl.where(in_tile, xs - xt, 0.0)
        sq += tl.sum(diff * diff, axis=1)
    return ms, zs, mt, zt, dz, m1, z1, sq


@triton.jit
def _tile_outputs(
    xs, xt, cols, label, c_t, inv_t,
    ms, mt, inv_zs, inv_zt, delta, m1, inv_z1,
    w_kl, w_ce, w_mse, beta, omb, log_ratio,
    ref_hi, ref_lo, ref_q, ref_w, ref_sp, s_corr,
    KL: tl.constexpr, CE: tl.constexpr, MSE: tl.constexpr, SHARE: tl.constexpr,
    DIV: tl.constexpr, GRAD_KL: tl.constexpr,
):  # fmt: skip
    """One (ROWS, BLOCK) tile's divergence terms and gradient (pass B); per-row values are
    (ROWS,). A term whose weight is 0 adds nothing (the where() keeps NaN of an inactive term from
    leaking in). For DIV != 0 also returns corr = p_s dq (dq = q − q_ref, divergences.py), whose
    row sum s_corr the divergence gradient p_s (dq − s_corr) needs: it is added only with GRAD_KL;
    ref_hi + ref_lo is the reference column's s' − t', ref_q, ref_w, ref_sp its constants
    (reference_consts)."""
    kl_terms = tl.zeros_like(xs)
    corr = kl_terms
    grad = tl.zeros_like(xs)
    if KL:
        ps = tl.exp2((xs - ms[:, None]) * c_t) * inv_zs[:, None]
        pt = tl.exp2((xt - mt[:, None]) * c_t) * inv_zt[:, None]
        # log p_s − log p_t, formed as u in pass A.
        v = ((xs - xt) - (ms - mt)[:, None]) * inv_t - delta[:, None]
        w = w_kl[:, None]
        if DIV == 0:
            small = _is_small(v)
            phi = _series_e_minus_1_minus_x(v)
            # Large or non-finite v (-inf logits): direct forms, with p_t = 0 terms dropped
            # explicitly (0 · inf would be NaN).
            direct = (ps - pt) - tl.where(pt > 0.0, pt * v, 0.0)
            kl_terms = tl.where(small, pt * phi, direct)
            grad += tl.where(w != 0.0, w * tl.where(small, pt * (phi + v), ps - pt), 0.0)
        else:
            # d − d_ref = ((s'_ref − t'_ref) − (s' − t')) / T, each logit difference taken
            # exactly (hi + lo): a rounded s' − t' is exact only close to the teacher; far from
            # it (|s' − t'| ~ 10) its rounding, over T = 0.05, cost up to 4e-6 of the gradient.
            dt_hi, dt_lo = two_diff(xs, xt)
            drel = ((ref_hi[:, None] - dt_hi) + (ref_lo[:, None] - dt_lo)) * inv_t
            kl_terms, dq = divergence_terms(
                ps, pt, -v, drel, beta, omb, log_ratio, ref_q, ref_w, ref_sp, DIV
            )
            corr = tl.where(ps > 0.0, ps * dq, 0.0)
            if GRAD_KL:
                grad += tl.where(w != 0.0, w * ps * (dq - s_corr[:, None]), 0.0)
        p1 = ps
    if CE:
        if not SHARE:
            p1 = tl.exp2((xs - m1[:, None]) * LOG2E) * inv_z1[:, None]
        onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        w = w_ce[:, None]
        grad += tl.where(w != 0.0, w * (p1 - onehot), 0.0)
    if MSE:
        w = w_mse[:, None]
        grad += tl.where(w != 0.0, w * (xs - xt), 0.0)
    return kl_terms, grad, corr


@triton.jit
def _fused_logits_rows(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    labels_ptr, mask_ptr, scales_ptr,
    row_kl_ptr, row_ce_ptr, row_mse_ptr, grad_ptr,
    n_rows, n_cols, temperature, ignore_index,
    KL: tl.constexpr, CE: tl.constexpr, MSE: tl.constexpr,
    HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, SHARE: tl.constexpr,
    SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    T2: tl.constexpr, DIV: tl.constexpr, TRANSFORM: tl.constexpr,
):  # fmt: skip
    """The row loop of both kernels below. T2: the divergence times T²; DIV: 0 forward KL,
    1 reverse KL, 2 JSD, 3 TVD; TRANSFORM: 0 none, 1 logit_scale, 2 and softcap. Their scalars
    (beta, 1 − beta, logit_scale, softcap) come as scales[3:7], read only where used."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    s_rows = student_ptr + rows * student_row_stride
    t_rows = teacher_ptr + rows * teacher_row_stride
    g_rows = grad_ptr + rows * n_cols
    cols0 = tl.arange(0, BLOCK)
    inv_t = 1.0 / temperature
    c_t = LOG2E * inv_t
    neg_inf = float("-inf")
    nan = float("nan")
    # A divergence other than forward KL needs a row sum before its gradient: an extra pass.
    ROW_SUM: tl.constexpr = KL and DIV != 0
    kl_mult = temperature * temperature if T2 else 1.0
    beta = 0.5
    omb = 0.5
    log_ratio = 0.0
    if DIV == 2:
        beta = tl.load(scales_ptr + 3)
        omb = tl.load(scales_ptr + 4)
        log_ratio = tl.log(beta / omb)
    logit_scale = 1.0
    softcap = 1.0
    if TRANSFORM != 0:
        logit_scale = tl.load(scales_ptr + 5)
        softcap = tl.load(scales_ptr + 6)

    # Which terms each row takes part in.
    selected = row_ok
    if HAS_MASK:
        selected = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    kl_on = selected & KL
    mse_on = selected & MSE
    # The label as an int32 column index (-1 when out of range); the int64 label is not kept
    # alive through the row loops.
    label = tl.full((ROWS,), -1, tl.int32)
    ce_on = row_ok & False
    label_ok = row_ok & False
    if CE:
        label64 = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        ce_on = row_ok & (label64 != ignore_index)
        label_ok = (label64 >= 0) & (label64 < n_cols)
        label = tl.where(label_ok, label64, -1).to(tl.int32)
    # Gradient weights (d total / d term / normaliser, T folded into KL and 2 into MSE); 0 turns
    # a term off for a row.
    w_kl = tl.where(kl_on, tl.load(scales_ptr + 0), 0.0)
    w_ce = tl.where(ce_on, tl.load(scales_ptr + 1), 0.0)
    w_mse = tl.where(mse_on, tl.load(scales_ptr + 2), 0.0)

    # ---- pass A: row statistics (and, for ROW_SUM, the column of the student's maximum) ----
    ms = tl.full((ROWS,), neg_inf, tl.float32)
    mt = tl.full((ROWS,), neg_inf, tl.float32)
    m1 = tl.full((ROWS,), neg_inf, tl.float32)
    zs = tl.zeros((ROWS,), tl.float32)
    zt = tl.zeros((ROWS,), tl.float32)
    dz = tl.zeros((ROWS,), tl.float32)
    z1 = tl.zeros((ROWS,), tl.float32)
    sq = tl.zeros((ROWS,), tl.float32)
    arg = tl.zeros((ROWS,), tl.int32)
    if SINGLE:
        xs, xt, in_tile, dfac = _load_tiles(
            s_rows, t_rows, row_ok, cols0, n_cols, logit_scale, softcap, KL, MSE, TRANSFORM
        )
        if ROW_SUM:
            arg = tl.argmax(xs, axis=1).to(tl.int32)
        ms, zs, mt, zt, dz, m1, z1, sq = _tile_stats(
            xs, xt, in_tile, c_t, inv_t, ms, zs, mt, zt, dz, m1, z1, sq, KL, CE, MSE, SHARE
        )
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            xs, xt, in_tile, dfac = _load_tiles(
                s_rows, t_rows, row_ok, cols, n_cols, logit_scale, softcap, KL, MSE, TRANSFORM
            )
            if ROW_SUM:
                tile_arg = tl.argmax(xs, axis=1).to(tl.int32) + start
                arg = tl.where(tl.max(xs, axis=1) > ms, tile_arg, arg)
            ms, zs, mt, zt, dz, m1, z1, sq = _tile_stats(
                xs, xt, in_tile, c_t, inv_t, ms, zs, mt, zt, dz, m1, z1, sq, KL, CE, MSE, SHARE
            )
    if SHARE:
        m1 = ms
        z1 = zs

    # A softmax is undefined on a row with NaN, +inf, or only -inf: its active terms (and its
    # gradient) are NaN, as in the reference; never hidden. A CE label out of [0, n_cols) that
    # is not ignore_index is NaN too (the host cannot raise without a sync; on CPU tensors the
    # op checks labels before launching).
    kl_nan = row_ok & False
    ce_nan = row_ok & False
    if KL:
        kl_sum = ms + mt + zs + zt
        kl_bad = (kl_sum != kl_sum) | (ms == float("inf")) | (mt == float("inf"))
        kl_bad = kl_bad | (ms == neg_inf) | (mt == neg_inf)
        kl_nan = kl_on & kl_bad
    if CE:
        ce_sum = m1 + z1
        ce_bad = (ce_sum != ce_sum) | (m1 == float("inf")) | (m1 == neg_inf)
        ce_bad = ce_bad | (~label_ok)
        ce_nan = ce_on & ce_bad
    # Each term is NaN only where its own softmax is undefined (a NaN teacher leaves CE finite,
    # as in the reference); the gradient of the total is NaN where any term is.
    bad = kl_nan | ce_nan

    inv_zs = 1.0 / zs
    inv_zt = 1.0 / zt
    delta = _log1p(dz / zt)
    inv_z1 = 1.0 / z1
    ms_safe = _finite_or_zero(ms)
    mt_safe = _finite_or_zero(mt)
    m1_safe = _finite_or_zero(m1)

    # The reference column, the student's most probable one: the gradient p_s (q − qbar) is
    # formed as p_s (dq − Σ p_s dq), dq = q − q_ref, whose sum has no large term to lose digits to
    # when that column's p_s is close to 1 (low T); dq comes from the logit differences of each
    # column and this one (divergences.py), exact 0 here.
    ref_hi = tl.zeros((ROWS,), tl.float32)
    ref_lo = ref_hi
    ref_q = ref_hi
    ref_w = ref_hi
    ref_sp = ref_hi
    if ROW_SUM:
        xs_top = tl.load(s_rows + arg, mask=row_ok, other=0.0).to(tl.float32)
        xt_top = tl.load(t_rows + arg, mask=row_ok, other=0.0).to(tl.float32)
        xs_top, _unused = _transform(xs_top, logit_scale, softcap, TRANSFORM)
        xt_top, _unused = _transform(xt_top, logit_scale, softcap, TRANSFORM)
        ps_top = tl.exp2((xs_top - ms_safe) * c_t) * inv_zs
        pt_top = tl.exp2((xt_top - mt_safe) * c_t) * inv_zt
        ref_hi, ref_lo = two_diff(xs_top, xt_top)
        d_top = delta - (ref_hi - (ms_safe - mt_safe)) * inv_t
        ref_q, ref_w, ref_sp = reference_consts(ps_top, pt_top, d_top, log_ratio, DIV)

    # The label's logit before any gradient is stored: the gradient may overwrite the student's
    # logits (the fused linear loss passes the same buffer).
    x_label = tl.zeros((ROWS,), tl.float32)
    if CE:
        x_label = tl.load(s_rows + label, mask=ce_on & label_ok, other=0.0).to(tl.float32)
        x_label, _unused = _transform(x_label, logit_scale, softcap, TRANSFORM)

    # ---- pass B: divergence terms and the gradient (pass C writes it for ROW_SUM) ----
    kl_acc = tl.zeros((ROWS,), tl.float32)
    s_corr = tl.zeros((ROWS,), tl.float32)
    if SINGLE:
        kl_terms, grad, corr = _tile_outputs(
            xs, xt, cols0, label, c_t, inv_t, ms_safe, mt_safe, inv_zs, inv_zt, delta, m1_safe,
            inv_z1, w_kl, w_ce, w_mse, beta, omb, log_ratio, ref_hi, ref_lo, ref_q, ref_w,
            ref_sp, s_corr, KL, CE, MSE, SHARE, DIV, not ROW_SUM,
        )  # fmt: skip
        kl_acc = tl.sum(tl.where(in_tile, kl_terms, 0.0), axis=1)
        if ROW_SUM:
            s_corr = tl.sum(tl.where(in_tile, corr, 0.0), axis=1)
            kl_terms, grad, corr = _tile_outputs(
                xs, xt, cols0, label, c_t, inv_t, ms_safe, mt_safe, inv_zs, inv_zt, delta,
                m1_safe, inv_z1, w_kl, w_ce, w_mse, beta, omb, log_ratio, ref_hi, ref_lo, ref_q,
                ref_w, ref_sp, s_corr, KL, CE, MSE, SHARE, DIV, True,
            )  # fmt: skip
        if WRITE_GRAD:
            if TRANSFORM != 0:
                grad = grad * dfac
            grad = tl.where(bad[:, None], nan, grad)
            store_output(g_rows[:, None] + cols0[None, :], grad, in_tile)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            xs, xt, in_tile, dfac = _load_tiles(
                s_rows, t_rows, row_ok, cols, n_cols, logit_scale, softcap, KL, MSE, TRANSFORM
            )
            kl_terms, grad, corr = _tile_outputs(
                xs, xt, cols, label, c_t, inv_t, ms_safe, mt_safe, inv_zs, inv_zt, delta, m1_safe,
                inv_z1, w_kl, w_ce, w_mse, beta, omb, log_ratio, ref_hi, ref_lo, ref_q, ref_w,
                ref_sp, s_corr, KL, CE, MSE, SHARE, DIV, not ROW_SUM,
            )  # fmt: skip
            kl_acc += tl.sum(tl.where(in_tile, kl_terms, 0.0), axis=1)
            if ROW_SUM:
                s_corr += tl.sum(tl.where(in_tile, corr, 0.0), axis=1)
            elif WRITE_GRAD:
                if TRANSFORM != 0:
                    grad = grad * dfac
                grad = tl.where(bad[:, None], nan, grad)
                store_output(g_rows[:, None] + cols[None, :], grad, in_tile)
        if ROW_SUM and WRITE_GRAD:
            # ---- pass C: the gradient of a divergence with a row sum ----
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                xs, xt, in_tile, dfac = _load_tiles(
                    s_rows, t_rows, row_ok, cols, n_cols, logit_scale, softcap, KL, MSE,
                    TRANSFORM,
                )  # fmt: skip
                kl_terms, grad, corr = _tile_outputs(
                    xs, xt, cols, label, c_t, inv_t, ms_safe, mt_safe, inv_zs, inv_zt, delta,
                    m1_safe, inv_z1, w_kl, w_ce, w_mse, beta, omb, log_ratio, ref_hi, ref_lo,
                    ref_q, ref_w, ref_sp, s_corr, KL, CE, MSE, SHARE, DIV, True,
                )  # fmt: skip
                if TRANSFORM != 0:
                    grad = grad * dfac
                grad = tl.where(bad[:, None], nan, grad)
                store_output(g_rows[:, None] + cols[None, :], grad, in_tile)

    if KL:
        kl_row = tl.where(kl_on, kl_acc * kl_mult, 0.0)
        tl.store(row_kl_ptr + rows, tl.where(kl_nan, nan, kl_row), mask=row_ok)
    if CE:
        # lse(s) − s[label] = (max − s[label]) + log z1: the exact difference first (V = 1 gives 0).
        ce_row = tl.where(ce_on, (m1_safe - x_label) + tl.log(z1), 0.0)
        tl.store(row_ce_ptr + rows, tl.where(ce_nan, nan, ce_row), mask=row_ok)
    if MSE:
        mse_row = tl.where(mse_on, sq, 0.0)  # IEEE arithmetic: inf or NaN as the data says
        tl.store(row_mse_ptr + rows, mse_row, mask=row_ok)


@triton.jit
def fused_logits_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    labels_ptr, mask_ptr, scales_ptr,
    row_kl_ptr, row_ce_ptr, row_mse_ptr, grad_ptr,
    n_rows, n_cols, temperature, ignore_index,
    KL: tl.constexpr, CE: tl.constexpr, MSE: tl.constexpr,
    HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, SHARE: tl.constexpr,
    SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The T²-scaled forward KL, CE and MSE on untransformed logits (kl_div, cross_entropy, mse,
    distillation)."""
    _fused_logits_rows(
        student_ptr, student_row_stride, teacher_ptr, teacher_row_stride,
        labels_ptr, mask_ptr, scales_ptr, row_kl_ptr, row_ce_ptr, row_mse_ptr, grad_ptr,
        n_rows, n_cols, temperature, ignore_index,
        KL, CE, MSE, HAS_MASK, WRITE_GRAD, SHARE, SINGLE, ROWS, BLOCK, True, 0, 0,
    )  # fmt: skip


@triton.jit
def divergence_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    labels_ptr, mask_ptr, scales_ptr,
    row_kl_ptr, row_ce_ptr, row_mse_ptr, grad_ptr,
    n_rows, n_cols, temperature, ignore_index,
    KL: tl.constexpr, CE: tl.constexpr, MSE: tl.constexpr,
    HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, SHARE: tl.constexpr,
    SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    T2: tl.constexpr, DIV: tl.constexpr, TRANSFORM: tl.constexpr,
):  # fmt: skip
    """The same row loop with another divergence, T² off, or the logit transforms
    (reverse_kl, jsd, tvd, distillation_divergence)."""
    _fused_logits_rows(
        student_ptr, student_row_stride, teacher_ptr, teacher_row_stride,
        labels_ptr, mask_ptr, scales_ptr, row_kl_ptr, row_ce_ptr, row_mse_ptr, grad_ptr,
        n_rows, n_cols, temperature, ignore_index,
        KL, CE, MSE, HAS_MASK, WRITE_GRAD, SHARE, SINGLE, ROWS, BLOCK, T2, DIV, TRANSFORM,
    )  # fmt: skip


def launch(
    student, teacher, labels, mask_u8, scales, row_kl, row_ce, row_mse, grad, *,
    temperature: float, ignore_index: int, kl: bool, ce: bool, mse: bool,
    divergence: int = 0, beta: float = 0.5, t2_scale: bool = True,
    logit_scale: float = 1.0, softcap: float = 0.0,
) -> None:  # fmt: skip
    """Launch on 2-D ``(rows, cols)`` views with unit column stride. ``scales`` is a float32
    tensor on the device: [3] gradient weights, then (for JSD or a transform) beta, 1 − beta,
    logit_scale and softcap (1 when off); ``row_*`` are float32 ``(rows,)`` outputs for
    the enabled terms; ``grad`` is a contiguous ``(rows, cols)`` buffer or None. ``divergence``:
    the code of csrc/cpu/kernels.h (0 forward KL, 1 reverse KL, 2 JSD with ``beta``, 3 TVD);
    ``logit_scale``/``softcap`` (0: off) transform both sides' logits before the temperature."""
    rows, cols = student.shape
    if rows == 0:
        return
    rows_per_program, block = tile_shape(rows, cols, MAX_BLOCK)
    dummy = scales  # stands in for absent tensors; never dereferenced (constexpr-guarded)
    teacher_arg = teacher if teacher is not None else student
    div = int(divergence) if kl else 0
    transform = 2 if softcap else (1 if logit_scale != 1.0 else 0)
    extra = {}
    kernel = fused_logits_kernel
    if div or transform or not t2_scale:
        kernel = divergence_kernel
        extra = dict(T2=bool(t2_scale), DIV=div, TRANSFORM=transform)
    kernel[(triton.cdiv(rows, rows_per_program),)](
        student, student.stride(0),
        teacher_arg, teacher_arg.stride(0),
        labels if labels is not None else dummy,
        mask_u8 if mask_u8 is not None else dummy,
        scales,
        row_kl if row_kl is not None else dummy,
        row_ce if row_ce is not None else dummy,
        row_mse if row_mse is not None else dummy,
        grad if grad is not None else student,
        rows, cols, float(temperature), int(ignore_index),
        KL=kl, CE=ce, MSE=mse,
        HAS_MASK=mask_u8 is not None,
        WRITE_GRAD=grad is not None,
        SHARE=kl and ce and float(temperature) == 1.0,
        SINGLE=cols <= block,
        ROWS=rows_per_program,
        BLOCK=block,
        **extra,
        num_warps=num_warps_for(rows_per_program * block),
    )  # fmt: skip
