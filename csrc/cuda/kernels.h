// CUDA launchers. No torch headers: raw device pointers, sizes, and the caller's stream handle.
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

// out: (B, N) dtype on the device; the contract's normals of logical indices [0, N) of each sample.
void normal(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, DType dtype,
            uintptr_t cuda_stream);

}  // namespace ddpm_fast::cuda
