// Sparse-target (top-k teacher) forward KL with hard cross-entropy, CPU entry point. Kept in its
// own header so that the shared kernels.h only gains an include. Torch-independent, like every
// kernel: Python validates, allocates and reduces; the kernel writes per-row values and the
// gradient.
#pragma once
#include <cstdint>

namespace fastdistill {

// How the sparse targets are normalised (fastdistill/reference.py, topk_kl_rows):
enum TopkNormalization : int {
  kTopkFull = 0,          // p = softmax_K(l Tc/T), q = softmax_V(s/T) restricted to K
  kTopkRenormalized = 1,  // p as above, q = softmax_K(s/T)
  kTopkTail = 2,          // p = exp(l) plus p_tail = exp(tail); q = softmax_V(s/T) plus q_tail
};

// Per row r (s = student row, z = s/T; K = ids[r, :k], l = logprobs[r, :k]):
//   row_kd[r] = KL(p || q) over K (+ the tail bucket), no T^2, if kd_mask[r] != 0 (null: all)
//   row_ce[r] = logsumexp(s) - s[labels[r]]        if labels[r] != ignore_index (use_ce)
// (0 where a term does not select the row), and, if grad is not null, grad (contiguous
// rows x cols, same dtype as the student) = scales[0] d(row_kd)/dz + scales[1] d(row_ce)/ds,
// zeros on rows neither term selects. `scales` already holds the chain factor of z = s/T, the
// weights and the normalisers. Ids of selected rows must be distinct and in [0, cols), labels in
// [0, cols): otherwise KernelInputError (before any row is computed).
struct TopkKLArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const int64_t* ids = nullptr;     // contiguous rows x k
  const float* logprobs = nullptr;  // contiguous rows x k
  const float* tail = nullptr;      // rows; needed by kTopkTail
  int64_t k = 0;
  const uint8_t* kd_mask = nullptr;
  const int64_t* labels = nullptr;  // needed by use_ce
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = 0;
  int normalization = kTopkFull;
  float temperature = 1.0f;
  float capture_temperature = 1.0f;
  int64_t ignore_index = -100;
  bool use_kd = true, use_ce = false;
  const float* scales = nullptr;  // [kd, ce]; needed when grad is not null
  float* row_kd = nullptr;        // required when use_kd
  float* row_ce = nullptr;        // required when use_ce
  void* grad = nullptr;
  int num_threads = 1;
};

#define FD_DECLARE_TOPK_KERNELS(ns) \
  namespace ns {                    \
  void topk_kl(const TopkKLArgs& a); \
  }

FD_DECLARE_TOPK_KERNELS(baseline)
FD_DECLARE_TOPK_KERNELS(avx2)
FD_DECLARE_TOPK_KERNELS(avx512)

}  // namespace fastdistill
