// CUDA kernel of the sparse-target loss, the formulas of csrc/cpu/topk_kl.cpp (meaning:
// fastdistill/reference.py, topk_kl_rows and topk_distillation_loss). One block per row
// (grid-stride past 2^31 - 1 rows), 32..512 threads:
//   pass 1  m = max_j s_j and, for the tail, m_out = max over the columns outside K
//   pass 2  S = sum_j exp((s_j - m)/T), S1 = sum_j exp(s_j - m) (the CE at T != 1) and
//           S_out = sum_{j not in K} exp((s_j - m_out)/T); per-thread sums in double
//   K part  warp 0: the k teacher and student terms in double (log-sum-exps, loss, the dense
//           coefficients), published through shared memory
//   pass 3  the dense gradient, a barrier, then the K columns and the label column rewritten.
// The row's ids arrive sorted: membership of a column in K is a binary search, a repeated id is
// equal to its neighbour. Invalid ids or labels make the row's loss and gradient NaN (no host
// sync). Scalar loads and stores (coalesced); rows are L2-resident between the passes.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/topk_kl_cuda.h"

namespace fastdistill {
namespace gpu {
namespace {

constexpr int kMaxThreads = 512;
constexpr float kLog2e = 1.44269504088896341f;
constexpr double kInfD = __builtin_huge_val();
constexpr double kNaND = __builtin_nan("");

struct Params {
  TopkKLArgs a;
  int cols;
  int k;
};

// Row results warp 0 computes for the block.
struct Shared {
  double loss, alpha, beta, norm_p, norm_q, total_p;
};

__device__ __forceinline__ bool in_k(const int64_t* ids, int k, int64_t j) {
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(ids + mid) < j)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < k && __ldg(ids + lo) == j;
}

template <typename Op, int N>
__device__ __forceinline__ void block_reduce_d(double (&v)[N], double* smem) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Op::apply(v[i], __shfl_xor_sync(kFullMask, v[i], o));
  }
  const int nwarps = static_cast<int>(blockDim.x) / kWarp;
  if (nwarps == 1) return;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * kWarp + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = lane < nwarps ? smem[i * kWarp + lane] : 0.0;
  for (int o = nwarps / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Op::apply(v[i], __shfl_xor_sync(kFullMask, v[i], o));
  }
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = __shfl_sync(kFullMask, v[i], 0);
}
struct SumD {
  __device__ static __forceinline__ double apply(double a, double b) { return a + b; }
};

// Warp 0: the K part of a row (csrc/cpu/topk_kl.cpp, k_part), into `out`.
template <typename F>
__device__ void k_part(const Params& p, const typename F::Raw* s, const int64_t* ids,
                       const float* lp, int64_t r, double m, double s_sum, double m_out,
                       double s_out, double inv_t, Shared& out) {
  const int lane = threadIdx.x % kWarp, k = p.k, norm = p.a.normalization;
  const double lp_scale = norm == 2 ? 1.0 : static_cast<double>(p.a.capture_temperature) * inv_t;
  double mx[2] = {-kInfD, -kInfD};  // teacher a_i, student z_i
  for (int i = lane; i < k; i += kWarp) {
    mx[0] = fmax(mx[0], lp[i] * lp_scale);
    mx[1] = fmax(mx[1], F::ld(s, ids[i]) * inv_t);
  }
  for (int o = kWarp / 2; o > 0; o >>= 1)
    for (int q = 0; q < 2; ++q) mx[q] = fmax(mx[q], __shfl_xor_sync(kFullMask, mx[q], o));
  double sm[2] = {0.0, 0.0};
  for (int i = lane; i < k; i += kWarp) {
    sm[0] += exp(lp[i] * lp_scale - mx[0]);
    sm[1] += exp(F::ld(s, ids[i]) * inv_t - mx[1]);
  }
  for (int o = kWarp / 2; o > 0; o >>= 1)
    for (int q = 0; q < 2; ++q) sm[q] += __shfl_xor_sync(kFullMask, sm[q], o);
  const double lse_v = m * inv_t + log(s_sum);
  const double norm_p = norm == 2 ? 0.0 : mx[0] + log(sm[0]);
  const double norm_q = norm == 1 ? mx[1] + log(sm[1]) : lse_v;
  double acc[2] = {0.0, 0.0};  // loss, sum p
  for (int i = lane; i < k; i += kWarp) {
    const double logp = lp[i] * lp_scale - norm_p;
    const double logq = F::ld(s, ids[i]) * inv_t - norm_q;
    const double pi = exp(logp);
    if (pi != 0.0) acc[0] += pi * (logp - logq);  // `!= 0`: NaN stays NaN
    acc[1] += pi;
  }
  for (int o = kWarp / 2; o > 0; o >>= 1)
    for (int q = 0; q < 2; ++q) acc[q] += __shfl_xor_sync(kFullMask, acc[q], o);
  if (lane != 0) return;
  out.norm_p = norm_p;
  out.norm_q = norm_q;
  out.beta = 0.0;
  out.total_p = 1.0;
  out.loss = acc[0];
  out.alpha = norm == 0 ? 1.0 / s_sum : 0.0;
  if (norm == 2) {
    const double tail = p.a.tail[r];
    const double p_t = exp(tail);
    const double log_qt = (m_out - m) * inv_t + log(s_out) - log(s_sum);
    if (p_t != 0.0) out.loss += p_t * (tail - log_qt);
    out.total_p = acc[1] + p_t;
    out.alpha = out.total_p / s_sum;
    out.beta = s_out > 0.0 ? -p_t / s_out : 0.0;
  }
}

template <typename F>
__global__ void __launch_bounds__(kMaxThreads, 1) topk_kl_kernel(const Params p) {
  using Raw = typename F::Raw;
  __shared__ float smf[2 * kWarp];
  __shared__ double smd[3 * kWarp];
  __shared__ Shared sh;
  __shared__ int bad_flag;
  const TopkKLArgs& a = p.a;
  const int tid = threadIdx.x, nthreads = blockDim.x, cols = p.cols, k = p.k;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const Raw* s = static_cast<const Raw*>(a.student) + r * a.student_row_stride;
    Raw* g = a.grad ? static_cast<Raw*>(a.grad) + r * static_cast<int64_t>(cols) : nullptr;
    const bool kd = a.use_kd && (a.kd_mask == nullptr || a.kd_mask[r] != 0);
    const int64_t label = a.use_ce ? a.labels[r] : a.ignore_index;
    const bool ce = a.use_ce && label != a.ignore_index;
    if (!kd && !ce) {
      if (tid == 0 && a.row_kd) a.row_kd[r] = 0.0f;
      if (tid == 0 && a.row_ce) a.row_ce[r] = 0.0f;
      if (g) fill_row<F>(g, cols, 0.0f);
      continue;
    }
    const int64_t* ids = a.ids + r * k;
    const float* lp = a.logprobs + r * k;
    if (tid == 0) bad_flag = 0;
    __syncthreads();
    if (kd) {
      for (int i = tid; i < k; i += nthreads) {
        const int64_t id = ids[i];
        if (id < 0 || id >= cols || (i + 1 < k && ids[i + 1] == id)) bad_flag = 1;
      }
    }
    __syncthreads();
    const bool bad = bad_flag != 0;
    const bool tail = kd && !bad && a.normalization == 2;
    const float temp = kd ? a.temperature : 1.0f;  // the CE alone runs at T = 1
    const float c_t = kLog2e / temp;
    const bool sep1 = ce && temp != 1.0f;

    float mm[2] = {-kInf, -kInf};
    for (int j = tid; j < cols; j += nthreads) {
      const float x = F::ld(s, j);
      mm[0] = fmaxf(mm[0], x);
      if (tail && !in_k(ids, k, j)) mm[1] = fmaxf(mm[1], x);
    }
    block_reduce<MaxOp, 2>(mm, smf);
    const float m = mm[0], m_out = mm[1];
    double acc[3] = {0.0, 0.0, 0.0};  // S, S1, S_out
    for (int j = tid; j < cols; j += nthreads) {
      const float x = F::ld(s, j);
      acc[0] += ex2((x - m) * c_t);
      if (sep1) acc[1] += ex2((x - m) * kLog2e);
      if (tail && m_out != -kInf && !in_k(ids, k, j)) acc[2] += ex2((x - m_out) * c_t);
    }
    block_reduce_d<SumD, 3>(acc, smd);
    const double s_sum = acc[0], s1 = sep1 ? acc[1] : acc[0], s_out = acc[2];
    const double inv_t = 1.0 / static_cast<double>(temp);
    if (kd && !bad && tid < kWarp)
      k_part<F>(p, s, ids, lp, r, m, s_sum, m_out, s_out, inv_t, sh);
    __syncthreads();
    const bool k_ok = kd && !bad;
    const double alpha = bad ? kNaND : (k_ok ? sh.alpha : 0.0);
    const double beta = k_ok ? sh.beta : 0.0;
    const bool label_ok = label >= 0 && label < cols;
    const float x_label = ce && label_ok ? F::ld(s, label) : 0.0f;
    if (tid == 0) {
      if (a.row_kd) a.row_kd[r] = bad ? kNaN : (kd ? static_cast<float>(sh.loss) : 0.0f);
      if (a.row_ce)
        a.row_ce[r] = !ce ? 0.0f : (label_ok ? static_cast<float>(m + log(s1) - x_label) : kNaN);
    }
    if (g) {
      const double c_kd = kd ? a.scales[0] : 0.0, c_ce = ce ? a.scales[1] : 0.0;
      // A label outside [0, cols): the whole gradient row NaN, like the loss.
      const float ce_coef = static_cast<float>(label_ok ? c_ce / s1 : kNaND);
      const float coef = static_cast<float>(c_kd * alpha) + (sep1 || !ce ? 0.0f : ce_coef);
      const float coef_out = static_cast<float>(c_kd * beta);
      for (int j = tid; j < cols; j += nthreads) {
        const float x = F::ld(s, j);
        float v = coef != 0.0f ? coef * ex2((x - m) * c_t) : 0.0f;  // renormalized: 0
        if (sep1) v += ce_coef * ex2((x - m) * kLog2e);
        if (coef_out != 0.0f) v += coef_out * ex2((x - m_out) * c_t);
        F::st(g, j, v);
      }
      __syncthreads();  // the K and label columns are rewritten below
      if (k_ok) {
        for (int i = tid; i < k; i += nthreads) {
          const int64_t j = ids[i];
          const double x = F::ld(s, j);
          const double logp = lp[i] * (a.normalization == 2
                                           ? 1.0
                                           : static_cast<double>(a.capture_temperature) * inv_t) -
                              sh.norm_p;
          const double pi = exp(logp), qi = exp(x * inv_t - sh.norm_q);
          double v = c_kd * (sh.total_p * qi - pi);
          if (ce) v += c_ce * (exp(x - m) / s1 - (j == label ? 1.0 : 0.0));
          F::st(g, j, static_cast<float>(v));
        }
      }
      if (tid == 0 && ce && label_ok && !(k_ok && in_k(ids, k, label))) {
        const double x = x_label;
        double kd_part = alpha * exp((x - m) * inv_t);
        if (beta != 0.0) kd_part += beta * exp((x - m_out) * inv_t);
        F::st(g, label, static_cast<float>(c_kd * kd_part + c_ce * (exp(x - m) / s1 - 1.0)));
      }
    }
    // Shared memory (sh, bad_flag, the reductions') is reused by the next row of this block.
    __syncthreads();
  }
}

template <typename F>
Status launch(const Params& p, cudaStream_t stream) {
  const int threads = threads_for(p.cols, 4, 4, kMaxThreads);
  const unsigned grid = static_cast<unsigned>(p.a.rows < INT_MAX ? p.a.rows : INT_MAX);
  topk_kl_kernel<F><<<grid, threads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

Status topk_kl(const TopkKLArgs& a) {
  if (a.dtype != kGpuFloat32 && a.dtype != kGpuBFloat16 && a.dtype != kGpuFloat16)
    return invalid("dtype", a.dtype);
  if (a.rows < 0) return invalid("rows", a.rows);
  if (a.cols < 1 || a.cols > INT_MAX - 64) return invalid("cols", a.cols);
  if (a.k < 1 || a.k > INT_MAX) return invalid("k", a.k);
  if (a.normalization < 0 || a.normalization > 2) return invalid("normalization", a.normalization);
  if (a.rows == 0) return Status{};
  if (!a.student || !a.ids || !a.logprobs) return invalid("student/ids/logprobs (null pointer)");
  if (a.normalization == 2 && a.use_kd && !a.tail) return invalid("tail (null pointer)");
  if (a.use_ce && (!a.labels || !a.row_ce)) return invalid("labels/row_ce (null pointer)");
  if (a.use_kd && !a.row_kd) return invalid("row_kd (null pointer)");
  if (a.grad && !a.scales) return invalid("scales (null pointer with a gradient)");
  Params p{a, static_cast<int>(a.cols), static_cast<int>(a.k)};
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kGpuFloat32: return launch<F32>(p, stream);
    case kGpuBFloat16: return launch<BF16>(p, stream);
    default: return launch<F16>(p, stream);
  }
}

}  // namespace gpu
}  // namespace fastdistill
