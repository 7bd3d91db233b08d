// The divergences of the logits row loop (divergence_passes in fused_logits.cpp), one small
// function each: what a column contributes to the loss and to the gradient. fused_logits.cpp
// includes this header after the series helpers it uses (exp_minus_1_minus_x_small, expm1_small,
// is_small).
//
// Every function receives, for one column, p_s and p_t (the probabilities at temperature T),
// d = log p_t - log p_s and dd = d - d_ref, both formed from exact logit differences (d is exact 0
// when the student equals the teacher; dd is exact 0 at the reference column), where d_ref is d at
// the reference column: the student's most probable one. It returns the column's loss term and
// dq = q - q_ref, with q = dL/dp_s (0 where p_s = 0) and q_ref its value at the reference column.
// The gradient with respect to the student's logits z = s'/T is p_s,j (q_j - sum_k p_s,k q_k),
// which does not change when a constant is added to q: measuring q from the reference column
// leaves the row sum without a large term where that column's p_s is close to 1 (low T), and dq
// is formed from dd, not as a difference of two rounded q (whose rounding can be all of it, where
// q is nearly one constant over the columns that carry the student's mass). Forward KL returns
// its gradient p_s - p_t itself in dq instead (no row sum needed; divergence_passes uses it on
// transformed logits only: process_row has its own pass 3 for it). A zero probability
// contributes nothing whatever the other side holds (0 log 0 = 0), so -inf logits are ordinary;
// NaN rows are caught before these functions run.
#pragma once

namespace fastdistill {
namespace FD_ISA {
namespace {

struct DivConsts {
  float beta, one_minus_beta;  // JSD weights of the teacher and the student in M
  double beta_d = 0.5, omb_d = 0.5;  // the same, summing to exactly 1 (see jsd_consts)
  float log_b;                 // JSD: log(beta)
  float log_lp;                // JSD: log(beta / (1 - beta))
  float log_omb;               // JSD: log(1 - beta)
  // Per row, from the reference column (set_reference): TVD's q there; JSD's sigmoid and
  // max(z, 0) of z_ref = d_ref + log_lp (> 0 exactly where z_ref is), log1p(e^-|z_ref|) and
  // l_ref = log(M / p_s) there.
  float q_ref = 0.0f;
  float w_ref = 0.0f, mz_ref = 0.0f, lg_ref = 0.0f, ell_ref = 0.0f;
};

// The launch-wide constants: JSD's weights and their logarithms, formed in double from one pair
// that sums to exactly 1: the smaller weight as given and the larger one as 1 minus it. The fp32
// pair the caller passes (beta, and 1 - beta rounded on its own) sums to 1 only within ~3e-8,
// and every constant here must describe the same M: log(M / p_s) and log(M / p_t) formed from
// two different pairs differ by that ~3e-8 on every column, which shifts the loss by 3e-8 times
// the mass there (3e-5 of a loss of 5.6e-4, a student within N(0, 0.1^2) of its teacher).
// Rounding the weights themselves to fp32 afterwards is harmless: they only scale terms whose
// row sums are second order.
inline DivConsts jsd_consts(float beta, float one_minus_beta) {
  const bool teacher_smaller = beta <= one_minus_beta;
  const double small = teacher_smaller ? beta : one_minus_beta;
  DivConsts c;
  c.beta_d = teacher_smaller ? small : 1.0 - small;
  c.omb_d = teacher_smaller ? 1.0 - small : small;
  c.beta = static_cast<float>(c.beta_d);
  c.one_minus_beta = static_cast<float>(c.omb_d);
  c.log_b = static_cast<float>(std::log(c.beta_d));
  c.log_lp = static_cast<float>(std::log(c.beta_d) - std::log(c.omb_d));
  c.log_omb = static_cast<float>(std::log(c.omb_d));
  return c;
}

struct DivTerm {
  float loss, dq;
};

// Forward KL(p_t || p_s) with v = log p_s - log p_t = -d, as pass 3 of process_row: the term
// p_t (e^v - 1 - v) (>= 0, series for small |v|) and the gradient p_s - p_t (= p_t expm1(v)) in dq.
inline DivTerm forward_kl_term(float ps, float pt, float d) {
  const float v = -d;
  const bool small = is_small(v);
  const float phi = exp_minus_1_minus_x_small(v);
  const float loss = small ? pt * phi : (ps - pt) - (pt > 0.0f ? pt * v : 0.0f);
  const float g = small ? pt * (phi + v) : ps - pt;
  return {loss, g};
}

// Reverse KL(p_s || p_t): the term p_s (e^d - 1 - d) (= p_t - p_s - p_s d, >= 0 summed over the
// row) and q = log(p_s / p_t) = -d, so dq = -dd.
inline DivTerm reverse_kl_term(float ps, float pt, float d, float dd) {
  const bool small = is_small(d);
  const float loss = small ? ps * exp_minus_1_minus_x_small(d) : (pt - ps) - (ps > 0.0f ? ps * d : 0.0f);
  return {loss, ps > 0.0f ? -dd : 0.0f};
}

// log1p(x) for x in [-1/4, 1]: fd_log_join's series with f = x directly below 1/2 (1 + x is
// never rounded, so a tiny x keeps its digits), else with 1 + x = 2 (1 + f), f = (x - 1) / 2
// (exact).
inline float log1p_unit(float x) {
  const bool big = x >= 0.5f;
  return fd_log_join(big ? 1.0f : 0.0f, big ? 0.5f * (x - 1.0f) : x);
}

// JSD's column term is the series below where |d| < kJsdSeries. The direct form subtracts two
// first-order quantities to leave a second-order one, so it keeps any error of log(M / p) that
// is common to both sides whole: ~1e-8 from the fp32 constants and approximations, against a
// term of ~1e-3 p at |d| ~ 0.15 (measured: 1e-5 to 3e-5 of the loss for a student within
// N(0, 0.1^2) of its teacher with the series below 1/8 only). Above 1/2 the term is >= 1e-2 p
// at beta = 0.9 and such errors are 1e-6 of it.
constexpr float kJsdSeries = 0.5f;

// Horner's rule: coefficients from the highest power down (divergences_avx512.h has the 16-lane
// twin, horner16, over the same tables).
template <size_t N>
inline float horner(float x, const float (&coef)[N]) {
  float r = coef[0];
  for (size_t i = 1; i < N; ++i) r = r * x + coef[i];
  return r;
}

// The series of jsd_small_term, highest power first: e^x - 1 over x to x^8 (truncation 1.1e-8
// relative at |x| = 1/2), g(x) / x^2 to n = 9 and h(u) / u^2 to k = 12 (see jsd_small_term).
constexpr float kExpm1Half[] = {1.0f / 40320.0f, 1.0f / 5040.0f, 1.0f / 720.0f,
                                1.0f / 120.0f,   1.0f / 24.0f,   1.0f / 6.0f,
                                0.5f,            1.0f};
constexpr float kJsdG[] = {1.0f / 45360.0f, 1.0f / 5760.0f, 1.0f / 840.0f,
                           1.0f / 144.0f,   1.0f / 30.0f,   1.0f / 8.0f,
                           1.0f / 3.0f,     0.5f};
constexpr float kJsdH[] = {1.0f / 132.0f, -1.0f / 110.0f, 1.0f / 90.0f, -1.0f / 72.0f,
                           1.0f / 56.0f,  -1.0f / 42.0f,  1.0f / 30.0f, -1.0f / 20.0f,
                           1.0f / 12.0f,  -1.0f / 6.0f,   0.5f};

// The JSD term for |d| < kJsdSeries. With p = p_s, a = beta, x = d (or p_t, 1 - beta and -d when
// beta > 1/2: the term is symmetric under that swap, and the smaller weight keeps the remaining
// cancellation below a factor 2), the term is p (a g(x) - h(u)) with u = a expm1(x),
// g(x) = x e^x - e^x + 1 = sum_n (n - 1) x^n / n! and h(u) = (1 + u) log1p(u) - u
// = sum_k (-1)^k u^k / (k (k - 1)), both as series: to n = 9 and k = 12, truncation below
// 1e-7 relative at |x| = 1/2 (where |u| <= (e^(1/2) - 1) / 2 = 0.32). Every error is then
// relative to the column's own term.
inline float jsd_small_term(float ps, float pt, float d, const DivConsts& c) {
  const bool lo = c.beta <= 0.5f;
  const float a = lo ? c.beta : c.one_minus_beta;
  const float p = lo ? ps : pt;
  const float x = lo ? d : -d;
  const float g = horner(x, kJsdG);
  const float u = a * (horner(x, kExpm1Half) * x);
  const float h = horner(u, kJsdH);
  return p * (a * g * (x * x) - h * (u * u));
}

// Generalised JSD at 0 < beta < 1, M = beta p_t + (1 - beta) p_s. With l = log(M / p_s)
// = log(1 - beta) + softplus(z), z = d + log(beta / (1 - beta)), the term is
// -beta p_t log(M / p_t) - (1 - beta) p_s l (>= 0 for every column by the log-sum inequality;
// clamped there against rounding; the series of jsd_small_term for |d| < kJsdSeries) and
// q = -(1 - beta) l, so dq = -(1 - beta) lam with lam = l - l_ref, measured two ways:
// - |dd| < 1/4: lam = log1p(w_ref expm1(dd)), w_ref = sigmoid(z_ref), exact 0 at the reference
//   and precise where the student is close to the teacher;
// - else: lam = (max(z, 0) - max(z_ref, 0)) + (log1p(e^-|z|) - log1p(e^-|z_ref|)), where the
//   first difference is dd itself when both z are positive, and each log1p keeps its digits
//   when tiny (the columns where the teacher's probability is negligible, whose q is otherwise
//   one constant plus its rounding). Nothing here underflows where both log-probabilities lie
//   far below -104 (p_s and p_t are 0 in fp32 there, and the terms are masked).
inline DivTerm jsd_term(float ps, float pt, float d, float dd, const DivConsts& c) {
  const bool near_ref = is_small(dd);
  const float z = d + c.log_lp;
  const float mz = z > 0.0f ? z : 0.0f;
  const float mzn = z < 0.0f ? -z : 0.0f;  // max(-z, 0): mz - z is NaN at z = +inf (p_s = 0)
  const float e_mz = fd_exp2(-(mz + mzn) * 1.44269504088896341f);  // e^-|z|
  const float lg = log1p_unit(near_ref ? c.w_ref * expm1_small(dd) : e_mz);
  const float mdiff = c.mz_ref > 0.0f && z > 0.0f ? dd : mz - c.mz_ref;
  const float lam = near_ref ? lg : mdiff + (lg - c.lg_ref);
  const float ell_s = c.ell_ref + lam;                            // log(M / p_s)
  const float ell_t = near_ref ? ell_s - d : c.log_b + lg + mzn;  // log(M / p_t)
  const float from_t = pt > 0.0f ? pt * ell_t : 0.0f;
  const float from_s = ps > 0.0f ? ps * ell_s : 0.0f;
  float loss = -(c.beta * from_t + c.one_minus_beta * from_s);
  if (d > -kJsdSeries && d < kJsdSeries) loss = jsd_small_term(ps, pt, d, c);
  return {loss < 0.0f ? 0.0f : loss, ps > 0.0f ? -c.one_minus_beta * lam : 0.0f};
}

// log1p(w) for w in [0, 1] as w times a degree-9 polynomial (least absolute error, fitted in
// double): absolute error 1.1e-7, relative 2.0e-7 (measured in fp32 over 2e6 points). No division.
constexpr float kLog1p01[] = {-2.435116097331047e-3f, 1.5937700867652893e-2f,
                              -4.8956386744976044e-2f, 9.704115986824036e-2f,
                              -1.4700457453727722e-1f, 1.9427339732646942e-1f,
                              -2.4893172085285187e-1f, 3.3321642875671387e-1f,
                              -4.9999359250068665e-1f, 9.999998807907104e-1f};
inline float log1p_01(float w) { return horner(w, kLog1p01) * w; }

// JSD's fast pass 3 over a row: what every column needs. q is measured from the reference
// column ref (as jsd_term's), from its softplus parts: z_ref > 0 (pos_ref), -max(z_ref, 0) and
// log1p(e^-|z_ref|) (sp_ref), so that q is exact 0 there (see jsd_fast_sound in fused_logits.cpp).
struct JsdFastRow {
  float inv_zs, inv_zt_lp;  // inv_zt_lp = beta / ((1 - beta) z_t)
  float delta, c_z;         // c_z = delta + log(beta / (1 - beta)) (rounded once)
  float u_ref, neg_mz_ref, sp_ref;
  bool pos_ref;
  int64_t ref;
};

// JSD's fast column (see jsd_fast_sound for when a row may keep its result), with
// l = log(M / p_s) = log(1 - beta) + softplus(z), z = d + log(beta / (1 - beta)) = c_z - u, and
// e^-|z| = w = min(p_s, pl) / max(p_s, pl), pl = p_t beta / (1 - beta):
// - q = l - l_ref = (max(z, 0) - max(z_ref, 0)) + (log1p(w) - sp_ref), the first difference
//   taken as dd = u_ref - u where both z are positive (as jsd_term); kept as is (the caller folds
//   -(1 - beta) into the gradient weight);
// - the loss term over 1 - beta, pl d - (p_s + pl) l (= (beta p_t d - M l) / (1 - beta), the
//   term of jsd_term), with the d inside l taken out by hand for z > 0 (l = d + log(beta) +
//   log1p(w), so the term is -p_s d - (p_s + pl)(log(beta) + log1p(w)): where the teacher holds
//   mass the student does not, both products are large and nearly equal); for z <= 0 it is
//   pl d - (p_s + pl)(log(1 - beta) + log1p(w)). b = the second product (for the error bound).
// No series: where the student is close to its teacher, the row's error bound fails and it is
// redone with jsd_term. A column with a -inf logit (d not finite) takes its limit: l =
// log(1 - beta) where p_s > 0 (q = -(max(z_ref, 0) + sp_ref); else q = 0) and the term
// -(pl log(beta) + p_s log(1 - beta)) (0 log 0 = 0 on either side).
struct JsdFastTerm {
  float loss, b, q;
};
inline float jsd_fast_sp(float ps, float pl) {
  const float hi0 = ps > pl ? ps : pl;
  const float hi = hi0 > 1.17549435e-38f ? hi0 : 1.17549435e-38f;  // FLT_MIN: both ~0 give w = 0
  return log1p_01((ps < pl ? ps : pl) / hi);
}
inline JsdFastTerm jsd_fast_term(float ps, float pl, float u, const JsdFastRow& r,
                                 const DivConsts& c) {
  const float d = r.delta - u, z = r.c_z - u;
  const float sp = jsd_fast_sp(ps, pl);
  const bool pos = z > 0.0f;
  const float mdiff = pos ? (r.pos_ref ? r.u_ref - u : z) : r.neg_mz_ref;
  float q = mdiff + (sp - r.sp_ref);
  float b = (ps + pl) * ((pos ? c.log_b : c.log_omb) + sp);
  float loss = (pos ? -ps : pl) * d - b;
  if (!(d > -kInf && d < kInf)) {
    q = ps > 0.0f ? r.neg_mz_ref - r.sp_ref : 0.0f;
    b = 0.0f;
    loss = -(pl * c.log_b + ps * c.log_omb);
  }
  return {loss, b, q};
}

// One column block's sums of JSD's fast pass 3 (fp32 lanes; JsdFastSums in fused_logits.cpp adds
// them in double): the loss over 1 - beta, sum |b| (see jsd_fast_term), sum (p_s + pl),
// s0 = sum p_s q, sum p_s |q|, sum p_s^2, sum p_s^2 q and sum p_s^2 q^2.
struct JsdBlockSums {
  float loss, abs_b, mass, s0, l1, p2, p2q, p2q2;
};

// q of the total variation: sign(p_s - p_t) / 2 (0 at a tie, as torch's abs) from
// p_s - p_t = -p_s expm1(d) by the series for small |d|, where the difference cancels.
inline float tvd_diff(float ps, float pt, float d) {
  return is_small(d) ? -ps * expm1_small(d) : ps - pt;
}
inline float tvd_q(float diff) { return diff > 0.0f ? 0.5f : (diff < 0.0f ? -0.5f : 0.0f); }

// Total variation 1/2 |p_s - p_t|, dq = q - q_ref (exact: q is +-1/2 or 0).
inline DivTerm tvd_term(float ps, float pt, float d, const DivConsts& c) {
  const float diff = tvd_diff(ps, pt, d);
  return {0.5f * (diff < 0.0f ? -diff : diff), ps > 0.0f ? tvd_q(diff) - c.q_ref : 0.0f};
}

template <int DIV>
inline DivTerm divergence_term(float ps, float pt, float d, float dd, const DivConsts& c) {
  if constexpr (DIV == kForwardKL) return forward_kl_term(ps, pt, d);
  if constexpr (DIV == kReverseKL) return reverse_kl_term(ps, pt, d, dd);
  if constexpr (DIV == kJSD) return jsd_term(ps, pt, d, dd, c);
  if constexpr (DIV == kTVD) return tvd_term(ps, pt, d, c);
  return {0.0f, 0.0f};
}

// The per-row part of c for DIV, from the reference column's p_s, p_t and d (in double: these
// constants carry no rounding the columns would inherit beyond their own).
template <int DIV>
inline void set_reference(float ps, float pt, float d, DivConsts& c) {
  if constexpr (DIV == kTVD) c.q_ref = tvd_q(tvd_diff(ps, pt, d));
  if constexpr (DIV == kJSD) {
    const float z = d + c.log_lp;  // as jsd_term forms it
    const double zd = z;
    c.w_ref = static_cast<float>(1.0 / (1.0 + std::exp(-zd)));  // 0 for z = -inf
    c.mz_ref = z > 0.0f ? z : 0.0f;
    c.lg_ref = static_cast<float>(std::log1p(std::exp(-std::fabs(zd))));
    // log((1 - beta) + beta e^d), exact 0 at d = 0
    c.ell_ref = static_cast<float>(std::log1p(c.beta_d * std::expm1(double{d})));
  }
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill
