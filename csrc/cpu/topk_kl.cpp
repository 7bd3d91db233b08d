// CPU kernel of the sparse-target loss (csrc/cpu/topk_kl.h; meaning: fastdistill/reference.py,
// topk_kl_rows and topk_distillation_loss). OpenMP over rows; per selected row:
//   pass 1  m = max_j s_j
//   pass 2  S = sum_j e_j with e_j = exp((s_j - m)/T); S1 = sum_j exp(s_j - m) for the CE when
//           T != 1; S_out = sum_{j not in K} e_j for the tail bucket (K marked in a per-thread
//           byte row), so log q_tail = log(S_out / S) never forms 1 - sum_K q
//   K part  the k teacher and student terms, in double
//   pass 3  the gradient: one dense formula for the columns outside K, then the K columns and
//           the label column overwritten with their own values (k + 1 scattered stores).
// The dense formula: d KL/dz_j = q_j P - p_j [j in K] - p_tail q_j / q_tail [j not in K] with
// P = sum_K p (+ p_tail), and d CE/ds_j = softmax(s)_j - [j = label].
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd_math.h"
#include "cpu/topk_kl.h"

namespace fastdistill {
namespace FD_ISA {
namespace {

constexpr float kLog2e = 1.44269504088896341f;

// Ids of selected rows distinct and in range, labels in range: sequential, before any thread
// starts, so the error names the first bad element. `mark` is a zeroed byte row of cols.
void validate(const TopkKLArgs& a, std::vector<uint8_t>& mark) {
  for (int64_t r = 0; r < a.rows; ++r) {
    if (a.use_ce) {
      const int64_t lab = a.labels[r];
      if (lab != a.ignore_index && (lab < 0 || lab >= a.cols))
        throw KernelInputError{"labels", r, lab};
    }
    if (!a.use_kd || (a.kd_mask && a.kd_mask[r] == 0)) continue;
    const int64_t* ids = a.ids + r * a.k;
    int64_t i = 0, bad = -1;
    for (; i < a.k; ++i) {
      const int64_t id = ids[i];
      if (id < 0 || id >= a.cols) {
        bad = 0;
        break;
      }
      if (mark[id]) {
        bad = 1;
        break;
      }
      mark[id] = 1;
    }
    for (int64_t j = 0; j < i; ++j) mark[ids[j]] = 0;
    if (bad == 0) throw KernelInputError{"teacher_ids: id out of range", r * a.k + i, ids[i]};
    if (bad == 1) throw KernelInputError{"teacher_ids: id repeated in a row", r * a.k + i, ids[i]};
  }
}

// m: the row maximum; s = sum_j exp((s_j - m)/T); s1 = sum_j exp(s_j - m) (the CE's, = s when
// T = 1); m_out, s_out: the same over the columns outside K, shifted by their own maximum so that
// a tail of mass far below fp32's range (T = 0.05) is still a normal number.
struct RowSums {
  float m, m_out;
  double s, s1, s_out;
};

// row_sums without the tail: one read of the row instead of two, in chunks that stay in L1. A
// chunk's maximum is taken first; when it raises the running maximum, the sums so far are
// rescaled (in double) before the chunk's exponentials are added.
template <typename T>
RowSums online_sums(const T* s, int64_t V, float c_t, bool need_s1) {
  constexpr int64_t kChunk = 2048;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf;
  double acc = 0.0, acc1 = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = V - c0 < kChunk ? V - c0 : kChunk;
    const T* x = s + c0;
    float cm = kNegInf;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) {
      const float v = load(x, j);
      cm = v > cm ? v : cm;
    }
    if (cm > m) {
      if (m != kNegInf) {
        acc *= std::exp2(static_cast<double>(m - cm) * c_t);
        acc1 *= std::exp2(static_cast<double>(m - cm) * kLog2e);
      }
      m = cm;
    }
    if (m == kNegInf) {  // nothing finite so far: those columns add 0 (and -inf - -inf is NaN)
      float nan_check = 0.0f;
#pragma omp simd reduction(+ : nan_check)
      for (int64_t j = 0; j < n; ++j) {
        const float v = load(x, j);
        nan_check += v != v ? 1.0f : 0.0f;
      }
      if (nan_check != 0.0f) acc = std::numeric_limits<double>::quiet_NaN();  // a NaN logit
      continue;
    }
    float a = 0.0f, a1 = 0.0f;
#pragma omp simd reduction(+ : a)
    for (int64_t j = 0; j < n; ++j) a += fd_exp2((load(x, j) - m) * c_t);
    if (need_s1) {
#pragma omp simd reduction(+ : a1)
      for (int64_t j = 0; j < n; ++j) a1 += fd_exp2((load(x, j) - m) * kLog2e);
    }
    acc += a;
    acc1 += a1;
  }
  return RowSums{m, kNegInf, acc, need_s1 ? acc1 : acc, 0.0};
}

template <typename T>
RowSums row_sums(const T* s, int64_t V, float c_t, bool need_s1, const uint8_t* mark) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  float m = kNegInf, m_out = kNegInf;
  if (mark) {
#pragma omp simd reduction(max : m, m_out)
    for (int64_t j = 0; j < V; ++j) {
      const float x = load(s, j);
      m = x > m ? x : m;
      m_out = (!mark[j] && x > m_out) ? x : m_out;
    }
  } else {
    return online_sums(s, V, c_t, need_s1);
  }
  // Sums in double: the tail term is a small difference of logs of them (measured: fp32 lanes
  // left 1.5e-5 relative error in a KL of 0.04 at T = 4).
  double acc = 0.0, acc1 = 0.0, acc_out = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < V; ++j) acc += fd_exp2((load(s, j) - m) * c_t);
  // No column outside K with a finite logit: s_out = 0 (and (x - m_out) would be NaN).
  if (mark && m_out != kNegInf) {
#pragma omp simd reduction(+ : acc_out)
    for (int64_t j = 0; j < V; ++j) acc_out += mark[j] ? 0.0f : fd_exp2((load(s, j) - m_out) * c_t);
  }
  if (need_s1) {
#pragma omp simd reduction(+ : acc1)
    for (int64_t j = 0; j < V; ++j) acc1 += fd_exp2((load(s, j) - m) * kLog2e);
  }
  return RowSums{m, m_out, acc, need_s1 ? acc1 : acc, acc_out};
}

double lse(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  if (!std::isfinite(m)) return m + 0.0 * x[0];  // all -inf: -inf; NaN stays NaN
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += std::exp(x[i] - m);
  return m + std::log(acc);
}

// The K part of one row: the loss and, per stored id, d KL/dz_i (written to gk); returns the
// dense coefficient of e_j (alpha) and the extra one for columns outside K (beta).
struct KPart {
  double loss, alpha, beta;
};

template <typename T>
KPart k_part(const TopkKLArgs& a, int64_t r, const T* s, const RowSums& rs, double* scratch,
             double* gk) {
  const int64_t k = a.k;
  const int64_t* ids = a.ids + r * k;
  const float* lp = a.logprobs + r * k;
  const double inv_t = 1.0 / a.temperature;
  const double log_s = std::log(rs.s);
  const double lse_v = static_cast<double>(rs.m) * inv_t + log_s;
  double* logp = scratch;
  double* logq = scratch + k;
  const bool tail = a.normalization == kTopkTail;
  if (tail) {
    for (int64_t i = 0; i < k; ++i) logp[i] = lp[i];
  } else {
    const double c = static_cast<double>(a.capture_temperature) / a.temperature;
    for (int64_t i = 0; i < k; ++i) logp[i] = lp[i] * c;
    const double norm = lse(logp, k);
    for (int64_t i = 0; i < k; ++i) logp[i] -= norm;
  }
  for (int64_t i = 0; i < k; ++i) logq[i] = load(s, ids[i]) * inv_t;
  const double norm_q = a.normalization == kTopkRenormalized ? lse(logq, k) : lse_v;
  for (int64_t i = 0; i < k; ++i) logq[i] -= norm_q;
  double loss = 0.0, p_sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double p = std::exp(logp[i]);
    if (p != 0.0) loss += p * (logp[i] - logq[i]);  // `p != 0`: NaN stays NaN
    p_sum += p;
    gk[i] = -p;
  }
  double alpha = 0.0, beta = 0.0;
  if (a.normalization == kTopkFull) {
    alpha = 1.0 / rs.s;  // q_j P with P = 1
    for (int64_t i = 0; i < k; ++i) gk[i] += std::exp(logq[i]);
  } else if (a.normalization == kTopkRenormalized) {
    for (int64_t i = 0; i < k; ++i) gk[i] += std::exp(logq[i]);
  } else {
    const double tail_lp = a.tail[r];
    const double p_t = std::exp(tail_lp);
    const double log_qt = (static_cast<double>(rs.m_out) - rs.m) * inv_t +
                          std::log(rs.s_out) - log_s;
    if (p_t != 0.0) loss += p_t * (tail_lp - log_qt);
    p_sum += p_t;
    alpha = p_sum / rs.s;
    // beta multiplies exp((s_j - m_out)/T), the columns outside K; none has mass when
    // s_out = 0 (k = V, or only -inf logits there).
    beta = rs.s_out > 0.0 ? -p_t / rs.s_out : 0.0;
    for (int64_t i = 0; i < k; ++i) gk[i] += p_sum * std::exp(logq[i]);
  }
  return KPart{loss, alpha, beta};
}

template <typename T>
void fill_zero(T* g, int64_t V) {
  std::memset(static_cast<void*>(g), 0, sizeof(T) * static_cast<size_t>(V));
}

// The dense part of a gradient row (see process_row); OUT adds the tail term, and the CE term
// has its own exponential only when ce_coef != 0 (T != 1).
template <typename T, bool OUT>
void dense_pass(const T* s, T* g, int64_t V, const RowSums& rs, float c_t, float coef,
                float coef_out, float ce_coef) {
  if (ce_coef != 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float x = load(s, j);
      float v = coef * fd_exp2((x - rs.m) * c_t) + ce_coef * fd_exp2((x - rs.m) * kLog2e);
      if (OUT) v += coef_out * fd_exp2((x - rs.m_out) * c_t);
      store(g, j, v);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float x = load(s, j);
      float v = coef * fd_exp2((x - rs.m) * c_t);
      if (OUT) v += coef_out * fd_exp2((x - rs.m_out) * c_t);
      store(g, j, v);
    }
  }
}

template <typename T>
void process_row(const TopkKLArgs& a, int64_t r, uint8_t* mark, double* scratch) {
  const int64_t V = a.cols, k = a.k;
  const T* s = static_cast<const T*>(a.student) + r * a.student_row_stride;
  T* g = a.grad ? static_cast<T*>(a.grad) + r * V : nullptr;
  const bool kd = a.use_kd && (!a.kd_mask || a.kd_mask[r] != 0);
  const int64_t label = a.use_ce ? a.labels[r] : a.ignore_index;
  const bool ce = a.use_ce && label != a.ignore_index;
  if (a.row_kd) a.row_kd[r] = 0.0f;
  if (a.row_ce) a.row_ce[r] = 0.0f;
  if (!kd && !ce) {
    if (g) fill_zero(g, V);
    return;
  }
  const int64_t* ids = a.ids + r * k;
  const bool tail = kd && a.normalization == kTopkTail;
  if (tail)
    for (int64_t i = 0; i < k; ++i) mark[ids[i]] = 1;
  const float temp = kd ? a.temperature : 1.0f;  // the CE alone runs at T = 1
  const float c_t = kLog2e / temp;
  const bool sep1 = ce && temp != 1.0f;  // the CE needs exp(s - m) besides exp((s - m)/T)
  // Renormalized KD alone reads only the K columns (q is a softmax over K): no full-row pass,
  // and every other column's gradient is 0, also where its logit is NaN.
  const bool k_only = kd && !ce && a.normalization == kTopkRenormalized;
  const RowSums rs =
      k_only ? RowSums{0.0f, 0.0f, 1.0, 1.0, 0.0} : row_sums(s, V, c_t, sep1, tail ? mark : nullptr);
  if (tail)
    for (int64_t i = 0; i < k; ++i) mark[ids[i]] = 0;
  double* gk = scratch + 2 * k;
  KPart kp{0.0, 0.0, 0.0};
  if (kd) {
    kp = k_part(a, r, s, rs, scratch, gk);
    a.row_kd[r] = static_cast<float>(kp.loss);
  }
  const double log_s1 = std::log(rs.s1);
  if (ce) a.row_ce[r] = static_cast<float>(rs.m + log_s1 - load(s, label));
  if (!g) return;
  const double c_kd = kd ? a.scales[0] : 0.0, c_ce = ce ? a.scales[1] : 0.0;
  // Outside K: c_kd (alpha e_j + beta e'_j) + c_ce e1_j / S1, with e_j = exp((s_j - m)/T),
  // e'_j = exp((s_j - m_out)/T) (tail only) and e1_j = exp(s_j - m) (= e_j when T = 1).
  const float ce_coef = static_cast<float>(c_ce / rs.s1);
  const float coef = static_cast<float>(c_kd * kp.alpha) + (sep1 ? 0.0f : ce_coef);
  const float coef_out = static_cast<float>(c_kd * kp.beta);
  if (k_only)
    fill_zero(g, V);
  else if (coef_out != 0.0f)
    dense_pass<T, true>(s, g, V, rs, c_t, coef, coef_out, sep1 ? ce_coef : 0.0f);
  else
    dense_pass<T, false>(s, g, V, rs, c_t, coef, 0.0f, sep1 ? ce_coef : 0.0f);
  // Each overwritten column: its whole value in double, rounded once.
  auto ce_part = [&](int64_t j) {
    const double e1 = std::exp(static_cast<double>(load(s, j)) - rs.m);
    return c_ce * (e1 / rs.s1 - (j == label ? 1.0 : 0.0));
  };
  bool label_in_k = false;
  if (kd) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = ids[i];
      label_in_k = label_in_k || j == label;
      store(g, j, static_cast<float>(c_kd * gk[i] + (ce ? ce_part(j) : 0.0)));
    }
  }
  if (ce && !label_in_k) {
    const double x = load(s, label);
    const double e = std::exp((x - rs.m) / temp);
    const double e_out = kp.beta != 0.0 ? std::exp((x - rs.m_out) / temp) : 0.0;
    const double kd_part = kd ? c_kd * (kp.alpha * e + kp.beta * e_out) : 0.0;
    store(g, label, static_cast<float>(kd_part + ce_part(label)));
  }
}

template <typename T>
void run(const TopkKLArgs& a) {
  if (a.rows == 0) return;
  {
    std::vector<uint8_t> mark(static_cast<size_t>(a.cols), 0);
    validate(a, mark);
  }
#pragma omp parallel num_threads(a.num_threads)
  {
    const DenormalsAsZero ftz;  // per thread, for the whole call
    std::vector<uint8_t> mark(static_cast<size_t>(a.cols), 0);
    std::vector<double> scratch(static_cast<size_t>(3 * a.k + 1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) process_row<T>(a, r, mark.data(), scratch.data());
  }
}

}  // namespace

void topk_kl(const TopkKLArgs& a) {
  switch (a.dtype) {
    case kFloat32: return run<float>(a);
    case kBFloat16: return run<BF16>(a);
    case kFloat16: return run<F16>(a);
    default: throw KernelInputError{"dtype", -1, a.dtype};
  }
}

}  // namespace FD_ISA
}  // namespace fastdistill
