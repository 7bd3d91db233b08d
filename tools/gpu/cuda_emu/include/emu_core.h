// Host emulation of the few CUDA features the fastdistill kernels use (see ../check.py): one
// std::thread per CUDA thread, blocks run one after another (so __shared__ can be a static),
// __syncthreads and warp shuffles on std::barrier (a divergent barrier deadlocks, as it would hang
// or misbehave on a GPU), 16-byte vector accesses checked for alignment. EMU_CHAOS=1 adds random
// yields and sleeps after barriers to shake out missing synchronisation.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstddef>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <atomic>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct U3 { unsigned x = 0, y = 0, z = 0; };
extern thread_local U3 threadIdx, blockIdx;
extern U3 blockDim, gridDim;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }

template <class T> inline void emu_check_align(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    std::fprintf(stderr, "misaligned %zu-byte access at %p\n", sizeof(T), (const void*)p);
    std::abort();
  }
}
template <class T> inline T __ldg(const T* p) { emu_check_align(p); return *p; }
template <class T> inline T __ldcs(const T* p) { emu_check_align(p); return *p; }
template <class T> inline void __stcs(T* p, T v) { emu_check_align(p); *p = v; }

namespace emu {
struct Block {
  explicit Block(int n) : bar(n), nwarps((n + 31) / 32) {
    for (int w = 0; w < nwarps; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  struct Warp {
    std::barrier<> bar{32};
    uint64_t slots[32];
  };
  std::barrier<> bar;
  int nwarps;
  std::vector<std::unique_ptr<Warp>> warps;
};
extern thread_local Block* t_block;
float ex2_approx(float x);
void chaos();

template <class T>
T shfl_generic(T v, int src) {
  Block::Warp& w = *t_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[lane] = bits;
  w.bar.arrive_and_wait();
  uint64_t got = w.slots[src & 31];
  w.bar.arrive_and_wait();
  chaos();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

template <class K, class... A>
void launch(K kernel, unsigned grid, int threads, size_t, cudaStream_t, A... args) {
  if (threads % 32 != 0 || threads > 1024 || threads < 32) { std::fprintf(stderr, "bad block %d\n", threads); std::abort(); }
  blockDim = U3{(unsigned)threads, 1, 1};
  gridDim = U3{grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    Block blk(threads);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx = U3{(unsigned)t, 0, 0};
        blockIdx = U3{b, 0, 0};
        t_block = &blk;
        kernel(args...);
      });
    for (auto& th : ts) th.join();
  }
}
}  // namespace emu

namespace emu { void chaos(); }
inline void __syncthreads() { emu::t_block->bar.arrive_and_wait(); emu::chaos(); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu::shfl_generic(v, (int)(threadIdx.x % 32) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu::shfl_generic(v, src); }
inline bool __any_sync(unsigned, int pred) {
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= emu::shfl_generic(pred, l);
  return any != 0;
}
#define exp2f(x) ::emu::ex2_approx(x)
