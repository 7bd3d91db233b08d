// pybind11 module fastdistill._C: the torch-independent compiled core.
// Python passes raw data pointers as integers (tensor.data_ptr()), sizes, row strides in
// elements, a dtype code and a thread count; it owns validation and allocation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd_math.h"
#include "cpu/topk_kl.h"
#include "cuda/kernels_cuda.h"
#include "cuda/topk_kl_cuda.h"

namespace py = pybind11;
using namespace fastdistill;

namespace {

struct Variant {
  const char* name;
  void (*fused_logits)(const FusedLogitsArgs&);
  void (*cosine)(const CosineArgs&);
  bool (*all_finite)(const void*, int64_t, int, int);
};

const Variant kBaseline{"baseline", baseline::fused_logits, baseline::cosine, baseline::all_finite};
#if FD_HAVE_X86_VARIANTS
const Variant kAvx2{"avx2", avx2::fused_logits, avx2::cosine, avx2::all_finite};
const Variant kAvx512{"avx512", avx512::fused_logits, avx512::cosine, avx512::all_finite};
#endif

std::vector<const Variant*> supported_variants() {
  std::vector<const Variant*> v{&kBaseline};
#if FD_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    v.push_back(&kAvx2);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    v.push_back(&kAvx512);
#endif
  return v;
}

const Variant* g_variant = nullptr;

const Variant& variant() {
  if (!g_variant) g_variant = supported_variants().back();  // the widest this CPU runs
  return *g_variant;
}

template <typename T>
const T* ptr(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* mut_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Below this many elements a second thread costs more than it saves: waking an OpenMP team is
// microseconds on an idle machine and milliseconds on a loaded one.
constexpr int64_t kMinElementsPerThread = 1 << 15;

int effective_threads(int requested, int64_t elements) {
  int64_t useful = elements / kMinElementsPerThread;
  if (useful < 1) useful = 1;
  if (requested < 1) requested = 1;
  return static_cast<int>(useful < requested ? useful : requested);
}

// Runs a kernel without the GIL and turns its input errors into ValueError.
template <typename F>
void call_kernel(F&& f) {
  try {
    py::gil_scoped_release release;
    f();
  } catch (const KernelInputError& e) {
    std::string msg = std::string("invalid ") + e.what;
    if (e.index >= 0)
      msg += ": element " + std::to_string(e.index) + " has value " + std::to_string(e.value) +
             ", outside [0, number of classes) and not equal to ignore_index";
    else
      msg += " (code " + std::to_string(e.value) + ")";
    throw py::value_error(msg);
  }
}

// The divergence term and the logit transforms: the same fields in the CPU and the CUDA argument
// structs (csrc/cpu/kernels.h, csrc/cuda/kernels_cuda.h).
template <typename Args>
void set_divergence(Args& a, int divergence, float beta, float one_minus_beta, bool t2_scale,
                    float logit_scale, float softcap) {
  a.divergence = divergence;
  a.beta = beta;
  a.one_minus_beta = one_minus_beta;
  a.t2_scale = t2_scale;
  a.logit_scale = logit_scale;
  a.softcap = softcap;
}

// ---- CUDA entry points ------------------------------------------------------------------------
static_assert(int{gpu::kGpuFloat32} == int{kFloat32} && int{gpu::kGpuBFloat16} == int{kBFloat16} &&
                  int{gpu::kGpuFloat16} == int{kFloat16},
              "csrc/cuda/kernels_cuda.h and csrc/cpu/simd_math.h disagree on dtype codes");
static_assert(int{gpu::kGpuForwardKL} == int{kForwardKL} &&
                  int{gpu::kGpuReverseKL} == int{kReverseKL} && int{gpu::kGpuJSD} == int{kJSD} &&
                  int{gpu::kGpuTVD} == int{kTVD},
              "csrc/cuda/kernels_cuda.h and csrc/cpu/kernels.h disagree on divergence codes");

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "fastdistill was built without CUDA kernels; reinstall on a machine with a CUDA toolkit "
      "(FASTDISTILL_CUDA=1 forces it)");
}

// Launches a CUDA kernel without the GIL (a launch can block while the launch queue is full) and
// turns its status into ValueError (bad argument) or RuntimeError (CUDA error).
template <typename F>
void call_cuda(const char* name, F&& f) {
#if FD_BUILT_CUDA
  gpu::Status st;
  {
    py::gil_scoped_release release;
    st = f();
  }
  if (st.code == gpu::Status::kInvalidArgument) {
    std::string msg = std::string(name) + ": invalid " + (st.message ? st.message : "argument");
    // "invalid dtype (code 7)", as the CPU entry points say it.
    if (st.value != gpu::Status::kNoValue)
      msg += (std::strcmp(st.message, "dtype") == 0 ? " (code " : " (value ") +
             std::to_string(st.value) + ")";
    throw py::value_error(msg);
  }
  if (st.code != gpu::Status::kOk)
    throw std::runtime_error(std::string(name) + ": CUDA error: " +
                             (st.message ? st.message : "unknown"));
#else
  (void)name;
  (void)f;
  no_cuda();
#endif
}

// Without CUDA sources the launchers do not exist; these stand-ins are never called (call_cuda
// raises first) but keep the lambdas below identical in both builds.
#if !FD_BUILT_CUDA
namespace no_cuda_stubs {
gpu::Status fused_logits(const gpu::FusedLogitsArgs&) { no_cuda(); }
gpu::Status cosine(const gpu::CosineArgs&) { no_cuda(); }
gpu::Status all_finite(const void*, int64_t, int, int32_t*, void*) { no_cuda(); }
}  // namespace no_cuda_stubs
namespace launch = no_cuda_stubs;
#else
namespace launch = fastdistill::gpu;
#endif

// The sparse-target kernel of the variant in use (csrc/cpu/topk_kl.h), and its input errors as
// ValueError messages that name the argument and the flat element.
using TopkFn = void (*)(const TopkKLArgs&);
TopkFn topk_kernel() {
  const std::string name = variant().name;
#if FD_HAVE_X86_VARIANTS
  if (name == "avx512") return avx512::topk_kl;
  if (name == "avx2") return avx2::topk_kl;
#endif
  return baseline::topk_kl;
}

void call_topk(const TopkKLArgs& a) {
  try {
    py::gil_scoped_release release;
    topk_kernel()(a);
  } catch (const KernelInputError& e) {
    std::string msg = std::string("invalid ") + e.what;
    if (e.index >= 0)
      msg += ": element " + std::to_string(e.index) + " (flat index) has value " +
             std::to_string(e.value) + "; ids must be distinct within a row and in [0, " +
             std::to_string(a.cols) + "), labels in [0, " + std::to_string(a.cols) +
             ") or ignore_index";
    else
      msg += " (code " + std::to_string(e.value) + ")";
    throw py::value_error(msg);
  }
}

#if !FD_BUILT_CUDA
namespace no_cuda_stubs {
gpu::Status topk_kl(const gpu::TopkKLArgs&) { no_cuda(); }
}  // namespace no_cuda_stubs
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistill compiled core (torch-independent CPU and CUDA kernels)";

  m.def("isa", [] { return std::string(variant().name); },
        "Name of the CPU instruction-set variant in use.");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const Variant* v : supported_variants()) names.emplace_back(v->name);
    return names;
  }, "Variants this CPU can run, narrowest first.");
  m.def("set_isa", [](const std::string& name) {
    for (const Variant* v : supported_variants()) {
      if (name == v->name) {
        g_variant = v;
        return;
      }
    }
    throw py::value_error("CPU variant '" + name + "' is not built or not supported by this CPU");
  }, py::arg("name"), "Force a CPU variant (for tests and benchmarks).");
  m.def("built_with_cuda", [] { return bool(FD_BUILT_CUDA); });
  m.def("avx512_bf16_in_use", [] {
    return std::string(variant().name) == "avx512" && cpu_has_avx512_bf16() &&
           allow_avx512_bf16().load();
  }, "True when bf16 gradients are converted with the AVX512_BF16 instruction.");
  m.def("allow_avx512_bf16", [](bool allow) { allow_avx512_bf16().store(allow); },
        py::arg("allow"),
        "Allow (default) or forbid the AVX512_BF16 conversion of bf16 gradients (for tests).");

  m.def(
      "advise_hugepages",
      [](std::uintptr_t p, int64_t nbytes) {
        // Ask for transparent huge pages on a fresh, untouched buffer (the gradient): first-touch
        // page faults of a large output otherwise cost more than the kernel itself on many
        // machines. Only the 2 MiB-aligned interior qualifies; failure is harmless (returns false).
#ifdef MADV_HUGEPAGE
        constexpr std::uintptr_t kHuge = 2u << 20;
        const std::uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
        const std::uintptr_t end = (p + static_cast<std::uintptr_t>(nbytes)) & ~(kHuge - 1);
        if (end <= begin) return false;
        return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
        (void)p;
        (void)nbytes;
        return false;
#endif
      },
      py::arg("ptr"), py::arg("nbytes"));

  m.def(
      "fused_logits",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t teacher,
         int64_t teacher_row_stride, std::uintptr_t labels, std::uintptr_t mask, int64_t rows,
         int64_t cols, int dtype, float temperature, int64_t ignore_index, bool use_kl,
         bool use_ce, bool use_mse, float w_kl, float w_ce, float w_mse, int norm_kl,
         int norm_ce, int norm_mse, std::uintptr_t row_kl, std::uintptr_t row_ce,
         std::uintptr_t row_mse, std::uintptr_t out, std::uintptr_t grad, int num_threads,
         int divergence, float beta, float one_minus_beta, bool t2_scale, float logit_scale,
         float softcap, double normalizer) {
        FusedLogitsArgs a;
        set_divergence(a, divergence, beta, one_minus_beta, t2_scale, logit_scale, softcap);
        a.normalizer = normalizer;
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.teacher = ptr<void>(teacher);
        a.teacher_row_stride = teacher_row_stride;
        a.labels = ptr<int64_t>(labels);
        a.mask = ptr<uint8_t>(mask);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.temperature = temperature;
        a.ignore_index = ignore_index;
        a.use_kl = use_kl;
        a.use_ce = use_ce;
        a.use_mse = use_mse;
        a.w_kl = w_kl;
        a.w_ce = w_ce;
        a.w_mse = w_mse;
        a.norm_kl = norm_kl;
        a.norm_ce = norm_ce;
        a.norm_mse = norm_mse;
        a.row_kl = mut_ptr<float>(row_kl);
        a.row_ce = mut_ptr<float>(row_ce);
        a.row_mse = mut_ptr<float>(row_mse);
        a.out = mut_ptr<float>(out);
        a.grad = mut_ptr<void>(grad);
        a.num_threads = effective_threads(num_threads, rows * cols);
        call_kernel([&] { variant().fused_logits(a); });
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("teacher"),
      py::arg("teacher_row_stride"), py::arg("labels"), py::arg("mask"), py::arg("rows"),
      py::arg("cols"), py::arg("dtype"), py::arg("temperature"), py::arg("ignore_index"),
      py::arg("use_kl"), py::arg("use_ce"), py::arg("use_mse"), py::arg("w_kl"),
      py::arg("w_ce"), py::arg("w_mse"), py::arg("norm_kl"), py::arg("norm_ce"),
      py::arg("norm_mse"), py::arg("row_kl"), py::arg("row_ce"), py::arg("row_mse"),
      py::arg("out"), py::arg("grad"), py::arg("num_threads"),
      // The divergence term and logit transforms (csrc/cpu/kernels.h); the defaults are
      // T^2 forward KL on untransformed logits.
      py::arg("divergence") = 0, py::arg("beta") = 0.5f, py::arg("one_minus_beta") = 0.5f,
      py::arg("t2_scale") = true, py::arg("logit_scale") = 1.0f, py::arg("softcap") = 0.0f,
      py::arg("normalizer") = 1.0);

  m.def(
      "cosine",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t teacher,
         int64_t teacher_row_stride, std::uintptr_t mask, int64_t rows, int64_t cols, int dtype,
         int norm, std::uintptr_t row_loss, std::uintptr_t out, std::uintptr_t grad,
         int num_threads) {
        CosineArgs a;
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.teacher = ptr<void>(teacher);
        a.teacher_row_stride = teacher_row_stride;
        a.mask = ptr<uint8_t>(mask);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.norm = norm;
        a.row_loss = mut_ptr<float>(row_loss);
        a.out = mut_ptr<float>(out);
        a.grad = mut_ptr<void>(grad);
        a.num_threads = effective_threads(num_threads, rows * cols);
        call_kernel([&] { variant().cosine(a); });
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("teacher"),
      py::arg("teacher_row_stride"), py::arg("mask"), py::arg("rows"), py::arg("cols"),
      py::arg("dtype"), py::arg("norm"), py::arg("row_loss"), py::arg("out"), py::arg("grad"),
      py::arg("num_threads"));

  // CUDA kernels (csrc/cuda): device pointers as integers, `stream` = a cudaStream_t as an integer
  // (torch.cuda.current_stream().cuda_stream). They enqueue work and return; errors surface as
  // ValueError (bad argument) or RuntimeError (CUDA error; or a build without CUDA kernels).
  m.def(
      "fused_logits_cuda",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t teacher,
         int64_t teacher_row_stride, std::uintptr_t labels, std::uintptr_t mask, int64_t rows,
         int64_t cols, int dtype, float temperature, int64_t ignore_index, bool use_kl,
         bool use_ce, bool use_mse, std::uintptr_t scales, std::uintptr_t row_kl,
         std::uintptr_t row_ce, std::uintptr_t row_mse, std::uintptr_t grad,
         std::uintptr_t stream, int divergence, float beta, float one_minus_beta, bool t2_scale,
         float logit_scale, float softcap) {
        gpu::FusedLogitsArgs a;
        set_divergence(a, divergence, beta, one_minus_beta, t2_scale, logit_scale, softcap);
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.teacher = ptr<void>(teacher);
        a.teacher_row_stride = teacher_row_stride;
        a.labels = ptr<int64_t>(labels);
        a.mask = ptr<uint8_t>(mask);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.temperature = temperature;
        a.ignore_index = ignore_index;
        a.use_kl = use_kl;
        a.use_ce = use_ce;
        a.use_mse = use_mse;
        a.scales = ptr<float>(scales);
        a.row_kl = mut_ptr<float>(row_kl);
        a.row_ce = mut_ptr<float>(row_ce);
        a.row_mse = mut_ptr<float>(row_mse);
        a.grad = mut_ptr<void>(grad);
        a.stream = mut_ptr<void>(stream);
        call_cuda("fused_logits_cuda", [&] { return launch::fused_logits(a); });
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("teacher"),
      py::arg("teacher_row_stride"), py::arg("labels"), py::arg("mask"), py::arg("rows"),
      py::arg("cols"), py::arg("dtype"), py::arg("temperature"), py::arg("ignore_index"),
      py::arg("use_kl"), py::arg("use_ce"), py::arg("use_mse"), py::arg("scales"),
      py::arg("row_kl"), py::arg("row_ce"), py::arg("row_mse"), py::arg("grad"),
      py::arg("stream"),
      // The divergence term and logit transforms (as fused_logits above; the defaults are
      // T^2 forward KL on untransformed logits).
      py::arg("divergence") = 0, py::arg("beta") = 0.5f, py::arg("one_minus_beta") = 0.5f,
      py::arg("t2_scale") = true, py::arg("logit_scale") = 1.0f, py::arg("softcap") = 0.0f);

  m.def(
      "cosine_cuda",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t teacher,
         int64_t teacher_row_stride, std::uintptr_t mask, int64_t rows, int64_t cols, int dtype,
         std::uintptr_t scale, std::uintptr_t row_loss, std::uintptr_t grad,
         std::uintptr_t stream) {
        gpu::CosineArgs a;
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.teacher = ptr<void>(teacher);
        a.teacher_row_stride = teacher_row_stride;
        a.mask = ptr<uint8_t>(mask);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.scale = ptr<float>(scale);
        a.row_loss = mut_ptr<float>(row_loss);
        a.grad = mut_ptr<void>(grad);
        a.stream = mut_ptr<void>(stream);
        call_cuda("cosine_cuda", [&] { return launch::cosine(a); });
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("teacher"),
      py::arg("teacher_row_stride"), py::arg("mask"), py::arg("rows"), py::arg("cols"),
      py::arg("dtype"), py::arg("scale"), py::arg("row_loss"), py::arg("grad"),
      py::arg("stream"));

  m.def(
      "all_finite_cuda",
      [](std::uintptr_t data, int64_t numel, int dtype, std::uintptr_t flag,
         std::uintptr_t stream) {
        call_cuda("all_finite_cuda", [&] {
          return launch::all_finite(ptr<void>(data), numel, dtype, mut_ptr<int32_t>(flag),
                                    mut_ptr<void>(stream));
        });
      },
      py::arg("data"), py::arg("numel"), py::arg("dtype"), py::arg("flag"), py::arg("stream"));

  m.def(
      "all_finite",
      [](std::uintptr_t data, int64_t numel, int dtype, int num_threads) {
        bool ok = true;
        call_kernel([&] {
          ok = variant().all_finite(ptr<void>(data), numel, dtype,
                                    effective_threads(num_threads, numel));
        });
        return ok;
      },
      py::arg("data"), py::arg("numel"), py::arg("dtype"), py::arg("num_threads"));

  m.def(
      "topk_kl",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t ids,
         std::uintptr_t logprobs, std::uintptr_t tail, int64_t k, std::uintptr_t kd_mask,
         std::uintptr_t labels, int64_t rows, int64_t cols, int dtype, int normalization,
         float temperature, float capture_temperature, int64_t ignore_index, bool use_kd,
         bool use_ce, std::uintptr_t scales, std::uintptr_t row_kd, std::uintptr_t row_ce,
         std::uintptr_t grad, int num_threads) {
        TopkKLArgs a;
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.ids = ptr<int64_t>(ids);
        a.logprobs = ptr<float>(logprobs);
        a.tail = ptr<float>(tail);
        a.k = k;
        a.kd_mask = ptr<uint8_t>(kd_mask);
        a.labels = ptr<int64_t>(labels);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.normalization = normalization;
        a.temperature = temperature;
        a.capture_temperature = capture_temperature;
        a.ignore_index = ignore_index;
        a.use_kd = use_kd;
        a.use_ce = use_ce;
        a.scales = ptr<float>(scales);
        a.row_kd = mut_ptr<float>(row_kd);
        a.row_ce = mut_ptr<float>(row_ce);
        a.grad = mut_ptr<void>(grad);
        a.num_threads = effective_threads(num_threads, rows * cols);
        call_topk(a);
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("ids"), py::arg("logprobs"),
      py::arg("tail"), py::arg("k"), py::arg("kd_mask"), py::arg("labels"), py::arg("rows"),
      py::arg("cols"), py::arg("dtype"), py::arg("normalization"), py::arg("temperature"),
      py::arg("capture_temperature"), py::arg("ignore_index"), py::arg("use_kd"),
      py::arg("use_ce"), py::arg("scales"), py::arg("row_kd"), py::arg("row_ce"),
      py::arg("grad"), py::arg("num_threads"));

  m.def(
      "topk_kl_cuda",
      [](std::uintptr_t student, int64_t student_row_stride, std::uintptr_t ids,
         std::uintptr_t logprobs, std::uintptr_t tail, int64_t k, std::uintptr_t kd_mask,
         std::uintptr_t labels, int64_t rows, int64_t cols, int dtype, int normalization,
         float temperature, float capture_temperature, int64_t ignore_index, bool use_kd,
         std::uintptr_t scales, std::uintptr_t row_kd, std::uintptr_t row_ce,
         std::uintptr_t grad, std::uintptr_t stream) {
        gpu::TopkKLArgs a;
        a.student = ptr<void>(student);
        a.student_row_stride = student_row_stride;
        a.ids = ptr<int64_t>(ids);
        a.logprobs = ptr<float>(logprobs);
        a.tail = ptr<float>(tail);
        a.k = k;
        a.kd_mask = ptr<uint8_t>(kd_mask);
        a.labels = ptr<int64_t>(labels);
        a.rows = rows;
        a.cols = cols;
        a.dtype = dtype;
        a.normalization = normalization;
        a.temperature = temperature;
        a.capture_temperature = capture_temperature;
        a.ignore_index = ignore_index;
        a.use_kd = use_kd;
        a.use_ce = labels != 0;
        a.scales = ptr<float>(scales);
        a.row_kd = mut_ptr<float>(row_kd);
        a.row_ce = mut_ptr<float>(row_ce);
        a.grad = mut_ptr<void>(grad);
        a.stream = mut_ptr<void>(stream);
        call_cuda("topk_kl_cuda", [&] { return launch::topk_kl(a); });
      },
      py::arg("student"), py::arg("student_row_stride"), py::arg("ids"), py::arg("logprobs"),
      py::arg("tail"), py::arg("k"), py::arg("kd_mask"), py::arg("labels"), py::arg("rows"),
      py::arg("cols"), py::arg("dtype"), py::arg("normalization"), py::arg("temperature"),
      py::arg("capture_temperature"), py::arg("ignore_index"), py::arg("use_kd"),
      py::arg("scales"), py::arg("row_kd"), py::arg("row_ce"), py::arg("grad"),
      py::arg("stream"));
}
