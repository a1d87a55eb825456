// Device helpers shared by the CUDA ops: storage <-> float32, 16-byte vector access, the accurate
// Box-Muller math policy, the timestep guard and launch-shape helpers. Included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <type_traits>
#include <utility>

#include "kernels.h"

// Launch syntax, dynamic shared memory and whether cluster code is compiled, as macros that the host
// emulator of the kernels (csrc/cuda_emulator, a test vehicle) defines its own way before this point.
#ifndef DDPM_LAUNCH
// kernel<<<grid, block, smem, stream>>>(args) is DDPM_LAUNCH(grid, block, smem, stream, kernel)(args).
#define DDPM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define DDPM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DDPM_CLUSTERS 1  // thread-block clusters: sm_90 device code
#else
#define DDPM_CLUSTERS 0
#endif
#endif

namespace ddpm_fast::cuda {

// CUDA's accurate logf / sqrtf / sincosf (not the __ intrinsics): the CPU kernels and the reference
// agree to a few ulp, which the noise tests rely on.
struct AccurateMath {
  static __device__ __forceinline__ float log(float x) { return ::logf(x); }
  static __device__ __forceinline__ float sqrt(float x) { return ::sqrtf(x); }
  static __device__ __forceinline__ void sincos(float x, float& s, float& c) { ::sincosf(x, &s, &c); }
};

// ---------------------------------------------------------------------------------------------
// Storage types: float, __half, __nv_bfloat16; math is float32 everywhere.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements per 16-byte access: 4 floats or 8 halves.
template <typename T>
constexpr int kVec = int(16 / sizeof(T));

// v[k] = p[k], k < N; p 16-byte aligned (read-only path).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&v)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte access");
  alignas(16) T tmp[N];
  *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = to_float(tmp[k]);
}

// 32-bit word w of v in storage format (the lower element in the low bits).
template <typename T, int N>
__device__ __forceinline__ uint32_t storage_word(const float (&v)[N], int w) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v[w]);
  } else {
    const auto bits = [](float f) -> uint32_t {
      if constexpr (std::is_same_v<T, __half>)
        return __half_as_ushort(__float2half_rn(f));
      else
        return __bfloat16_as_ushort(__float2bfloat16_rn(f));
    };
    return bits(v[2 * w]) | (bits(v[2 * w + 1]) << 16);
  }
}

// p[k] = v[k], k < N; p 16-byte aligned. One st.global.v4 through __stwb (a plain write-back store):
// the compiler split a plain uint4 assignment into N scalar stores in the NCHW GroupNorm kernels.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte access");
  __stwb(reinterpret_cast<uint4*>(p), make_uint4(storage_word<T>(v, 0), storage_word<T>(v, 1),
                                                 storage_word<T>(v, 2), storage_word<T>(v, 3)));
}

template <typename T>
__device__ __forceinline__ float load1(const T* __restrict__ p) { return to_float(__ldg(p)); }

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// The timestep guard (documented in kernels.h): t is read from device memory, so it cannot be
// checked on the host without a sync. A t outside [0, num_t) must not index the table; the kernels
// write NaN for that sample instead.
__device__ __forceinline__ bool t_ok(int64_t t, int64_t num_t) { return t >= 0 && t < num_t; }

// silu(v) = v * sigmoid(v); expf overflows to inf for v < -88, giving -0 (PyTorch: a denormal).
__device__ __forceinline__ float sigmoid_f(float v) { return 1.0f / (1.0f + ::expf(-v)); }

// Thread-block clusters (sm_90): a barrier over the K blocks of this cluster, and p in the shared memory of
// block `rank` of it. K == 1 (or code compiled for an older architecture): no barrier, p itself.
__device__ __forceinline__ void cluster_sync(int K) {
#if DDPM_CLUSTERS
  if (K > 1) cooperative_groups::this_cluster().sync();
#else
  (void)K;
#endif
}

template <class P>
__device__ __forceinline__ P* cluster_ptr(P* p, int K, int rank) {
#if DDPM_CLUSTERS
  if (K > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)K, (void)rank;
#endif
  return p;
}

// ---------------------------------------------------------------------------------------------
// Host helpers.
// ---------------------------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether a (B, C, S) tensor with this batch stride can be read with 16-byte accesses from the start
// of every sample: its pointer is 16-byte aligned (or absent) and every sample starts on 16 bytes.
inline bool vec_ok(const void* p, int64_t batch_stride, int64_t B, size_t elem) {
  if (p == nullptr) return true;
  return aligned16(p) && (B <= 1 || (batch_stride * int64_t(elem)) % 16 == 0);
}

// The device properties the launchers read, queried once per device: at batch 1 a launch is a few
// microseconds, and the queries were seven runtime calls of each.
struct DeviceProps {
  int sms = 1, major = 0, smem_per_sm = 0, smem_optin = 0, l2_bytes = 0;
};

inline void query_props(int dev, DeviceProps& p) {
  cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&p.major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&p.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  cudaDeviceGetAttribute(&p.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&p.l2_bytes, cudaDevAttrL2CacheSize, dev);
  p.sms = std::max(p.sms, 1);
}

// The current device's properties.
inline const DeviceProps& device_props() {
  constexpr int kCached = 64;
  static DeviceProps props[kCached];
  static std::once_flag once[kCached];
  thread_local DeviceProps beyond;  // device numbers past kCached: queried every time
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kCached) {
    query_props(dev, beyond);
    return beyond;
  }
  std::call_once(once[dev], query_props, dev, std::ref(props[dev]));
  return props[dev];
}

constexpr unsigned kMaxGridY = 65535;  // samples beyond it are looped over inside the kernels
constexpr int kMaxCluster = 8;         // the portable cluster size

// Whether the kernels of this build (`kernel`: any of them) can use thread-block clusters on the current
// device: an sm_90 GPU running code compiled for sm_90 (a build for older architectures runs on an H100
// through PTX compiled for them, where the cluster code is compiled out). Cached per device.
inline bool clusters_available(const void* kernel) {
  static std::atomic<int> known[64];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  cudaGetDevice(&dev);
  const int cached = dev >= 0 && dev < 64 ? known[dev].load(std::memory_order_relaxed) : 0;
  if (cached) return cached == 1;
  cudaFuncAttributes attr{};
  const bool ok = device_props().major >= 9 &&
                  cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
                  attr.ptxVersion >= 90;
  if (dev >= 0 && dev < 64) known[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// The configuration of `blocks` blocks of `threads` along x on stream s, in clusters of K of them when K > 1
// (`attr` holds the cluster attribute the configuration points to).
inline cudaLaunchConfig_t launch_config(unsigned blocks, int threads, size_t smem, int K, cudaStream_t s,
                                        cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  if (K > 1) {
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = unsigned(K);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  return cfg;
}

// kernel(args...) on stream s: `blocks` blocks of `threads` along x, in clusters of K of them when K > 1.
template <class... Params, class... Args>
cudaError_t launch_in_clusters(void (*kernel)(Params...), unsigned blocks, int threads, size_t smem, int K,
                               cudaStream_t s, Args&&... args) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(blocks, threads, smem, K, s, attr);
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace ddpm_fast::cuda

// DDPM_CUDA_DISPATCH(dtype, T, stmt): runs stmt with `using T` bound to the storage type.
#define DDPM_CUDA_DISPATCH(dtype, T, ...)                                         \
  do {                                                                            \
    switch (dtype) {                                                              \
      case ::ddpm_fast::DType::Float32: {                                         \
        using T = float;                                                          \
        __VA_ARGS__;                                                              \
        break;                                                                    \
      }                                                                           \
      case ::ddpm_fast::DType::Float16: {                                         \
        using T = __half;                                                         \
        __VA_ARGS__;                                                              \
        break;                                                                    \
      }                                                                           \
      case ::ddpm_fast::DType::BFloat16: {                                        \
        using T = __nv_bfloat16;                                                  \
        __VA_ARGS__;                                                              \
        break;                                                                    \
      }                                                                           \
      default:                                                                    \
        DDPM_CHECK(false, "unsupported dtype code ", static_cast<int>(dtype));    \
    }                                                                             \
  } while (0)
