// The divergences of the logits row loop (divergence_passes in fused_logits.cpp), one small
// function each: what a column contributes to the loss and to the gradient. fused_logits.cpp
// includes this header after the series helpers it uses (exp_minus_1_minus_x_small, expm1_small,
// is_small).
//
// Every function receives, for one column, p_s and p_t (the probabilities at temperature T) and
// d = log p_t - log p_s, formed from exact logit differences so that it is exact 0 when the
// student equals the teacher and accurate when they are close. It returns the column's loss term
// and q = dL/dp_s (up to a constant, which the softmax cancels; 0 where p_s = 0): the gradient with
// respect to the student's logits z = s'/T is p_s,j (q_j - sum_k p_s,k q_k) (see divergence_passes).
// Forward KL returns that gradient itself in q instead (p_s - p_t: no row sum needed). A zero
// probability contributes nothing whatever the other side holds (0 log 0 = 0), so -inf logits
// are ordinary. NaN stays NaN.
#pragma once

namespace fastdistill {
namespace FD_ISA {
namespace {

struct DivConsts {
  float beta, one_minus_beta;  // JSD weights of the teacher and the student in M
};

struct DivTerm {
  float loss, q;
};

// Forward KL(p_t || p_s) with v = log p_s - log p_t = -d, as pass 3 of process_row: the term
// p_t (e^v - 1 - v) (>= 0, series for small |v|) and the gradient p_s - p_t (= p_t expm1(v)) in q.
inline DivTerm forward_kl_term(float ps, float pt, float d) {
  const float v = -d;
  const bool small = is_small(v);
  const float phi = exp_minus_1_minus_x_small(v);
  const float loss = small ? pt * phi : (ps - pt) - (pt > 0.0f ? pt * v : 0.0f);
  const float g = small ? pt * (phi + v) : ps - pt;
  return {loss, g};
}

// Reverse KL(p_s || p_t): the term p_s (e^d - 1 - d) (= p_t - p_s - p_s d, >= 0 summed over the
// row) and q = log(p_s / p_t) = -d.
inline DivTerm reverse_kl_term(float ps, float pt, float d) {
  const bool small = is_small(d);
  const float loss = small ? ps * exp_minus_1_minus_x_small(d) : (pt - ps) - (ps > 0.0f ? ps * d : 0.0f);
  return {loss, ps > 0.0f ? -d : 0.0f};
}

// log(M / p_s) and log(M / p_t) for M = beta p_t + (1 - beta) p_s, from d alone: nothing
// underflows where both log-probabilities lie far below -104 (p_s and p_t are 0 in fp32 there),
// and both are exact 0 at d = 0. With x = -|d| <= 0 the ratio on the side of the larger
// probability is log(b + a e^x) (a = the weight of the smaller side, b = 1 - a): as
// log1p(a expm1(x)) for small |x| (exact at 0; the log1p undoes the rounding of 1 + w), directly
// otherwise (a sum of two positive terms). The other side's ratio differs by d. Both branches
// share one evaluation of the log's series (fd_log_join): the small one passes w straight as the
// log1p argument, so 1 + w is never rounded.
inline void jsd_log_ratios(float d, const DivConsts& c, float& rho_s, float& rho_t) {
  const bool student_larger = d <= 0.0f;  // false for NaN, which then propagates
  const float a = student_larger ? c.beta : c.one_minus_beta;
  const float b = student_larger ? c.one_minus_beta : c.beta;
  const float x = student_larger ? d : -d;
  const bool small = x > -0.25f;
  float e, f;
  fd_log_split(b + a * fd_exp2(x * 1.44269504088896341f), e, f);
  const float r = fd_log_join(small ? 0.0f : e, small ? a * expm1_small(x) : f);
  rho_s = student_larger ? r : r + d;
  rho_t = student_larger ? r - d : r;
}

// Generalised JSD at 0 < beta < 1: the term -beta p_t log(M/p_t) - (1 - beta) p_s log(M/p_s),
// which is >= 0 for every column (log-sum inequality) and clamped there against rounding, and
// q = (1 - beta) log(p_s / M).
inline DivTerm jsd_term(float ps, float pt, float d, const DivConsts& c) {
  float rho_s, rho_t;
  jsd_log_ratios(d, c, rho_s, rho_t);
  const float from_t = pt > 0.0f ? pt * rho_t : 0.0f;
  const float from_s = ps > 0.0f ? ps * rho_s : 0.0f;
  const float loss = -(c.beta * from_t + c.one_minus_beta * from_s);
  return {loss < 0.0f ? 0.0f : loss, ps > 0.0f ? -c.one_minus_beta * rho_s : 0.0f};
}

// Total variation 1/2 |p_s - p_t| and q = sign(p_s - p_t) / 2 (sign 0 at a tie, as torch's abs). p_s - p_t = -p_s expm1(d) by the series for small |d|, where the difference cancels.
inline DivTerm tvd_term(float ps, float pt, float d) {
  const float diff = is_small(d) ? -ps * expm1_small(d) : ps - pt;
  const float q = diff > 0.0f ? 0.5f : (diff < 0.0f ? -0.5f : 0.0f);
  return {0.5f * (diff < 0.0f ? -diff : diff), q};
}

template <int DIV>
inline DivTerm divergence_term(float ps, float pt, float d, const DivConsts& c) {
  if constexpr (DIV == kForwardKL) return forward_kl_term(ps, pt, d);
  if constexpr (DIV == kReverseKL) return reverse_kl_term(ps, pt, d);
  if constexpr (DIV == kJSD) return jsd_term(ps, pt, d, c);
  if constexpr (DIV == kTVD) return tvd_term(ps, pt, d);
  return {0.0f, 0.0f};
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill
