// Device helpers shared by the CUDA kernels: fp32/bf16/fp16 storage formats behind 16-byte
// vector loads, the split of a row into an unaligned head, 16-byte vectors and a tail, block-wide
// reductions that leave identical bits in every thread, and launch-error reporting.
//
// Loads come in two flavours: `ld` (ld.global.nc, normal caching) for a first read of a row, and
// `ld_last` (ld.global.cs, evict-first in L1 and L2) for the last read, so a row pass 2 re-reads
// does not push rows that other blocks still have to re-read out of L2. Gradient stores are
// st.global.cs for the same reason: nothing reads them back in these kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels_cuda.h"

namespace fastdistill {
namespace gpu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Compile-time constants usable in host and device code (CUDART_INF_F is a device function call,
// which the host pass rejects in default member initialisers).
constexpr float kInf = __builtin_huge_valf();
constexpr float kNaN = __builtin_nanf("");

// 2^x with one MUFU.EX2 (ex2.approx.ftz: <= 2 ulp relative error; results below 2^-126 flush to
// 0, far below anything that matters next to the row maximum's term of ~1). exp2f() without
// --use_fast_math adds range scaling around the same instruction that the softmax loops never
// need. ex2(-inf) = 0, ex2(NaN) = NaN, which the kernels rely on.
__device__ __forceinline__ float ex2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);  // not a device compilation (a host-side emulation of the kernels)
#endif
}

__device__ __forceinline__ bool finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Word i of a vector; the branches fold away where i is a constant (every caller is unrolled).
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  if (i == 0) return v.x;
  if (i == 1) return v.y;
  if (i == 2) return v.z;
  return v.w;
}

// ---- storage formats ------------------------------------------------------------------------
// Each format: Raw (element storage type), kVec (elements per 16 bytes), get (element e of a
// 16-byte vector as float), put (kVec floats to a vector) and put_word (kVec / 4 floats to one
// 32-bit word), rounding to nearest even, scalar ld/ld_last/st, and splat (one value kVec times).
struct F32 {
  using Raw = float;
  static constexpr int kVec = 4;
  __device__ static __forceinline__ float get(const uint4& v, int e) {
    return __uint_as_float(word(v, e));
  }
  __device__ static __forceinline__ uint4 put(const float (&g)[kVec]) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]),
                      __float_as_uint(g[3]));
  }
  __device__ static __forceinline__ uint32_t put_word(const float (&g)[1]) {
    return __float_as_uint(g[0]);
  }
  __device__ static __forceinline__ float ld(const Raw* p, int64_t j) { return __ldg(p + j); }
  __device__ static __forceinline__ float ld_last(const Raw* p, int64_t j) { return __ldcs(p + j); }
  __device__ static __forceinline__ void st(Raw* p, int64_t j, float v) { __stcs(p + j, v); }
  __device__ static __forceinline__ uint4 splat(float v) {
    const uint32_t u = __float_as_uint(v);
    return make_uint4(u, u, u, u);
  }
};

struct BF16 {
  using Raw = unsigned short;
  static constexpr int kVec = 8;
  __device__ static __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b << 16); }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    // cvt.rn.bf16x2.f32: round to nearest even, NaN stays NaN, one instruction for two values.
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return static_cast<uint32_t>(__bfloat16_as_ushort(h.x)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
  }
  __device__ static __forceinline__ float get(const uint4& v, int e) {
    const uint32_t w = word(v, e >> 1);
    return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
  }
  __device__ static __forceinline__ uint4 put(const float (&g)[kVec]) {
    return make_uint4(pack(g[0], g[1]), pack(g[2], g[3]), pack(g[4], g[5]), pack(g[6], g[7]));
  }
  __device__ static __forceinline__ uint32_t put_word(const float (&g)[2]) {
    return pack(g[0], g[1]);
  }
  __device__ static __forceinline__ float ld(const Raw* p, int64_t j) {
    return from_bits(__ldg(p + j));
  }
  __device__ static __forceinline__ float ld_last(const Raw* p, int64_t j) {
    return from_bits(__ldcs(p + j));
  }
  __device__ static __forceinline__ void st(Raw* p, int64_t j, float v) {
    __stcs(p + j, __bfloat16_as_ushort(__float2bfloat16_rn(v)));
  }
  __device__ static __forceinline__ uint4 splat(float v) {
    const uint32_t u = pack(v, v);
    return make_uint4(u, u, u, u);
  }
};

struct F16 {
  using Raw = unsigned short;
  static constexpr int kVec = 8;
  __device__ static __forceinline__ float from_bits(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
           (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
  }
  __device__ static __forceinline__ float get(const uint4& v, int e) {
    const uint32_t w = word(v, e >> 1);
    return from_bits((e & 1) ? (w >> 16) : (w & 0xffffu));
  }
  __device__ static __forceinline__ uint4 put(const float (&g)[kVec]) {
    return make_uint4(pack(g[0], g[1]), pack(g[2], g[3]), pack(g[4], g[5]), pack(g[6], g[7]));
  }
  __device__ static __forceinline__ uint32_t put_word(const float (&g)[2]) {
    return pack(g[0], g[1]);
  }
  __device__ static __forceinline__ float ld(const Raw* p, int64_t j) {
    return from_bits(__ldg(p + j));
  }
  __device__ static __forceinline__ float ld_last(const Raw* p, int64_t j) {
    return from_bits(__ldcs(p + j));
  }
  __device__ static __forceinline__ void st(Raw* p, int64_t j, float v) {
    __stcs(p + j, __half_as_ushort(__float2half_rn(v)));
  }
  __device__ static __forceinline__ uint4 splat(float v) {
    const uint32_t u = pack(v, v);
    return make_uint4(u, u, u, u);
  }
};

// ---- row layout -----------------------------------------------------------------------------
// Elements [0, head) and [tail, cols) are scalar; [head, tail) is nvec 16-byte vectors starting
// at a 16-byte boundary. The vector path needs every row pointer involved (student, teacher,
// gradient; null ones ignored) at the same address modulo 16, so that one element index is
// aligned in all of them: true for contiguous tensors from torch's allocator whatever the number
// of columns (rows of 50257 bf16 logits start at every even address modulo 16, and the head
// absorbs it). Other rows (unusual strides or storage offsets) take the all-scalar path
// {0, 0, 0}, which is correct, just slower.
struct Span {
  int head, nvec, tail;
};

template <typename Raw, int kVec>
__device__ __forceinline__ Span row_span(const void* a, const void* b, const void* c, int cols) {
  const uint32_t phase = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(a)) & 15u;
  bool ok = phase % sizeof(Raw) == 0;
  if (b) ok = ok && (static_cast<uint32_t>(reinterpret_cast<uintptr_t>(b)) & 15u) == phase;
  if (c) ok = ok && (static_cast<uint32_t>(reinterpret_cast<uintptr_t>(c)) & 15u) == phase;
  if (!ok) return Span{0, 0, 0};
  int head = static_cast<int>(((16u - phase) & 15u) / sizeof(Raw));
  if (head > cols) head = cols;
  const int nvec = (cols - head) / kVec;
  return Span{head, nvec, head + nvec * kVec};
}

// Fills a contiguous row of `cols` elements with `value` (zeros for unselected rows, NaN for
// rows whose loss is undefined).
template <typename F>
__device__ __forceinline__ void fill_row(typename F::Raw* g, int cols, float value) {
  const Span sp = row_span<typename F::Raw, F::kVec>(g, nullptr, nullptr, cols);
  uint4* gv = reinterpret_cast<uint4*>(g + sp.head);
  const uint4 v = F::splat(value);
  for (int k = threadIdx.x; k < sp.nvec; k += blockDim.x) __stcs(gv + k, v);
  for (int j = threadIdx.x; j < sp.head; j += blockDim.x) F::st(g, j, value);
  for (int j = sp.tail + threadIdx.x; j < cols; j += blockDim.x) F::st(g, j, value);
}

// ---- block reductions -----------------------------------------------------------------------
// blockDim.x is a power of two and a multiple of 32 (the launchers guarantee it). The result is
// the same bits in every thread: an xor butterfly combines lane i with lane i^o and lane i^o
// with lane i, and + and max are commutative, so all lanes agree; every warp then repeats the
// same second-level butterfly on the same shared-memory values. `smem` holds N * 32 floats and
// must not be read by another reduction until a __syncthreads() separates them.
struct SumOp {
  __device__ static __forceinline__ float apply(float a, float b) { return a + b; }
  __device__ static __forceinline__ float identity() { return 0.0f; }
};
struct MaxOp {
  __device__ static __forceinline__ float apply(float a, float b) { return fmaxf(a, b); }
  __device__ static __forceinline__ float identity() { return -kInf; }
};

template <typename Op, int N>
__device__ __forceinline__ void block_reduce(float (&v)[N], float* smem) {
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
  for (int i = 0; i < N; ++i) v[i] = lane < nwarps ? smem[i * kWarp + lane] : Op::identity();
  for (int o = nwarps / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = Op::apply(v[i], __shfl_xor_sync(kFullMask, v[i], o));
  }
  // Lanes >= nwarps reduced identities among themselves: take lane 0's value everywhere.
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = __shfl_sync(kFullMask, v[i], 0);
}

// Threads per block for rows of `cols` elements, `per_thread` 16-byte vectors per thread when the
// row is long: a power of two in [32, max_threads].
inline int threads_for(int64_t cols, int vec, int per_thread, int max_threads) {
  const int64_t vectors = (cols + vec - 1) / vec;
  const int64_t want = (vectors + per_thread - 1) / per_thread;
  int t = kWarp;
  while (t < max_threads && t < want) t *= 2;
  return t;
}

// Status of the launch just made: cudaGetLastError() reports a bad configuration, no device, a
// missing driver or a stream from another device without waiting for the kernel.
inline Status launch_status() {
  const cudaError_t err = cudaGetLastError();
  Status st;
  if (err != cudaSuccess) {
    st.code = Status::kCudaError;
    st.message = cudaGetErrorString(err);
  }
  return st;
}

inline Status invalid(const char* what, int64_t value = Status::kNoValue) {
  Status st;
  st.code = Status::kInvalidArgument;
  st.message = what;
  st.value = value;
  return st;
}

}  // namespace gpu
}  // namespace fastdistill
