"""The divergences of the Triton logits row loop (fused_logits.py) other than forward KL, one small
function each, as csrc/cuda/divergences.cuh holds them for the CUDA kernel; and the small-argument
series they share with the row loop.

A column's function receives p_s, p_t (the probabilities at temperature T), d = log p_t − log p_s
(formed from logit differences: exact 0 where the student equals the teacher, accurate where they
are close) and drel = d − d_ref, formed from the exact logit differences of the column and the
reference column (exact 0 there). It returns the column's loss term
and dq = q − q_ref, q = dL/dp_s (0 where p_s = 0). The gradient w.r.t. the student's z = s'/T is
p_s (q − Σ p_s q), which does not change when a constant is added to q; the row loop measures q
from its value q_ref at the student's most probable column, and forms dq from drel rather than as
a difference of two rounded q: where q is nearly one constant over the columns that carry the
student's mass, the rounding of each q would be all of the difference. A zero probability
contributes nothing whatever the other side holds (0 log 0 = 0), so -inf logits are ordinary;
NaN stays NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _series_e_minus_1_minus_x(v):
    # e^v − 1 − v to v^7: below 2e-8 relative for |v| < 1/4, where the direct form cancels.
    q = 1.0 / 5040.0
    q = q * v + 1.0 / 720.0
    q = q * v + 1.0 / 120.0
    q = q * v + 1.0 / 24.0
    q = q * v + 1.0 / 6.0
    q = q * v + 0.5
    return q * v * v


@triton.jit
def _is_small(v):
    return (v > -0.25) & (v < 0.25)  # false for NaN and ±inf


@triton.jit
def _expm1_small(v):
    return _series_e_minus_1_minus_x(v) + v


@triton.jit
def _log1p(x):
    # log(1 + x) with the rounding of 1 + x undone (u − 1 is exact; Goldberg's trick): a few ulps
    # for all x, where log(1 + x) alone loses ~6e-8/|x| relative for small x.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _softplus(z):
    # log(1 + e^z) without overflow, precise where it is tiny (z ≪ 0); ±inf give +inf and 0.
    return tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))


@triton.jit
def two_diff(a, b):
    """a − b as hi + lo exactly (Knuth's two-sum): hi is the rounded difference, lo its rounding
    error (0 where hi is not finite, so that infinities stay what hi says)."""
    hi = a - b
    bb = hi - a
    lo = (a - (hi - bb)) - (b + bb)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def _jsd_log_ratios(d, beta, omb):
    """log(M / p_s) and log(M / p_t), M = β p_t + (1 − β) p_s, from d = log p_t − log p_s
    alone (as csrc/cuda/divergences.cuh): nothing underflows where both log-probabilities are far
    below −104, and both are exact 0 at d = 0. With x = −|d| and a the weight of the smaller side,
    the ratio on the larger side is log((1 − a) + a e^x) = log1p(a expm1(x)): 1 − a is implied,
    never the other weight as passed (β and 1 − β, each rounded to fp32, sum to 1 only within
    ~3e-8, and every column's log(M / p) must describe the same M: a common shift of both ratios
    moves the loss by that shift times the mass)."""
    student_larger = d <= 0.0  # false for NaN, which then propagates
    a = tl.where(student_larger, beta, omb)
    x = tl.where(student_larger, d, -d)  # <= 0
    em1 = tl.where(x > -0.25, _expm1_small(x), tl.exp(x) - 1.0)
    r = _log1p(a * em1)
    return tl.where(student_larger, r, r + d), tl.where(student_larger, r - d, r)


@triton.jit
def _expm1_half(x):
    # e^x − 1 for |x| <= 1/2: its Taylor series to x^8 (truncation 1.1e-8 relative).
    e = 1.0 / 40320.0
    e = e * x + 1.0 / 5040.0
    e = e * x + 1.0 / 720.0
    e = e * x + 1.0 / 120.0
    e = e * x + 1.0 / 24.0
    e = e * x + 1.0 / 6.0
    e = e * x + 0.5
    e = e * x + 1.0
    return e * x


@triton.jit
def _jsd_small_term(ps, pt, d, beta, omb):
    """JSD's column term for |d| < 1/2 (a student close to its teacher), where the direct form
    is a difference of two first-order terms that leaves a second-order one and keeps any error
    common to both whole (~1e-3 relative at |d| ~ 1e-4; 1e-5 of the loss at |d| ~ 0.15). With the
    smaller weight a (a = β, p = p_s, x = d; or a = 1 − β, p = p_t, x = −d: the term is symmetric
    under that swap, and a <= 1/2 keeps the cancellation below a factor 2) the term is
    p (a g(x) − h(u)), u = a expm1(x), g(x) = x e^x − e^x + 1 = Σ (n − 1) x^n / n!,
    h(u) = (1 + u) log1p(u) − u = Σ (−1)^k u^k / (k (k − 1)), both by their series to n = 9 and
    k = 12 (truncation below 1e-7 relative at |x| = 1/2, where |u| <= 0.32)."""
    lo = beta <= 0.5
    a = tl.where(lo, beta, omb)
    p = tl.where(lo, ps, pt)
    x = tl.where(lo, d, -d)
    g = 1.0 / 45360.0
    g = g * x + 1.0 / 5760.0
    g = g * x + 1.0 / 840.0
    g = g * x + 1.0 / 144.0
    g = g * x + 1.0 / 30.0
    g = g * x + 0.125
    g = g * x + 1.0 / 3.0
    g = g * x + 0.5
    u = a * _expm1_half(x)
    h = 1.0 / 132.0
    h = h * u - 1.0 / 110.0
    h = h * u + 1.0 / 90.0
    h = h * u - 1.0 / 72.0
    h = h * u + 1.0 / 56.0
    h = h * u - 1.0 / 42.0
    h = h * u + 1.0 / 30.0
    h = h * u - 0.05
    h = h * u + 1.0 / 12.0
    h = h * u - 1.0 / 6.0
    h = h * u + 0.5
    return p * (a * g * (x * x) - h * (u * u))


@triton.jit
def _jsd_terms(ps, pt, d, drel, beta, omb, log_ratio, ref_w, ref_sp):
    """Generalised JSD at 0 < β < 1: the term −β p_t log(M/p_t) − (1 − β) p_s log(M/p_s)
    (>= 0 per column by the log-sum inequality, clamped there against rounding; the series of
    _jsd_small_term for |d| < 1/2), and dq. q = (1 − β) log(p_s / M) = −(1 − β) softplus(z) up to
    a constant, z = d + log(β / (1 − β)), so dq = −(1 − β) (softplus(z) − softplus(z_ref)): for
    |drel| < 1 as log1p(w_ref expm1(drel)), w_ref = sigmoid(z_ref) (exact 0 at the reference,
    precise where the two would cancel), else as the difference of two softplus values, each
    precise where it is tiny (the columns where the teacher's probability is negligible)."""
    rho_s, rho_t = _jsd_log_ratios(d, beta, omb)
    from_t = tl.where(pt > 0.0, pt * rho_t, 0.0)
    from_s = tl.where(ps > 0.0, ps * rho_s, 0.0)
    loss = -(beta * from_t + omb * from_s)
    near_teacher = (d > -0.5) & (d < 0.5)  # false for NaN and ±inf
    loss = tl.where(near_teacher, _jsd_small_term(ps, pt, d, beta, omb), loss)
    loss = tl.where(loss < 0.0, 0.0, loss)  # NaN stays NaN
    em1 = tl.where(_is_small(drel), _expm1_small(drel), tl.exp(drel) - 1.0)
    near_ref = (drel > -1.0) & (drel < 1.0)
    g = tl.where(near_ref, _log1p(ref_w[:, None] * em1), _softplus(d + log_ratio) - ref_sp[:, None])
    return loss, tl.where(ps > 0.0, -omb * g, 0.0)


@triton.jit
def _tvd_diff(ps, pt, d):
    # p_s − p_t = −p_s expm1(d), by the series for small |d| where the difference cancels.
    return tl.where(_is_small(d), -ps * _expm1_small(d), ps - pt)


@triton.jit
def _tvd_q(diff):
    return tl.where(diff > 0.0, 0.5, tl.where(diff < 0.0, -0.5, 0.0))  # 0 at a tie, as torch's abs


@triton.jit
def divergence_terms(
    ps, pt, d, drel, beta, omb, log_ratio, ref_q, ref_w, ref_sp, DIV: tl.constexpr
):  # fmt: skip
    """A (ROWS, BLOCK) tile's loss terms and dq = q − q_ref for the reverse KL (DIV 1), JSD (2)
    and TVD (3); the per-row constants (ROWS,) come from reference_consts."""
    if DIV == 1:
        # p_s (e^d − 1 − d) (series for small |d|) or directly (p_t − p_s) − p_s d; q = −d.
        small = _is_small(d)
        direct = (pt - ps) - tl.where(ps > 0.0, ps * d, 0.0)
        loss = tl.where(small, ps * _series_e_minus_1_minus_x(d), direct)
        dq = tl.where(ps > 0.0, -drel, 0.0)
    elif DIV == 2:
        loss, dq = _jsd_terms(ps, pt, d, drel, beta, omb, log_ratio, ref_w, ref_sp)
    else:
        diff = _tvd_diff(ps, pt, d)
        loss = 0.5 * tl.abs(diff)
        dq = tl.where(ps > 0.0, _tvd_q(diff) - ref_q[:, None], 0.0)  # exact: ±1/2 or 0 each
    return loss, dq


@triton.jit
def reference_consts(ps, pt, d, log_ratio, DIV: tl.constexpr):
    """Per row, from the reference column's p_s, p_t and d: (q_ref, w_ref, softplus(z_ref)), the
    constants divergence_terms measures dq against (TVD uses the first, JSD the other two)."""
    q_ref = tl.zeros_like(d)
    w_ref = q_ref
    sp_ref = q_ref
    if DIV == 3:
        q_ref = _tvd_q(_tvd_diff(ps, pt, d))
    if DIV == 2:
        z = d + log_ratio
        e = tl.exp(-tl.abs(z))
        # sigmoid(z), without overflow for z ≪ 0; 0 for z = -inf (the teacher's logit -inf).
        w_ref = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        sp_ref = _softplus(z)
    return q_ref, w_ref, sp_ref
