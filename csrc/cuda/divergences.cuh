// The divergences of the CUDA logits row loop other than forward KL, one small function each: what
// a column contributes to the loss, and dq = q - q_ref with q = dL/dp_s (0 where p_s = 0): the
// gradient w.r.t. the student's z = s'/T is p_s,j (q_j - sum_k p_s,k q_k), which does not change
// when a constant is added to q, and fused_logits.cu measures q from its value q_ref at a
// reference column (the student's most probable one), where the gradient needs q - sum p_s q to
// its own precision. The arithmetic of csrc/cpu/divergences.h (plus a series for JSD's value and
// a difference form of its q, where the CPU header's forms cancel), in the CUDA kernel's log2
// units: every function receives p_s, p_t and v = log2(p_s / p_t) formed from exact logit
// differences (v is exactly 0 when the student equals the teacher and accurate when they are
// close; d = -v ln 2 = log p_t - log p_s is the CPU header's d), and vrel = v - v_ref, formed
// from the exact logit differences of the column and the reference column. A zero probability
// contributes nothing whatever the other side holds (0 log 0 = 0), so -inf logits are ordinary;
// NaN stays NaN. fused_logits.cu includes this header after the series helpers it uses
// (exp2m1_lin_small, kSmall2, kLn2, kLog2e, kFltMax, kTinyPt).
#pragma once

namespace fastdistill {
namespace gpu {
namespace {

struct DivTerm {
  float loss, dq;
};

// A divergence's constants: JSD's weights (per launch), and per row what dq is measured against
// (reference_consts).
struct DivConsts {
  float beta, omb, log_ratio;  // JSD: beta (the teacher's weight), 1 - beta, log(beta / (1 - beta))
  float q_ref;                 // TVD: q at the reference column
  float w_ref, sp_ref;         // JSD: sigmoid and softplus of z_ref (see jsd_term)
};

// e^d - 1 for |v| < kSmall2 (|d| < 1/2), d = -v ln 2: the series, exact at 0 where the direct
// form cancels.
__device__ __forceinline__ float expm1_of_minus(float v) {
  return fmaf(-v, kLn2, exp2m1_lin_small(-v));
}

// log(1 + e^z) without overflow; +-inf give +inf and 0, NaN stays NaN.
__device__ __forceinline__ float softplus(float z) {
  return fmaxf(z, 0.0f) + log1pf(ex2(-fabsf(z) * kLog2e));
}

// Reverse KL(p_s || p_t): the term p_s (e^d - 1 - d) (>= 0, series for small |d|) or directly
// (p_t - p_s) - p_s d, and q = log(p_s / p_t) = -d, so dq = vrel ln 2. In the direct form,
// d = +inf (s = -inf) and NaN (both -inf) contribute 0, d = -inf (t = -inf, s finite) gives +inf
// even where p_s underflowed (ex2 flushes below 2^-126; the smallest denormal keeps the product
// infinite).
__device__ __forceinline__ DivTerm reverse_kl_term(float ps, float pt, float v, float vrel) {
  const float d = -v * kLn2;
  const float dc = d <= kFltMax ? d : 0.0f;
  const float direct = fmaf(-fmaxf(ps, kTinyPt), dc, pt - ps);
  const float loss = fabsf(v) < kSmall2 ? ps * exp2m1_lin_small(-v) : direct;
  return {loss, ps > 0.0f ? vrel * kLn2 : 0.0f};
}

// log(M / p_s) and log(M / p_t) for M = beta p_t + (1 - beta) p_s, from v alone (as
// _jsd_log_ratios in fastdistill/triton/divergences.py): nothing underflows where both
// log-probabilities lie far below -104 (p_s and p_t are 0 in fp32 there), and both are exact 0
// at v = 0. With x = -|d| <= 0 the ratio on the side of the larger probability is
// log((1 - a) + a e^x) = log1p(a expm1(x)) (a = the weight of the smaller side). 1 - a is
// implied, never the other weight as passed: beta and 1 - beta, each rounded to fp32, sum to 1
// only within ~3e-8, and every column's ratios must describe the same M (a shift common to both
// ratios moves the loss by that shift times the mass). The other side's ratio differs by d.
__device__ __forceinline__ void jsd_log_ratios(float v, float beta, float omb, float& rho_s,
                                               float& rho_t) {
  const bool student_larger = v >= 0.0f;  // d <= 0; false for NaN, which then propagates
  const float a = student_larger ? beta : omb;
  const float x2 = student_larger ? -v : v;  // x = -|d| in log2 units
  const bool small = x2 > -0.36067376f;     // |x| < 1/4
  const float r = log1pf(a * (small ? expm1_of_minus(-x2) : ex2(x2) - 1.0f));
  const float d = -v * kLn2;
  rho_s = student_larger ? r : r + d;
  rho_t = student_larger ? r - d : r;
}

// The JSD term for small |d| (|v| < kSmall2, |d| < 1/2), where the direct form below is a
// difference of two first-order terms that leaves a second-order one and keeps any error common
// to both whole (relative error ~1e-3 at |d| ~ 1e-4, a student close to its teacher; 1e-5 of the
// loss at |d| ~ 0.15). With p = p_s, a = beta and x = d (the other side, p_t, 1 - beta and -d
// when beta > 1/2: the term is symmetric under that swap, and the smaller weight keeps the
// cancellation below a factor 2), the term is p (a g(x) - h(u)), u = a expm1(x),
// g(x) = x e^x - e^x + 1 = sum_n (n - 1) x^n / n!, h(u) = (1 + u) log1p(u) - u
// = sum_k (-1)^k u^k / (k (k - 1)): both series, to n = 9 and k = 12 (truncation below 1e-7
// relative at |x| = 1/2, where |u| <= 0.32).
__device__ __forceinline__ float jsd_small_term(float ps, float pt, float v, float beta,
                                                float omb) {
  const bool lo = beta <= 0.5f;
  const float a = lo ? beta : omb;
  const float p = lo ? ps : pt;
  const float w = lo ? -v : v;  // x in log2 units
  const float x = w * kLn2;
  float g = 2.2045855e-5f;  // 1/45360
  g = fmaf(g, x, 1.7361111e-4f);
  g = fmaf(g, x, 1.1904762e-3f);
  g = fmaf(g, x, 6.9444444e-3f);
  g = fmaf(g, x, 3.3333333e-2f);
  g = fmaf(g, x, 0.125f);
  g = fmaf(g, x, 0.33333333f);
  g = fmaf(g, x, 0.5f);
  const float u = a * fmaf(w, kLn2, exp2m1_lin_small(w));
  float h = 7.5757576e-3f;  // 1/132
  h = fmaf(h, u, -9.0909091e-3f);
  h = fmaf(h, u, 1.1111111e-2f);
  h = fmaf(h, u, -1.3888889e-2f);
  h = fmaf(h, u, 1.7857143e-2f);
  h = fmaf(h, u, -2.3809524e-2f);
  h = fmaf(h, u, 3.3333333e-2f);
  h = fmaf(h, u, -0.05f);
  h = fmaf(h, u, 8.3333333e-2f);
  h = fmaf(h, u, -0.16666667f);
  h = fmaf(h, u, 0.5f);
  return p * fmaf(a, g * (x * x), -h * (u * u));
}

// Generalised JSD at 0 < beta < 1: the term -beta p_t log(M/p_t) - (1 - beta) p_s log(M/p_s)
// (the series of jsd_small_term for small |d|), >= 0 for every column (log-sum inequality) and
// clamped there against rounding, and q = (1 - beta) log(p_s / M) = -(1 - beta) softplus(z) up to
// a constant, z = d + log(beta / (1 - beta)). dq = -(1 - beta) (softplus(z) - softplus(z_ref)):
// for |z - z_ref| = |d - d_ref| < 1 as log1p(w_ref expm1(d - d_ref)), w_ref = sigmoid(z_ref)
// (exact 0 at the reference, precise where the student is close to the teacher and the
// difference would cancel), else as the difference (each softplus precise where it is tiny: the
// columns where the teacher's probability is negligible, whose q is otherwise all one constant
// plus its rounding).
__device__ __forceinline__ DivTerm jsd_term(float ps, float pt, float v, float vrel,
                                            const DivConsts& c) {
  float rho_s, rho_t;
  jsd_log_ratios(v, c.beta, c.omb, rho_s, rho_t);
  const float from_t = pt > 0.0f ? pt * rho_t : 0.0f;
  const float from_s = ps > 0.0f ? ps * rho_s : 0.0f;
  float loss = -fmaf(c.beta, from_t, c.omb * from_s);
  if (fabsf(v) < kSmall2) loss = jsd_small_term(ps, pt, v, c.beta, c.omb);
  const float dd = -vrel * kLn2;  // d - d_ref
  const float em1 = fabsf(vrel) < kSmall2 ? expm1_of_minus(vrel) : ex2(-vrel) - 1.0f;
  float g = softplus(fmaf(-v, kLn2, c.log_ratio)) - c.sp_ref;
  if (fabsf(dd) < 1.0f) g = log1pf(c.w_ref * em1);
  return {loss < 0.0f ? 0.0f : loss, ps > 0.0f ? -c.omb * g : 0.0f};
}

// q of the total variation: sign(p_s - p_t) / 2 (0 at a tie, as torch's abs), and its term.
// p_s - p_t = -p_s expm1(d) by the series for small |d|, where the difference cancels.
__device__ __forceinline__ float tvd_diff(float ps, float pt, float v) {
  return fabsf(v) < kSmall2 ? -ps * expm1_of_minus(v) : ps - pt;
}
__device__ __forceinline__ float tvd_q(float diff) {
  return diff > 0.0f ? 0.5f : (diff < 0.0f ? -0.5f : 0.0f);
}

// Total variation 1/2 |p_s - p_t|, dq = q - q_ref (exact: q is +-1/2 or 0).
__device__ __forceinline__ DivTerm tvd_term(float ps, float pt, float v, const DivConsts& c) {
  const float diff = tvd_diff(ps, pt, v);
  return {0.5f * fabsf(diff), ps > 0.0f ? tvd_q(diff) - c.q_ref : 0.0f};
}

template <int DIV>
__device__ __forceinline__ DivTerm divergence_term(float ps, float pt, float v, float vrel,
                                                   const DivConsts& c) {
  if constexpr (DIV == kGpuReverseKL) return reverse_kl_term(ps, pt, v, vrel);
  if constexpr (DIV == kGpuJSD) return jsd_term(ps, pt, v, vrel, c);
  if constexpr (DIV == kGpuTVD) return tvd_term(ps, pt, v, c);
  return {0.0f, 0.0f};
}

// The per-row part of c for DIV, from the reference column's p_s, p_t and v.
template <int DIV>
__device__ __forceinline__ void reference_consts(float ps, float pt, float v, DivConsts& c) {
  if constexpr (DIV == kGpuTVD) c.q_ref = tvd_q(tvd_diff(ps, pt, v));
  if constexpr (DIV == kGpuJSD) {
    const float z = fmaf(-v, kLn2, c.log_ratio);
    c.w_ref = 1.0f / (1.0f + ex2(-z * kLog2e));  // 0 for z = -inf (the teacher's logit -inf)
    c.sp_ref = softplus(z);
  }
}

}  // namespace
}  // namespace gpu
}  // namespace fastdistill
