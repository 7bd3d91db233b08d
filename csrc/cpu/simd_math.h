// Scalar-looking math that GCC/Clang vectorise inside `#pragma omp simd` loops, plus the
// fp32 <-> bf16/fp16 conversions the kernels use. Header-only and torch-independent.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace fastdistill {

// Data-type codes shared with Python (fastdistill/_native.py must agree).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Why our own exponential: glibc only declares its vector expf variants (libmvec) under
// __FAST_MATH__, and -ffast-math's finite-math assumption breaks -inf logits.
// 2^y in fp32 for y <= 64 or NaN, the form the softmax loops use: callers fold log2(e)/T into one
// scale factor of (x - shift), so each exponential costs one multiply less and needs no Cody-Waite
// split (2^y splits exactly into 2^n * 2^r). 2^r on |r| <= 1/2 by a degree-5 minimax polynomial
// (relative error 1.0e-7). 2^n goes straight into the exponent bits: adding 1.5 * 2^23 rounds y to
// an integer n held in the low mantissa bits of the sum, and those bits shifted left by 23 are
// n << 23. Measured max relative error against double exp2 over [-30, 0]: 1.8e-7, far inside the
// 1e-5 budget. Results below 2^-125 (y = -inf too) are flushed to 0; NaN stays NaN.
static inline float fd_exp2(float y) {
  const float yc = y < -127.0f ? -127.0f : y;  // keeps n in range; NaN passes through
  const float kShift = 12582912.0f;            // 1.5 * 2^23
  const float shifted = yc + kShift;
  const float n = shifted - kShift;
  const float r = yc - n;
  float p = 1.3308821944519877e-3f;
  p = p * r + 9.6715176478028297e-3f;
  p = p * r + 5.5505823343992233e-2f;
  p = p * r + 2.4022242426872253e-1f;
  p = p * r + 6.9314706325531006e-1f;
  p = p * r + 1.0f;
  const uint32_t scale_bits = float_to_bits(shifted) << 23;  // n << 23, two's complement
  const float v = bits_to_float(float_to_bits(p) + scale_bits);
  return yc < -125.0f ? 0.0f : v;
}

// Natural log in fp32, vectorisable like fd_exp2 (glibc's logf is not, for the same reason), in
// two halves so that a caller can feed the second one a log1p argument of its own (one division
// for either): x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), then
// log x = e ln 2 + log1p(f), log1p(f) = 2 atanh(s) with s = f / (2 + f), |s| <= 0.1716, by its odd
// series to s^9 (truncation below 1e-9). fd_log_split handles normal x > 0 only (zero,
// denormals, +inf and NaN are not: the callers pass values in [1e-38, 2^64]).
static inline void fd_log_split(float x, float& e, float& f) {
  const uint32_t bits = float_to_bits(x);
  const float m1 = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m1 > 1.41421356f;
  f = (big ? 0.5f * m1 : m1) - 1.0f;  // exact (Sterbenz)
  e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - (big ? 126 : 127));
}

// e ln 2 + log1p(f) for |f| <= 0.4143 (exact 0 at e = f = 0).
static inline float fd_log_join(float e, float f) {
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return e * 0.693147180559945309f + 2.0f * s * p;
}

static inline float fd_log(float x) {
  float e, f;
  fd_log_split(x, e, f);
  return fd_log_join(e, f);
}

// ---- element loads/stores: fp32 math on fp32/bf16/fp16 storage --------------------------------
struct BF16 {
  uint16_t bits;
};
using F16 = _Float16;

template <typename T>
static inline float load(const T* p, int64_t i);
template <>
inline float load<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
inline float load<BF16>(const BF16* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(p[i].bits) << 16);
}
template <>
inline float load<F16>(const F16* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
static inline void store(T* p, int64_t i, float v);
template <>
inline void store<float>(float* p, int64_t i, float v) {
  p[i] = v;
}
template <>
inline void store<BF16>(BF16* p, int64_t i, float v) {
  // Round to nearest even, as torch does; NaN stays NaN (quiet bit forced on).
  uint32_t u = float_to_bits(v);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  p[i].bits = static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
}
template <>
inline void store<F16>(F16* p, int64_t i, float v) {
  p[i] = static_cast<F16>(v);
}

static inline bool is_finite(float x) {
  return (float_to_bits(x) & 0x7f800000u) != 0x7f800000u;
}

// Flush-to-zero and denormals-are-zero on the calling thread while in scope (x86; elsewhere a
// no-op). Probabilities and gradient terms in the fp32 denormal range (below 1.2e-38) are
// negligible at any tolerance, but an operation that produces or reads one costs a microcode
// assist: pass 3 ran 1.5x slower on rows of denormal exponentials (Zen 4, measured).
struct DenormalsAsZero {
#if defined(__SSE__)
  const unsigned int saved = _mm_getcsr();
  DenormalsAsZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAsZero() { _mm_setcsr(saved); }
  DenormalsAsZero(const DenormalsAsZero&) = delete;
  DenormalsAsZero& operator=(const DenormalsAsZero&) = delete;
#endif
};

// ---- non-temporal row stores -------------------------------------------------------------------
// A gradient row is written once and not read again by the kernel: streaming it to memory skips the
// read of each destination line that a normal store causes, and keeps the L2-resident scratch rows
// in place. Measured on this project's 2-core Zen 4 VM: 75 GB/s for streamed versus 26 GB/s for
// plain stores of a 262 MB buffer. Only where the ISA variant has vector streaming stores; the
// caller falls back to plain stores without them.
#if defined(__AVX__)
#define FD_STREAM_STORES 1
// Copy `bytes` from `src` (an L1-resident tile) to `dst`: plain stores up to the first 64-byte
// boundary of dst and for the tail, streaming stores for the whole lines in between.
static inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63);
  if (head > bytes) head = bytes;
  std::memcpy(d, s, static_cast<size_t>(head));
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#else
    const __m256i* s256 = reinterpret_cast<const __m256i*>(s);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(s256));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_loadu_si256(s256 + 1));
#endif
  }
  std::memcpy(d, s, static_cast<size_t>(bytes));
}
// Streaming stores are weakly ordered: fence before the row counts as written.
static inline void stream_fence() { _mm_sfence(); }
#else
#define FD_STREAM_STORES 0
#endif

}  // namespace fastdistill
