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

// Why our own exponential: glibc only declares its vector expf variants (libmvec) under
// __FAST_MATH__, and -ffast-math's finite-math assumption breaks -inf logits. Measured max relative
// error of fd_exp2: 2.4e-7 (2 ulp) over [-125, 0] against double exp2, far inside the 1e-5 budget.
// 2^y in fp32, the form the softmax loops use: callers fold log2(e)/T into one scale factor of
// (x - max), so each exponential costs one multiply less and needs no Cody-Waite split (2^y splits
// exactly into 2^n * 2^r). 2^r on |r| <= 1/2 by the degree-6 Taylor series of e^(r ln2):
// truncation (ln2/2)^7/7! = 1.2e-7 relative. Inputs below -126 (including -inf) return 0 (below
// the smallest normal float; the kernels only exponentiate y <= 0). NaN must not reach it.
static inline float fd_exp2(float y) {
  const bool underflow = y < -126.0f;
  float yc = underflow ? 0.0f : y;
  yc = yc > 127.0f ? 127.0f : yc;
  const float kShift = 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const float n = (yc + kShift) - kShift;
  const float r = yc - n;
  float p = 1.5403530393381609e-4f;
  p = p * r + 1.3333558146428443e-3f;
  p = p * r + 9.6181291076284772e-3f;
  p = p * r + 5.5504108664821580e-2f;
  p = p * r + 2.4022650695910071e-1f;
  p = p * r + 6.9314718055994531e-1f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return underflow ? 0.0f : p * scale;
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
