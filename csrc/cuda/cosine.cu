// CUDA kernel for the hidden-state cosine loss, the same formula as csrc/cpu/cosine.cpp:
//   cos  = <s,t> / sqrt((|s|^2 + eps) (|t|^2 + eps)),  eps = 1e-12 (torch's cosine_embedding_loss)
//   loss = 1 - cos on rows with mask != 0 (0 elsewhere)
//   grad = scale[0] * d(loss)/ds = scale[0] * (-(t / denom - cos s / (|s|^2 + eps))), zeros on
//          unselected rows; scale is read on the device.
// The three dot products accumulate in fp32 (per thread, then a block tree); the per-row scalar
// math (eps, sqrt, division) is in double, as on the CPU.
//
// Launch: one block per row (grid-stride past 2^31 - 1 rows), 32..512 threads chosen by the row
// length, 16-byte vector loads where the rows allow them (csrc/cuda/common.cuh, row_span). Pass 1
// reads s and t; pass 2, only with a gradient, re-reads them in reverse order (evict-first loads:
// the row's tail is the likeliest to still be in L2) and writes the gradient with streaming stores.
#include <climits>

#include "cuda/common.cuh"

namespace fastdistill {
namespace gpu {
namespace {

constexpr int kMaxThreads = 512;
// Hidden rows are short (768..8192 elements): fewer vectors per thread, more rows in flight.
constexpr int kVectorsPerThread = 2;
constexpr double kEps = 1e-12;  // torch's EPSILON in cosine_embedding_loss

struct Params {
  const void* student;
  int64_t student_row_stride;
  const void* teacher;
  int64_t teacher_row_stride;
  const uint8_t* mask;
  int64_t rows;
  int cols;
  const float* scale;
  float* row_loss;
  void* grad;
};

template <int N>
__device__ __forceinline__ void dots(const float (&x)[N], const float (&y)[N], float& dot,
                                     float& ss, float& tt) {
#pragma unroll
  for (int e = 0; e < N; ++e) {
    dot = fmaf(x[e], y[e], dot);
    ss = fmaf(x[e], x[e], ss);
    tt = fmaf(y[e], y[e], tt);
  }
}

template <typename F>
__global__ void __launch_bounds__(kMaxThreads) cosine_kernel(const Params p) {
  using Raw = typename F::Raw;
  constexpr int W = F::kVec;
  __shared__ float sm[3 * kWarp];
  const int tid = threadIdx.x, nthreads = blockDim.x, cols = p.cols;
  const float scale = p.grad ? p.scale[0] : 0.0f;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const Raw* s = static_cast<const Raw*>(p.student) + r * p.student_row_stride;
    const Raw* t = static_cast<const Raw*>(p.teacher) + r * p.teacher_row_stride;
    Raw* g = p.grad ? static_cast<Raw*>(p.grad) + r * static_cast<int64_t>(cols) : nullptr;
    if (p.mask != nullptr && p.mask[r] == 0) {
      if (tid == 0) p.row_loss[r] = 0.0f;
      if (g) fill_row<F>(g, cols, 0.0f);
      continue;  // no shared memory touched: nothing to separate from the next row
    }
    const Span sp = row_span<Raw, W>(s, t, g, cols);
    const uint4* sv = reinterpret_cast<const uint4*>(s + sp.head);
    const uint4* tv = reinterpret_cast<const uint4*>(t + sp.head);

    float acc[3] = {0.0f, 0.0f, 0.0f};  // <s,t>, |s|^2, |t|^2
    for (int k = tid; k < sp.nvec; k += nthreads) {
      const uint4 xs = __ldg(sv + k), ys = __ldg(tv + k);
      float x[W], y[W];
#pragma unroll
      for (int e = 0; e < W; ++e) {
        x[e] = F::get(xs, e);
        y[e] = F::get(ys, e);
      }
      dots(x, y, acc[0], acc[1], acc[2]);
    }
    auto scalar1 = [&](int j) {
      const float x[1] = {F::ld(s, j)}, y[1] = {F::ld(t, j)};
      dots(x, y, acc[0], acc[1], acc[2]);
    };
    for (int j = tid; j < sp.head; j += nthreads) scalar1(j);
    for (int j = sp.tail + tid; j < cols; j += nthreads) scalar1(j);
    block_reduce<SumOp, 3>(acc, sm);

    const double ms = static_cast<double>(acc[1]) + kEps;
    const double denom = sqrt(ms * (static_cast<double>(acc[2]) + kEps));
    const double cos = static_cast<double>(acc[0]) / denom;
    if (tid == 0) p.row_loss[r] = static_cast<float>(1.0 - cos);
    if (g) {
      const float ct = static_cast<float>(-static_cast<double>(scale) / denom);
      const float cs = static_cast<float>(static_cast<double>(scale) * cos / ms);
      uint4* gv = reinterpret_cast<uint4*>(g + sp.head);
      if (tid < sp.nvec) {
        for (int k = tid + ((sp.nvec - 1 - tid) / nthreads) * nthreads; k >= 0; k -= nthreads) {
          const uint4 xs = __ldcs(sv + k), ys = __ldcs(tv + k);
          float out[W];
#pragma unroll
          for (int e = 0; e < W; ++e) out[e] = fmaf(ct, F::get(ys, e), cs * F::get(xs, e));
          __stcs(gv + k, F::put(out));
        }
      }
      auto grad1 = [&](int j) { F::st(g, j, fmaf(ct, F::ld_last(t, j), cs * F::ld_last(s, j))); };
      for (int j = tid; j < sp.head; j += nthreads) grad1(j);
      for (int j = sp.tail + tid; j < cols; j += nthreads) grad1(j);
    }
    // Several rows per block only past 2^31 - 1 rows: keep this row's shared-memory reads apart
    // from the next row's writes.
    if (gridDim.x < p.rows) __syncthreads();
  }
}

template <typename F>
Status launch(const Params& p, cudaStream_t stream) {
  const int threads = threads_for(p.cols, F::kVec, kVectorsPerThread, kMaxThreads);
  const unsigned grid = static_cast<unsigned>(p.rows < INT_MAX ? p.rows : INT_MAX);
  cosine_kernel<F><<<grid, threads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

Status cosine(const CosineArgs& a) {
  if (a.dtype != kGpuFloat32 && a.dtype != kGpuBFloat16 && a.dtype != kGpuFloat16)
    return invalid("dtype", a.dtype);
  if (a.rows < 0) return invalid("rows", a.rows);
  if (a.cols < 0 || a.cols > INT_MAX - 64) return invalid("cols", a.cols);
  if (a.rows == 0) return Status{};
  if (a.cols > 0 && (!a.student || !a.teacher)) return invalid("student/teacher (null pointer)");
  if (!a.row_loss) return invalid("row_loss (null pointer)");
  if (a.grad && !a.scale) return invalid("scale (null pointer with a gradient)");
  Params p;
  p.student = a.student;
  p.student_row_stride = a.student_row_stride;
  p.teacher = a.teacher;
  p.teacher_row_stride = a.teacher_row_stride;
  p.mask = a.mask;
  p.rows = a.rows;
  p.cols = static_cast<int>(a.cols);
  p.scale = a.scale;
  p.row_loss = a.row_loss;
  p.grad = a.grad;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kGpuFloat32: return launch<F32>(p, stream);
    case kGpuBFloat16: return launch<BF16>(p, stream);
    default: return launch<F16>(p, stream);
  }
}

}  // namespace gpu
}  // namespace fastdistill
