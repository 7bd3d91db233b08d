// AVX-512 versions of pass2_portable and pass3_portable (fused_logits.cpp), which includes this
// header in its avx512 variant only. Same arguments, same arithmetic, written with intrinsics for
// what the compiler does not produce from the portable loops:
// - 2^y as max, round, subtract, 5 FMAs and one vscalefps (9 instructions; the portable fd_exp2
//   vectorises to 17: its clamp, integer exponent and flush each cost a compare and a blend);
// - masked loads, stores and accumulations for the block tail instead of a scalar epilogue;
// - the conditional terms as masked moves and blends;
// - one software prefetch per cache line of the next row pair, spread over pass 2, with one real
//   load per 4 KiB page so that the prefetches are not dropped on TLB misses.
#pragma once
#include <immintrin.h>

#include <type_traits>

namespace fastdistill {
namespace FD_ISA {
namespace {
namespace simd16 {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// 16 elements as fp32; lanes outside m read as 0.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BF16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const F16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// 16 fp32 lanes rounded to a 16-bit format: bf16 rounds to nearest even with NaN kept quiet, as
// store<BF16> in simd_math.h; f16 as the hardware conversion (nearest even), as store<F16>.
inline __m256i to_bits16(__m512 v, const BF16*) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline __m256i to_bits16(__m512 v, const F16*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// A software prefetch that misses the TLB does nothing on this CPU (Zen 4), so on 4 KiB pages
// pass 2's next-row prefetches would all be lost. A real load of the first line of each page,
// issued just before that line's prefetch, walks the page table for the prefetches that follow.
// Measured on 2048 x 32000 fp32 with 4 KiB input pages: KL forward 32 -> 27 ms (the in-cache time),
// forward + backward 34.5 -> 30-31.5 ms.
inline void touch_page_start(const char* line) {
  if ((reinterpret_cast<uintptr_t>(line) & 4095) < 64)
    (void)*reinterpret_cast<const volatile char*>(line);
}

// The cache line at byte `off` of each next row into L2 (nothing past their end), the page's
// first line touched first (touch_page_start).
inline void prefetch_next(const NextRows& next, int64_t off) {
  if (off >= next.bytes) return;
  touch_page_start(next.s + off);
  touch_page_start(next.t + off);
  _mm_prefetch(next.s + off, _MM_HINT_T1);
  _mm_prefetch(next.t + off, _MM_HINT_T1);
}

// 2^y for y <= 64 or NaN, with the polynomial of fd_exp2. y below -150 (including -inf) is clamped
// there, where vscalefps rounds the result to 0; _mm512_max_ps returns its second operand when
// either is NaN, so NaN passes through.
inline __m512 exp2_16(__m512 y) {
  y = _mm512_max_ps(_mm512_set1_ps(-150.0f), y);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.3308821944519877e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6715176478028297e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5505823343992233e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022242426872253e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314706325531006e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// v q(v), q of exp_minus_1_minus_x_small: e^v - 1 - v = (v q(v)) v and e^v - 1 = (v q(v)) v + v.
inline __m512 v_times_q(__m512 v) {
  __m512 q = _mm512_set1_ps(8.340870961546898e-3f);
  q = _mm512_fmadd_ps(q, v, _mm512_set1_ps(4.173790290951729e-2f));
  q = _mm512_fmadd_ps(q, v, _mm512_set1_ps(1.0f / 6.0f));
  q = _mm512_fmadd_ps(q, v, _mm512_set1_ps(0.5f));
  return _mm512_mul_ps(q, v);
}

// |v| < 1/4 (false for NaN and inf), as is_small.
inline __mmask16 small16(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(0.25f), _CMP_LT_OQ);
}

// dz_term (fused_logits.cpp) on 16 lanes, where `small` = small16(u).
inline __m512 dz_term16(__m512 es, __m512 et, __m512 u, __mmask16 small) {
  const __m512 em1 = _mm512_fmadd_ps(v_times_q(u), u, u);
  return _mm512_mask_mul_ps(_mm512_sub_ps(es, et), small, et, em1);
}

}  // namespace simd16

template <typename T, bool KL, int E1, bool MSE, bool KEEP, bool NEAR = false>
Pass2Sums pass2_avx512(const T* s, const T* t, const Pass2Args& p, int64_t j0, int64_t j1) {
  using namespace simd16;
  const __m512 zero = _mm512_setzero_ps();
  __m512 zs = zero, zt = zero, dz = zero, z1 = zero, sq = zero, near = zero;
  __m512 max_s = _mm512_set1_ps(-kInf), max_t = max_s;
  const __m512 ms = _mm512_set1_ps(p.ms), mt = _mm512_set1_ps(p.mt);
  const __m512 dm = _mm512_set1_ps(p.dm), c_t = _mm512_set1_ps(p.c_t);
  const __m512 inv_t = _mm512_set1_ps(p.inv_t), log2e = _mm512_set1_ps(kLog2e);
  for (int64_t j = j0; j < j1; j += 16) {
    // One cache line of each next row per 16 columns: spread over the loop, the prefetches overlap
    // the next row's DRAM reads with this row's arithmetic (bursts of them do not).
    prefetch_next(p.next, 4 * j);
    const __mmask16 m = tail_mask(j1 - j);
    const __m512 x = load16(s + j, m);
    __m512 y = zero;
    if constexpr (KL || MSE) y = load16(t + j, m);
    if constexpr (KL || E1 != kE1None) max_s = _mm512_mask_max_ps(max_s, m, max_s, x);
    if constexpr (KL) max_t = _mm512_mask_max_ps(max_t, m, max_t, y);
    __m512 es = zero;
    if constexpr (KL) {
      es = exp2_16(_mm512_mul_ps(_mm512_sub_ps(x, ms), c_t));
      const __m512 et = exp2_16(_mm512_mul_ps(_mm512_sub_ps(y, mt), c_t));
      zs = _mm512_mask_add_ps(zs, m, zs, es);
      zt = _mm512_mask_add_ps(zt, m, zt, et);
      const __m512 u = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(x, y), dm), inv_t);
      if constexpr (KEEP) {
        _mm512_mask_storeu_ps(p.keep_s + j, m, es);
        _mm512_mask_storeu_ps(p.keep_t + j, m, et);
        _mm512_mask_storeu_ps(p.keep_u + j, m, u);
      }
      const __mmask16 small = small16(u);
      if constexpr (NEAR) {
        near = _mm512_mask_add_ps(near, small & m, near, es);
      } else {
        dz = _mm512_mask_add_ps(dz, m, dz, dz_term16(es, et, u, small));
      }
    }
    if constexpr (E1 != kE1None) {
      const __m512 e1 = E1 == kE1Square ? _mm512_mul_ps(es, es)
                                        : exp2_16(_mm512_mul_ps(_mm512_sub_ps(x, ms), log2e));
      if constexpr (KEEP) _mm512_mask_storeu_ps(p.keep_1 + j, m, e1);
      z1 = _mm512_mask_add_ps(z1, m, z1, e1);
    }
    if constexpr (MSE) {
      const __m512 d = _mm512_sub_ps(x, y);  // 0 in masked-off lanes
      sq = _mm512_fmadd_ps(d, d, sq);
    }
  }
  return Pass2Sums{_mm512_reduce_add_ps(zs),   _mm512_reduce_add_ps(zt),
                   _mm512_reduce_add_ps(dz),   _mm512_reduce_add_ps(z1),
                   _mm512_reduce_add_ps(sq),   _mm512_reduce_add_ps(near),
                   _mm512_reduce_max_ps(max_s), _mm512_reduce_max_ps(max_t)};
}

// Writes the gradient in fp32 (to an L1 tile; flush_tile_avx512 converts and streams it out).
template <typename T, bool KL, bool CE, bool MSE, bool GRAD>
float pass3_avx512(const T* s, const T* t, const Pass3Args& p, int64_t j0, int64_t j1, float* out) {
  using namespace simd16;
  const __m512 zero = _mm512_setzero_ps();
  __m512 kl = zero;
  const __m512 ps_scale = _mm512_set1_ps(p.ps_scale), pt_scale = _mm512_set1_ps(p.pt_scale);
  const __m512 delta = _mm512_set1_ps(p.delta), kl_grad_scale = _mm512_set1_ps(p.kl_grad_scale);
  const bool scale_kl_grad = p.kl_grad_scale != 1.0f;
  const __m512 wce_1 = _mm512_set1_ps(p.wce_1), wce = _mm512_set1_ps(p.wce);
  const __m512 wmse = _mm512_set1_ps(p.wmse);
  for (int64_t j = j0; j < j1; j += 16) {
    const __mmask16 m = tail_mask(j1 - j);
    __m512 gv = zero;
    if constexpr (KL) {
      const __m512 et = _mm512_maskz_loadu_ps(m, p.keep_t + j);
      const __m512 pt = _mm512_mul_ps(et, pt_scale);
      const __m512 d = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, p.keep_s + j), ps_scale, pt);
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.keep_u + j), delta);
      const __mmask16 small = small16(v);
      const __m512 ptv = _mm512_mul_ps(pt, v);
      const __m512 a = _mm512_mul_ps(ptv, v_times_q(v));  // f p_t (e^v - 1 - v)
      const __m512 b = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(et, zero, _CMP_GT_OQ), ptv);
      kl = _mm512_mask_add_ps(kl, m, kl, _mm512_mask_blend_ps(small, _mm512_sub_ps(d, b), a));
      if constexpr (GRAD) {
        gv = _mm512_mask_blend_ps(small, d, _mm512_add_ps(a, b));
        if (scale_kl_grad) gv = _mm512_mul_ps(gv, kl_grad_scale);
      }
    }
    if constexpr (GRAD) {
      if constexpr (CE) {
        gv = _mm512_fmadd_ps(wce_1, _mm512_maskz_loadu_ps(m, p.e1 + j), gv);
        const uint64_t at = static_cast<uint64_t>(p.label - j);
        if (at < 16) gv = _mm512_mask_sub_ps(gv, static_cast<__mmask16>(1u << at), gv, wce);
      }
      if constexpr (MSE) {
        gv = _mm512_fmadd_ps(wmse, _mm512_sub_ps(load16(s + j, m), load16(t + j, m)), gv);
      }
      _mm512_mask_storeu_ps(out + (j - j0), m, gv);
    }
  }
  return _mm512_reduce_add_ps(kl);
}

// ---- gradient tile -> DRAM ---------------------------------------------------------------------
// pass3_avx512 leaves n fp32 gradient values in an L1 tile; these write them to the gradient row in
// its dtype with streaming stores (see FD_STREAM_STORES in simd_math.h).

// bf16 with the AVX512_BF16 conversion (Zen 4, Sapphire Rapids): 32 values per instruction, round
// to nearest even like store<BF16>; it flushes denormals to 0 (below 1.2e-38, far under any
// tolerance) where the integer rounding keeps them.
__attribute__((target("avx512bf16"))) inline void flush_bf16_hw(BF16* dst, const float* src,
                                                                int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) store(dst, i, src[i]);
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), reinterpret_cast<__m512i>(v));
  }
  for (; i < n; ++i) store(dst, i, src[i]);
}

template <typename T>
void flush_tile_avx512(T* dst, const float* tile, int64_t n) {
  using namespace simd16;
  if constexpr (std::is_same<T, float>::value) {
    stream_copy(dst, tile, n * static_cast<int64_t>(sizeof(float)));
  } else {
    if constexpr (std::is_same<T, BF16>::value) {
      if (cpu_has_avx512_bf16() && allow_avx512_bf16().load(std::memory_order_relaxed)) {
        return flush_bf16_hw(dst, tile, n);
      }
    }
    // 16 values at a time into a 16-bit tile, then streamed like the fp32 case.
    alignas(64) T bits[1024];
    for (int64_t done = 0; done < n; done += 1024) {
      const int64_t count = n - done < 1024 ? n - done : 1024;
      for (int64_t j = 0; j < count; j += 16) {
        const __mmask16 m = tail_mask(count - j);
        _mm256_mask_storeu_epi16(bits + j, m,
                                 to_bits16(_mm512_maskz_loadu_ps(m, tile + done + j), bits));
      }
      stream_copy(dst + done, bits, count * static_cast<int64_t>(sizeof(T)));
    }
  }
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill
