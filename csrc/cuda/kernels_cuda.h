// Argument structs and launchers of the CUDA kernels (csrc/cuda/*.cu). Torch- and CUDA-free on
// purpose: bindings.cpp is plain C++ and includes this header whether or not the CUDA sources were
// built, so streams travel as void* (a cudaStream_t is a pointer) and errors as a Status.
//
// Every pointer is a device pointer; row strides are in elements. A launcher enqueues its work on
// `stream` and returns: it never synchronises, never allocates and never reads device memory from
// the host (all data-dependent decisions, e.g. the gradient scales, are made in the kernels).
#pragma once
#include <cstdint>

namespace fastdistill {
namespace gpu {

// Data-type codes: the same values as DType in csrc/cpu/simd_math.h (bindings.cpp checks this at
// compile time), repeated here because that header uses _Float16, which nvcc's front end rejects.
enum GpuDType : int { kGpuFloat32 = 0, kGpuBFloat16 = 1, kGpuFloat16 = 2, kGpuFloat64 = 3 };
// Divergence codes: the same values as Divergence in csrc/cpu/kernels.h (bindings.cpp checks).
enum GpuDivergence : int { kGpuForwardKL = 0, kGpuReverseKL = 1, kGpuJSD = 2, kGpuTVD = 3 };

struct Status {
  enum Code : int { kOk = 0, kInvalidArgument = 1, kCudaError = 2 };
  int code = kOk;
  // kInvalidArgument: what was wrong (static string); kCudaError: cudaGetErrorString's text.
  const char* message = nullptr;
  static constexpr int64_t kNoValue = INT64_MIN;
  int64_t value = kNoValue;  // the offending value for kInvalidArgument, if there is one
};

// Per row r of `cols` logits (s', t' = student and teacher rows after the logit transforms,
// p_s = softmax(s'/T), p_t = softmax(t'/T), fp32 math):
//   row_kl[r]  = D(p_s, p_t), times T^2 with t2_scale      if mask[r] != 0 (mask null: every row)
//   row_ce[r]  = logsumexp(s') - s'[labels[r]]             if labels[r] != ignore_index
//   row_mse[r] = sum_j (s'_j - t'_j)^2                     if mask[r] != 0
// (0 on rows where a term is not selected; NaN for a label outside [0, cols)), where D is the
// `divergence` (csrc/cpu/kernels.h, enum Divergence: KL(p_t || p_s), KL(p_s || p_t), JSD with
// beta, TVD) and x' = x * logit_scale, then softcap * tanh(x' / softcap) when softcap > 0. If
// grad is not null, grad (contiguous rows x cols, same dtype) = (scales[0] dD/dz [kl]
// + scales[1] (softmax(s') - onehot(label)) [ce] + scales[2] (s' - t') [mse]) ds'/ds, z = s'/T
// (dD/dz = softmax(s'/T) - softmax(t'/T) for forward KL), zeros where no term is selected.
// `scales` is a device float[3] (further entries are ignored).
struct FusedLogitsArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;  // needed by kl and mse
  int64_t teacher_row_stride = 0;
  const int64_t* labels = nullptr;  // needed by ce
  const uint8_t* mask = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = kGpuFloat32;
  float temperature = 1.0f;
  int64_t ignore_index = -100;
  bool use_kl = false, use_ce = false, use_mse = false;
  int divergence = kGpuForwardKL;
  float beta = 0.5f, one_minus_beta = 0.5f;  // JSD only: 0 < beta < 1, 1 - beta formed in double
  bool t2_scale = true;                       // multiply the divergence by T^2
  float logit_scale = 1.0f;                   // finite, > 0
  float softcap = 0.0f;                       // > 0: softcap * tanh(x / softcap); 0: off
  const float* scales = nullptr;  // needed when grad is not null
  float* row_kl = nullptr;        // non-null exactly for the active terms
  float* row_ce = nullptr;
  float* row_mse = nullptr;
  void* grad = nullptr;
  void* stream = nullptr;  // cudaStream_t
};

// Per selected row: row_loss[r] = 1 - <s,t> / sqrt((|s|^2 + 1e-12)(|t|^2 + 1e-12)) (0 when
// mask[r] == 0); grad (if not null) = scale[0] * d(row_loss)/ds, zeros on unselected rows.
struct CosineArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;
  int64_t teacher_row_stride = 0;
  const uint8_t* mask = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = kGpuFloat32;
  const float* scale = nullptr;  // device float[1], needed when grad is not null
  float* row_loss = nullptr;     // required
  void* grad = nullptr;
  void* stream = nullptr;
};

Status fused_logits(const FusedLogitsArgs& a);
Status cosine(const CosineArgs& a);
// Sets *flag = 0 (device int32) if any of the `numel` contiguous elements is NaN or +-inf; never
// writes 1. dtype: the codes above, float64 included.
Status all_finite(const void* data, int64_t numel, int dtype, int32_t* flag, void* stream);

}  // namespace gpu
}  // namespace fastdistill
