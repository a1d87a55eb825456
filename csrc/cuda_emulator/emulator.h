// The CUDA kernels of csrc/cuda, compiled for the host and run with CUDA's execution model, so that their
// logic (indexing, the 16-byte and scalar paths, shared memory, barriers, warp shuffles, thread-block
// clusters, atomics, the in-kernel noise) is tested on a machine without a GPU. Test vehicle only: the
// module it builds (ddpm_fast._cuda_emulator) is never chosen automatically and never shipped in a wheel.
//
// How: each launch runs its grid one cluster at a time (one block when there is no cluster); every thread
// of the cluster is a fiber on the calling OS thread, resumed until it reaches a barrier (__syncthreads, a
// shuffle, a cluster sync). One block runs until none of its threads can go on, then the next, so blocks
// never advance in lockstep. Each block has its own dynamic shared memory, filled with 0xff bytes (NaN as
// float or double) when the block starts and again when it leaves, so a read of a value nobody wrote, or of
// a peer's memory before its cluster sync or after it left, shows up. The order of the threads and of the
// blocks is selectable (forward, reverse, random): a missing barrier makes the result depend on it.
// It checks what a GPU would refuse or fault on: launch configurations an H200 rejects, dynamic shared
// memory above 48 KB without the kernel's attribute, misaligned vector loads and stores, shuffles that
// do not include every lane, and barriers that threads still running never reach (a hang on a GPU: here
// an error naming the kernel). A __syncthreads counts the threads still running, as the hardware does.
//
// Not covered: timing, the memory model between blocks (they run one after another), registers, and
// __launch_bounds__ (not checked). Three emulated devices: 0 an H200 (sm_90, 132 SMs, clusters), 1 an
// A100 (sm_80, 108 SMs, no clusters), 2 an L4 (sm_89, 58 SMs, 99 KB of shared memory a block: the least of
// the architectures a wheel targets).
//
// Included first by the shadow headers cuda_runtime.h and cooperative_groups.h of this folder, which the
// emulator build puts ahead of the CUDA toolkit's on the include path; the toolkit's own headers still
// provide the types (dim3, uint4, __half, __nv_bfloat16, cudaLaunchConfig_t, ...).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <tuple>
#include <typeinfo>
#include <type_traits>
#include <utility>

namespace ddpm_fast::emulator {

void sync_block();    // __syncthreads
void sync_cluster();  // cooperative_groups::this_cluster().sync()
uint64_t* warp_slots();  // 32 slots of the calling thread's warp, for shuffles
void sync_warp(unsigned mask);
unsigned lane();
unsigned char* dynamic_shared();
void* cluster_shared(const void* p, unsigned rank);  // map_shared_rank
unsigned cluster_rank();
[[noreturn]] void fault(const char* what);  // a fault a GPU would raise: ends the launch with an error

// Runs body() once per thread of the launch, as described above. Returns the error a CUDA runtime would
// return for this configuration (cudaSuccess when it ran); faults inside the kernel throw
// std::runtime_error.
// `signature` names the kernel in errors (its parameter types: kernels in anonymous namespaces have no
// exported symbol to name them by).
cudaError_t run(const void* kernel, const char* signature, dim3 grid, dim3 block, size_t smem, unsigned cluster,
                const std::function<void()>& body);

void set_last_error(cudaError_t err);

// A kernel with its arguments converted to its parameter types once, as a launch does; every thread gets
// its own copy, as every CUDA thread reads its parameters.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, unsigned cluster,
                   Args&&... args) {
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  return run(reinterpret_cast<const void*>(kernel), typeid(kernel).name(), grid, block, smem, cluster, [&] {
    auto copy = params;
    std::apply(kernel, copy);
  });
}

// kernel<<<grid, block, smem, stream>>>(args...), as DDPM_LAUNCH(grid, block, smem, stream, kernel)(args...).
template <class... Params>
struct ChevronLaunch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args&&... args) const {
    set_last_error(launch(kernel, grid, block, smem, 1, std::forward<Args>(args)...));
  }
};

template <class... Params>
ChevronLaunch<Params...> chevrons(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return {kernel, grid, block, smem};
}

// The runtime API calls the kernels' host code makes, on the emulated devices (the CUDA runtime library
// is not linked; cuda_runtime.h of this folder maps the cuda* names onto these).
cudaError_t get_device(int* device);
cudaError_t get_device_count(int* count);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
// Clusters of the config's size resident at once: the GPCs' SMs over the size, one block per SM.
cudaError_t occupancy_max_active_clusters(int* clusters, const void* kernel, const cudaLaunchConfig_t* config);
cudaError_t occupancy_max_active_blocks_per_multiprocessor(int* blocks, const void* kernel, int threads, size_t smem);
cudaError_t memset_async(void* p, int value, size_t count, cudaStream_t stream);
cudaError_t get_last_error();
const char* error_name(cudaError_t err);
const char* error_string(cudaError_t err);

// What the calling OS thread's launches since the last call were: how many, and the largest cluster.
struct LaunchStats {
  long long launches = 0, blocks = 0;
  unsigned max_cluster = 0;
};
LaunchStats take_stats();

// Python-facing controls (ddpm_fast._cuda_emulator).
void set_device(int device);         // the calling OS thread's emulated device (0: H200, 1: A100, 2: L4)
void set_schedule(int order, uint64_t seed);  // 0 forward, 1 reverse, 2 random (seeded)
std::pair<int, uint64_t> get_schedule();

}  // namespace ddpm_fast::emulator

// ---------------------------------------------------------------------------------------------
// The device-side names the kernels use.
// ---------------------------------------------------------------------------------------------
// threadIdx, blockIdx, blockDim and gridDim: objects whose .x / .y / .z read the running fiber's values
// (objects, not macros, so that members of the same names, as cudaLaunchConfig_t::gridDim, are untouched).
namespace ddpm_fast::emulator {
enum class Builtin { ThreadIdx, BlockIdx, BlockDim, GridDim };
unsigned builtin(Builtin which, int axis);
template <Builtin B>
struct BuiltinAxis {
  int axis;
  operator unsigned() const { return builtin(B, axis); }
};
template <Builtin B>
struct BuiltinVector {
  BuiltinAxis<B> x{0}, y{1}, z{2};
};
}  // namespace ddpm_fast::emulator
inline constexpr ddpm_fast::emulator::BuiltinVector<ddpm_fast::emulator::Builtin::ThreadIdx> threadIdx{};
inline constexpr ddpm_fast::emulator::BuiltinVector<ddpm_fast::emulator::Builtin::BlockIdx> blockIdx{};
inline constexpr ddpm_fast::emulator::BuiltinVector<ddpm_fast::emulator::Builtin::BlockDim> blockDim{};
inline constexpr ddpm_fast::emulator::BuiltinVector<ddpm_fast::emulator::Builtin::GridDim> gridDim{};

// Static __shared__ variables: one per OS thread, which runs one block at a time (so a kernel with static
// shared memory must not be launched in clusters here; ours are not).
#undef __shared__
#define __shared__ static thread_local
#undef __launch_bounds__
#define __launch_bounds__(...)

#define DDPM_LAUNCH(grid, block, smem, stream, ...) \
  ::ddpm_fast::emulator::chevrons(__VA_ARGS__, grid, block, smem, stream)
#define DDPM_DYNAMIC_SHARED(name) unsigned char* const name = ::ddpm_fast::emulator::dynamic_shared()
#define DDPM_CLUSTERS 1

inline void __syncthreads() { ::ddpm_fast::emulator::sync_block(); }

namespace ddpm_fast::emulator {
// A shuffle `name`: every lane of the mask publishes value, then takes lane src's (src == its own lane:
// its own value back).
template <class T>
T shuffle(const char* name, unsigned mask, T value, unsigned src, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  thread_local char why[96];  // not on the fiber's stack, which a fault never unwinds
  const unsigned me = lane();
  if (width != 32 || src >= 32 || !(mask >> src & 1u) || !(mask >> me & 1u)) {
    std::snprintf(why, sizeof(why), "%s: %s", name,
                  width != 32 ? "only width 32 is emulated" : "the lane or its peer is not in the mask");
    fault(why);
  }
  uint64_t* slots = warp_slots();
  std::memcpy(&slots[me], &value, sizeof(T));
  sync_warp(mask);
  T out;
  std::memcpy(&out, &slots[src], sizeof(T));
  sync_warp(mask);  // the slots are rewritten by the next shuffle
  return out;
}
}  // namespace ddpm_fast::emulator

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  namespace emu = ::ddpm_fast::emulator;
  return emu::shuffle("__shfl_xor_sync", mask, value, emu::lane() ^ unsigned(lane_mask), width);
}

// This lane's value from lane - delta, or its own where that is below lane 0.
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  namespace emu = ::ddpm_fast::emulator;
  const unsigned me = emu::lane();
  return emu::shuffle("__shfl_up_sync", mask, value, me >= delta ? me - delta : me, width);
}

template <class T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) ::ddpm_fast::emulator::fault("misaligned load");
  return *p;
}

inline void __stwb(uint4* p, uint4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::ddpm_fast::emulator::fault("misaligned 16-byte store");
  *p = v;
}

// Atomics: the fibers of a launch never run at the same time, so a plain read-modify-write is atomic.
template <class T, class Update>
T emulator_atomic(T* p, Update update) {
  const T old = *p;
  *p = update(old);
  return old;
}
inline float atomicAdd(float* p, float v) { return emulator_atomic(p, [v](float o) { return o + v; }); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emulator_atomic(p, [v](unsigned o) { return o + v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return emulator_atomic(p, [v](unsigned o) { return o > v ? o : v; });
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return emulator_atomic(p, [v](unsigned o) { return o < v ? o : v; });
}

template <class To, class From>
inline To emulator_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
inline unsigned __float_as_uint(float v) { return emulator_bit_cast<unsigned>(v); }
inline float __uint_as_float(unsigned v) { return emulator_bit_cast<float>(v); }
inline float __int_as_float(int v) { return emulator_bit_cast<float>(v); }
inline int __float_as_int(float v) { return emulator_bit_cast<int>(v); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

// Round-to-nearest arithmetic that nvcc never contracts into an FMA: the host (built with
// -ffp-contract=off) computes the same.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
