// The cuda submodule's functions: the launchers and what the CUDA runtime sees. Bound into ddpm_fast._C
// (the real kernels) and into ddpm_fast._cuda_emulator (the same sources run by the host emulator).
#pragma once

#include "../bind_ops.h"
#include "kernels.h"

namespace ddpm_fast::bind {

inline void def_cuda(py::module_& m) {
  m.def("runtime_info", [] {
    const cuda::RuntimeInfo info = cuda::runtime_info();
    py::dict d;
    d["runtime_version"] = info.runtime_version;
    d["driver_version"] = info.driver_version;
    d["device_count"] = info.device_count;
    d["error"] = info.error;
    return d;
  });
  def_ops(m, &cuda::q_sample, &cuda::step, &cuda::group_norm_forward, &cuda::group_norm_backward, &cuda::normal);
}

}  // namespace ddpm_fast::bind
