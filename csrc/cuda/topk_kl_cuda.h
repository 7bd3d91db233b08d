// CUDA launcher of the sparse-target loss (csrc/cuda/topk_kl.cu); kept in its own header, next to
// kernels_cuda.h, and torch- and CUDA-free like it (bindings.cpp includes it in every build).
#pragma once
#include <cstdint>

#include "cuda/kernels_cuda.h"

namespace fastdistill {
namespace gpu {

// The meaning of csrc/cpu/topk_kl.h (TopkKLArgs), on the device, with two differences: each row's
// ids must be sorted ascending (logprobs permuted alike), and a row whose ids repeat or leave
// [0, cols), or whose label leaves [0, cols), gets a NaN loss and gradient instead of an error (a
// check on the host would be a device sync). `scales` is a device float[2].
struct TopkKLArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const int64_t* ids = nullptr;     // rows x k, sorted per row
  const float* logprobs = nullptr;  // rows x k
  const float* tail = nullptr;      // rows; needed by normalization 2 (tail)
  int64_t k = 0;
  const uint8_t* kd_mask = nullptr;
  const int64_t* labels = nullptr;  // needed by use_ce
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = kGpuFloat32;
  int normalization = 0;  // 0 full, 1 renormalized, 2 tail
  float temperature = 1.0f;
  float capture_temperature = 1.0f;
  int64_t ignore_index = -100;
  bool use_kd = true, use_ce = false;
  const float* scales = nullptr;
  float* row_kd = nullptr;  // required when use_kd
  float* row_ce = nullptr;  // required when use_ce
  void* grad = nullptr;
  void* stream = nullptr;
};

Status topk_kl(const TopkKLArgs& a);

}  // namespace gpu
}  // namespace fastdistill
