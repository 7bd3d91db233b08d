// AVX-512 version of the JSD column loop of divergence_passes (fused_logits.cpp), which includes
// this header in its avx512 variant only, after fused_logits_avx512.h (simd16 helpers). Same
// arithmetic as jsd_term (divergences.h); the compiler's version of that loop costs ~90
// instructions per 16 columns (its exp2 alone 17, the log's split 6 plus blends), this one about
// 60: exp2 by vscalefps, the log's exponent and mantissa by vgetexpps/vgetmantps, conditional terms
// as masked operations.
#pragma once
#include <immintrin.h>

namespace fastdistill {
namespace FD_ISA {
namespace {

// Pass 3 of JSD over columns [j0, j1): q over e_t, and the block's loss and sum p_s q.
inline void jsd_pass3_avx512(const float* e_s, float* e_t, const float* e_u, int64_t j0,
                             int64_t j1, float inv_zs, float inv_zt, float delta,
                             const DivConsts& c, float& loss_out, float& s0_out) {
  using namespace simd16;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 v_inv_zs = _mm512_set1_ps(inv_zs), v_inv_zt = _mm512_set1_ps(inv_zt);
  const __m512 v_delta = _mm512_set1_ps(delta);
  const __m512 beta = _mm512_set1_ps(c.beta), omb = _mm512_set1_ps(c.one_minus_beta);
  const __m512 sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
  __m512 loss = zero, s0 = zero;
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 m = tail_mask(j1 - j);
    const __m512 ps = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_s + j), v_inv_zs);
    const __m512 pt = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e_t + j), v_inv_zt);
    const __m512 d = _mm512_sub_ps(v_delta, _mm512_maskz_loadu_ps(m, e_u + j));
    // jsd_log_ratios: a = the smaller side's weight, x = -|d|
    const __mmask16 student_larger = _mm512_cmp_ps_mask(d, zero, _CMP_LE_OQ);
    const __m512 a = _mm512_mask_blend_ps(student_larger, omb, beta);
    const __m512 b = _mm512_mask_blend_ps(student_larger, beta, omb);
    const __m512 x = _mm512_or_ps(_mm512_abs_ps(d), sign);
    const __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-0.25f), _CMP_GT_OQ);
    // e^x = min(p_s, p_t) / max(p_s, p_t), cheaper than an exp2 (where both are 0 the quotient
    // is NaN, and every term that would read it is masked: p_s = p_t = 0).
    const __m512 hi = _mm512_max_ps(ps, pt);
    const __m512 r_hi = _mm512_rcp14_ps(hi);
    const __m512 ex = _mm512_mul_ps(_mm512_min_ps(ps, pt),
                                    _mm512_mul_ps(r_hi, _mm512_fnmadd_ps(hi, r_hi, _mm512_set1_ps(2.0f))));
    const __m512 u_big = _mm512_fmadd_ps(a, ex, b);
    // u_big = 2^e mant, mant in [0.75, 1.5); the small branch takes e = 0, f = a expm1(x).
    const __m512 mant = _mm512_getmant_ps(u_big, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
    const __m512 e_big = _mm512_sub_ps(_mm512_getexp_ps(u_big), _mm512_getexp_ps(mant));
    const __m512 w = _mm512_mul_ps(a, _mm512_fmadd_ps(v_times_q(x), x, x));
    const __m512 f = _mm512_mask_blend_ps(small, _mm512_sub_ps(mant, one), w);
    const __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(~small), e_big);
    // fd_log_join
    // s = f / (2 + f) by the reciprocal estimate and one Newton step (relative error ~1e-8;
    // the division is the slowest instruction of the loop otherwise)
    const __m512 den = _mm512_add_ps(_mm512_set1_ps(2.0f), f);
    const __m512 r0 = _mm512_rcp14_ps(den);
    const __m512 s = _mm512_mul_ps(f, _mm512_mul_ps(r0, _mm512_fnmadd_ps(den, r0, _mm512_set1_ps(2.0f))));
    const __m512 s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_set1_ps(1.0f / 9.0f);
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7.0f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5.0f));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3.0f));
    p = _mm512_fmadd_ps(p, s2, one);
    const __m512 r = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f),
                                     _mm512_mul_ps(_mm512_add_ps(s, s), p));
    const __m512 rho_s = _mm512_mask_blend_ps(student_larger, _mm512_add_ps(r, d), r);
    const __m512 rho_t = _mm512_mask_blend_ps(student_larger, r, _mm512_sub_ps(r, d));
    // jsd_term
    const __mmask16 ps_pos = _mm512_cmp_ps_mask(ps, zero, _CMP_GT_OQ);
    const __m512 from_t =
        _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(pt, zero, _CMP_GT_OQ), pt, rho_t);
    const __m512 from_s = _mm512_maskz_mul_ps(ps_pos, ps, rho_s);
    __m512 term = _mm512_xor_ps(_mm512_fmadd_ps(beta, from_t, _mm512_mul_ps(omb, from_s)), sign);
    term = _mm512_mask_mov_ps(term, _mm512_cmp_ps_mask(term, zero, _CMP_LT_OQ), zero);
    const __m512 q = _mm512_maskz_mul_ps(ps_pos, _mm512_xor_ps(omb, sign), rho_s);
    _mm512_mask_storeu_ps(e_t + j, m, q);
    loss = _mm512_mask_add_ps(loss, m, loss, term);
    s0 = _mm512_mask_add_ps(s0, m, s0, _mm512_mul_ps(ps, q));
  }
  loss_out = _mm512_reduce_add_ps(loss);
  s0_out = _mm512_reduce_add_ps(s0);
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill
