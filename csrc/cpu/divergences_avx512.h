// AVX-512 version of the JSD column loop of divergence_passes (fused_logits.cpp), which includes
// this header in its avx512 variant only, after fused_logits_avx512.h (simd16 helpers). Same
// arithmetic as jsd_term (divergences.h), written with intrinsics for what the compiler does not
// produce from it: e^-|z| as the ratio of the two probabilities (one reciprocal estimate and a
// Newton step instead of an exp2), the conditional terms as masked operations, and the series of
// jsd_small_term only for the vectors that have a column with |d| < kJsdSeries (every column
// where the student is close to the teacher; few on unrelated rows).
#pragma once
#include <immintrin.h>

namespace fastdistill {
namespace FD_ISA {
namespace {

// log1p_unit (divergences.h) on 16 lanes, x in [-1/4, 1].
inline __m512 log1p_unit16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  const __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 f = _mm512_mask_mul_ps(x, big, _mm512_sub_ps(x, one), _mm512_set1_ps(0.5f));
  // s = f / (2 + f) by the reciprocal estimate and one Newton step (relative error ~1e-8)
  const __m512 den = _mm512_add_ps(two, f);
  const __m512 r0 = _mm512_rcp14_ps(den);
  const __m512 s = _mm512_mul_ps(f, _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, two)));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(1.0f / 9.0f);
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3.0f));
  p = _mm512_fmadd_ps(p, s2, one);
  const __m512 lg = _mm512_mul_ps(_mm512_add_ps(s, s), p);
  return _mm512_mask_add_ps(lg, big, lg, _mm512_set1_ps(0.693147180559945309f));
}

// horner (divergences.h) on 16 lanes.
template <size_t N>
inline __m512 horner16(__m512 x, const float (&coef)[N]) {
  __m512 r = _mm512_set1_ps(coef[0]);
  for (size_t i = 1; i < N; ++i) r = _mm512_fmadd_ps(r, x, _mm512_set1_ps(coef[i]));
  return r;
}

// jsd_small_term on 16 lanes.
inline __m512 jsd_small_term16(__m512 ps, __m512 pt, __m512 d, const DivConsts& c) {
  const bool lo = c.beta <= 0.5f;
  const __m512 a = _mm512_set1_ps(lo ? c.beta : c.one_minus_beta);
  const __m512 p = lo ? ps : pt;
  const __m512 x = lo ? d : _mm512_sub_ps(_mm512_setzero_ps(), d);
  const __m512 g = horner16(x, kJsdG);
  const __m512 u = _mm512_mul_ps(a, _mm512_mul_ps(horner16(x, kExpm1Half), x));
  const __m512 h = horner16(u, kJsdH);
  const __m512 ag = _mm512_mul_ps(a, _mm512_mul_ps(g, _mm512_mul_ps(x, x)));
  return _mm512_mul_ps(p, _mm512_fnmadd_ps(h, _mm512_mul_ps(u, u), ag));
}

// log1p_01 (divergences.h) on 16 lanes.
inline __m512 log1p_01_16(__m512 w) { return _mm512_mul_ps(horner16(w, kLog1p01), w); }

// jsd_fast_sp on 16 lanes: e^-|z| as the ratio of p_s and pl by a reciprocal estimate and one
// Newton step (as jsd_pass3_avx512), then log1p_01.
inline __m512 jsd_fast_sp16(__m512 ps, __m512 pl) {
  const __m512 hi = _mm512_max_ps(_mm512_max_ps(ps, pl), _mm512_set1_ps(1.17549435e-38f));
  const __m512 rc = _mm512_rcp14_ps(hi);
  const __m512 inv = _mm512_mul_ps(rc, _mm512_fnmadd_ps(hi, rc, _mm512_set1_ps(2.0f)));
  return log1p_01_16(_mm512_mul_ps(_mm512_min_ps(ps, pl), inv));
}

// JSD's fast pass 3 over columns [j0, j1): jsd_fast_block (fused_logits.cpp) on 16 lanes. Lanes
// past j1 load as 0 and add exact zeros to every sum.
template <bool kPosRef>  // r.pos_ref
JsdBlockSums jsd_fast_block_avx512(const float* e_s, const float* e_t, const float* e_u,
                                   float* e_q, int64_t j0, int64_t j1, const JsdFastRow& r,
                                   const DivConsts& c) {
  using namespace simd16;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 inv_zs = _mm512_set1_ps(r.inv_zs), inv_zt_lp = _mm512_set1_ps(r.inv_zt_lp);
  const __m512 delta = _mm512_set1_ps(r.delta), c_z = _mm512_set1_ps(r.c_z);
  const __m512 u_ref = _mm512_set1_ps(r.u_ref), neg_mz_ref = _mm512_set1_ps(r.neg_mz_ref);
  const __m512 sp_ref = _mm512_set1_ps(r.sp_ref);
  const __m512 log_omb = _mm512_set1_ps(c.log_omb), log_b = _mm512_set1_ps(c.log_b);
  __m512 loss = zero, abs_b = zero, mass = zero, s0 = zero, l1 = zero, p2 = zero, p2q = zero,
         p2q2 = zero;
  // One vector of columns from j (lanes outside m load as 0); full vectors first, with m a
  // constant that turns the masked loads and store into plain ones.
  const auto step = [&](int64_t j, __mmask16 m) {
    const __m512 ps = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_s + j), inv_zs);
    const __m512 pl = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_t + j), inv_zt_lp);
    const __m512 u = _mm512_maskz_loadu_ps(m, e_u + j);
    const __m512 d = _mm512_sub_ps(delta, u), z = _mm512_sub_ps(c_z, u);
    const __m512 sp = jsd_fast_sp16(ps, pl);
    const __mmask16 pos = _mm512_cmp_ps_mask(z, zero, _CMP_GT_OQ);
    // q = (max(z, 0) - max(z_ref, 0)) + (sp - sp_ref), the first part dd = u_ref - u where both
    // z are positive
    const __m512 dsp = _mm512_sub_ps(sp, sp_ref);
    __m512 q = kPosRef ? _mm512_add_ps(_mm512_mask_sub_ps(neg_mz_ref, pos, u_ref, u), dsp)
                       : _mm512_mask_add_ps(dsp, pos, dsp, z);
    const __m512 k_sp = _mm512_mask_add_ps(_mm512_add_ps(log_omb, sp), pos, log_b, sp);
    const __m512 ps_pl = _mm512_add_ps(ps, pl);
    __m512 b = _mm512_mul_ps(ps_pl, k_sp);
    __m512 term = _mm512_fmsub_ps(_mm512_mask_sub_ps(pl, pos, zero, ps), d, b);
    const __mmask16 odd = _mm512_fpclass_ps_mask(d, 0x99);  // NaN or +-inf: a -inf logit
    if (odd) {
      const __mmask16 ps_pos = _mm512_cmp_ps_mask(ps, zero, _CMP_GT_OQ);
      q = _mm512_mask_mov_ps(q, odd, _mm512_maskz_sub_ps(ps_pos, neg_mz_ref, sp_ref));
      b = _mm512_mask_mov_ps(b, odd, zero);
      const __m512 lim = _mm512_fmadd_ps(pl, log_b, _mm512_mul_ps(ps, log_omb));
      term = _mm512_mask_sub_ps(term, odd, zero, lim);
    }
    _mm512_mask_storeu_ps(e_q + j, m, q);
    loss = _mm512_add_ps(loss, term);
    abs_b = _mm512_add_ps(abs_b, _mm512_abs_ps(b));
    mass = _mm512_add_ps(mass, ps_pl);
    s0 = _mm512_fmadd_ps(ps, q, s0);
    l1 = _mm512_fmadd_ps(ps, _mm512_abs_ps(q), l1);
    const __m512 ps2 = _mm512_mul_ps(ps, ps);
    p2 = _mm512_add_ps(p2, ps2);
    const __m512 ps2q = _mm512_mul_ps(ps2, q);
    p2q = _mm512_add_ps(p2q, ps2q);
    p2q2 = _mm512_fmadd_ps(ps2q, q, p2q2);
  };
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) step(j, static_cast<__mmask16>(0xFFFF));
  if (j < j1) step(j, tail_mask(j1 - j));
  return {_mm512_reduce_add_ps(loss), _mm512_reduce_add_ps(abs_b), _mm512_reduce_add_ps(mass),
          _mm512_reduce_add_ps(s0),   _mm512_reduce_add_ps(l1),    _mm512_reduce_add_ps(p2),
          _mm512_reduce_add_ps(p2q),  _mm512_reduce_add_ps(p2q2)};
}

// scratch_dz (fused_logits.cpp) over columns [j0, j1): the dz of pass2_avx512, from the scratch.
inline float scratch_dz_avx512(const float* e_s, const float* e_t, const float* e_u, int64_t j0,
                               int64_t j1) {
  using namespace simd16;
  __m512 dz = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 m = tail_mask(j1 - j);
    const __m512 es = _mm512_maskz_loadu_ps(m, e_s + j), et = _mm512_maskz_loadu_ps(m, e_t + j);
    const __m512 u = _mm512_maskz_loadu_ps(m, e_u + j);
    dz = _mm512_add_ps(dz, dz_term16(es, et, u, small16(u)));
  }
  return _mm512_reduce_add_ps(dz);
}

// Pass 3 of JSD over columns [j0, j1): dq over e_t, and the block's loss and sum p_s dq.
inline void jsd_pass3_avx512(const float* e_s, float* e_t, const float* e_u, int64_t j0,
                             int64_t j1, float inv_zs, float inv_zt, float delta, float u_ref,
                             const DivConsts& c, float& loss_out,
                             float& s0_out) {
  using namespace simd16;
  const __m512 zero = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f);
  const __m512 v_inv_zs = _mm512_set1_ps(inv_zs), v_inv_zt = _mm512_set1_ps(inv_zt);
  // p_t beta / (1 - beta): its ratio to p_s is e^z
  const __m512 v_inv_zt_lp = _mm512_set1_ps(static_cast<float>(inv_zt * (c.beta_d / c.omb_d)));
  const __m512 v_delta = _mm512_set1_ps(delta), v_u_ref = _mm512_set1_ps(u_ref);
  const __m512 beta = _mm512_set1_ps(c.beta), omb = _mm512_set1_ps(c.one_minus_beta);
  const __m512 neg_omb = _mm512_set1_ps(-c.one_minus_beta), log_lp = _mm512_set1_ps(c.log_lp);
  const __m512 w_ref = _mm512_set1_ps(c.w_ref), mz_ref = _mm512_set1_ps(c.mz_ref);
  const __m512 lg_ref = _mm512_set1_ps(c.lg_ref), ell_ref = _mm512_set1_ps(c.ell_ref);
  const __m512 log_b = _mm512_set1_ps(c.log_b), two = _mm512_set1_ps(2.0f);
  const __m512 tiny = _mm512_set1_ps(1.17549435e-38f);  // FLT_MIN
  const __mmask16 z_ref_pos = c.mz_ref > 0.0f ? static_cast<__mmask16>(0xFFFF) : 0;
  __m512 loss = zero, s0 = zero;
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 m = tail_mask(j1 - j);
    const __m512 es = _mm512_maskz_loadu_ps(m, e_s + j), et = _mm512_maskz_loadu_ps(m, e_t + j);
    const __m512 u = _mm512_maskz_loadu_ps(m, e_u + j);
    const __m512 ps = _mm512_mul_ps(es, v_inv_zs), pt = _mm512_mul_ps(et, v_inv_zt);
    const __m512 pl = _mm512_mul_ps(et, v_inv_zt_lp);
    const __m512 d = _mm512_sub_ps(v_delta, u);
    const __m512 dd = _mm512_sub_ps(v_u_ref, u);
    const __m512 z = _mm512_add_ps(d, log_lp);
    const __mmask16 near_ref = small16(dd);
    // e^-|z| = min(p_s, pl) / max(p_s, pl); the max kept normal so that the estimate is finite
    // (columns below that carry nothing: their terms are masked or ~1e-38)
    const __m512 hi = _mm512_max_ps(_mm512_max_ps(ps, pl), tiny);
    const __m512 r_hi = _mm512_rcp14_ps(hi);
    const __m512 e_mz = _mm512_mul_ps(_mm512_min_ps(ps, pl),
                                      _mm512_mul_ps(r_hi, _mm512_fnmadd_ps(hi, r_hi, two)));
    const __m512 a_near = _mm512_mul_ps(w_ref, _mm512_fmadd_ps(v_times_q(dd), dd, dd));
    const __m512 lg = log1p_unit16(_mm512_mask_blend_ps(near_ref, e_mz, a_near));
    const __m512 mz = _mm512_max_ps(z, zero);   // NaN z (both -inf): 0
    const __m512 mzn = _mm512_max_ps(_mm512_sub_ps(zero, z), zero);
    const __mmask16 both_pos = _mm512_mask_cmp_ps_mask(z_ref_pos, z, zero, _CMP_GT_OQ);
    const __m512 mdiff = _mm512_mask_blend_ps(both_pos, _mm512_sub_ps(mz, mz_ref), dd);
    const __m512 lam = _mm512_mask_blend_ps(near_ref, _mm512_add_ps(mdiff, _mm512_sub_ps(lg, lg_ref)), lg);
    const __m512 ell_s = _mm512_add_ps(ell_ref, lam);
    const __m512 ell_t = _mm512_mask_blend_ps(near_ref, _mm512_add_ps(_mm512_add_ps(log_b, lg), mzn),
                                              _mm512_sub_ps(ell_s, d));
    const __mmask16 ps_pos = _mm512_cmp_ps_mask(ps, zero, _CMP_GT_OQ);
    const __m512 from_t = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(pt, zero, _CMP_GT_OQ), pt, ell_t);
    const __m512 from_s = _mm512_maskz_mul_ps(ps_pos, ps, ell_s);
    __m512 term = _mm512_xor_ps(_mm512_fmadd_ps(beta, from_t, _mm512_mul_ps(omb, from_s)), sign);
    const __mmask16 near_t = _mm512_mask_cmp_ps_mask(
        m, _mm512_abs_ps(d), _mm512_set1_ps(kJsdSeries), _CMP_LT_OQ);
    if (near_t) term = _mm512_mask_mov_ps(term, near_t, jsd_small_term16(ps, pt, d, c));
    term = _mm512_mask_mov_ps(term, _mm512_cmp_ps_mask(term, zero, _CMP_LT_OQ), zero);
    const __m512 dq = _mm512_maskz_mul_ps(ps_pos, neg_omb, lam);
    _mm512_mask_storeu_ps(e_t + j, m, dq);
    loss = _mm512_mask_add_ps(loss, m, loss, term);
    s0 = _mm512_mask_add_ps(s0, m, s0, _mm512_mul_ps(ps, dq));
  }
  loss_out = _mm512_reduce_add_ps(loss);
  s0_out = _mm512_reduce_add_ps(s0);
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill
