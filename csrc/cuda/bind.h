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
  m.def("group_norm_refusal",
        [](int64_t B, int64_t C, int64_t S, int64_t G, int layout, int dtype, bool backward) {
          return cuda::group_norm_refusal(B, C, S, G, Layout(layout), DType(dtype), backward);
        },
        "Why group_norm_silu's kernels (forward, and backward when asked) would refuse this shape on the "
        "current device, whatever the alignment; empty when they take it");
  def_ops(m, &cuda::q_sample, &cuda::step, &cuda::group_norm_forward, &cuda::group_norm_backward, &cuda::normal);
}

}  // namespace ddpm_fast::bind
