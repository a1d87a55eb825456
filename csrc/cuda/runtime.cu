// Device discovery and launch checking shared by every CUDA op.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace ddpm_fast::cuda {

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);  // leaves 0 when there is no driver
  cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  } else if (info.device_count == 0) {
    info.error = "the CUDA driver reports no device";
  }
  return info;
}

void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ddpm_fast.") + op + ": CUDA launch failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

void check_status(const char* op, int status) {
  const auto err = static_cast<cudaError_t>(status);
  if (err != cudaSuccess) {
    cudaGetLastError();  // the failed call also set the per-thread last error: clear it
    throw std::runtime_error(std::string("ddpm_fast.") + op + ": CUDA call failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

}  // namespace ddpm_fast::cuda
