// Small faulty kernels that show the emulator catches what a GPU would refuse, hang on or get wrong
// (tests/test_cuda_emulator.py): without them, a green run of the real kernels on the emulator could mean
// an emulator too lenient to notice anything.
#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <stdexcept>
#include <string>
#include <vector>


namespace ddpm_fast::emulator {
namespace {

// Half of a warp shuffles.
__global__ void partial_shuffle(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_vector_load(float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(out + 1));
  out[threadIdx.x] = __uint_as_float(v.x);
}

// Each thread writes its slot of shared memory and reads its neighbour's with no barrier between: the
// result depends on the order the threads run in (on a GPU, on timing).
__global__ void missing_barrier(float* out) {
  DDPM_DYNAMIC_SHARED(raw);
  float* s = reinterpret_cast<float*>(raw);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Reads shared memory nobody wrote.
__global__ void unwritten_shared(float* out) {
  DDPM_DYNAMIC_SHARED(raw);
  out[threadIdx.x] = reinterpret_cast<float*>(raw)[threadIdx.x];
}

// Block 1 of a 2-block cluster leaves at once; block 0 then reads its shared memory (the real kernels
// sync the cluster before any block leaves).
__global__ void peer_read_after_exit(float* out) {
  DDPM_DYNAMIC_SHARED(raw);
  float* s = reinterpret_cast<float*>(raw);
  s[threadIdx.x] = 1.0f;
  if (blockIdx.x == 1) return;
  __syncthreads();
  out[threadIdx.x] = cooperative_groups::this_cluster().map_shared_rank(s, 1)[threadIdx.x];
}

// The butterfly sum of a warp: every lane ends with the warp's total (a correct kernel, as a control).
__global__ void warp_sum(float* out) {
  float v = float(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

void launch_checked(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("launch refused: ") + error_name(err));
}

}  // namespace

std::vector<float> selftest(const std::string& name) {
  std::vector<float> out(64, 0.0f);
  float* p = out.data();
  const auto run1 = [&](void (*kernel)(float*), unsigned threads, size_t smem, unsigned blocks = 1,
                        unsigned cluster = 1) {
    launch_checked(launch(kernel, dim3(blocks), dim3(threads), smem, cluster, p));
  };
  if (name == "partial_shuffle") run1(partial_shuffle, 32, 0);
  else if (name == "misaligned_vector_load") run1(misaligned_vector_load, 32, 0);
  else if (name == "missing_barrier") run1(missing_barrier, 64, 64 * sizeof(float));
  else if (name == "unwritten_shared") run1(unwritten_shared, 32, 32 * sizeof(float));
  else if (name == "peer_read_after_exit") run1(peer_read_after_exit, 32, 32 * sizeof(float), 2, 2);
  else if (name == "warp_sum") run1(warp_sum, 32, 0);
  else if (name == "too_many_threads") run1(warp_sum, 2048, 0);
  else if (name == "shared_over_48k_without_attribute") run1(warp_sum, 32, 64 * 1024);
  else throw std::invalid_argument("unknown self-test " + name);
  return out;
}

}  // namespace ddpm_fast::emulator
