// CPU launchers of the fused ops. No torch headers: raw pointers, sizes, batch strides.
// Every tensor is (B, C, S) in `layout` (see docs/contracts.md); strides and sizes are in elements.
#pragma once

#include <cstdint>

#include "../common.h"

namespace ddpm_fast::cpu {

// x_t = a[t] * x0 + b[t] * eps; target = eps (target 0) or a * eps - b * x0 (target 1).
// eps is read from `noise` when non-null, else drawn from Philox(seeds[b], stream, logical index).
void q_sample(const void* x0, int64_t x0_bstride,     // (B, C, S) dtype
              const int64_t* t,                         // (B,)
              const float* table, int64_t num_t,        // (T, 2)
              const void* noise, int64_t noise_bstride, // (B, C, S) dtype or null
              const int64_t* seeds, uint64_t stream,    // (B,) or null
              void* x_t, void* target,                  // (B, C, S) dtype, dense
              int target_kind, int64_t B, int64_t C, int64_t S, Layout layout, DType dtype,
              int num_threads);

// One reverse step (DDPM or DDIM, folded into the coefficient table).
void step(const void* x, int64_t x_bstride,          // (B, C, S) the current sample x_t
          const void* m, int64_t m_bstride,          // (B, C, S) model output
          const void* v, int64_t v_bstride,          // (B, C, S) predicted variance or null
          const int64_t* t,                          // (B,)
          const float* table, int64_t num_t,         // (T, 8)
          const void* noise, int64_t noise_bstride,  // (B, C, S) or null
          const int64_t* seeds,                      // (B,) or null (then noise is given or std == 0)
          void* prev, void* x0_out,                  // (B, C, S) dense; x0_out may be null
          int64_t B, int64_t C, int64_t S, Layout layout, DType dtype,
          float clip_range, float threshold_ratio, float sample_max_value, int num_threads);

void group_norm_forward(const void* x,                       // (B, C, S) dtype, dense
                        const float* weight, const float* bias,  // (C,) or null
                        const float* bias_in,                 // (B, C) or null
                        const float* scale, const float* shift,   // (B, C) or null
                        void* y,                              // (B, C, S) dtype, dense
                        float* mean, float* rstd,             // (B, G)
                        int64_t B, int64_t C, int64_t S, int64_t G, float eps, Activation act,
                        Layout layout, DType dtype, int num_threads);

void group_norm_backward(const void* dy, const void* x,        // (B, C, S) dtype, dense
                         const float* weight, const float* bias,
                         const float* bias_in, const float* scale, const float* shift,
                         const float* mean, const float* rstd, // (B, G)
                         void* dx,                             // (B, C, S) dtype
                         float* dweight, float* dbias,         // (C,) or null
                         float* dbias_in, float* dscale, float* dshift,  // (B, C) or null
                         int64_t B, int64_t C, int64_t S, int64_t G, Activation act,
                         Layout layout, DType dtype, int num_threads);

// Fill out (B, N) with the contract's normals for logical indices [0, N) of each sample.
void normal(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, DType dtype,
            int num_threads);

// The Philox path the noise takes in this process: "avx2" (AVX2 + FMA intrinsics) or "portable".
const char* philox_path();

// The version of the kernels that the loader took on this CPU: "x86-64-v3" (GCC) or "avx2" (Clang), "baseline"
// (the CPU lacks those), or "single" (built without clones: DDPM_FAST_CPU_DISPATCH=OFF, or not x86-64 glibc).
const char* cpu_clone();

// Test hook: vec_math.h's fn ("log", "sincos", "exp" or "silu") of x[0, n) into a (and b: sincos's cos).
void vec_math(const char* fn, const float* x, float* a, float* b, int64_t n);

}  // namespace ddpm_fast::cpu
