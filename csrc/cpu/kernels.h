// Argument structs and entry points of the CPU kernels. Torch-independent: Python validates
// tensors and passes raw pointers, sizes and row strides (in elements). Each entry point is
// compiled once per instruction-set variant into namespace fastdistill::<variant>
// (see CMakeLists.txt); bindings.cpp chooses the variant at run time.
#pragma once
#include <atomic>
#include <cstdint>

namespace fastdistill {

// Normaliser of a loss term: what the sum over selected rows is divided by.
enum Norm : int {
  kNormSum = 0,        // "sum" and "none": divide by 1
  kNormRows = 1,       // "batchmean" (and CE "mean"): divide by max(#selected rows, 1)
  kNormRowsCols = 2,   // "mean": divide by max(#selected rows, 1) * cols (nn.KLDivLoss/MSELoss)
  kNormGiven = 3,      // divide by FusedLogitsArgs::normalizer (a global token count)
};

// What the divergence term ("kl" below) computes between p_s = softmax(s'/T) and
// p_t = softmax(t'/T), where x' is x after the logit transforms (logit_scale, softcap):
enum Divergence : int {
  kForwardKL = 0,  // KL(p_t || p_s) = sum p_t (log p_t - log p_s)
  kReverseKL = 1,  // KL(p_s || p_t)
  kJSD = 2,        // beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s
  kTVD = 3,        // 1/2 sum |p_t - p_s|
};

// One pass over student (and teacher) logits rows computing any subset of
//   kl  = T^2 * KL(softmax(t/T) || softmax(s/T))   on rows selected by `mask`
//         (or another Divergence; times T^2 only with t2_scale)
//   ce  = logsumexp(s) - s[label]                  on rows with label != ignore_index
//   mse = sum_j (s_j - t_j)^2                      on rows selected by `mask`
// their weighted, normalised sum, and (optionally) the gradient of that sum w.r.t. the student.
struct FusedLogitsArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;  // needed by kl and mse
  int64_t teacher_row_stride = 0;
  const int64_t* labels = nullptr;  // needed by ce
  const uint8_t* mask = nullptr;    // null: every row selected (for kl and mse)
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = 0;  // DType of student and teacher (and of grad)
  float temperature = 1.0f;
  int64_t ignore_index = -100;
  bool use_kl = false, use_ce = false, use_mse = false;
  float w_kl = 1.0f, w_ce = 1.0f, w_mse = 1.0f;
  int norm_kl = kNormRows, norm_ce = kNormRows, norm_mse = kNormRows;
  // Per-row unnormalised values (0 on unselected rows); each may be null.
  float* row_kl = nullptr;
  float* row_ce = nullptr;
  float* row_mse = nullptr;
  float* out = nullptr;  // [weighted total, kl, ce, mse], each normalised
  void* grad = nullptr;  // null: no gradient; else contiguous rows x cols in `dtype`
  int num_threads = 1;
  // The divergence term and the logit transforms. Each transform applies to both sides' logits
  // before the temperature, and every term (kl, ce, mse) sees the transformed logits.
  int divergence = kForwardKL;
  float beta = 0.5f;            // kJSD only, 0 < beta < 1
  float one_minus_beta = 0.5f;  // 1 - beta, formed in double by the caller
  bool t2_scale = true;         // multiply the divergence by T^2
  float logit_scale = 1.0f;     // x -> x * logit_scale
  float softcap = 0.0f;         // > 0: x -> softcap * tanh(x / softcap); 0: off
  double normalizer = 1.0;      // the divisor of kNormGiven
};

// Cosine loss on hidden states: per selected row, 1 - <s,t> / sqrt((|s|^2+eps)(|t|^2+eps)),
// eps = 1e-12 as in torch's cosine_embedding_loss.
struct CosineArgs {
  const void* student = nullptr;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;
  int64_t teacher_row_stride = 0;
  const uint8_t* mask = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int dtype = 0;
  int norm = kNormRows;  // kNormSum or kNormRows
  float* row_loss = nullptr;  // may be null
  float* out = nullptr;       // [normalised loss]
  void* grad = nullptr;
  int num_threads = 1;
};

// Validation failures inside a kernel (e.g. a label out of range) are reported with this
// exception type; bindings.cpp turns it into Python's ValueError.
struct KernelInputError {
  const char* what;
  int64_t index;
  int64_t value;
};

// Whether the avx512 variant may convert bf16 gradients with the AVX512_BF16 instruction when the
// CPU has it (default) or must use the integer rounding every other variant uses; tests switch it
// off to compare the two. One flag for the whole program (an inline function's static).
inline std::atomic<bool>& allow_avx512_bf16() {
  static std::atomic<bool> allow{true};
  return allow;
}

// The CPU can execute AVX512_BF16 instructions.
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

#define FD_DECLARE_KERNELS(ns)                                                       \
  namespace ns {                                                                     \
  void fused_logits(const FusedLogitsArgs& a);                                       \
  void cosine(const CosineArgs& a);                                                  \
  /* dtype 3 = float64 as well; returns false if any element is NaN or +-inf. */     \
  bool all_finite(const void* data, int64_t numel, int dtype, int num_threads);      \
  }

FD_DECLARE_KERNELS(baseline)
FD_DECLARE_KERNELS(avx2)
FD_DECLARE_KERNELS(avx512)

}  // namespace fastdistill
