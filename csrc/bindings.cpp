// ddpm_fast._C: one launcher per op and device. Pointers arrive as integers (tensor.data_ptr()),
// so this module never includes torch headers and survives torch upgrades.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_ops.h"
#include "cpu/kernels.h"
#ifdef DDPM_FAST_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/bind.h"
#endif

namespace py = pybind11;
using namespace ddpm_fast;

namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = DDPM_FAST_VERSION;
  info["compiler"] = compiler();
  info["cpu_philox"] = cpu::philox_path();
  info["cpu_clone"] = cpu::cpu_clone();
#ifdef DDPM_FAST_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = DDPM_FAST_CUDA_ARCHS;
  info["cuda_missing_reason"] = "";
#else
  info["cuda_compiled"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
  info["cuda_missing_reason"] = DDPM_FAST_CUDA_MISSING_REASON;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast native kernels (CPU, and CUDA when compiled)";
  m.def("build_info", &build_info, "How this module was built: version, compiler, CUDA version and archs");

  auto cpu = m.def_submodule("cpu", "C++ CPU kernels");
  bind::def_ops(cpu, &cpu::q_sample, &cpu::step, &cpu::group_norm_forward, &cpu::group_norm_backward, &cpu::normal);
  cpu.def(
      "vec_math",
      [](const std::string& fn, uintptr_t x, uintptr_t a, uintptr_t b, int64_t n) {
        cpu::vec_math(fn.c_str(), bind::ptr<const float>(x), bind::ptr<float>(a), bind::ptr<float>(b), n);
      },
      "Test hook: the CPU kernels' polynomial log / sincos / exp / silu of float32 x into a (and b: cos)");

#ifdef DDPM_FAST_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels (launched on the caller's stream)");
  bind::def_cuda(cuda);
#endif
}
