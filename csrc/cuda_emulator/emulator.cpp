// The emulator's scheduler and runtime (the design: emulator.h).
#include "emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm_fast::emulator {
namespace {

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------
struct Device {
  const char* name;
  int major, minor, sms, smem_per_sm, smem_optin, max_grid_y, l2_bytes;
  int gpc_sms[8];  // SMs per GPC (a cluster's blocks share one GPC); sm_90 only
};
constexpr Device kDevices[] = {
    {"H200 (emulated)", 9, 0, 132, 233472, 232448, 65535, 50 << 20, {16, 16, 16, 16, 16, 16, 18, 18}},
    {"A100 (emulated)", 8, 0, 108, 167936, 166912, 65535, 40 << 20, {}},
    {"L4 (emulated)", 8, 9, 58, 102400, 101376, 65535, 48 << 20, {}},  // sm_89: the least shared memory of the targets
};
constexpr int kDeviceCount = int(sizeof(kDevices) / sizeof(kDevices[0]));
constexpr size_t kStaticSmemLimit = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr unsigned kMaxCluster = 8;               // the portable cluster size
constexpr size_t kStackBytes = 64 * 1024;

thread_local int current_device = 0;
thread_local cudaError_t last_error = cudaSuccess;
thread_local LaunchStats stats;
std::atomic<int> schedule_order{0};
std::atomic<uint64_t> schedule_seed{0};

std::mutex attr_mutex;
std::map<std::pair<const void*, int>, int> max_dynamic_smem;  // (kernel, device) -> bytes allowed

// The kernel's symbol, or else its demangled type (a pointer to a function of its parameters).
std::string kernel_name(const void* kernel, const char* signature) {
  Dl_info info{};
  const char* mangled = dladdr(kernel, &info) && info.dli_sname ? info.dli_sname : signature;
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 ? demangled.get() : mangled;
}

// ---------------------------------------------------------------------------------------------
// Fibers
// ---------------------------------------------------------------------------------------------
struct ThreadIndex {
  uint3 thread_idx, block_idx;
};

struct LaunchShape {
  dim3 grid_dim, block_dim;
};

struct Barrier {
  unsigned arrived = 0;
  uint64_t generation = 0;
};

enum class Scope { Block, Warp, Cluster };

struct Fiber {
  ucontext_t context;
  ThreadIndex index;
  unsigned block;  // rank within the cluster
  unsigned warp;   // warp within the cluster
  unsigned lane;
  bool done = false;
  Barrier* waiting = nullptr;  // the barrier it waits at, and its generation then
  uint64_t waiting_generation = 0;
  Scope waiting_scope = Scope::Block;
};

struct Stacks {  // fiber stacks, kept between launches of one OS thread (pages are touched lazily)
  std::vector<void*> stacks;
  ~Stacks() {
    for (void* s : stacks) munmap(s, kStackBytes);
  }
  void* get(size_t i) {
    while (stacks.size() <= i) {
      void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (s == MAP_FAILED) throw std::runtime_error("ddpm_fast CUDA emulator: cannot map a fiber stack");
      stacks.push_back(s);
    }
    return stacks[i];
  }
};
thread_local Stacks stacks;

// A launch, run one cluster at a time (run_cluster resets the per-cluster state).
struct ClusterRun {
  LaunchShape shape;
  unsigned cluster;
  size_t smem;
  unsigned threads_per_block, warps_per_block;
  const std::function<void()>* body;

  std::vector<Fiber> fibers;
  std::vector<std::vector<uint4>> shared;  // per block: 16-byte aligned, as __align__(16) promises
  std::vector<Barrier> block_barriers, warp_barriers;
  Barrier cluster_barrier;
  std::vector<unsigned> live_in_block;
  unsigned live = 0;
  std::vector<uint64_t> slots;  // 32 per warp
  Fiber* current = nullptr;
  ucontext_t scheduler;
  std::string fault;
};

thread_local ClusterRun* active = nullptr;

unsigned char* shared_of(ClusterRun& run, unsigned block) {
  return reinterpret_cast<unsigned char*>(run.shared[block].data());
}

void poison_shared(ClusterRun& run, unsigned block) {
  std::memset(shared_of(run, block), 0xff, run.smem);
}

void fiber_main() {
  ClusterRun& run = *active;
  (*run.body)();
  Fiber& f = *run.current;
  f.done = true;
  --run.live;
  if (--run.live_in_block[f.block] == 0 && run.cluster > 1) poison_shared(run, f.block);  // peers must not read it now
  // uc_link returns to the scheduler
}

ClusterRun& run_of_caller(const char* what) {
  if (active == nullptr || active->current == nullptr) {
    throw std::logic_error(std::string("ddpm_fast CUDA emulator: ") + what + " called outside a kernel");
  }
  return *active;
}

// Arrive at barrier b, whose scope has `expected` threads, and wait for the others.
void arrive_and_wait(ClusterRun& run, Barrier& b, unsigned expected, Scope scope) {
  Fiber& f = *run.current;
  if (++b.arrived >= expected) {  // the last one releases the others (they watch the generation)
    b.arrived = 0;
    ++b.generation;
    return;
  }
  f.waiting = &b;
  f.waiting_generation = b.generation;
  f.waiting_scope = scope;
  swapcontext(&f.context, &run.scheduler);
}

bool ready(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->generation != f.waiting_generation);
}

std::string describe_deadlock(const ClusterRun& run) {
  unsigned at[3] = {0, 0, 0}, done = 0;
  for (const Fiber& f : run.fibers) {
    if (f.done)
      ++done;
    else
      ++at[int(f.waiting_scope)];
  }
  std::ostringstream os;
  os << "deadlock: of " << run.fibers.size() << " threads, " << at[0] << " wait at __syncthreads, " << at[1]
     << " at a warp shuffle, " << at[2] << " at a cluster sync, " << done
     << " have exited (a barrier not every thread reaches)";
  return os.str();
}

// The order in which a round resumes the fibers.
std::vector<size_t> round_order(size_t n, std::mt19937_64& rng) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  const int kind = schedule_order.load();
  if (kind == 1) std::reverse(order.begin(), order.end());
  if (kind == 2) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// Barriers count the threads still running: release the block's and the cluster's when f's exit leaves
// only waiting threads behind.
void release_after_exit(ClusterRun& run, const Fiber& f) {
  Barrier& bb = run.block_barriers[f.block];
  if (bb.arrived > 0 && bb.arrived >= run.live_in_block[f.block]) {
    bb.arrived = 0;
    ++bb.generation;
  }
  Barrier& cb = run.cluster_barrier;
  if (cb.arrived > 0 && cb.arrived >= run.live) {
    cb.arrived = 0;
    ++cb.generation;
  }
}

void run_cluster(ClusterRun& run, uint3 first_block, std::mt19937_64& rng) {
  const unsigned T = run.threads_per_block, K = run.cluster;
  run.fibers.assign(size_t(K) * T, Fiber{});
  run.block_barriers.assign(K, Barrier{});
  run.warp_barriers.assign(size_t(K) * run.warps_per_block, Barrier{});
  run.cluster_barrier = Barrier{};
  run.live_in_block.assign(K, T);
  run.live = K * T;
  run.slots.assign(size_t(K) * run.warps_per_block * 32, 0);
  for (unsigned k = 0; k < K; ++k) poison_shared(run, k);
  const dim3 bd = run.shape.block_dim;
  for (unsigned k = 0; k < K; ++k) {
    for (unsigned t = 0; t < T; ++t) {
      Fiber& f = run.fibers[size_t(k) * T + t];
      f.index.thread_idx = make_uint3(t % bd.x, t / bd.x % bd.y, t / (bd.x * bd.y));
      f.index.block_idx = make_uint3(first_block.x + k, first_block.y, first_block.z);
      f.block = k;
      f.warp = k * run.warps_per_block + t / 32;
      f.lane = t % 32;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks.get(size_t(k) * T + t);
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &run.scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
  }
  // One block at a time runs until none of its threads can go on (all wait at a barrier or exited), then
  // the next: blocks of a cluster never advance in lockstep, so one that reads a peer's shared memory
  // before the cluster sync that should precede it reads the peer's 0xff poison.
  while (run.live > 0) {
    bool resumed = false;
    for (size_t k : round_order(K, rng)) {
      for (bool again = true; again;) {
        again = false;
        for (size_t t : round_order(T, rng)) {
          Fiber& f = run.fibers[k * T + t];
          if (!ready(f)) continue;
          f.waiting = nullptr;
          run.current = &f;
          swapcontext(&run.scheduler, &f.context);
          run.current = nullptr;
          again = resumed = true;
          if (!run.fault.empty()) return;
          if (f.done) release_after_exit(run, f);
        }
      }
      if (resumed) break;  // start again from the first block in the order
    }
    if (!resumed) {
      run.fault = describe_deadlock(run);
      return;
    }
  }
}

const Device* device_or_null(int device) {
  return device >= 0 && device < kDeviceCount ? &kDevices[device] : nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------
unsigned builtin(Builtin which, int axis) {
  const ClusterRun& run = run_of_caller("threadIdx / blockIdx / blockDim / gridDim");
  const ThreadIndex& i = run.current->index;
  const auto pick = [axis](const auto& v) -> unsigned { return axis == 0 ? v.x : axis == 1 ? v.y : v.z; };
  switch (which) {
    case Builtin::ThreadIdx: return pick(i.thread_idx);
    case Builtin::BlockIdx: return pick(i.block_idx);
    case Builtin::BlockDim: return pick(run.shape.block_dim);
    case Builtin::GridDim: return pick(run.shape.grid_dim);
  }
  return 0;
}

void sync_block() {
  ClusterRun& run = run_of_caller("__syncthreads");
  const unsigned k = run.current->block;
  arrive_and_wait(run, run.block_barriers[k], run.live_in_block[k], Scope::Block);
}

void sync_warp(unsigned mask) {
  ClusterRun& run = run_of_caller("a warp shuffle");
  Fiber& f = *run.current;
  // Every lane of the mask takes part; a lane that exited or never comes is a deadlock.
  const unsigned first = f.warp % run.warps_per_block * 32, in_block = run.threads_per_block - first;
  const unsigned lanes = in_block < 32 ? in_block : 32;
  if (mask != (lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u))
    fault("warp shuffle: only a mask of every lane of the warp is emulated");
  arrive_and_wait(run, run.warp_barriers[f.warp], lanes, Scope::Warp);
}

void sync_cluster() {
  ClusterRun& run = run_of_caller("cluster sync");
  arrive_and_wait(run, run.cluster_barrier, run.live, Scope::Cluster);
}

uint64_t* warp_slots() {
  ClusterRun& run = run_of_caller("a warp shuffle");
  return run.slots.data() + size_t(run.current->warp) * 32;
}

unsigned lane() { return run_of_caller("a warp shuffle").current->lane; }

unsigned char* dynamic_shared() {
  ClusterRun& run = run_of_caller("dynamic shared memory");
  return shared_of(run, run.current->block);
}

unsigned cluster_rank() { return run_of_caller("cluster rank").current->block; }

void* cluster_shared(const void* p, unsigned rank) {
  ClusterRun& run = run_of_caller("map_shared_rank");
  const unsigned char* mine = shared_of(run, run.current->block);
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < mine || q >= mine + run.smem) fault("map_shared_rank: the pointer is not in this block's shared memory");
  if (rank >= run.cluster) fault("map_shared_rank: the rank is not in the cluster");
  return shared_of(run, rank) + (q - mine);
}

void fault(const char* what) {
  ClusterRun& run = run_of_caller(what);
  Fiber& f = *run.current;
  std::ostringstream os;
  os << what << " (thread " << f.index.thread_idx.x << " of block " << f.index.block_idx.x << ","
     << f.index.block_idx.y << ")";
  run.fault = os.str();
  swapcontext(&f.context, &run.scheduler);  // never resumed: the launch ends here
  std::abort();
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------
cudaError_t run(const void* kernel, const char* signature, dim3 grid, dim3 block, size_t smem, unsigned cluster,
                const std::function<void()>& body) {
  const Device& dev = kDevices[current_device];
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > unsigned(dev.max_grid_y) || grid.z > 65535u || grid.x > 0x7fffffffu)
    return cudaErrorInvalidConfiguration;
  if (cluster > 1 && (dev.major < 9 || cluster > kMaxCluster || grid.x % cluster != 0))
    return cudaErrorInvalidClusterSize;
  if (smem > size_t(dev.smem_optin)) return cudaErrorInvalidValue;
  if (smem > kStaticSmemLimit) {
    std::lock_guard<std::mutex> lock(attr_mutex);
    const auto it = max_dynamic_smem.find({kernel, current_device});
    if (it == max_dynamic_smem.end() || size_t(it->second) < smem) return cudaErrorInvalidValue;
  }
  if (active != nullptr) throw std::logic_error("ddpm_fast CUDA emulator: a launch from inside a kernel");
  ++stats.launches;
  stats.blocks += (long long)grid.x * grid.y * grid.z;
  stats.max_cluster = std::max(stats.max_cluster, cluster);

  ClusterRun state;
  state.shape = {grid, block};
  state.cluster = cluster;
  state.smem = smem;
  state.threads_per_block = unsigned(threads);
  state.warps_per_block = unsigned((threads + 31) / 32);
  state.body = &body;
  state.shared.assign(cluster, std::vector<uint4>((smem + 15) / 16 + 1));
  std::mt19937_64 rng(schedule_seed.load());
  active = &state;
  struct Reset {
    ~Reset() { active = nullptr; }
  } reset;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += cluster) {
        run_cluster(state, make_uint3(x, y, z), rng);
        if (!state.fault.empty()) {
          throw std::runtime_error("ddpm_fast CUDA emulator: " + kernel_name(kernel, signature) + ": " + state.fault);
        }
      }
  return cudaSuccess;
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) last_error = err;
}

// ---------------------------------------------------------------------------------------------
// Runtime API
// ---------------------------------------------------------------------------------------------
cudaError_t get_device(int* device) { return *device = current_device, cudaSuccess; }
cudaError_t get_device_count(int* count) { return *count = kDeviceCount, cudaSuccess; }

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  const Device* d = device_or_null(device);
  if (d == nullptr) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d->sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d->major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d->minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d->smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d->smem_optin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(kStaticSmemLimit); break;
    case cudaDevAttrMaxGridDimY: *value = d->max_grid_y; break;
    case cudaDevAttrL2CacheSize: *value = d->l2_bytes; break;
    default: return cudaErrorInvalidValue;  // not emulated
  }
  return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  attr->ptxVersion = kDevices[current_device].major * 10;  // code compiled for the device's architecture
  attr->binaryVersion = attr->ptxVersion;
  return cudaSuccess;
}

cudaError_t occupancy_max_active_clusters(int* clusters, const void*, const cudaLaunchConfig_t* config) {
  unsigned size = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) size = config->attrs[i].val.clusterDim.x;
  const Device& dev = kDevices[current_device];
  if (dev.major < 9 || size < 1 || size > kMaxCluster) return cudaErrorInvalidValue;
  *clusters = 0;
  for (int sms : dev.gpc_sms) *clusters += sms / int(size);  // one block per SM: registers are not emulated
  return cudaSuccess;
}

cudaError_t occupancy_max_active_blocks_per_multiprocessor(int* blocks, const void*, int threads, size_t smem) {
  const Device& dev = kDevices[current_device];
  if (threads < 1 || threads > 1024) return cudaErrorInvalidValue;
  // the threads' and the shared memory's limits (registers are not emulated)
  *blocks = std::min<int>(2048 / threads, smem == 0 ? 32 : int(size_t(dev.smem_per_sm) / smem));
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;  // not emulated
  if (value < 0 || value > kDevices[current_device].smem_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(attr_mutex);
  max_dynamic_smem[{kernel, current_device}] = value;
  return cudaSuccess;
}

cudaError_t memset_async(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError (other)";
  }
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorInvalidClusterSize: return "invalid cluster size (emulated)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (emulated)";
    case cudaErrorNotSupported: return "operation not supported by the emulator";
    default: return "error (emulated)";
  }
}

LaunchStats take_stats() { return std::exchange(stats, LaunchStats{}); }

void set_device(int device) {
  if (device_or_null(device) == nullptr) {
    throw std::invalid_argument("ddpm_fast CUDA emulator: device must be 0 (H200), 1 (A100) or 2 (L4), got " +
                                std::to_string(device));
  }
  current_device = device;
}

std::pair<int, uint64_t> get_schedule() { return {schedule_order.load(), schedule_seed.load()}; }

void set_schedule(int order, uint64_t seed) {
  if (order < 0 || order > 2) {
    throw std::invalid_argument("ddpm_fast CUDA emulator: order must be 0 (forward), 1 (reverse) or 2 (random), got " +
                                std::to_string(order));
  }
  schedule_order = order;
  schedule_seed = seed;
}

}  // namespace ddpm_fast::emulator
