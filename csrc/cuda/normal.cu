// The contract's Gaussian noise on the GPU: one thread per Philox group of four logical elements.
#include "device.cuh"

namespace ddpm_fast::cuda {
namespace {

// seeds: (B,) int64; out: (B, N). y-blocks walk the samples (gridDim.y is at most 65535), x-threads a
// sample's groups.
template <typename T>
__global__ void normal_kernel(const int64_t* __restrict__ seeds, uint64_t stream, T* __restrict__ out,
                              int64_t B, int64_t N) {
  const int64_t groups = (N + 3) / 4;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const uint64_t seed = uint64_t(seeds[b]);
    T* row = out + b * N;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < groups;
         j += int64_t(gridDim.x) * blockDim.x) {
      float z[4];
      philox_normal4<AccurateMath>(seed, stream, uint64_t(j), z);
      const int64_t i0 = 4 * j;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (i0 + k < N) row[i0 + k] = from_float<T>(z[k]);
      }
    }
  }
}

template <typename T>
void launch(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, cudaStream_t s) {
  constexpr int kThreads = 256;
  const int64_t groups = (N + 3) / 4;
  const unsigned blocks_x = unsigned(std::min<int64_t>(ceil_div<int64_t>(groups, kThreads), 65535));
  const unsigned blocks_y = unsigned(std::min<int64_t>(B, 65535));
  DDPM_LAUNCH(dim3(blocks_x, blocks_y), kThreads, 0, s, normal_kernel<T>)(seeds, stream, static_cast<T*>(out), B,
                                                                          N);
}

}  // namespace

void normal(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, DType dtype,
            uintptr_t cuda_stream) {
  if (B == 0 || N == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  switch (dtype) {
    case DType::Float32: launch<float>(seeds, stream, out, B, N, s); break;
    case DType::Float16: launch<__half>(seeds, stream, out, B, N, s); break;
    case DType::BFloat16: launch<__nv_bfloat16>(seeds, stream, out, B, N, s); break;
  }
  check_launch("randn");
}

}  // namespace ddpm_fast::cuda
