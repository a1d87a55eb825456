// CUDA launchers. No torch headers: raw device pointers, sizes, and the caller's stream handle.
// Every launcher mirrors the CPU launcher of the same name (csrc/cpu/kernels.h, same arguments and
// semantics) except that the last argument is the caller's cudaStream_t (as an integer) instead of a
// thread count. Launchers never synchronize and never allocate, so they can be captured in a CUDA
// graph; the seeds and timesteps are read on the device.
//
// Timestep guard: t lives on the device, so it is checked there, not on the host. A sample whose t is
// outside [0, num_t) is never used as a table index: q_sample writes NaN to its x_t and target, step
// writes NaN to its prev (and x0_out). A step row that adds noise (std != 0) with neither noise nor
// seeds given likewise gives NaN (the CPU launcher raises for both).
#pragma once

#include <cstdint>
#include <string>

#include "../common.h"

namespace ddpm_fast::cuda {

// What the CUDA runtime linked into this module sees on this machine.
struct RuntimeInfo {
  int runtime_version = 0;  // e.g. 13000 for CUDA 13.0
  int driver_version = 0;   // 0 when no driver is installed
  int device_count = 0;
  std::string error;        // why no device is usable, empty when one is
};

RuntimeInfo runtime_info();

// Raise std::runtime_error naming `op` when the last launch on this thread failed.
void check_launch(const char* op);

// Raise std::runtime_error naming `op` when `status` (a cudaError_t as int) is not cudaSuccess.
void check_status(const char* op, int status);

// out: (B, N) dtype on the device; the contract's normals of logical indices [0, N) of each sample.
void normal(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, DType dtype,
            uintptr_t cuda_stream);

// x_t = a[t] * x0 + b[t] * eps; target = eps (target 0) or a * eps - b * x0 (target 1).
void q_sample(const void* x0, int64_t x0_bstride,     // (B, C, S) dtype
              const int64_t* t,                         // (B,) on the device
              const float* table, int64_t num_t,        // (T, 2)
              const void* noise, int64_t noise_bstride, // (B, C, S) dtype or null
              const int64_t* seeds, uint64_t stream,    // (B,) or null
              void* x_t, void* target,                  // (B, C, S) dtype, dense
              int target_kind, int64_t B, int64_t C, int64_t S, Layout layout, DType dtype,
              uintptr_t cuda_stream);

// One reverse step (DDPM or DDIM, folded into the coefficient table); thresholding when
// threshold_ratio > 0 (its per-sample quantile is computed in the same launch).
void step(const void* x, int64_t x_bstride,          // (B, C, S) the current sample x_t
          const void* m, int64_t m_bstride,          // (B, C, S) model output
          const void* v, int64_t v_bstride,          // (B, C, S) predicted variance or null
          const int64_t* t,                          // (B,) on the device
          const float* table, int64_t num_t,         // (T, 8)
          const void* noise, int64_t noise_bstride,  // (B, C, S) or null
          const int64_t* seeds,                      // (B,) or null
          void* prev, void* x0_out,                  // (B, C, S) dense; x0_out may be null
          int64_t B, int64_t C, int64_t S, Layout layout, DType dtype,
          float clip_range, float threshold_ratio, float sample_max_value, uintptr_t cuda_stream);

void group_norm_forward(const void* x,                       // (B, C, S) dtype, dense
                        const float* weight, const float* bias,  // (C,) or null
                        const float* bias_in,                 // (B, C) or null
                        const float* scale, const float* shift,   // (B, C) or null
                        void* y,                              // (B, C, S) dtype, dense
                        float* mean, float* rstd,             // (B, G)
                        int64_t B, int64_t C, int64_t S, int64_t G, float eps, Activation act,
                        Layout layout, DType dtype, uintptr_t cuda_stream);

// dweight / dbias are accumulated with float atomics over samples (zeroed first on the stream):
// their last bits may vary between runs; every other output is deterministic.
void group_norm_backward(const void* dy, const void* x,        // (B, C, S) dtype, dense
                         const float* weight, const float* bias,
                         const float* bias_in, const float* scale, const float* shift,
                         const float* mean, const float* rstd, // (B, G)
                         void* dx,                             // (B, C, S) dtype or null
                         float* dweight, float* dbias,         // (C,) or null
                         float* dbias_in, float* dscale, float* dshift,  // (B, C) or null
                         int64_t B, int64_t C, int64_t S, int64_t G, Activation act,
                         Layout layout, DType dtype, uintptr_t cuda_stream);

// Why the group_norm launchers (forward, and backward when asked) would refuse this shape on the current
// device, whatever the pointers' alignment, as the message they would raise; "" when they take it. The
// automatic backend choice asks it before it picks cuda for a wide group (ddpm_fast/ops/group_norm.py).
std::string group_norm_refusal(int64_t B, int64_t C, int64_t S, int64_t G, Layout layout, DType dtype, bool backward);

}  // namespace ddpm_fast::cuda
