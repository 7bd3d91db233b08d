#include "cuda/kernels_cuda.h"
using namespace fastdistill::gpu;
extern "C" {
int emu_fused_logits(const void* s, int64_t ss, const void* t, int64_t ts, const int64_t* labels,
                     const uint8_t* mask, int64_t rows, int64_t cols, int dtype, float temp,
                     int64_t ignore, int kl, int ce, int mse, const float* scales, float* rkl,
                     float* rce, float* rmse, void* grad, int divergence, float beta,
                     float one_minus_beta, int t2_scale, float logit_scale, float softcap) {
  FusedLogitsArgs a;
  a.divergence = divergence; a.beta = beta; a.one_minus_beta = one_minus_beta;
  a.t2_scale = t2_scale; a.logit_scale = logit_scale; a.softcap = softcap;
  a.student = s; a.student_row_stride = ss; a.teacher = t; a.teacher_row_stride = ts;
  a.labels = labels; a.mask = mask; a.rows = rows; a.cols = cols; a.dtype = dtype;
  a.temperature = temp; a.ignore_index = ignore; a.use_kl = kl; a.use_ce = ce; a.use_mse = mse;
  a.scales = scales; a.row_kl = rkl; a.row_ce = rce; a.row_mse = rmse; a.grad = grad;
  return fused_logits(a).code;
}
int emu_cosine(const void* s, int64_t ss, const void* t, int64_t ts, const uint8_t* mask,
               int64_t rows, int64_t cols, int dtype, const float* scale, float* row_loss,
               void* grad) {
  CosineArgs a;
  a.student = s; a.student_row_stride = ss; a.teacher = t; a.teacher_row_stride = ts;
  a.mask = mask; a.rows = rows; a.cols = cols; a.dtype = dtype; a.scale = scale;
  a.row_loss = row_loss; a.grad = grad;
  return cosine(a).code;
}
int emu_all_finite(const void* d, int64_t n, int dtype, int32_t* flag) {
  return all_finite(d, n, dtype, flag, nullptr).code;
}
}
