// Scalar-looking math that GCC/Clang vectorise inside `#pragma omp simd` loops, plus the
// fp32 <-> bf16/fp16 conversions the kernels use. Header-only and torch-independent.
#pragma once
#include <cstdint>
#include <cstring>

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

// exp(x) in fp32 for the softmax loops. Why not expf: glibc only declares its vector variants
// (libmvec) under __FAST_MATH__, and -ffast-math's finite-math assumption breaks -inf logits.
// Method: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by its degree-6
// Taylor polynomial, 2^n built in the exponent bits. Measured max relative error 2.4e-7 (2 ulp)
// over [-87, 0.5] against double exp: far inside the 1e-5 loss/gradient budget.
// Inputs below -87.3 (including -inf) return 0: the kernels only exponentiate x - max <= 0, and
// e^-87.3 is below the smallest normal float, so flushing it changes no sum at fp32 precision.
// NaN must not reach this function (the kernels screen rows with NaN/+inf before exponentiating).
static inline float fd_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // ln2 with the low 12 mantissa bits cleared
  const float kLn2Lo = 1.428606765330187e-06f;
  const bool underflow = x < -87.3f;
  float xc = underflow ? 0.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // Round to nearest via the 1.5*2^23 trick: exact for |x*log2e| < 2^22, vectorises everywhere.
  const float kShift = 12582912.0f;
  float n = (xc * kLog2e + kShift) - kShift;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // Truncation error r^7/7! <= 1.2e-7 on |r| <= 0.347.
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float y = p * scale;
  return underflow ? 0.0f : y;
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

}  // namespace fastdistill
