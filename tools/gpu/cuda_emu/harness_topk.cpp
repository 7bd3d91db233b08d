// C entry point of csrc/cuda/topk_kl.cu for check_topk.py (host emulation; see check.py).
#include "cuda/topk_kl_cuda.h"
using namespace fastdistill::gpu;
extern "C" {
int emu_topk_kl(const void* s, int64_t ss, const int64_t* ids, const float* lp, const float* tail,
                int64_t k, const uint8_t* mask, const int64_t* labels, int64_t rows, int64_t cols,
                int dtype, int norm, float temp, float capture, int use_kd, const float* scales,
                float* row_kd, float* row_ce, void* grad) {
  TopkKLArgs a;
  a.student = s; a.student_row_stride = ss; a.ids = ids; a.logprobs = lp; a.tail = tail;
  a.k = k; a.kd_mask = mask; a.labels = labels; a.rows = rows; a.cols = cols; a.dtype = dtype;
  a.normalization = norm; a.temperature = temp; a.capture_temperature = capture;
  a.use_kd = use_kd; a.use_ce = labels != nullptr; a.scales = scales; a.row_kd = row_kd;
  a.row_ce = row_ce; a.grad = grad;
  return topk_kl(a).code;
}
}
