// The emulator's stand-in for the toolkit's cuda_runtime.h (emulator.h): the runtime API names the
// kernels' host code calls, mapped onto the emulated devices; the toolkit's cuda_runtime_api.h still
// declares the types.
#pragma once

#include "emulator.h"

#define cudaGetDevice ::ddpm_fast::emulator::get_device
#define cudaGetDeviceCount ::ddpm_fast::emulator::get_device_count
#define cudaDeviceGetAttribute ::ddpm_fast::emulator::device_get_attribute
#define cudaFuncGetAttributes ::ddpm_fast::emulator::func_get_attributes
#define cudaFuncSetAttribute ::ddpm_fast::emulator::func_set_attribute
#define cudaOccupancyMaxActiveClusters ::ddpm_fast::emulator::occupancy_max_active_clusters
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::ddpm_fast::emulator::occupancy_max_active_blocks_per_multiprocessor
#define cudaMemsetAsync ::ddpm_fast::emulator::memset_async
#define cudaGetLastError ::ddpm_fast::emulator::get_last_error
#define cudaGetErrorName ::ddpm_fast::emulator::error_name
#define cudaGetErrorString ::ddpm_fast::emulator::error_string

// The emulator's runtime and driver "versions": the toolkit's, no driver.
inline cudaError_t cudaRuntimeGetVersion(int* v) { return *v = CUDART_VERSION, cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { return *v = 0, cudaSuccess; }

// cudaLaunchKernelEx with the kernel's parameter types, as the toolkit's C++ overload; a cluster
// dimension attribute launches clusters of that many blocks along x.
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension) continue;
    if (a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1) return cudaErrorNotSupported;  // not emulated
    cluster = a.val.clusterDim.x;
  }
  const cudaError_t err = ::ddpm_fast::emulator::launch(kernel, config->gridDim, config->blockDim,
                                                       config->dynamicSmemBytes, cluster, std::forward<Args>(args)...);
  ::ddpm_fast::emulator::set_last_error(err);
  return err;
}
