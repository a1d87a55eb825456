// vec_math.h's polynomials elementwise over float32 arrays, in the clone that the kernels take on this CPU:
// a test hook, so tests/test_vec_math.py holds them to the accuracy the header states, against float64.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "vec_math.h"

namespace ddpm_fast::cpu {
namespace {

enum class VecFn { log, sincos, exp, silu };

DDPM_TARGET_CLONES void eval(VecFn fn, const float* DDPM_RESTRICT x, float* DDPM_RESTRICT a,
                             float* DDPM_RESTRICT b, int64_t n) {
  switch (fn) {
    case VecFn::log:
      for (int64_t i = 0; i < n; ++i) a[i] = vm::vlog_pos(x[i]);
      break;
    case VecFn::sincos:
      for (int64_t i = 0; i < n; ++i) vm::vsincos(x[i], a[i], b[i]);
      break;
    case VecFn::exp:
      for (int64_t i = 0; i < n; ++i) a[i] = vm::vexp(x[i]);
      break;
    case VecFn::silu:
      for (int64_t i = 0; i < n; ++i) a[i] = vm::vsilu(x[i]);
      break;
  }
}

}  // namespace

void vec_math(const char* fn, const float* x, float* a, float* b, int64_t n) {
  static const struct { const char* name; VecFn fn; } kFns[] = {
      {"log", VecFn::log}, {"sincos", VecFn::sincos}, {"exp", VecFn::exp}, {"silu", VecFn::silu}};
  for (const auto& f : kFns) {
    if (std::strcmp(fn, f.name) == 0) return eval(f.fn, x, a, b, n);
  }
  throw std::invalid_argument(std::string("vec_math: fn must be 'log', 'sincos', 'exp' or 'silu', got '") + fn + "'");
}

const char* cpu_clone() {
#if defined(DDPM_HAVE_TARGET_CLONES) && defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? "avx2" : "baseline";
#elif defined(DDPM_HAVE_TARGET_CLONES)
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3" : "baseline";
#else
  return "single";
#endif
}

}  // namespace ddpm_fast::cpu
