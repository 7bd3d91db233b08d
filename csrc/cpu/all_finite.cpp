// CPU kernel for all_finite: true when no element is NaN or +-inf. Works on the exponent bits
// (all ones means inf or NaN), so it is exact for every float format and vectorises as integer
// compares.
#include <omp.h>

#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/simd_math.h"

namespace fastdistill {
namespace FD_ISA {
namespace {

template <typename U>
bool run(const U* x, int64_t n, U exp_mask, int num_threads) {
  int64_t bad = 0;
#pragma omp parallel for simd reduction(+ : bad) num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad += ((x[i] & exp_mask) == exp_mask);
  return bad == 0;
}

}  // namespace

bool all_finite(const void* data, int64_t numel, int dtype, int num_threads) {
  const int nt = num_threads;  // bindings.cpp already caps threads for small inputs
  switch (dtype) {
    case kFloat32:
      return run(static_cast<const uint32_t*>(data), numel, uint32_t{0x7f800000u}, nt);
    case kBFloat16:
      return run(static_cast<const uint16_t*>(data), numel, uint16_t{0x7f80u}, nt);
    case kFloat16:
      return run(static_cast<const uint16_t*>(data), numel, uint16_t{0x7c00u}, nt);
    case 3:  // float64
      return run(static_cast<const uint64_t*>(data), numel, uint64_t{0x7ff0000000000000ull}, nt);
    default:
      throw KernelInputError{"dtype", -1, dtype};
  }
}

}  // namespace FD_ISA
}  // namespace fastdistill
