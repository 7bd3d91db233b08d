// CPU kernel for the logits losses: KL at temperature T (x T^2), hard cross-entropy and logit MSE,
// any subset of them in one pass over each (student, teacher) row pair. kl_div_loss, cross_entropy,
// mse_loss and distillation_loss are all this kernel with different terms switched on; the LLM
// divergences (reverse KL, JSD, TVD) and the logit transforms replace its KL term (see
// divergence_passes and process_row_div below).
//
// Per row: pass 2 accumulates the softmax normalisers (exponentials shifted by the maxima of the
// row's first block, see process_row) and the KL/MSE sums and keeps the exponentials in an fp32
// scratch row; pass 3 computes KL and writes the gradient from that scratch. The logits are read
// from DRAM once (the AVX-512 pass 2 prefetches the next row pair); the gradient
// is written once, with streaming stores where the ISA has them. Rows are spread over OpenMP
// threads; inside a row, the portable loops are `omp simd` loops the compiler vectorises for each
// ISA variant, and the AVX-512 variant uses the intrinsics loops of fused_logits_avx512.h.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd_math.h"

namespace fastdistill {
namespace FD_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLog2e = 1.44269504088896341f;

// e^v - 1 - v = v^2 q(v) for |v| < 1/4, with q(v) = 1/2 + v/6 + c2 v^2 + c3 v^3 and c2, c3 fitted
// for the least relative error over the interval (2.0e-6 at |v| = 1/4; 1.1e-6 at 0.1, 1.4e-8 at
// 0.01: exact as v -> 0, where a student close to its teacher puts most of the KL). Nothing
// cancels, where the direct form loses all digits as v -> 0.
inline float exp_minus_1_minus_x_small(float v) {
  float q = 8.340870961546898e-3f;
  q = q * v + 4.173790290951729e-2f;
  q = q * v + 1.0f / 6.0f;
  q = q * v + 0.5f;
  return q * v * v;
}

// e^v - 1 for |v| < 1/4, from the same series.
inline float expm1_small(float v) { return exp_minus_1_minus_x_small(v) + v; }

inline bool is_small(float v) { return v > -0.25f && v < 0.25f; }  // false for NaN and inf

// One column's share of dz = z_s - z_t: e_t expm1(u) where |u| < 1/4 (e_s - e_t would cancel
// there), else e_s - e_t (u = log(e_s / e_t)).
inline float dz_term(float es, float et, float u) {
  return is_small(u) ? et * expm1_small(u) : es - et;
}

// 2^-24, the unit roundoff of fp32 (eps in JSD's fast-pass error bounds, see jsd_fast_sound).
constexpr double kEps24 = 5.9604644775390625e-8;

struct RowResult {
  float kl = 0.0f, ce = 0.0f, mse = 0.0f;
};

// Gradient weights of one row: d(total)/d(term) / normaliser, already folded with T for KL.
struct RowWeights {
  float kl, ce, mse;
};

template <typename T>
void fill_row(T* g, int64_t n, float v) {
  if (v == 0.0f) {
    std::memset(static_cast<void*>(g), 0, sizeof(T) * n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) store(g, j, v);
}

// Max of a row. NaN is not looked for here (a comparison per element costs ~5% of the whole
// kernel): a NaN input makes its exponential NaN and thus the row's softmax sum, which the row
// code checks once after pass 2. +inf shows up as a non-finite max.
template <typename T>
inline float row_max(const T* x, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float v = load(x, j);
    m = v > m ? v : m;
  }
  return m;
}

// ---- pass 2 and pass 3 of one row, over a column block [j0, j1) --------------------------------
// The portable loops below are `omp simd` loops the compiler vectorises for each ISA variant;
// fused_logits_avx512.h has hand-vectorised versions of the same two functions (same arguments,
// same arithmetic) that the AVX-512 variant uses instead.

// The next row pair, prefetched into L2 while this row computes (AVX-512 loops only: one prefetch
// per cache line needs an explicit loop; see prefetch_next). bytes = 0: nothing to prefetch.
struct NextRows {
  const char* s = nullptr;
  const char* t = nullptr;
  int64_t bytes = 0;
};

// Pass 2 keeps its exponentials (student and teacher at T; student at 1 for CE) in a per-thread
// fp32 scratch row, L2-resident for V up to ~64k, so pass 3 computes no exp.
struct Pass2Args {
  float ms, mt;  // shifts of the student and teacher exponentials (see process_row)
  float dm;      // ms - mt
  float c_t;     // log2(e) / T: e^((x - m)/T) = 2^((x - m) c_t)
  float inv_t;   // 1 / T
  float *keep_s, *keep_t, *keep_1, *keep_u;  // e_s, e_t (at T), e_1 (student at 1), u
  NextRows next;  // prefetched during pass 2
};

// Block sums, fp32 per SIMD lane; the caller adds them up across blocks in double.
struct Pass2Sums {
  float zs = 0.0f, zt = 0.0f, dz = 0.0f, z1 = 0.0f, sq = 0.0f;
  float near = 0.0f;  // NEAR: sum of e_s over the columns with |u| < 1/4 (instead of dz)
  float max_s = -kInf, max_t = -kInf;  // block maxima (tracked where the exponentials need them)
};

// The CE exponential e_1 = e^(s - ms): none (no CE, or CE shares the KL student softmax at T = 1),
// its own exponential, or e_s^2 (KL at T = 2: one multiply instead of an exponential).
enum E1Mode : int { kE1None = 0, kE1Exp = 1, kE1Square = 2 };

// Template flags: KL, E1 (an E1Mode), MSE, KEEP (write the scratch rows), NEAR (sum `near` instead
// of dz: see RowSums). A loop-invariant runtime choice inside an `omp simd` loop kept GCC from
// vectorising it, hence the template parameters.
template <typename T, bool KL, int E1, bool MSE, bool KEEP, bool NEAR = false>
Pass2Sums pass2_portable(const T* s, const T* t, const Pass2Args& p, int64_t j0, int64_t j1) {
  float zs = 0.0f, zt = 0.0f, dz = 0.0f, z1 = 0.0f, sq = 0.0f, near = 0.0f;
  float max_s = -kInf, max_t = -kInf;
  const float ms = p.ms, mt = p.mt, dm = p.dm, c_t = p.c_t, inv_t = p.inv_t;
  // Locals, not p.keep_*: stores through a pointer read from p inside the loop made GCC run the
  // scalar version of the loop inside process_row (6x slower).
  float* const keep_s = p.keep_s;
  float* const keep_t = p.keep_t;
  float* const keep_1 = p.keep_1;
  float* const keep_u = p.keep_u;
#pragma omp simd reduction(+ : zs, zt, dz, z1, sq, near) reduction(max : max_s, max_t)
  for (int64_t j = j0; j < j1; ++j) {
    const float x = load(s, j);
    float y = 0.0f;
    if constexpr (KL || MSE) y = load(t, j);
    if constexpr (KL || E1 != kE1None) max_s = x > max_s ? x : max_s;
    if constexpr (KL) max_t = y > max_t ? y : max_t;
    float es = 0.0f;
    if constexpr (KL) {
      es = fd_exp2((x - ms) * c_t);
      const float et = fd_exp2((y - mt) * c_t);
      zs += es;
      zt += et;
      const float u = ((x - y) - dm) * inv_t;
      if constexpr (KEEP) {
        keep_s[j] = es;
        keep_t[j] = et;
        keep_u[j] = u;
      }
      if constexpr (NEAR) {
        near += is_small(u) ? es : 0.0f;
      } else {
        dz += dz_term(es, et, u);
      }
    }
    if constexpr (E1 != kE1None) {
      const float e1 = E1 == kE1Square ? es * es : fd_exp2((x - ms) * kLog2e);
      if constexpr (KEEP) keep_1[j] = e1;
      z1 += e1;
    }
    if constexpr (MSE) {
      const float d = x - y;
      sq += d * d;
    }
  }
  return Pass2Sums{zs, zt, dz, z1, sq, near, max_s, max_t};
}

struct Pass3Args {
  const float *keep_s, *keep_t, *keep_u;
  const float* e1;  // e^(s - ms): keep_1, or keep_s when CE shares the KL softmax
  // f / zs and f / zt: the probabilities come out scaled by the KL gradient weight f, so the
  // gradient needs no multiply; the KL sum is divided by f afterwards. f = 1 where the weight is 0
  // or not finite, and then kl_grad_scale (otherwise 1) multiplies the KL gradient instead.
  float ps_scale, pt_scale;
  float kl_grad_scale;
  float delta;
  float wce_1, wce, wmse;  // gradient weights of the other terms; wce_1 = wce / z1
  int64_t label;
};

// Pass 3: the KL sum (times f, returned) and, with GRAD, the gradient of columns [j0, j1) written
// to out[0 .. j1 - j0). Per column, with v = u - delta and a = f p_t (e^v - 1 - v), b = f p_t v:
//   KL term  = small |v| ? a : f (p_s - p_t) - b
//   gradient = small |v| ? a + b : f (p_s - p_t)       (both = f p_t expm1(v) = f (p_s - p_t))
// p_t = 0 columns drop b (0 * inf would be NaN for a -inf logit).
template <typename T, bool KL, bool CE, bool MSE, bool GRAD>
float pass3_portable(const T* s, const T* t, const Pass3Args& p, int64_t j0, int64_t j1, T* out) {
  float kl = 0.0f;
  const float ps_scale = p.ps_scale, pt_scale = p.pt_scale, delta = p.delta;
  const float kl_grad_scale = p.kl_grad_scale;
  const float wce_1 = p.wce_1, wce = p.wce, wmse = p.wmse;
  const int64_t label = p.label;
  const float* const keep_s = p.keep_s;  // locals: see pass2_portable
  const float* const keep_t = p.keep_t;
  const float* const keep_u = p.keep_u;
  const float* const e1 = p.e1;
#pragma omp simd reduction(+ : kl)
  for (int64_t j = j0; j < j1; ++j) {
    float gv = 0.0f;
    if constexpr (KL) {
      const float et = keep_t[j];
      const float pt = et * pt_scale;
      const float d = keep_s[j] * ps_scale - pt;
      const float v = keep_u[j] - delta;
      const bool small = is_small(v);  // false for NaN and inf v (-inf logits)
      const float a = pt * exp_minus_1_minus_x_small(v);
      const float b = et > 0.0f ? pt * v : 0.0f;
      kl += small ? a : d - b;
      if constexpr (GRAD) gv = (small ? a + b : d) * kl_grad_scale;
    }
    if constexpr (GRAD) {
      if constexpr (CE) gv += wce_1 * e1[j] - (j == label ? wce : 0.0f);
      if constexpr (MSE) gv += wmse * (load(s, j) - load(t, j));
      store(out, j - j0, gv);
    }
  }
  return kl;
}

}  // namespace
}  // namespace FD_ISA
}  // namespace fastdistill

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "cpu/fused_logits_avx512.h"
#define FD_PASS2 pass2_avx512
#define FD_PASS3 pass3_avx512
#define FD_TILE_T(T) float  // pass3_avx512 writes fp32; flush_tile_avx512 converts
#define FD_FLUSH_TILE flush_tile_avx512
#define FD_BLOCK 1024  // 64 terms per fp32 lane (16 lanes) before the double sum
#else
#define FD_PASS2 pass2_portable
#define FD_PASS3 pass3_portable
#define FD_TILE_T(T) T
#define FD_FLUSH_TILE(dst, tile, n) \
  stream_copy(dst, tile, (n) * static_cast<int64_t>(sizeof(*(dst))))
// 32 (AVX2) or 64 (SSE2) terms per fp32 lane before the double sum: the compiler's vectorised
// reductions lose accuracy linearly with the block (gradient error 4.4e-7 at 1024 columns, 1.5e-7
// at 256, on random rows, AVX2).
#define FD_BLOCK 256
#endif

#include "cpu/divergences.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "cpu/divergences_avx512.h"
#define FD_JSD_AVX512 1
#endif

namespace fastdistill {
namespace FD_ISA {
namespace {

// n fp32 gradient values from an L1 tile to a gradient row in its dtype (streaming stores where
// the ISA has them).
template <typename T>
void write_grad_block(T* dst, const float* tile, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  flush_tile_avx512(dst, tile, n);
#elif FD_STREAM_STORES
  alignas(64) T bits[FD_BLOCK];
  for (int64_t j = 0; j < n; ++j) store(bits, j, tile[j]);
  stream_copy(dst, bits, n * static_cast<int64_t>(sizeof(T)));
#else
  for (int64_t j = 0; j < n; ++j) store(dst, j, tile[j]);
#endif
}

// What the generic divergence passes need of the op's options.
struct DivParams {
  float temp, inv_t, c_t;  // T, 1/T, log2(e)/T
  bool t2;                 // multiply the divergence by T^2
  float logit_scale, softcap;
  DivConsts c;
};

// The first column whose student logit (times scale) equals max_s, the row maximum pass 2 found
// first in the block starting at column `from`: the student's most probable column, which
// divergence_passes measures q from. Blocks are tested with a vectorised OR before one is scanned
// (the row is still in L2 from pass 2); the search normally ends in the block it starts in.
template <typename S>
int64_t first_max_column(const S* s, int64_t V, float max_s, float scale, int64_t from) {
  constexpr int64_t kBlock = FD_BLOCK;
  for (int64_t j0 = from; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < j1; ++j) hit |= load(s, j) * scale == max_s ? 1 : 0;
    if (!hit) continue;
    for (int64_t j = j0; j < j1; ++j) {
      if (load(s, j) * scale == max_s) return j;
    }
  }
  if (from > 0) return first_max_column(s, V, max_s, scale, 0);
  return 0;  // not reached: max_s is one of the row's values
}

// JSD's fast pass 3: the row's constants (jsd_fast_pass3 adds the reference column's parts).
inline JsdFastRow jsd_fast_row(const DivConsts& c, float inv_zs, double zt_d, float delta,
                               int64_t ref) {
  const double log_lp = std::log(c.beta_d) - std::log(c.omb_d);
  return JsdFastRow{inv_zs,
                    static_cast<float>(c.beta_d / (zt_d * c.omb_d)),
                    delta,
                    static_cast<float>(double{delta} + log_lp),
                    0.0f,
                    0.0f,
                    0.0f,
                    false,
                    ref};
}

// JSD's fast pass 3 over a row (JsdBlockSums), summed in double across blocks.
struct JsdFastSums {
  double loss = 0.0, abs_b = 0.0, mass = 0.0, s0 = 0.0, l1 = 0.0, p2 = 0.0, p2q = 0.0, p2q2 = 0.0;
  float k = 0.0f;         // K of jsd_fast_sound
  bool stopped = false;   // the loss bound already failed part-way (jsd_fast_pass3)
  void add(const JsdBlockSums& b) {
    loss += b.loss, abs_b += b.abs_b, mass += b.mass, s0 += b.s0, l1 += b.l1;
    p2 += b.p2, p2q += b.p2q, p2q2 += b.p2q2;
  }
};

// jsd_fast_term over columns [j0, j1), q into e_q (portable loop).
inline JsdBlockSums jsd_fast_block(const float* e_s, const float* e_t, const float* e_u,
                                   float* e_q, int64_t j0, int64_t j1, const JsdFastRow& r,
                                   const DivConsts& c) {
  float loss = 0.0f, abs_b = 0.0f, mass = 0.0f, s0 = 0.0f, l1 = 0.0f, p2 = 0.0f, p2q = 0.0f,
        p2q2 = 0.0f;
#pragma omp simd reduction(+ : loss, abs_b, mass, s0, l1, p2, p2q, p2q2)
  for (int64_t j = j0; j < j1; ++j) {
    const float ps = e_s[j] * r.inv_zs, pl = e_t[j] * r.inv_zt_lp;
    const JsdFastTerm term = jsd_fast_term(ps, pl, e_u[j], r, c);
    const float q = term.q;
    e_q[j] = q;
    loss += term.loss;
    abs_b += std::fabs(term.b);
    mass += ps + pl;
    s0 += ps * q;
    l1 += ps * std::fabs(q);
    const float ps2 = ps * ps;
    p2 += ps2;
    p2q += ps2 * q;
    p2q2 += ps2 * q * q;
  }
  return {loss, abs_b, mass, s0, l1, p2, p2q, p2q2};
}

constexpr double kJsdTol = 1e-5;  // see jsd_fast_sound

// The rounding-error bound of the fast loss (over 1 - beta) summed in f, see jsd_fast_sound.
inline double jsd_loss_bound(const JsdFastSums& f, const DivConsts& c) {
  const double k_max = std::fmax(std::fabs(double{c.log_omb}), std::fabs(double{c.log_b}));
  return kEps24 * (6.0 * f.loss + 8.0 * f.abs_b + (0.5 * k_max + 3.4) * f.mass);
}

// The whole row: the reference column's parts first (with the arithmetic of the column loop, so
// that q is exactly 0 there), then the blocks.
inline JsdFastSums jsd_fast_pass3(const float* e_s, const float* e_t, const float* e_u, float* e_q,
                                  int64_t V, JsdFastRow r, const DivConsts& c) {
  constexpr int64_t kBlock = FD_BLOCK;
  const float u_ref = e_u[r.ref], z_ref = r.c_z - u_ref;
  const float ps_ref = e_s[r.ref] * r.inv_zs, pl_ref = e_t[r.ref] * r.inv_zt_lp;
#if FD_JSD_AVX512
  r.sp_ref = _mm512_cvtss_f32(jsd_fast_sp16(_mm512_set1_ps(ps_ref), _mm512_set1_ps(pl_ref)));
#else
  r.sp_ref = jsd_fast_sp(ps_ref, pl_ref);
#endif
  r.u_ref = u_ref;
  r.pos_ref = z_ref > 0.0f;
  r.neg_mz_ref = r.pos_ref ? -z_ref : 0.0f;
  JsdFastSums f;
  f.k = r.pos_ref ? std::fabs(z_ref) + 13.0f : 19.0f * r.sp_ref;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
#if FD_JSD_AVX512
    f.add(r.pos_ref ? jsd_fast_block_avx512<true>(e_s, e_t, e_u, e_q, j0, j1, r, c)
                    : jsd_fast_block_avx512<false>(e_s, e_t, e_u, e_q, j0, j1, r, c));
#else
    f.add(jsd_fast_block(e_s, e_t, e_u, e_q, j0, j1, r, c));
#endif
    // An eighth of the way, a row whose loss bound is already over kJsdTol stops (the bound's
    // parts grow with the columns alike, so the row would most likely fail it at the end): a
    // student somewhat close to its teacher costs the precise pass and an eighth of this one.
    if (j0 < V / 8 && j1 >= V / 8 && j1 < V && !(jsd_loss_bound(f, c) <= kJsdTol * f.loss)) {
      f.stopped = true;
      return f;
    }
  }
  return f;
}

// Whether a row keeps JSD's fast result: the worst-case rounding-error bounds of its value and
// (with grad) of its gradient must both lie below kTol of them. Errors of d (u's rounding, delta's
// and c_z's) and of the fp32 block sums are left out: the precise passes share them. Per column,
// in units of eps = 2^-24:
// - the loss term a - b (a = pl d or -p_s d, b as in jsd_fast_term): 5 |a| (d's own rounding)
//   for a, 3 |b| + (p_s + pl)(0.5 |log(beta or 1 - beta)| + 3.4) for b (log1p_01's 1.85, the ratio
//   w's 1.5), and |term| for the subtraction (delta's own rounding is an error of d). With
//   |a| <= term + |b| (the term is >= 0), the value's bound is (jsd_loss_bound)
//   6 loss + 8 sum |b| + (0.5 max(|log beta|, |log(1 - beta)|) + 3.4) sum (p_s + pl);
// - q (exact 0 at ref) is off by at most 13 |q| + K, K = |z_ref| + 13 where z_ref > 0 (the
//   roundings of z and of the sums, log1p_01's 3.3 |sp| relative and the ratio w's) and
//   K = 19 sp_ref where not (every part of q is then a multiple of |q| + sp_ref: where the
//   teacher has little mass at the student's top columns, q is small and so is its error);
//   s0 by at most 14 sum p_s |q| + K rest, rest = the mass off ref (<= 1 - p_s,ref + 72 eps:
//   the probabilities' roundings and the sums'); the gradient p_s (q - s0) (times -(1 - beta)) by
//   at most 13 |p_s q|_2 + K |p_s|_2,rest + (14 sum p_s |q| + K rest) |p_s|_2 + |grad|_2 in norm,
//   with |p_s|_2,rest^2 <= rest min(rest, p_s,ref) (ref holds the largest p_s) and <= sum p_s^2 -
//   p_s,ref^2 (with the sum's rounding). The gradient's
//   norm is sqrt(sum p_s^2 q^2 - 2 s0 sum p_s^2 q + s0^2 sum p_s^2), a difference that can
//   cancel, but only where the bound is far above kTol of it (a passing row's norm is well
//   determined).
// Measuring q from ref matters where the student's top column holds nearly all its mass: there
// s0 is small instead of l at ref (whose rounding would be all of the gradient). The bounds fail
// where the student is close to its teacher (the loss is second order in d) and where q is
// nearly one constant over the student's mass (the gradient is a small difference): the regimes
// jsd_term's series and dd forms are for.
inline bool jsd_fast_sound(const JsdFastSums& f, float ps_ref, const DivConsts& c, bool grad) {
  if (f.stopped || !(jsd_loss_bound(f, c) <= kJsdTol * f.loss)) return false;  // also false for NaN
  if (!grad) return true;
  const double g2 = f.p2q2 - 2.0 * f.s0 * f.p2q + f.s0 * f.s0 * f.p2;
  const double norm = std::sqrt(g2 > 0.0 ? g2 : 0.0);
  const double rest = std::fmax(1.0 - ps_ref, 0.0) + 72.0 * kEps24;
  const double p2_rest = std::fmin(rest * std::fmin(rest, double{ps_ref}), std::fmax(0.0,
      f.p2 * (1.0 + 72.0 * kEps24) - double{ps_ref} * ps_ref * (1.0 - 4.0 * kEps24)));
  const double k = f.k;
  const double grad_bound = kEps24 * (13.0 * std::sqrt(f.p2q2) + k * std::sqrt(p2_rest) +
                                      (14.0 * f.l1 + k * rest) * std::sqrt(f.p2) + norm);
  return grad_bound <= kJsdTol * norm;
}

// Pass 3 with the divergence's column function (divergences.h) and q measured from the
// reference column ref: dq over e_t; returns the loss (double) and s0 = sum p_s dq in s0_out.
template <int DIV>
double precise_pass3(const float* e_s, float* e_t, const float* e_u, int64_t V, float inv_zs,
                     float inv_zt, float delta, int64_t ref, DivConsts c,
                     float& s0_out) {
  constexpr int64_t kBlock = FD_BLOCK;
  constexpr bool kRowSum = DIV != kForwardKL;  // forward KL's dq is its gradient already
  float u_ref = 0.0f;
  if constexpr (kRowSum) {
    u_ref = e_u[ref];
    set_reference<DIV>(e_s[ref] * inv_zs, e_t[ref] * inv_zt, delta - u_ref, c);
  }
  double loss_d = 0.0, s0_d = 0.0;
  float* const q_ = e_t;  // locals for the loop (see pass 2)
  const float* const es_ = e_s;
  const float* const eu_ = e_u;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
    float loss = 0.0f, sq = 0.0f;
#if FD_JSD_AVX512
    if constexpr (DIV == kJSD) {  // the hand-vectorised loop (divergences_avx512.h)
      jsd_pass3_avx512(es_, q_, eu_, j0, j1, inv_zs, inv_zt, delta, u_ref, c, loss, sq);
      loss_d += loss, s0_d += sq;
      continue;
    }
#endif
#pragma omp simd reduction(+ : loss, sq)
    for (int64_t j = j0; j < j1; ++j) {
      const float ps = es_[j] * inv_zs, pt = q_[j] * inv_zt;
      const DivTerm term = divergence_term<DIV>(ps, pt, delta - eu_[j], u_ref - eu_[j], c);
      q_[j] = term.dq;
      loss += term.loss;
      if constexpr (kRowSum) sq += ps * term.dq;
    }
    loss_d += loss, s0_d += sq;
  }
  s0_out = static_cast<float>(s0_d);
  return loss_d;
}

// What pass 2 leaves for passes 3 and 4 besides its scratch rows: the softmax sums (double),
// dz = sum (e_s - e_t) term by term (see process_row) unless pass 2 summed `near` instead (JSD:
// the student's mass on columns with |u| < 1/4), and the row maximum of the student's logits with
// the first block that holds it.
struct RowSums {
  double zs, zt, dz, z1, near;
  bool have_dz;
  float max_s;
  int64_t max_from;
};

// delta = log(zs / zt) from dz where zs and zt are close (the regime dz exists for); where they
// are not, dz has lost zs to rounding (the references need not be the maxima, so zs / zt can be
// as far from 1 as 2^64) and the plain ratio of the sums is the accurate form.
inline double row_delta(double zs, double zt, double dz) {
  const double dz_rel = dz / zt;
  return std::fabs(dz_rel) <= 0.125 ? std::log1p(dz_rel) : std::log(zs / zt);
}

// dz from pass 2's scratch, for a row whose pass 2 summed `near` instead (its precise passes need
// delta to ~1e-10 where the student is close to its teacher).
inline double scratch_dz(const float* e_s, const float* e_t, const float* e_u, int64_t V) {
  constexpr int64_t kBlock = FD_BLOCK;
  double dz_d = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
#if FD_JSD_AVX512
    dz_d += scratch_dz_avx512(e_s, e_t, e_u, j0, j1);
#else
    float dz = 0.0f;
#pragma omp simd reduction(+ : dz)
    for (int64_t j = j0; j < j1; ++j) {
      dz += dz_term(e_s[j], e_t[j], e_u[j]);
    }
    dz_d += dz;
#endif
  }
  return dz_d;
}

constexpr double kJsdNearMass = 0.5;  // see divergence_passes

// Passes 3 and 4 of a divergence other than process_row's forward KL, on pass 2's scratch
// (e_s, e_t (at T), e_u = log(e_s / e_t) and e_1 (CE)), shared by process_row and divergence_row.
// Pass 3 (precise_pass3) evaluates the divergence column function (divergences.h) from p_s, p_t,
// d = delta - u (delta = log(z_s / z_t)) and dd = u_ref - u (= d - d_ref, d_ref taken at the
// reference column ref, the student's most probable one: first_max_column of max_s, pass 2's row
// maximum, first seen in the block at max_from), keeps dq = q - q_ref over e_t and sums p_s dq.
// With q measured from that column the sum has no large term (no second correction pass is
// needed where that column's p_s is close to 1). JSD first runs its fast pass 3
// (jsd_fast_pass3: q into the spare row e_q, e_s, e_t and e_u left as they were) and the precise
// one only for a row whose error bound that fails (jsd_fast_sound). Pass 4 writes the gradient
// p_s (dq - sum p_s dq) w.r.t. the raw student logits S, times dfac (CAP) or scale. res.kl
// receives the row's value.
template <typename S, typename T, int DIV, bool KL, bool CE, bool MSE, bool CAP>
void divergence_passes(const S* s, const S* t, int64_t V, const DivParams& p, float scale,
                       int64_t label, RowWeights w, T* g, const float* dfac, float* e_s,
                       float* e_t, const float* e_u, const float* e_1, float* e_q,
                       const RowSums& sums, RowResult& res) {
  constexpr int64_t kBlock = FD_BLOCK;
  const double zs_d = sums.zs, zt_d = sums.zt, z1_d = sums.z1;
  const float inv_zs = static_cast<float>(1.0 / zs_d), inv_zt = static_cast<float>(1.0 / zt_d);
  float delta = static_cast<float>(sums.have_dz ? row_delta(zs_d, zt_d, sums.dz)
                                                : std::log(zs_d / zt_d));
  constexpr bool kRowSum = DIV != kForwardKL;  // forward KL's dq is its gradient already
  float s0 = 0.0f;
  const float* q = e_t;  // pass 4's dq, times q_scale
  float q_scale = 1.0f;
  if constexpr (KL) {
    const float t2 = p.t2 ? p.temp * p.temp : 1.0f;
    const int64_t ref = kRowSum ? first_max_column(s, V, sums.max_s, scale, sums.max_from) : 0;
    bool fast = false;
    // JSD's fast pass, unless the student is close to its teacher: where half of the student's
    // mass lies on columns with |u| < 1/4 (near, from pass 2; u = d - delta, and delta ~ 0 for
    // such a student), the fast bounds fail (measured: near 0.66-0.88 and bounds 2e-5 to 9e-5 at
    // logits within N(0, 0.3^2) of the teacher's, T = 2) and the fast pass would only cost time.
    // The fast pass takes delta without dz (the plain ratio: its rounding, like u's, is an error
    // of d, and dz is only more precise where the student is that close).
    if (DIV == kJSD && !(sums.near >= kJsdNearMass * zs_d)) {
      const JsdFastRow r = jsd_fast_row(p.c, inv_zs, zt_d, delta, ref);
      const JsdFastSums f = jsd_fast_pass3(e_s, e_t, e_u, e_q, V, r, p.c);
      fast = jsd_fast_sound(f, e_s[ref] * inv_zs, p.c, g != nullptr);
      if (fast) {
        const float omb = p.c.one_minus_beta;
        res.kl = static_cast<float>(f.loss * omb * t2);
        s0 = static_cast<float>(f.s0);
        q = e_q;
        q_scale = -omb;
      }
    }
    if (!fast) {
      if (!sums.have_dz) {
        delta = static_cast<float>(row_delta(zs_d, zt_d, scratch_dz(e_s, e_t, e_u, V)));
      }
      const double loss = precise_pass3<DIV>(e_s, e_t, e_u, V, inv_zs, inv_zt, delta, ref, p.c, s0);
      res.kl = static_cast<float>(loss * t2);
    }
  }
  if (!g) return;

  // Pass 4: the gradient w.r.t. the raw student logits, through an L1 tile to memory.
  //   kl:  p_s,j (dq_j - s0) (forward KL: dq_j);  ce: softmax(s') - onehot(label);
  //   mse: 2 (s' - t');  all times dx'/dx. (1/T, 2 and the weights are folded into w.)
  const float wkl_zs = w.kl * inv_zs * q_scale;
  const float wce_1 = CE ? static_cast<float>(w.ce / z1_d) : 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
    alignas(64) float tile[kBlock];
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      float gv = 0.0f;
      if constexpr (KL) gv = kRowSum ? wkl_zs * e_s[j] * (q[j] - s0) : w.kl * q[j];
      if constexpr (CE) gv += wce_1 * e_1[j] - (j == label ? w.ce : 0.0f);
      if constexpr (MSE) gv += w.mse * (load(s, j) - load(t, j)) * scale;
      tile[j - j0] = gv * (CAP ? dfac[j] : scale);
    }
    write_grad_block(g + j0, tile, j1 - j0);
  }
#if FD_STREAM_STORES
  stream_fence();
#endif
}

// One row with the terms KL/CE/MSE switched on at compile time. Returns the unnormalised row
// values and, if g != nullptr, writes w.kl*(p_s - p_t) + w.ce*(p1 - onehot) + w.mse*(s - t)
// (the caller folds T into w.kl and the 2 of d(s-t)^2 into w.mse). next_s/next_t: the row pair
// that follows, prefetched during this one (null: none).
template <typename T, bool KL, bool CE, bool MSE, int DIV = kForwardKL>
RowResult process_row(const T* s, const T* t, int64_t V, float temp, int64_t label, RowWeights w,
                      T* g, const T* next_s, const T* next_t, bool t2 = true,
                      const DivParams* dp = nullptr) {
  RowResult res;
  // Rows whose softmax is undefined propagate NaN (the reference gives NaN too), never hide it.
  auto nan_row = [&] {
    if (KL) res.kl = kNaN;
    if (CE) res.ce = kNaN;
    if (MSE) res.mse = kNaN;
    if (g) fill_row(g, V, kNaN);
    return res;
  };
  const float inv_t = 1.0f / temp;
  // Sums run in fp32 SIMD lanes within a block and in double across blocks: one fp32
  // accumulator per lane over 128k terms loses low bits (loss error ~5e-5 at V = 128256).
  constexpr int64_t kBlock = FD_BLOCK;
  // The exponentials are shifted by references ms, mt, not necessarily the row maxima: any
  // reference works (everything below is exact in it) as long as no exponential overflows. The
  // maxima of the first block (kBlock columns) serve, and spare a whole pass over the row; pass 2
  // finds the row's true maxima and is run again with them in the rare row whose maximum lies so
  // far above the first block's that an exponential could exceed 2^kMaxExponent.
  constexpr float kMaxExponent = 64.0f;  // sums stay below 2^(64 + 17) for V <= 128k
  float ms = 0.0f, mt = 0.0f;
  if constexpr (KL || CE) {
    const int64_t first = V < kBlock ? V : kBlock;
    ms = row_max(s, first);
    if constexpr (KL) mt = row_max(t, first);
    if (!is_finite(ms) || (KL && !is_finite(mt))) {  // +inf, or a first block all -inf
      ms = row_max(s, V);
      if constexpr (KL) mt = row_max(t, V);
      // NaN/+inf in a row, or a row that is entirely -inf: the softmax is undefined there.
      if (!is_finite(ms) || (KL && !is_finite(mt))) return nan_row();
    }
  }

  // The CE softmax is at temperature 1; with T == 1 it is the KL student softmax.
  const bool share = KL && CE && temp == 1.0f;
  const bool keep = KL || g;
  Pass2Args p2{ms, mt, ms - mt, kLog2e * inv_t, inv_t, nullptr, nullptr, nullptr, nullptr, {}};
  if (next_s) {  // prefetched during pass 2 (every divergence: see the note in ARCHITECTURE.md)
    p2.next.s = reinterpret_cast<const char*>(next_s);
    p2.next.t = reinterpret_cast<const char*>(next_t ? next_t : next_s);
    p2.next.bytes = V * static_cast<int64_t>(sizeof(T));
  }
  if (keep) {
    thread_local std::vector<float> scratch;
    // e_s, e_t, e_1, u, and JSD's fast q (divergence_passes)
    if (scratch.size() < static_cast<size_t>(5 * V)) scratch.resize(static_cast<size_t>(5 * V));
    p2.keep_s = scratch.data();
    p2.keep_t = p2.keep_s + V;
    p2.keep_1 = p2.keep_t + V;
    p2.keep_u = p2.keep_1 + V;  // u = (s - t - (ms - mt)) / T, see pass 3
  }
  // dz = sum (e_s - e_t) = zs - zt, accumulated term by term as e_t expm1(u) (see pass 3) so
  // that log(zs/zt) = log1p(dz/zt) is accurate to ~1e-10 even when zs and zt agree to 1e-7.
  constexpr bool kNear = KL && DIV == kJSD;  // pass 2 sums `near` instead of dz (see RowSums)
  double zs_d, zt_d, dz_d, z1_d, sq_d, near_d;
  float max_s, max_t;
  int64_t max_from;  // the first block holding max_s
  auto pass2 = [&](auto e1_tag, auto keep_tag) {
    constexpr int kE1 = decltype(e1_tag)::value;
    constexpr bool kKeep = decltype(keep_tag)::value;
    zs_d = zt_d = dz_d = z1_d = sq_d = near_d = 0.0;
    max_s = max_t = -kInf;
    max_from = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
      const Pass2Sums b = FD_PASS2<T, KL, kE1, MSE, kKeep, kNear>(s, t, p2, j0, j1);
      zs_d += b.zs;
      zt_d += b.zt;
      dz_d += b.dz;
      near_d += b.near;
      z1_d += b.z1;
      sq_d += b.sq;
      if (b.max_s > max_s) max_s = b.max_s, max_from = j0;
      max_t = b.max_t > max_t ? b.max_t : max_t;
    }
  };
  auto run_pass2 = [&] {
    using True = std::true_type;
    using False = std::false_type;
    using E1None = std::integral_constant<int, kE1None>;
    // kE1Square only where KL computes e_s; without CE every mode is kE1None.
    using E1Exp = std::integral_constant<int, CE ? kE1Exp : kE1None>;
    using E1Square = std::integral_constant<int, CE && KL ? kE1Square : kE1None>;
    if (CE && !share && KL && temp == 2.0f) {
      keep ? pass2(E1Square{}, True{}) : pass2(E1Square{}, False{});
    } else if (CE && !share) {
      keep ? pass2(E1Exp{}, True{}) : pass2(E1Exp{}, False{});
    } else {
      keep ? pass2(E1None{}, True{}) : pass2(E1None{}, False{});
    }
  };
  run_pass2();
  if constexpr (KL || CE) {
    if (!is_finite(max_s) || (KL && !is_finite(max_t))) return nan_row();  // +inf somewhere
    // Largest exponent above the reference: student at 1/T (KL) and at 1 (CE), teacher at 1/T.
    float scale_s = KL ? p2.c_t : 0.0f;
    if (CE && !share && kLog2e > scale_s) scale_s = kLog2e;
    const float over_s = (max_s - ms) * scale_s;
    const float over_t = KL ? (max_t - mt) * p2.c_t : 0.0f;
    if (over_s > kMaxExponent || over_t > kMaxExponent) {
      ms = p2.ms = max_s;
      if constexpr (KL) mt = p2.mt = max_t;
      p2.dm = ms - mt;
      run_pass2();
    }
  }
  if (share) z1_d = zs_d;
  // NaN anywhere in the row has made a softmax sum NaN: same treatment as a bad max above, except
  // that a term whose own sum is fine keeps its value (a NaN teacher leaves CE finite, as in the
  // reference; MSE follows IEEE arithmetic).
  const bool kl_bad = KL && !std::isfinite(zs_d + zt_d);
  const bool ce_bad = CE && !std::isfinite(z1_d);
  if (kl_bad || ce_bad) {
    // The label's logit is read before nan_row fills the gradient: g may be s itself (the fused
    // linear loss writes a chunk's gradient over its logits).
    const double x_label = CE && !ce_bad ? double{load(s, label)} : 0.0;
    nan_row();
    if (CE && !ce_bad) res.ce = static_cast<float>(static_cast<double>(ms) + std::log(z1_d) - x_label);
    if (MSE) res.mse = static_cast<float>(sq_d);
    return res;
  }
  const double log_z1 = std::log(z1_d);
  if constexpr (CE) {
    res.ce = static_cast<float>(static_cast<double>(ms) + log_z1 - load(s, label));
  }
  if constexpr (MSE) res.mse = static_cast<float>(sq_d);
  if (!KL && !g) return res;

  // Pass 3: KL and the gradient, free of cancellation when the student is close to the teacher
  // (the regime distillation converges to). With u = (s - t - (ms - mt)) / T and
  // delta = log(zs / zt) = lse(s/T) - lse(t/T) - (ms - mt)/T, log p_s - log p_t = u - delta =: v, so
  //   KL        = sum p_t (e^v - 1 - v)      (every term >= 0; first-order insensitive to delta)
  //   p_s - p_t = p_t expm1(v).
  // Small |v| uses the series of e^v - 1 - v and expm1 (nothing cancels); large |v| uses the
  // direct forms, which are accurate there. Pass 3 reads pass 2's scratch (e_s, e_t, u), not the
  // logits rows; only the MSE term re-reads them (from L2). The KL gradient weight is folded into
  // the probabilities (see Pass3Args) unless it is 0 or not finite.
  const float f = std::isfinite(w.kl) && w.kl != 0.0f ? w.kl : 1.0f;
  if constexpr (DIV != kForwardKL) {
    // Another divergence: its own passes 3 and 4 on this pass 2's scratch.
    const RowSums sums{zs_d, zt_d, dz_d, z1_d, near_d, !kNear, max_s, max_from};
    divergence_passes<T, T, DIV, KL, CE, MSE, false>(
        s, t, V, *dp, 1.0f, label, w, g, nullptr, p2.keep_s, p2.keep_t, p2.keep_u,
        share ? p2.keep_s : p2.keep_1, p2.keep_u + V, sums, res);
    return res;
  }
  const double delta = row_delta(zs_d, zt_d, dz_d);
  const Pass3Args p3{p2.keep_s,
                     p2.keep_t,
                     p2.keep_u,
                     share ? p2.keep_s : p2.keep_1,
                     static_cast<float>(f / zs_d),
                     static_cast<float>(f / zt_d),
                     f == w.kl ? 1.0f : w.kl,
                     static_cast<float>(delta),
                     static_cast<float>(w.ce / z1_d),
                     w.ce,
                     w.mse,
                     label};
  double kl_d = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
    if (!g) {
      kl_d += FD_PASS3<T, KL, CE, MSE, false>(s, t, p3, j0, j1, nullptr);
      continue;
    }
#if FD_STREAM_STORES
    // The gradient goes through an L1 tile to DRAM with streaming stores: no read of each
    // destination line before it is written, and no eviction of the L2-resident scratch rows.
    // (Streaming each vector straight from the pass 3 loop measured slower: 44 vs 38 ms.)
    alignas(64) FD_TILE_T(T) tile[kBlock];
    kl_d += FD_PASS3<T, KL, CE, MSE, true>(s, t, p3, j0, j1, tile);
    FD_FLUSH_TILE(g + j0, tile, j1 - j0);
#else
    kl_d += FD_PASS3<T, KL, CE, MSE, true>(s, t, p3, j0, j1, g + j0);
#endif
  }
#if FD_STREAM_STORES
  if (g) stream_fence();
#endif
  if constexpr (KL) res.kl = static_cast<float>(t2 ? kl_d / f * temp * temp : kl_d / f);
  return res;
}

// ---- the logit transforms: a generic row loop ------------------------------------------------
// process_row above reads raw logits (its pass 2 hand-vectorised on AVX-512) and serves every
// divergence: forward KL with its own pass 3, the others with divergence_passes. With
// logit_scale or softcap the row runs here instead: the same passes (portable `omp simd` loops)
// on the transformed logits, and the gradient chained through the transform.

// softcap: the student's and teacher's transformed logits x' into a and (for the student, with
// dfac not null) dx'/dx into dfac. tanh/cosh do not vectorise: a scalar loop (a rarely used path
// whose result the vectorised passes then read like fp32 logits).
template <typename T>
void softcap_row(const T* x, int64_t n, const DivParams& p, float* a, float* dfac) {
  const float scale = p.logit_scale, cap = p.softcap, inv_cap = 1.0f / cap;
  for (int64_t j = 0; j < n; ++j) {
    const float y = load(x, j) * scale * inv_cap;
    a[j] = cap * std::tanh(y);
    if (dfac) {
      const float ch = std::cosh(y);  // +inf for |y| > 89: derivative 0
      dfac[j] = scale / (ch * ch);
    }
  }
}

// The generic row on logits S (the input dtype, or fp32 softcapped logits) times `scale`, with
// the gradient written in T (CAP: times dfac = dx'/dx, else times scale). The passes follow
// process_row: pass 2 reads the logits once and
// keeps e_s, e_t (at T), u = log(e_s / e_t) and e_1 (CE) in fp32 scratch, with shifts taken from
// the first block's maxima (re-run with the row maxima if an exponential could overflow); pass 3
// evaluates the divergence column function (divergences.h) from p_s, p_t and d = -(u - delta)
// and keeps its q over e_t; pass 4 writes the gradient.
template <typename S, typename T, int DIV, bool KL, bool CE, bool MSE, bool CAP>
RowResult divergence_row(const S* s, const S* t, int64_t V, const DivParams& p, float scale,
                         int64_t label, RowWeights w, T* g, const float* dfac, float* scratch) {
  RowResult res;
  auto nan_row = [&] {
    if (KL) res.kl = kNaN;
    if (CE) res.ce = kNaN;
    if (MSE) res.mse = kNaN;
    if (g) fill_row(g, V, kNaN);
    return res;
  };
  float* const e_s = scratch;
  float* const e_t = e_s + V;  // q after pass 3
  float* const e_u = e_t + V;
  float* const e_1 = e_u + V;
  constexpr int64_t kBlock = FD_BLOCK;
  constexpr float kMaxExponent = 64.0f;  // as process_row
  float ms = 0.0f, mt = 0.0f;
  if constexpr (KL || CE) {
    const int64_t first = V < kBlock ? V : kBlock;
    ms = row_max(s, first) * scale;
    if constexpr (KL) mt = row_max(t, first) * scale;
    if (!is_finite(ms) || (KL && !is_finite(mt))) {
      ms = row_max(s, V) * scale;
      if constexpr (KL) mt = row_max(t, V) * scale;
      if (!is_finite(ms) || (KL && !is_finite(mt))) return nan_row();
    }
  }
  // Pass 2. dz = z_s - z_t term by term as e_t expm1(u) (as process_row): log(z_s / z_t) keeps
  // the digits that a near-one-hot row's sums lose.
  const float c_t = p.c_t, inv_t = p.inv_t;
  double zs_d, zt_d, dz_d, z1_d, sq_d;
  float max_s, max_t;
  int64_t max_from;  // the first block holding max_s
  auto pass2 = [&] {
    zs_d = zt_d = dz_d = z1_d = sq_d = 0.0;
    max_s = max_t = -kInf;
    max_from = 0;
    // Locals, not the captured references: stores through a pointer reached via the closure made
    // GCC run the scalar version of the loop (as the note in pass2_portable says).
    float* const es_ = e_s;
    float* const et_ = e_t;
    float* const eu_ = e_u;
    float* const e1_ = e_1;
    const float ms_ = ms, mt_ = mt, dm = ms - mt, sc = scale, ct = c_t, it = inv_t;
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
      float zs = 0.0f, zt = 0.0f, dz = 0.0f, z1 = 0.0f, sq = 0.0f, bs = -kInf, bt = -kInf;
#pragma omp simd reduction(+ : zs, zt, dz, z1, sq) reduction(max : bs, bt)
      for (int64_t j = j0; j < j1; ++j) {
        const float x = load(s, j) * sc;
        float y = 0.0f;
        if constexpr (KL || MSE) y = load(t, j) * sc;
        bs = x > bs ? x : bs;
        if constexpr (KL) {
          bt = y > bt ? y : bt;
          const float es = fd_exp2((x - ms_) * ct), et = fd_exp2((y - mt_) * ct);
          const float u = ((x - y) - dm) * it;
          es_[j] = es;
          et_[j] = et;
          eu_[j] = u;
          zs += es;
          zt += et;
          dz += dz_term(es, et, u);
        }
        if constexpr (CE) {
          const float e1 = fd_exp2((x - ms_) * kLog2e);
          e1_[j] = e1;
          z1 += e1;
        }
        if constexpr (MSE) sq += (x - y) * (x - y);
      }
      zs_d += zs, zt_d += zt, dz_d += dz, z1_d += z1, sq_d += sq;
      if (bs > max_s) max_s = bs, max_from = j0;
      max_t = bt > max_t ? bt : max_t;
    }
  };
  pass2();
  if constexpr (KL || CE) {
    if (!is_finite(max_s) || (KL && !is_finite(max_t))) return nan_row();  // +inf somewhere
    const float over_s = (max_s - ms) * (CE && kLog2e > c_t ? kLog2e : c_t);
    const float over_t = KL ? (max_t - mt) * c_t : 0.0f;
    if (over_s > kMaxExponent || over_t > kMaxExponent) {
      ms = max_s;
      if constexpr (KL) mt = max_t;
      pass2();
    }
  }
  const bool kl_bad = KL && !std::isfinite(zs_d + zt_d);
  const bool ce_bad = CE && !std::isfinite(z1_d);
  const auto x_label = [&] { return static_cast<double>(load(s, label) * scale); };
  if (kl_bad || ce_bad) {
    const double xl = CE && !ce_bad ? x_label() : 0.0;  // before nan_row: g may be s itself
    nan_row();
    if (CE && !ce_bad) res.ce = static_cast<float>(ms + std::log(z1_d) - xl);
    if (MSE) res.mse = static_cast<float>(sq_d);
    return res;
  }
  if constexpr (CE) res.ce = static_cast<float>(static_cast<double>(ms) + std::log(z1_d) - x_label());
  if constexpr (MSE) res.mse = static_cast<float>(sq_d);
  if (!KL && !g) return res;

  const RowSums sums{zs_d, zt_d, dz_d, z1_d, 0.0, true, max_s, max_from};
  divergence_passes<S, T, DIV, KL, CE, MSE, CAP>(s, t, V, p, scale, label, w, g, dfac, e_s, e_t,
                                                 e_u, e_1, e_1 + V, sums, res);
  return res;
}

template <typename T, int DIV, bool KL, bool CE, bool MSE>
RowResult process_row_div(const T* s, const T* t, int64_t V, const DivParams& p, int64_t label,
                          RowWeights w, T* g) {
  // Scratch (fp32, L2-resident for V up to ~32k): pass 2's four rows and JSD's fast q, then for
  // softcap the transformed logits and dx'/dx.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>((p.softcap > 0.0f ? 8 : 5) * V);
  if (scratch.size() < need) scratch.resize(need);
  if (p.softcap > 0.0f) {
    float* const a_s = scratch.data() + 5 * V;
    float* const a_t = a_s + V;
    float* const dfac = g ? a_t + V : nullptr;
    softcap_row(s, V, p, a_s, dfac);
    if (KL || MSE) softcap_row(t, V, p, a_t, nullptr);
    return divergence_row<float, T, DIV, KL, CE, MSE, true>(a_s, a_t, V, p, 1.0f, label, w, g,
                                                            dfac, scratch.data());
  }
  return divergence_row<T, T, DIV, KL, CE, MSE, false>(s, t, V, p, p.logit_scale, label, w, g,
                                                       nullptr, scratch.data());
}

// One row: the row's active terms and the op's divergence as template arguments (one
// instantiation set per dtype, not per op). `transform`: the generic loop (process_row_div);
// otherwise process_row, whose forward KL case run() calls directly.
template <typename T>
RowResult generic_row(bool transform, int div, bool kl, bool ce, bool mse, const T* s, const T* t,
                      int64_t V, const DivParams& p, int64_t label, RowWeights w, T* g,
                      const T* ns, const T* nt) {
  const int terms = (ce ? 2 : 0) | (mse ? 1 : 0);
  auto with_div = [&](auto div_tag) -> RowResult {
    constexpr int D = decltype(div_tag)::value;
    if (!transform) {
      const float temp = p.temp;
      const bool t2 = p.t2;
      switch (terms) {
        case 3: return process_row<T, true, true, true, D>(s, t, V, temp, label, w, g, ns, nt, t2, &p);
        case 2: return process_row<T, true, true, false, D>(s, t, V, temp, label, w, g, ns, nt, t2, &p);
        case 1: return process_row<T, true, false, true, D>(s, t, V, temp, label, w, g, ns, nt, t2, &p);
        default: return process_row<T, true, false, false, D>(s, t, V, temp, label, w, g, ns, nt, t2, &p);
      }
    }
    switch (terms) {
      case 3: return process_row_div<T, D, true, true, true>(s, t, V, p, label, w, g);
      case 2: return process_row_div<T, D, true, true, false>(s, t, V, p, label, w, g);
      case 1: return process_row_div<T, D, true, false, true>(s, t, V, p, label, w, g);
      default: return process_row_div<T, D, true, false, false>(s, t, V, p, label, w, g);
    }
  };
  if (kl) {
    switch (div) {
      case kReverseKL: return with_div(std::integral_constant<int, kReverseKL>{});
      case kJSD: return with_div(std::integral_constant<int, kJSD>{});
      case kTVD: return with_div(std::integral_constant<int, kTVD>{});
      default: return with_div(std::integral_constant<int, kForwardKL>{});
    }
  }
  switch (terms) {
    case 3: return process_row_div<T, kForwardKL, false, true, true>(s, t, V, p, label, w, g);
    case 2: return process_row_div<T, kForwardKL, false, true, false>(s, t, V, p, label, w, g);
    case 1: return process_row_div<T, kForwardKL, false, false, true>(s, t, V, p, label, w, g);
    default:
      if (g) fill_row(g, V, 0.0f);
      return RowResult{};
  }
}

double divisor(int norm, int64_t count, int64_t cols) {
  const double c = static_cast<double>(count > 0 ? count : 1);
  if (norm == kNormSum) return 1.0;
  if (norm == kNormRows) return c;
  return c * static_cast<double>(cols);
}

template <typename T, bool KL, bool CE, bool MSE>
void run(const FusedLogitsArgs& a) {
  const int64_t N = a.rows, V = a.cols;
  const T* S = static_cast<const T*>(a.student);
  const T* Tch = static_cast<const T*>(a.teacher);
  T* G = static_cast<T*>(a.grad);

  // Counts and label validation: O(rows), sequential, before any thread starts.
  int64_t n_sel = 0, n_lab = 0;
  for (int64_t i = 0; i < N; ++i) n_sel += a.mask ? (a.mask[i] != 0) : 1;
  if (CE) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t lab = a.labels[i];
      if (lab == a.ignore_index) continue;
      if (lab < 0 || lab >= V) throw KernelInputError{"labels", i, lab};
      ++n_lab;
    }
  }
  const double d_kl = a.norm_kl == kNormGiven ? a.normalizer : divisor(a.norm_kl, n_sel, V);
  const double d_ce = divisor(a.norm_ce, n_lab, V);
  const double d_mse = divisor(a.norm_mse, n_sel, V);
  const float temp = a.temperature;
  // d(T^2 KL)/ds = T (p_s - p_t) (1/T without t2_scale); d(sum (s-t)^2)/ds = 2 (s - t).
  const RowWeights full{
      static_cast<float>(a.t2_scale ? a.w_kl * temp / d_kl : a.w_kl / temp / d_kl),
      static_cast<float>(a.w_ce / d_ce), static_cast<float>(2.0 * a.w_mse / d_mse)};
  // A logit transform: the generic row loop (process_row_div); another divergence: process_row
  // with that divergence's passes (generic_row dispatches both).
  const bool transform = a.logit_scale != 1.0f || a.softcap > 0.0f;
  const bool other_div = a.divergence != kForwardKL;
  const DivParams dp{temp,
                     1.0f / temp,
                     kLog2e / temp,
                     a.t2_scale,
                     a.logit_scale,
                     a.softcap,
                     jsd_consts(a.beta, a.one_minus_beta)};

  auto row = [&](int64_t r) -> RowResult {
    const T* s = S + r * a.student_row_stride;
    const T* t = Tch ? Tch + r * a.teacher_row_stride : nullptr;
    T* g = G ? G + r * V : nullptr;
    // The next row pair, for pass 2 to prefetch (the row after this thread's last one belongs to
    // the other thread: a wasted prefetch at most).
    const T* ns = r + 1 < N ? S + (r + 1) * a.student_row_stride : nullptr;
    const T* nt = ns && Tch ? Tch + (r + 1) * a.teacher_row_stride : nullptr;
    const bool sel = a.mask ? a.mask[r] != 0 : true;
    const int64_t label = CE ? a.labels[r] : a.ignore_index;
    const bool kl = KL && sel, mse = MSE && sel, ce = CE && label != a.ignore_index;
    if (transform || (other_div && kl))
      return generic_row<T>(transform, a.divergence, kl, ce, mse, s, t, V, dp, label, full, g, ns,
                            nt);
    const bool t2 = a.t2_scale;
    // Runtime row flags -> compile-time row function; only subsets of the op's terms occur.
    switch ((kl ? 4 : 0) | (ce ? 2 : 0) | (mse ? 1 : 0)) {
      case 7: return process_row<T, true, true, true>(s, t, V, temp, label, full, g, ns, nt, t2);
      case 6: return process_row<T, true, true, false>(s, t, V, temp, label, full, g, ns, nt, t2);
      case 5: return process_row<T, true, false, true>(s, t, V, temp, label, full, g, ns, nt, t2);
      case 4: return process_row<T, true, false, false>(s, t, V, temp, label, full, g, ns, nt, t2);
      case 3: return process_row<T, false, true, true>(s, t, V, temp, label, full, g, ns, nt);
      case 2: return process_row<T, false, true, false>(s, t, V, temp, label, full, g, ns, nt);
      case 1: return process_row<T, false, false, true>(s, t, V, temp, label, full, g, ns, nt);
      default:
        if (g) fill_row(g, V, 0.0f);
        return RowResult{};
    }
  };

  std::vector<RowResult> rows(static_cast<size_t>(N));
#pragma omp parallel num_threads(a.num_threads)
  {
    const DenormalsAsZero ftz;  // per thread, for the whole call
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) rows[static_cast<size_t>(r)] = row(r);
  }

  // Deterministic reduction in row order, in double.
  double s_kl = 0.0, s_ce = 0.0, s_mse = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    const RowResult& res = rows[static_cast<size_t>(r)];
    s_kl += res.kl;
    s_ce += res.ce;
    s_mse += res.mse;
    if (a.row_kl) a.row_kl[r] = res.kl;
    if (a.row_ce) a.row_ce[r] = res.ce;
    if (a.row_mse) a.row_mse[r] = res.mse;
  }
  const double kl = KL ? s_kl / d_kl : 0.0;
  const double ce = CE ? s_ce / d_ce : 0.0;
  const double mse = MSE ? s_mse / d_mse : 0.0;
  double total = 0.0;
  if (KL) total += a.w_kl * kl;
  if (CE) total += a.w_ce * ce;
  if (MSE) total += a.w_mse * mse;
  a.out[0] = static_cast<float>(total);
  a.out[1] = static_cast<float>(kl);
  a.out[2] = static_cast<float>(ce);
  a.out[3] = static_cast<float>(mse);
}

template <typename T>
void run_dtype(const FusedLogitsArgs& a) {
  const int key = (a.use_kl ? 4 : 0) | (a.use_ce ? 2 : 0) | (a.use_mse ? 1 : 0);
  switch (key) {
    case 7: return run<T, true, true, true>(a);
    case 6: return run<T, true, true, false>(a);
    case 5: return run<T, true, false, true>(a);
    case 4: return run<T, true, false, false>(a);
    case 3: return run<T, false, true, true>(a);
    case 2: return run<T, false, true, false>(a);
    case 1: return run<T, false, false, true>(a);
    default: throw KernelInputError{"terms (no loss term enabled)", -1, 0};
  }
}

}  // namespace

void fused_logits(const FusedLogitsArgs& a) {
  switch (a.dtype) {
    case kFloat32: return run_dtype<float>(a);
    case kBFloat16: return run_dtype<BF16>(a);
    case kFloat16: return run_dtype<F16>(a);
    default: throw KernelInputError{"dtype", -1, a.dtype};
  }
}

}  // namespace FD_ISA
}  // namespace fastdistill
