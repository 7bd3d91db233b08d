// CUDA kernel for all_finite: sets *flag = 0 when any element is NaN or +-inf, never writes 1
// (Python sets the flag to 1 once and may run the kernel on several tensors into one flag).
// The test is on the bits: a float is inf or NaN exactly when its exponent field is all ones, so
// it holds under any floating-point flags and compares 16-bit formats two per 32-bit word.
//
// Launch: 256-thread blocks grid-striding over 16-byte vectors, four loads in flight per thread
// (evict-first: the data is read once); the elements before the first 16-byte boundary and after
// the last whole vector are checked one by one. One store per warp that saw a bad element.
#include "cuda/common.cuh"

namespace fastdistill {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kMaxBlocks = 4096;  // enough to fill any current GPU; the rest is grid-stride

// Exponent-all-ones test of the elements packed in 32-bit words, per format.
template <int DT>
struct Finite;
template <>
struct Finite<kGpuFloat32> {
  using Raw = uint32_t;
  __device__ static __forceinline__ bool bad_word(uint32_t w, int) {
    return (w & 0x7f800000u) == 0x7f800000u;
  }
  __device__ static __forceinline__ bool bad(Raw x) { return bad_word(x, 0); }
};
template <>
struct Finite<kGpuBFloat16> {
  using Raw = uint16_t;
  __device__ static __forceinline__ bool bad_word(uint32_t w, int) {
    return (w & 0x7f80u) == 0x7f80u || (w & 0x7f800000u) == 0x7f800000u;
  }
  __device__ static __forceinline__ bool bad(Raw x) { return (x & 0x7f80u) == 0x7f80u; }
};
template <>
struct Finite<kGpuFloat16> {
  using Raw = uint16_t;
  __device__ static __forceinline__ bool bad_word(uint32_t w, int) {
    return (w & 0x7c00u) == 0x7c00u || (w & 0x7c000000u) == 0x7c000000u;
  }
  __device__ static __forceinline__ bool bad(Raw x) { return (x & 0x7c00u) == 0x7c00u; }
};
template <>
struct Finite<kGpuFloat64> {
  using Raw = unsigned long long;
  // Little-endian: the odd words are the high halves, which hold the 11-bit exponent.
  __device__ static __forceinline__ bool bad_word(uint32_t w, int i) {
    return (i & 1) && (w & 0x7ff00000u) == 0x7ff00000u;
  }
  __device__ static __forceinline__ bool bad(Raw x) {
    return (x & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
};

template <int DT>
__device__ __forceinline__ bool bad_vec(const uint4& v) {
  using B = Finite<DT>;
  return B::bad_word(v.x, 0) | B::bad_word(v.y, 1) | B::bad_word(v.z, 2) | B::bad_word(v.w, 3);
}

// Elements [0, head) and [tail, numel) are scalar, [head, tail) is nvec 16-byte vectors.
template <int DT>
__global__ void __launch_bounds__(kThreads)
    all_finite_kernel(const void* data, int64_t head, int64_t nvec, int64_t tail, int64_t numel,
                      int32_t* flag) {
  using Raw = typename Finite<DT>::Raw;
  const Raw* x = static_cast<const Raw*>(data);
  const uint4* v = reinterpret_cast<const uint4*>(x + head);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bool bad = false;
  int64_t i = first;
  for (; i + (kUnroll - 1) * stride < nvec; i += kUnroll * stride) {
    uint4 a[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) a[u] = __ldcs(v + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) bad |= bad_vec<DT>(a[u]);
  }
  for (; i < nvec; i += stride) bad |= bad_vec<DT>(__ldcs(v + i));
  for (int64_t j = first; j < head; j += stride) bad |= Finite<DT>::bad(x[j]);
  for (int64_t j = tail + first; j < numel; j += stride) bad |= Finite<DT>::bad(x[j]);
  // Every lane of every warp gets here (no early exit; blocks are whole warps).
  if (__any_sync(kFullMask, bad) && threadIdx.x % kWarp == 0) *flag = 0;
}

template <int DT>
Status launch(const void* data, int64_t numel, int32_t* flag, cudaStream_t stream) {
  using Raw = typename Finite<DT>::Raw;
  constexpr int64_t kVec = 16 / sizeof(Raw);
  const uint32_t phase = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(data)) & 15u;
  int64_t head = 0, nvec = 0, tail = 0;  // all scalar unless element-aligned
  if (phase % sizeof(Raw) == 0) {
    head = static_cast<int64_t>(((16u - phase) & 15u) / sizeof(Raw));
    if (head > numel) head = numel;
    nvec = (numel - head) / kVec;
    tail = head + nvec * kVec;
  }
  const int64_t work = nvec > 0 ? nvec : numel;
  int64_t blocks = (work + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  all_finite_kernel<DT>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(data, head, nvec, tail, numel, flag);
  return launch_status();
}

}  // namespace

Status all_finite(const void* data, int64_t numel, int dtype, int32_t* flag, void* stream) {
  if (dtype < kGpuFloat32 || dtype > kGpuFloat64) return invalid("dtype", dtype);
  if (numel < 0) return invalid("numel", numel);
  if (numel == 0) return Status{};
  if (!data || !flag) return invalid("data/flag (null pointer)");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kGpuFloat32: return launch<kGpuFloat32>(data, numel, flag, s);
    case kGpuBFloat16: return launch<kGpuBFloat16>(data, numel, flag, s);
    case kGpuFloat16: return launch<kGpuFloat16>(data, numel, flag, s);
    default: return launch<kGpuFloat64>(data, numel, flag, s);
  }
}

}  // namespace gpu
}  // namespace fastdistill
