// CUDA kernel for the logits losses: KL at temperature T (x T^2), hard cross-entropy and logit
// MSE, any subset of them, reading each (student, teacher) row pair at most twice (three times for
// the divergences below whose gradient needs a row sum). kl_div_loss, cross_entropy, mse_loss and
// distillation_loss on CUDA tensors are all this kernel; the LLM divergences (reverse KL, JSD,
// TVD), t2_scale off and the logit transforms are the same row loop with template switches (see
// "Divergences and logit transforms" below).
//
// Per row (s, t = student and teacher logits, fp32 math, c = log2(e)/T):
//   kl  = T^2 sum_j p_t,j (log p_t,j - log p_s,j),  p = softmax(x/T)    rows with mask != 0
//   ce  = logsumexp(s) - s[label]                                        label != ignore_index
//   mse = sum_j (s_j - t_j)^2                                            rows with mask != 0
//   grad = c_kl (p_s - p_t) + c_ce (softmax(s) - onehot(label)) + c_mse (s - t), each term on the
//          rows where it is selected; c_* = scales[0..2], read on the device.
//
// Launch: one block per row (grid-stride over rows beyond 2^31 - 1), 32..512 threads chosen by
// the row length; each thread walks 16-byte vectors (4 fp32 or 8 bf16/fp16) strided by the block.
// Pass 1 reads s and t once and keeps, per thread, the running maxima and the softmax sums
// relative to them (rescaled when a maximum grows: online softmax). Block max, rescale of every
// thread to the row maxima, block sums. Pass 2 re-reads the row in reverse order (the part read
// last in pass 1 is the likeliest to still be in L2; loads are evict-first) and writes the
// gradient with streaming stores and sums the KL terms. CE-only and MSE-only rows without a
// gradient need no pass 2.
//
// Precision (the test oracle is float64; student ~= teacher is the regime distillation converges
// to, where the naive lse(s/T) - lse(t/T) difference keeps no correct digit). Exponentials are in
// base 2 with log2(e)/T folded into one scale c: e_s = 2^((s - m_s) c), e_t = 2^((t - m_t) c)
// relative to the running maxima, so the maxima contribute exactly 1 and
// u = log2(e_s / e_t) = ((s - t) - (m_s - m_t)) c is computed from the exact differences s - t
// and m_s - m_t. Pass 1 accumulates z_s = sum e_s, z_t = sum e_t and dz = z_s - z_t term by term
// as e_t (2^u - 1) (series for small |u|, e_s - e_t otherwise), so that
// delta = log2(z_s / z_t) = log1p(dz / z_t) / ln 2 keeps its digits when z_s ~= z_t. When a
// thread's maxima move from (m_s, m_t) to (m_s', m_t') its sums scale by a = 2^((m_s - m_s') c)
// and b = 2^((m_t - m_t') c), and dz' = a dz + (a - b) z_t with a - b = b (2^d - 1), where
// d = log2(a / b) = ((m_s - m_t) - (m_s' - m_t')) c comes from the exact max differences.
// Pass 2 uses v = u - delta = log2(p_s / p_t):
//   KL term  p_t (e^v' - 1 - v'),  v' = v ln 2  (every term >= 0; series for |v'| < 1/2),
//   gradient p_t (e^v' - 1) for |v'| < 1/2, p_s - p_t otherwise.
// Student == teacher gives u = 0, dz = 0, delta = 0, v = 0: loss and gradient exactly 0.
// CE = (m_s - s[label]) + log1p((n - 1) + r), where z_1 = sum_j e^(s_j - m_s) is kept as the
// count n of elements equal to the maximum plus the sum r of the others: exact for one-hot rows
// and accurate for confident ones (CE << 1, z_1 ~= 1, where an fp32 z_1 has no room for r).
// Rows whose softmax is undefined (NaN or +inf anywhere, or all -inf) give NaN for the KL/CE value
// and a NaN gradient row; -inf entries are ordinary (p = 0). A label outside [0, cols) that is
// not ignore_index gives NaN as well: the host cannot raise without a synchronisation.
//
// Divergences and logit transforms (template parameters DIV and XF of logits_row; the kernels with
// DIV = forward KL and XF off are the ones above, unchanged). XF: both sides' logits go through
// x' = x logit_scale, then softcap tanh(x' / softcap) when softcap > 0, as they are loaded; every
// term sees x', and the gradient is multiplied by dx'/dx (4e / (1 + e)^2 times logit_scale with
// e = e^(-2|x logit_scale / softcap|): accurate where tanh is close to 1). x' is rounded to fp32
// before s' - t' is formed (as in the CPU and Triton kernels), so s' - t' is exact only without a
// transform: close to the teacher, the transforms cost ~ulp(x') / |s' - t'| of relative accuracy.
// t2_scale only changes the row value's factor (T^2 or 1); the gradient weight comes from the
// host. DIV = reverse KL, JSD or TVD: the column functions of divergences.cuh give each column's
// term and dq = q - q_ref, q = dD/dp_s, from p_s, p_t and v = log2(p_s / p_t) (formed as above),
// and the gradient w.r.t. z = s'/T is p_s (q - sum_k p_s,k q_k), which needs a row sum before any
// gradient is written: pass 2 sums the terms and the correction sum_k p_s,k dq_k, pass 3 re-reads
// the row (reading each row pair three times) and writes p_s (dq - correction). q_ref is q at the
// student's most probable column (pass 1 tracks the teacher's logit there): the correction then
// has no large term, and that column's gradient, where p_s is close to 1 at low T, is formed
// without cancellation; dq is formed from the differences of the logits of the column and the
// reference column, not as a difference of two q (whose roundings can be all of it).
#include <climits>
#include <cmath>
#include <type_traits>

#include "cuda/common.cuh"

namespace fastdistill {
namespace gpu {
namespace {

// Up to 512 threads per row and 2 resident blocks per SM, which caps the kernels at 64 registers
// (no spills at that cap is checked by ptxas -v). Two blocks per SM let one block's row
// reductions overlap the other's streaming; few resident rows (264 on an H100) keep a row pair
// of up to ~128 KiB (32k bf16 logits) in L2 between its two passes.
constexpr int kMaxThreads = 512;
constexpr int kMinBlocksPerSm = 2;
// XF kernels with CE (the transforms or a divergence next to a cross-entropy) hold more per-row
// state: one block per SM, up to 128 registers (at 64 the divergences' ones spill).
constexpr int kMinBlocksPerSmXfCe = 1;
constexpr int kVectorsPerThread = 4;  // below this many 16-byte vectors per thread, fewer threads

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.44269504088896341f;  // float(log2 e): the CE scale of e^(s - max)
constexpr float kFltMax = 3.402823466e38f;
constexpr float kTinyPt = 1.40129846e-45f;  // smallest fp32 denormal

// Series branches, in log2 units: pass 1 uses |u ln2| < 1/8, pass 2 uses |v ln2| < 1/2.
constexpr float kSmall1 = 0.18033688f;  // 0.125 / ln 2
constexpr float kSmall2 = 0.72134752f;  // 0.5 / ln 2

// 2^u - 1 for |u| < kSmall1, degree 5 in u (coefficients ln2^k / k!): truncation 4e-8 relative,
// no cancellation (2^u - 1 from ex2 would lose all digits as u -> 0).
__device__ __forceinline__ float exp2m1_small(float u) {
  float q = 1.3333558146428441e-3f;
  q = fmaf(q, u, 9.6181291076284770e-3f);
  q = fmaf(q, u, 5.5504108664821576e-2f);
  q = fmaf(q, u, 2.4022650695910071e-1f);
  q = fmaf(q, u, 6.9314718055994531e-1f);
  return q * u;
}

// 2^v - 1 - v ln2 (= e^v' - 1 - v' with v' = v ln2) for |v| < kSmall2, degree 8: truncation
// below 6e-8 relative, every term of the same sign as the result near 0.
__device__ __forceinline__ float exp2m1_lin_small(float v) {
  float q = 1.3215486790144305e-6f;
  q = fmaf(q, v, 1.5252733804059838e-5f);
  q = fmaf(q, v, 1.5403530393381606e-4f);
  q = fmaf(q, v, 1.3333558146428441e-3f);
  q = fmaf(q, v, 9.6181291076284770e-3f);
  q = fmaf(q, v, 5.5504108664821576e-2f);
  q = fmaf(q, v, 2.4022650695910071e-1f);
  return q * (v * v);
}

}  // namespace
}  // namespace gpu
}  // namespace fastdistill

#include "cuda/divergences.cuh"

namespace fastdistill {
namespace gpu {
namespace {

// The logit transforms (XF): x' = x scale, or with `capped` x' = cap tanh(x k), k = scale / cap.
struct Xform {
  float scale, k, cap;
  bool capped;
};

__device__ __forceinline__ float xform(const Xform& f, float x) {
  if (!f.capped) return x * f.scale;
  const float y = x * f.k;
  const float em1 = expm1f(-2.0f * fabsf(y));  // tanh |y| = -em1 / (2 + em1): exact for small y
  return f.cap * copysignf(-em1 / (2.0f + em1), y);
}

// x' and dfac = dx'/dx. 1 - tanh^2 = 4e / (1 + e)^2 with e = e^(-2|y|) keeps its digits where
// tanh is close to 1 (1 - tanh^2 would be 0 there); -inf and +inf logits get dfac = 0.
__device__ __forceinline__ float xform_grad(const Xform& f, float x, float& dfac) {
  dfac = f.scale;
  if (f.capped) {
    const float e = expf(-2.0f * fabsf(x * f.k));
    dfac *= (4.0f * e) / ((1.0f + e) * (1.0f + e));
  }
  return xform(f, x);
}

// Running maximum of a thread that has seen nothing but -inf (or nothing). A finite sentinel
// rather than -inf keeps x - m and the rescale exponents free of -inf - -inf: an element x = -inf
// gives x - m = -inf (term 0), the first finite element replaces the sentinel, and moving from
// the sentinel scales by 2^((-FLT_MAX - m') c) = 0, which is right since nothing was summed. A
// row whose maximum is still the sentinel is all -inf (logits equal to -FLT_MAX count as -inf).
constexpr float kEmpty = -3.402823466e38f;

// Pass-1 state of one thread (see the file comment): running maxima and the sums relative to
// them. Only the members of the active terms are used. REF: also the teacher's logit at the
// column of the student's running maximum (the first such column this thread saw).
template <bool KL, bool CE, bool MSE, bool REF = false>
struct Online {
  float ms = kEmpty, mt = kEmpty;  // maxima of s and t (the logits as the terms see them)
  float zs = 0.0f, zt = 0.0f, dz = 0.0f, sq = 0.0f;
  // CE: z_1 = n1 + r1, n1 = how many elements equal the maximum (each e^0 = 1, counted exactly)
  // and r1 = the sum of the others' e^(s - ms). ln z_1 = log1p((n1 - 1) + r1) then keeps its
  // digits for a confident row (z_1 ~= 1), where an fp32 z_1 would have no room for them.
  float n1 = 0.0f, r1 = 0.0f;
  float tref = 0.0f;  // REF only

  // Moves the maxima to (ms2, mt2) >= (ms, mt) and rescales the sums.
  __device__ __forceinline__ void move_to(float ms2, float mt2, float c) {
    if constexpr (KL) {
      const float a = ex2((ms - ms2) * c), b = ex2((mt - mt2) * c);
      // a - b from d = log2(a / b) = ((ms - mt) - (ms2 - mt2)) c: the max differences are small
      // and exact when the student is close to the teacher, while ms - ms2 and mt - mt2 are not
      // small. With a sentinel on either side |d| is huge and a - b is taken directly.
      float a_minus_b = a - b;
      const float d = ((ms - mt) - (ms2 - mt2)) * c;
      if (fabsf(d) < kSmall1) a_minus_b = b * exp2m1_small(d);
      dz = fmaf(a, dz, a_minus_b * zt);
      zs *= a;
      zt *= b;
    }
    if constexpr (CE) {
      if (ms2 != ms) {  // the old maxima become ordinary elements
        r1 = ex2((ms - ms2) * kLog2e) * (r1 + n1);
        n1 = 0.0f;
      }
    }
    ms = ms2;
    mt = mt2;
  }

  // Adds a tile of N elements (1 or 4). The maxima are checked per tile, so the rescale branch
  // is taken a few times per thread and row, not per element.
  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N], const float (&y)[N], float c) {
    if constexpr (KL || CE) {
      float tx = x[0], ty = y[0];
#pragma unroll
      for (int e = 1; e < N; ++e) {
        tx = fmaxf(tx, x[e]);  // fmaxf ignores NaN: NaN reaches the sums through ex2 instead
        if constexpr (KL) ty = fmaxf(ty, y[e]);
      }
      bool grow = tx > ms;
      if constexpr (KL) grow = grow || ty > mt;
      if (grow) {
        if constexpr (REF) {
          if (tx > ms) {
#pragma unroll
            for (int e = N - 1; e >= 0; --e) {
              if (x[e] == tx) tref = y[e];
            }
          }
        }
        move_to(fmaxf(ms, tx), KL ? fmaxf(mt, ty) : mt, c);
      }
    }
    const float dm = ms - mt;  // exact when the student is close to the teacher
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float xd = x[e] - ms;
      if constexpr (KL) {
        const float es = ex2(xd * c);
        const float et = ex2((y[e] - mt) * c);
        zs += es;
        zt += et;
        const float u = ((x[e] - y[e]) - dm) * c;  // log2(es / et); NaN/inf for -inf entries
        dz += fabsf(u) < kSmall1 ? et * exp2m1_small(u) : es - et;
      }
      if constexpr (CE) {
        if (xd == 0.0f) {
          n1 += 1.0f;
        } else {
          r1 += ex2(xd * kLog2e);
        }
      }
      if constexpr (MSE) {
        const float d = x[e] - y[e];
        sq = fmaf(d, d, sq);
      }
    }
  }
};

struct Coeffs {
  float kl, ce, mse;
};

// What pass 2 (and pass 3) need of a row, identical in every thread.
struct RowConsts {
  float c, rs, rt, dm;  // scale, row maxima of s and t, rs - rt
  float delta;          // log2(z_s / z_t)
  float inv_zs, inv_zt;
  float ce_p;   // c_ce / z_1
  float g_lab;  // c_ce (p_label - 1), the CE gradient at the label
  Coeffs w;
  Xform xf;      // XF only
  DivConsts dc;  // row-sum divergences: their constants (divergences.cuh)
  float ref_dt;  // row-sum divergences: s' - t' at the reference column (the student's maximum)
  float s_corr;  // row-sum divergences: the correction sum_k p_s,k (q_k - q_ref)
};

// What a sweep over the row computes per element: the forward KL terms and the gradient (pass 2
// of forward KL, CE and MSE rows), or for the other divergences the terms and the correction sum
// (pass 2), then the gradient (pass 3).
enum Pass : int { kTermsGrad = 0, kTerms = 1, kGrad = 2 };

// A row-sum divergence's column: its term and dq = q - q_ref from the (transformed) logits x, y;
// p_s in ps.
template <int DIV>
__device__ __forceinline__ DivTerm column_term(const RowConsts& k, float x, float y, float& ps) {
  ps = ex2((x - k.rs) * k.c) * k.inv_zs;
  const float pt = ex2((y - k.rt) * k.c) * k.inv_zt;
  const float v = fmaf((x - y) - k.dm, k.c, -k.delta);  // log2(ps / pt)
  const float vrel = ((x - y) - k.ref_dt) * k.c;         // v - v_ref, exact 0 at the reference
  return divergence_term<DIV>(ps, pt, v, vrel, k.dc);
}

// One element of a sweep (see Pass) on raw logits x, y: returns its gradient value (kTerms: 0)
// and adds its divergence term (natural log units) to kl and, for kTerms, p_s dq to corr.
template <int DIV, bool XF, int MODE, bool KL, bool CE, bool MSE>
__device__ __forceinline__ float pass2_elem(const RowConsts& k, float x, float y, bool is_label,
                                            float& kl, float& corr) {
  float dfac = 1.0f;
  if constexpr (XF) {
    if constexpr (MODE == kTerms) {
      x = xform(k.xf, x);
    } else {
      x = xform_grad(k.xf, x, dfac);
    }
    if constexpr (KL || MSE) y = xform(k.xf, y);
  }
  float gv = 0.0f;
  const float xd = x - k.rs;
  if constexpr (KL && DIV == kGpuForwardKL) {
    const float ps = ex2(xd * k.c) * k.inv_zs;
    const float pt = ex2((y - k.rt) * k.c) * k.inv_zt;
    const float v = fmaf((x - y) - k.dm, k.c, -k.delta);  // log2(ps / pt)
    const bool small = fabsf(v) < kSmall2;                // false for NaN and inf
    const float phi = exp2m1_lin_small(v);                // e^v' - 1 - v'
    const float vn = v * kLn2;                            // v' = log(ps / pt)
    const float dd = ps - pt;
    // Direct form for large |v'|: (ps - pt) - pt v', with the limits of the math rather than of
    // fp32 products: v' = +inf (t = -inf, pt = 0) and NaN (both -inf) count as 0, and s = -inf
    // with t finite gives +inf even where pt underflowed to 0 (ex2 flushes below 2^-126; the
    // smallest denormal keeps -pt v' = +inf and adds < 1e-39 to any finite term).
    const float vc = vn <= kFltMax ? vn : 0.0f;
    const float direct = fmaf(-fmaxf(pt, kTinyPt), vc, dd);
    kl += small ? pt * phi : direct;
    gv = k.w.kl * (small ? pt * (vn + phi) : dd);
  } else if constexpr (KL) {
    float ps;
    const DivTerm dt = column_term<DIV>(k, x, y, ps);
    if constexpr (MODE == kTerms) {
      kl += dt.loss;
      corr = fmaf(ps, dt.dq, corr);
    } else {
      gv = k.w.kl * (ps * (dt.dq - k.s_corr));
    }
  }
  if constexpr (MODE != kTerms) {
    if constexpr (CE) gv += is_label ? k.g_lab : k.ce_p * ex2(xd * kLog2e);
    if constexpr (MSE) gv = fmaf(k.w.mse, x - y, gv);
    if constexpr (XF) gv *= dfac;
  }
  return gv;
}

// pass2_elem on a 16-byte vector pair; returns the gradient vector. Each 32-bit word is packed as
// soon as its elements are done, which keeps few gradient values live (no spills at 8 per vector).
// lab_off = label - (column of element 0).
template <typename F, int DIV, bool XF, int MODE, bool KL, bool CE, bool MSE>
__device__ __forceinline__ uint4 pass2_vec(const RowConsts& k, const uint4& xs, const uint4& ys,
                                           int lab_off, float& kl, float& corr) {
  constexpr int kPerWord = F::kVec / 4;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float g[kPerWord];
#pragma unroll
    for (int h = 0; h < kPerWord; ++h) {
      const int e = i * kPerWord + h;
      g[h] = pass2_elem<DIV, XF, MODE, KL, CE, MSE>(k, F::get(xs, e), F::get(ys, e), lab_off == e,
                                                    kl, corr);
    }
    w[i] = F::put_word(g);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

struct Params {
  const void* student;
  int64_t student_row_stride;
  const void* teacher;
  int64_t teacher_row_stride;
  const int64_t* labels;
  const uint8_t* mask;
  int64_t rows;
  int cols;
  float c;     // log2(e) / T
  float t_sq;  // the divergence's factor: T^2, or 1 without t2_scale
  int64_t ignore_index;
  const float* scales;
  float* row_kl;
  float* row_ce;
  float* row_mse;
  void* grad;
  Xform xf;      // the logit transforms (kernels with XF)
  DivConsts dc;  // JSD's weights
};

struct Smem {  // one buffer per reduction of a row (common.cuh, block_reduce)
  float max[2 * kWarp];
  float ref[kWarp];
  float sum[6 * kWarp];
  float kl[2 * kWarp];
};

template <bool LAST>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if constexpr (LAST) return __ldcs(p);
  return __ldg(p);
}

// One sweep of a thread over its share of a row pair: the scalar elements, [0, head) and
// [tail, cols), as scalar(j, x, y) (raw fp32 values; y = 0 without a teacher), then the 16-byte
// vector pairs as vec(k, xs, ys), first to last or (REVERSE) last to first, with the next pair
// loaded before the current one is processed (two loads in flight per thread and input). LAST:
// the row's last read (evict-first loads, see common.cuh).
template <typename F, bool kTeacher, bool REVERSE, bool LAST, typename Scalar, typename Vec>
__device__ __forceinline__ void sweep(const typename F::Raw* s, const typename F::Raw* t,
                                      const Span& sp, int cols, Scalar&& scalar, Vec&& vec) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  // At most 2 * (W - 1) scalar elements on the vector path, all of them on the scalar path; one
  // loop (one inlined copy of the element code).
  const int n_scalar = sp.head + (cols - sp.tail);
#pragma unroll 1
  for (int i = tid; i < n_scalar; i += nthreads) {
    const int j = i < sp.head ? i : sp.tail + (i - sp.head);
    const float x = LAST ? F::ld_last(s, j) : F::ld(s, j);
    float y = 0.0f;
    if constexpr (kTeacher) y = LAST ? F::ld_last(t, j) : F::ld(t, j);
    scalar(j, x, y);
  }
  if (tid >= sp.nvec) return;
  const uint4* sv = reinterpret_cast<const uint4*>(s + sp.head);
  const uint4* tv = reinterpret_cast<const uint4*>(t + sp.head);
  int k = REVERSE ? tid + ((sp.nvec - 1 - tid) / nthreads) * nthreads : tid;
  uint4 xs = load16<LAST>(sv + k);
  uint4 ys = kTeacher ? load16<LAST>(tv + k) : xs;
#pragma unroll 1
  for (;;) {
    const int kn = REVERSE ? k - nthreads : k + nthreads;
    const bool more = REVERSE ? kn >= 0 : kn < sp.nvec;
    uint4 xn = xs, yn = ys;
    if (more) {
      xn = load16<LAST>(sv + kn);
      if constexpr (kTeacher) yn = load16<LAST>(tv + kn);
    }
    vec(k, xs, ys);
    if (!more) break;
    xs = xn;
    ys = yn;
    k = kn;
  }
}

// One row with the terms KL/CE/MSE switched on (a subset of the kernel's terms: the row's
// selection), the divergence DIV and (XF) the logit transforms. Writes the row values of those
// terms and the gradient row (if any).
template <typename F, int DIV, bool XF, bool KL, bool CE, bool MSE>
__device__ __forceinline__ void logits_row(const Params& p, int64_t r, int64_t label, Smem& sm) {
  using Raw = typename F::Raw;
  constexpr int W = F::kVec;
  constexpr bool kTeacher = KL || MSE;
  constexpr bool kRowSum = KL && DIV != kGpuForwardKL;  // a row sum before the gradient
  const int cols = p.cols;
  const int tid = threadIdx.x;
  const Raw* s = static_cast<const Raw*>(p.student) + r * p.student_row_stride;
  const Raw* t = kTeacher ? static_cast<const Raw*>(p.teacher) + r * p.teacher_row_stride : s;
  Raw* g = p.grad ? static_cast<Raw*>(p.grad) + r * static_cast<int64_t>(cols) : nullptr;
  const Span sp = row_span<Raw, W>(s, kTeacher ? t : nullptr, g, cols);
  auto xin = [&](float x) {  // a loaded logit as the terms see it
    if constexpr (XF) x = xform(p.xf, x);
    return x;
  };

  // ---- pass 1: maxima and sums, online ----
  Online<KL, CE, MSE, kRowSum> st;
  sweep<F, kTeacher, false, false>(
      s, t, sp, cols,
      [&](int, float x, float y) {
        const float xa[1] = {xin(x)};
        const float ya[1] = {kTeacher ? xin(y) : 0.0f};
        st.add(xa, ya, p.c);
      },
      [&](int, const uint4& xs, const uint4& ys) {
        // Tiles of 4 elements (half a 16-bit vector): 8 unpacked values live instead of 16,
        // which is what keeps the KL + CE kernels on 16-bit inputs within 64 registers.
#pragma unroll
        for (int h = 0; h < W; h += 4) {
          float x[4], y[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            x[e] = xin(F::get(xs, h + e));
            y[e] = kTeacher ? xin(F::get(ys, h + e)) : 0.0f;
          }
          st.add(x, y, p.c);
        }
      });

  // ---- row maxima, every thread moved to them, row sums ----
  float tref = 0.0f;  // kRowSum: the teacher's logit at the student's maximum
  if constexpr (KL) {
    float m[2] = {st.ms, st.mt};
    block_reduce<MaxOp, 2>(m, sm.max);
    if constexpr (kRowSum) {  // ties: the largest teacher logit among the maximum's columns
      float v[1] = {st.ms == m[0] ? st.tref : -kInf};
      block_reduce<MaxOp, 1>(v, sm.ref);
      tref = v[0];
    }
    st.move_to(m[0], m[1], p.c);
  } else if constexpr (CE) {
    float m[1] = {st.ms};
    block_reduce<MaxOp, 1>(m, sm.max);
    st.move_to(m[0], st.mt, p.c);
  }
  constexpr int kSums = (KL ? 3 : 0) + (CE ? 2 : 0) + (MSE ? 1 : 0);
  float z[kSums];
  if constexpr (KL) {
    z[0] = st.zs;
    z[1] = st.zt;
    z[2] = st.dz;
  }
  if constexpr (CE) {
    z[KL ? 3 : 0] = st.n1;
    z[KL ? 4 : 1] = st.r1;
  }
  if constexpr (MSE) z[kSums - 1] = st.sq;
  block_reduce<SumOp, kSums>(z, sm.sum);
  const float zs = KL ? z[0] : 0.0f, zt = KL ? z[1] : 0.0f, dz = KL ? z[2] : 0.0f;
  const float n1 = CE ? z[KL ? 3 : 0] : 1.0f, r1 = CE ? z[KL ? 4 : 1] : 0.0f;
  const float z1 = n1 + r1;

  // ---- row values ----
  const bool label_ok = label >= 0 && label < cols;
  bool bad_kl = false, bad_ce = false;
  // NaN or +inf in the row, or a row of -inf only: the softmax is undefined.
  const bool s_ok = finite(st.ms) && st.ms != kEmpty;
  if constexpr (KL)
    bad_kl = !(s_ok && finite(st.mt) && st.mt != kEmpty && finite(zs) && finite(zt) && finite(dz));
  if constexpr (CE) bad_ce = !label_ok || !s_ok || !finite(r1);
  const bool nan_grad = g != nullptr && (bad_kl || bad_ce);
  const bool write = g != nullptr && !nan_grad;
  const bool pass2 = (KL && !bad_kl) || write;
  // (fp32 is enough for these per-row scalars: sums of two same-signed terms or a log1p, to a few
  // ulp; double-precision logs would also cost registers the loops need.)
  float s_label = 0.0f;  // read by every thread: the CE gradient at the label needs it
  if constexpr (CE) s_label = bad_ce ? 0.0f : xin(F::ld(s, label));
  if (tid == 0) {
    if constexpr (MSE) p.row_mse[r] = z[kSums - 1];
    if constexpr (CE) p.row_ce[r] = bad_ce ? kNaN : (st.ms - s_label) + log1pf((n1 - 1.0f) + r1);
    if constexpr (KL) {
      if (bad_kl) p.row_kl[r] = kNaN;
    }
  }

  // ---- pass 2: divergence terms and the gradient (pass 3 writes it for row-sum divergences) --
  if (pass2) {
    RowConsts kc;
    kc.c = p.c;
    kc.rs = st.ms;
    kc.rt = st.mt;
    kc.dm = st.ms - st.mt;
    // Read here, not at kernel start: three registers fewer through pass 1.
    const Coeffs w = p.grad ? Coeffs{p.scales[0], p.scales[1], p.scales[2]} : Coeffs{0.f, 0.f, 0.f};
    kc.w = w;
    kc.xf = p.xf;
    kc.dc = p.dc;
    kc.inv_zs = kc.inv_zt = kc.delta = kc.ce_p = kc.ref_dt = kc.s_corr = 0.0f;
    if constexpr (KL) {
      kc.inv_zs = 1.0f / zs;
      kc.inv_zt = 1.0f / zt;
      // log1p(dz/zt) keeps delta's digits when z_s ~= z_t; far from that, z_s and z_t themselves
      // are the accurate quantities (dz/zt near -1 would lose them).
      kc.delta = fabsf(dz) <= 0.5f * zt ? log1pf(dz / zt) * kLog2e : log2f(zs / zt);
    }
    kc.ce_p = kc.g_lab = 0.0f;
    if constexpr (CE) {
      kc.ce_p = w.ce / z1;
      // p_label - 1 = -((n1 - 1) + r1) / z_1 when the label is a maximum (no cancellation), else
      // (e^(s_label - ms) - z_1) / z_1 with p_label <= 1/2.
      kc.g_lab = s_label == st.ms ? -kc.ce_p * ((n1 - 1.0f) + r1)
                                  : kc.ce_p * (ex2((s_label - st.ms) * kLog2e) - z1);
    }
    const int lab = CE && label_ok ? static_cast<int>(label) : -1;
    uint4* gv = reinterpret_cast<uint4*>(write ? g + sp.head : nullptr);
    float kl = 0.0f, corr = 0.0f;
    // The sweep of one pass; vectors in reverse of the previous pass's order (see the file
    // comment), scalar elements first (nothing they need stays live through the vector loop).
    auto run = [&](auto mode, auto reverse, auto last) {
      constexpr int kMode = decltype(mode)::value;
      sweep<F, kTeacher, decltype(reverse)::value, decltype(last)::value>(
          s, t, sp, cols,
          [&](int j, float x, float y) {
            const float gg = pass2_elem<DIV, XF, kMode, KL, CE, MSE>(kc, x, y, lab == j, kl, corr);
            if (kMode != kTerms && write) F::st(g, j, gg);
          },
          [&](int k, const uint4& xs, const uint4& ys) {
            const uint4 out = pass2_vec<F, DIV, XF, kMode, KL, CE, MSE>(
                kc, xs, ys, lab - (sp.head + k * W), kl, corr);
            if (kMode != kTerms && write) __stcs(gv + k, out);
          });
    };
    using True = std::true_type;
    using False = std::false_type;
    if constexpr (kRowSum) {
      // The reference column (x' = rs, t' = tref), with the expressions of column_term.
      kc.ref_dt = st.ms - tref;
      const float ps_ref = ex2((st.ms - kc.rs) * kc.c) * kc.inv_zs;
      const float pt_ref = ex2((tref - kc.rt) * kc.c) * kc.inv_zt;
      reference_consts<DIV>(ps_ref, pt_ref, fmaf(kc.ref_dt - kc.dm, kc.c, -kc.delta), kc.dc);
      // Pass 2 is the last read only without a gradient: normal loads.
      run(std::integral_constant<int, kTerms>{}, True{}, False{});
      float v[2] = {kl, corr};
      block_reduce<SumOp, 2>(v, sm.kl);
      if (tid == 0) p.row_kl[r] = v[0] * p.t_sq;
      if (write) {
        kc.s_corr = v[1];
        run(std::integral_constant<int, kGrad>{}, False{}, True{});
      }
    } else {
      run(std::integral_constant<int, kTermsGrad>{}, True{}, True{});
      if constexpr (KL) {
        float v[1] = {kl};
        block_reduce<SumOp, 1>(v, sm.kl);
        if (tid == 0) p.row_kl[r] = v[0] * p.t_sq;
      }
    }
  }
  if (nan_grad) fill_row<F>(g, cols, kNaN);
}

template <typename F, int DIV, bool XF, bool KL, bool CE, bool MSE>
__global__ void __launch_bounds__(kMaxThreads, XF && CE ? kMinBlocksPerSmXfCe : kMinBlocksPerSm)
    fused_logits_kernel(const Params p) {
  __shared__ Smem sm;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    // Row selection -> one of the kernel's term subsets, chosen uniformly for the block.
    const bool sel = p.mask == nullptr || p.mask[r] != 0;
    int64_t label = p.ignore_index;
    if constexpr (CE) label = p.labels[r];
    const bool ce_on = CE && label != p.ignore_index;
    const bool grp = (KL || MSE) && sel;  // kl and mse share the mask
    if (grp && ce_on) {
      if constexpr (CE && (KL || MSE)) logits_row<F, DIV, XF, KL, true, MSE>(p, r, label, sm);
    } else if (grp) {
      if constexpr (KL || MSE) logits_row<F, DIV, XF, KL, false, MSE>(p, r, label, sm);
    } else if (ce_on) {
      if constexpr (CE) logits_row<F, DIV, XF, false, true, false>(p, r, label, sm);
    } else if (p.grad) {
      fill_row<F>(static_cast<typename F::Raw*>(p.grad) + r * static_cast<int64_t>(p.cols), p.cols,
                  0.0f);
    }
    if (threadIdx.x == 0) {
      if (KL && !grp) p.row_kl[r] = 0.0f;
      if (MSE && !grp) p.row_mse[r] = 0.0f;
      if (CE && !ce_on) p.row_ce[r] = 0.0f;
    }
    // Several rows per block only past 2^31 - 1 rows: keep one row's shared-memory reads apart
    // from the next row's writes.
    if (gridDim.x < p.rows) __syncthreads();
  }
}

// The kernel of one term set (key: 4 kl | 2 ce | 1 mse). Term sets without the divergence come
// with DIV = forward KL only (the host's choice; the code would be unused).
template <typename F, int DIV, bool XF>
Status launch(const Params& p, int key, cudaStream_t stream) {
  const int threads = threads_for(p.cols, F::kVec, kVectorsPerThread, kMaxThreads);
  const unsigned grid = static_cast<unsigned>(p.rows < INT_MAX ? p.rows : INT_MAX);
  void (*kernel)(Params) = nullptr;
  switch (key) {
    case 7: kernel = fused_logits_kernel<F, DIV, XF, true, true, true>; break;
    case 6: kernel = fused_logits_kernel<F, DIV, XF, true, true, false>; break;
    case 5: kernel = fused_logits_kernel<F, DIV, XF, true, false, true>; break;
    case 4: kernel = fused_logits_kernel<F, DIV, XF, true, false, false>; break;
    default:
      if constexpr (DIV == kGpuForwardKL) {
        if (key == 3) kernel = fused_logits_kernel<F, DIV, XF, false, true, true>;
        if (key == 2) kernel = fused_logits_kernel<F, DIV, XF, false, true, false>;
        if (key == 1) kernel = fused_logits_kernel<F, DIV, XF, false, false, true>;
      }
  }
  if (kernel == nullptr) return invalid("terms (a divergence without the kl term)", key);
  kernel<<<grid, threads, 0, stream>>>(p);
  return launch_status();
}

// Forward KL on untransformed logits: the kernels without XF; everything else: with XF (a logit
// scale of 1 and no softcap cost one multiply per element there).
template <typename F>
Status launch_for(const Params& p, int key, int div, bool transform, cudaStream_t stream) {
  switch (div) {
    case kGpuReverseKL: return launch<F, kGpuReverseKL, true>(p, key, stream);
    case kGpuJSD: return launch<F, kGpuJSD, true>(p, key, stream);
    case kGpuTVD: return launch<F, kGpuTVD, true>(p, key, stream);
    default:
      return transform ? launch<F, kGpuForwardKL, true>(p, key, stream)
                       : launch<F, kGpuForwardKL, false>(p, key, stream);
  }
}

}  // namespace

Status fused_logits(const FusedLogitsArgs& a) {
  if (a.dtype != kGpuFloat32 && a.dtype != kGpuBFloat16 && a.dtype != kGpuFloat16)
    return invalid("dtype", a.dtype);
  const int key = (a.use_kl ? 4 : 0) | (a.use_ce ? 2 : 0) | (a.use_mse ? 1 : 0);
  if (key == 0) return invalid("terms (no loss term enabled)");
  if (a.rows < 0) return invalid("rows", a.rows);
  // Columns are int inside the kernel; a 2^31-element row is far beyond any vocabulary.
  if (a.cols < 0 || a.cols > INT_MAX - 64) return invalid("cols", a.cols);
  if (a.use_kl && !(a.temperature > 0.0f && std::isfinite(a.temperature)))
    return invalid("temperature (must be finite and > 0)");
  if (a.rows == 0) return Status{};
  // (Empty rows read no logits: torch gives zero-size tensors a null data pointer.)
  if (a.cols > 0 && !a.student) return invalid("student (null pointer)");
  if (a.cols > 0 && (a.use_kl || a.use_mse) && !a.teacher) return invalid("teacher (null pointer)");
  if (a.use_ce && !a.labels) return invalid("labels (null pointer)");
  if ((a.use_kl && !a.row_kl) || (a.use_ce && !a.row_ce) || (a.use_mse && !a.row_mse))
    return invalid("row outputs (null pointer for an active term)");
  if (a.grad && !a.scales) return invalid("scales (null pointer with a gradient)");
  const int div = a.use_kl ? a.divergence : kGpuForwardKL;
  if (div < kGpuForwardKL || div > kGpuTVD) return invalid("divergence", div);
  if (div == kGpuJSD && !(a.beta > 0.0f && a.beta < 1.0f && a.one_minus_beta > 0.0f &&
                          a.one_minus_beta < 1.0f))
    return invalid("beta (JSD needs 0 < beta < 1; 0 and 1 are forward and reverse KL)");
  if (!(std::isfinite(a.logit_scale) && a.logit_scale > 0.0f))
    return invalid("logit_scale (must be finite and > 0)");
  if (!(std::isfinite(a.softcap) && a.softcap >= 0.0f))
    return invalid("softcap (must be finite and > 0, or 0 for off)");

  Params p;
  p.student = a.student;
  p.student_row_stride = a.student_row_stride;
  p.teacher = a.teacher;
  p.teacher_row_stride = a.teacher_row_stride;
  p.labels = a.labels;
  p.mask = a.mask;
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  const double temp = a.use_kl ? static_cast<double>(a.temperature) : 1.0;
  p.c = static_cast<float>(1.4426950408889634074 / temp);
  p.t_sq = a.t2_scale ? static_cast<float>(temp * temp) : 1.0f;
  p.ignore_index = a.ignore_index;
  p.scales = a.scales;
  p.row_kl = a.use_kl ? a.row_kl : nullptr;
  p.row_ce = a.use_ce ? a.row_ce : nullptr;
  p.row_mse = a.use_mse ? a.row_mse : nullptr;
  p.grad = a.grad;
  const bool capped = a.softcap > 0.0f;
  const double cap = capped ? static_cast<double>(a.softcap) : 1.0;
  p.xf = Xform{a.logit_scale, static_cast<float>(a.logit_scale / cap), static_cast<float>(cap),
               capped};
  const double log_ratio = std::log(static_cast<double>(a.beta) / a.one_minus_beta);
  p.dc = DivConsts{a.beta, a.one_minus_beta, static_cast<float>(div == kGpuJSD ? log_ratio : 0.0),
                   0.0f, 0.0f, 0.0f};
  const bool transform = capped || a.logit_scale != 1.0f;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kGpuFloat32: return launch_for<F32>(p, key, div, transform, stream);
    case kGpuBFloat16: return launch_for<BF16>(p, key, div, transform, stream);
    default: return launch_for<F16>(p, key, div, transform, stream);
  }
}

}  // namespace gpu
}  // namespace fastdistill
