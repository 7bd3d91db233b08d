#include "emu_core.h"
thread_local U3 threadIdx, blockIdx;
U3 blockDim, gridDim;
#include <random>
#include <chrono>
namespace emu {
thread_local Block* t_block = nullptr;
static const bool g_chaos = std::getenv("EMU_CHAOS") != nullptr;
void chaos() {
  if (!g_chaos) return;
  thread_local std::mt19937 rng(std::random_device{}());
  const unsigned r = rng() % 100;
  if (r < 10) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
  else if (r < 30) std::this_thread::yield();
}
// ex2.approx.ftz model: exact 2^x, then a deterministic perturbation of -2..+2 ulp chosen by a
// hash of the input bits (same input, same output, like the hardware), flush below 2^-126.
float ex2_approx(float x) {
  if (std::isnan(x)) return x;
  double r = std::exp2((double)x);
  if (r < 1.1754943508222875e-38) return 0.0f;
  float f = (float)r;
  if (std::isinf(f)) return f;
  unsigned h = __float_as_uint(x) * 2654435761u;
  int k = (int)((h >> 13) % 5) - 2;
  unsigned u = __float_as_uint(f);
  return __uint_as_float(u + k);
}
}
