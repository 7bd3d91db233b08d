// CPU kernel for the hidden-state cosine loss, 1 - cos(s, t) per selected row, with torch's
// cosine_embedding_loss epsilon: cos = <s,t> / sqrt((|s|^2 + 1e-12) (|t|^2 + 1e-12)).
// One pass accumulates the three dot products, a second writes the gradient
//   d(1 - cos)/ds = -(t / denom - cos * s / (|s|^2 + eps)).
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd_math.h"

namespace fastdistill {
namespace FD_ISA {
namespace {

constexpr double kEps = 1e-12;  // torch's EPSILON in cosine_embedding_loss

template <typename T>
void run(const CosineArgs& a) {
  const int64_t N = a.rows, D = a.cols;
  const T* S = static_cast<const T*>(a.student);
  const T* Tch = static_cast<const T*>(a.teacher);
  T* G = static_cast<T*>(a.grad);
  int64_t n_sel = 0;
  for (int64_t i = 0; i < N; ++i) n_sel += a.mask ? (a.mask[i] != 0) : 1;
  const double div = a.norm == kNormSum ? 1.0 : static_cast<double>(n_sel > 0 ? n_sel : 1);
  const float w = static_cast<float>(1.0 / div);

  std::vector<float> row_loss(static_cast<size_t>(N));
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t r = 0; r < N; ++r) {
    const T* s = S + r * a.student_row_stride;
    const T* t = Tch + r * a.teacher_row_stride;
    T* g = G ? G + r * D : nullptr;
    if (a.mask && a.mask[r] == 0) {
      row_loss[static_cast<size_t>(r)] = 0.0f;
      if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * D);
      continue;
    }
    float dot = 0.0f, ss = 0.0f, tt = 0.0f;
#pragma omp simd reduction(+ : dot, ss, tt)
    for (int64_t j = 0; j < D; ++j) {
      const float x = load(s, j), y = load(t, j);
      dot += x * y;
      ss += x * x;
      tt += y * y;
    }
    const double ms = static_cast<double>(ss) + kEps;
    const double denom = std::sqrt(ms * (static_cast<double>(tt) + kEps));
    const double cos = static_cast<double>(dot) / denom;
    row_loss[static_cast<size_t>(r)] = static_cast<float>(1.0 - cos);
    if (!g) continue;
    const float ct = static_cast<float>(-w / denom);
    const float cs = static_cast<float>(w * cos / ms);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) store(g, j, ct * load(t, j) + cs * load(s, j));
  }
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    total += row_loss[static_cast<size_t>(r)];
    if (a.row_loss) a.row_loss[r] = row_loss[static_cast<size_t>(r)];
  }
  a.out[0] = static_cast<float>(total / div);
}

}  // namespace

void cosine(const CosineArgs& a) {
  switch (a.dtype) {
    case kFloat32: return run<float>(a);
    case kBFloat16: return run<BF16>(a);
    case kFloat16: return run<F16>(a);
    default: throw KernelInputError{"dtype", -1, a.dtype};
  }
}

}  // namespace FD_ISA
}  // namespace fastdistill
