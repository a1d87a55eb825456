// def_ops: binds one backend's launchers into a pybind11 module. Pointers arrive as integers
// (tensor.data_ptr()), so no module includes torch headers. Shared by ddpm_fast._C (the cpu and cuda
// submodules) and ddpm_fast._cuda_emulator.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"

namespace ddpm_fast::bind {

namespace py = pybind11;

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The launchers of one backend. The CPU and CUDA kernels take the same arguments but the last: the CPU
// thread count (int) or the caller's CUDA stream handle (uintptr_t), so one definition binds both.
template <typename Last>
void def_ops(py::module_& m,
             void (*q_sample)(const void*, int64_t, const int64_t*, const float*, int64_t, const void*, int64_t,
                              const int64_t*, uint64_t, void*, void*, int, int64_t, int64_t, int64_t, Layout,
                              DType, Last),
             void (*step)(const void*, int64_t, const void*, int64_t, const void*, int64_t, const int64_t*,
                          const float*, int64_t, const void*, int64_t, const int64_t*, void*, void*, int64_t,
                          int64_t, int64_t, Layout, DType, float, float, float, Last),
             void (*gn_forward)(const void*, const float*, const float*, const float*, const float*, const float*,
                                void*, float*, float*, int64_t, int64_t, int64_t, int64_t, float, Activation,
                                Layout, DType, Last),
             void (*gn_backward)(const void*, const void*, const float*, const float*, const float*, const float*,
                                 const float*, const float*, const float*, void*, float*, float*, float*, float*,
                                 float*, int64_t, int64_t, int64_t, int64_t, Activation, Layout, DType, Last),
             void (*normal)(const int64_t*, uint64_t, void*, int64_t, int64_t, DType, Last)) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("q_sample",
        [q_sample](uintptr_t x0, int64_t x0_bs, uintptr_t t, uintptr_t table, int64_t num_t, uintptr_t noise,
                   int64_t noise_bs, uintptr_t seeds, uint64_t stream, uintptr_t x_t, uintptr_t target,
                   int target_kind, int64_t B, int64_t C, int64_t S, int layout, int dtype, Last last) {
          q_sample(ptr<const void>(x0), x0_bs, ptr<const int64_t>(t), ptr<const float>(table), num_t,
                   ptr<const void>(noise), noise_bs, ptr<const int64_t>(seeds), stream, ptr<void>(x_t),
                   ptr<void>(target), target_kind, B, C, S, Layout(layout), DType(dtype), last);
        },
        nogil);
  m.def("step",
        [step](uintptr_t x, int64_t x_bs, uintptr_t mo, int64_t m_bs, uintptr_t v, int64_t v_bs, uintptr_t t,
               uintptr_t table, int64_t num_t, uintptr_t noise, int64_t noise_bs, uintptr_t seeds, uintptr_t prev,
               uintptr_t x0_out, int64_t B, int64_t C, int64_t S, int layout, int dtype, float clip_range,
               float threshold_ratio, float sample_max_value, Last last) {
          step(ptr<const void>(x), x_bs, ptr<const void>(mo), m_bs, ptr<const void>(v), v_bs, ptr<const int64_t>(t),
               ptr<const float>(table), num_t, ptr<const void>(noise), noise_bs, ptr<const int64_t>(seeds),
               ptr<void>(prev), ptr<void>(x0_out), B, C, S, Layout(layout), DType(dtype), clip_range,
               threshold_ratio, sample_max_value, last);
        },
        nogil);
  m.def("group_norm_forward",
        [gn_forward](uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t bias_in, uintptr_t scale, uintptr_t shift,
                     uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t B, int64_t C, int64_t S, int64_t G,
                     float eps, int act, int layout, int dtype, Last last) {
          gn_forward(ptr<const void>(x), ptr<const float>(w), ptr<const float>(b), ptr<const float>(bias_in),
                     ptr<const float>(scale), ptr<const float>(shift), ptr<void>(y), ptr<float>(mean),
                     ptr<float>(rstd), B, C, S, G, eps, Activation(act), Layout(layout), DType(dtype), last);
        },
        nogil);
  m.def("group_norm_backward",
        [gn_backward](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t bias_in, uintptr_t scale,
                      uintptr_t shift, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dw, uintptr_t db,
                      uintptr_t dbias_in, uintptr_t dscale, uintptr_t dshift, int64_t B, int64_t C, int64_t S,
                      int64_t G, int act, int layout, int dtype, Last last) {
          gn_backward(ptr<const void>(dy), ptr<const void>(x), ptr<const float>(w), ptr<const float>(b),
                      ptr<const float>(bias_in), ptr<const float>(scale), ptr<const float>(shift),
                      ptr<const float>(mean), ptr<const float>(rstd), ptr<void>(dx), ptr<float>(dw), ptr<float>(db),
                      ptr<float>(dbias_in), ptr<float>(dscale), ptr<float>(dshift), B, C, S, G, Activation(act),
                      Layout(layout), DType(dtype), last);
        },
        nogil);
  m.def("normal",
        [normal](uintptr_t seeds, uint64_t stream, uintptr_t out, int64_t B, int64_t N, int dtype, Last last) {
          normal(ptr<const int64_t>(seeds), stream, ptr<void>(out), B, N, DType(dtype), last);
        },
        nogil);
}

}  // namespace ddpm_fast::bind
