// One reverse step on the GPU (DDPM or DDIM folded into the coefficient table), docs/contracts.md
// "Reverse-step coefficient table", element for element as csrc/cpu/step.cpp:
//   x0 = ax * x + am * m;  x0c = clip / threshold(x0);  mean = p0 * x0c + p1 * x + p2 * m;
//   prev = mean + std * sigma * z   (z given, or Philox(seeds[b], 2^32 + t[b], i); only when std != 0)
//
// Without thresholding: the flat or tile walk of elementwise.cuh over the whole grid.
// Dynamic thresholding: the blocks of one sample find s = quantile(|x0|, ratio) exactly as the CPU
// kernel (a radix select on the bit patterns of |x0|: three passes over the sample, digits of 11, 10 and
// 10 bits; the last pass also finds the next larger value that linear interpolation needs), then apply
// the step to their sample with s in shared memory. A sample takes one block, or on sm_90 a cluster of up
// to 8 (threshold_cluster: to fill the GPU with a small batch, or to keep a large batch's samples in flight
// in the L2), whose blocks combine their digit counts through distributed shared memory. No scratch memory
// is needed, so the launch stays allocation-free and graph-safe.
//
// Device-side guards (the host cannot read t without a sync): a sample whose t is outside
// [0, num_t), or whose row adds noise (std != 0) while neither noise nor seeds was given, gets NaN
// in prev and x0_out; the table is never indexed with a bad t.
#include <map>
#include <mutex>
#include <tuple>

#include "elementwise.cuh"

namespace ddpm_fast::cuda {
namespace {

// x0 = ax * x + am * m with one explicit rounding order, so the quantile pass and the step agree bit
// for bit on every |x0|.
__device__ __forceinline__ float x0_of(float ax, float am, float x, float m) {
  return __fmaf_rn(ax, x, __fmul_rn(am, m));
}

template <typename T_>
struct StepOp {
  using T = T_;
  const T* x;              // (B, C, S) x_t, batch stride x_bs
  int64_t x_bs;
  const T* m;              // (B, C, S) model output, batch stride m_bs
  int64_t m_bs;
  const T* v;              // (B, C, S) predicted variance (learned_range), or null
  int64_t v_bs;
  const int64_t* t;        // (B,)
  const float* table;      // (num_t, 8)
  int64_t num_t;
  const T* noise;          // (B, C, S) or null
  int64_t noise_bs;
  const int64_t* seeds;    // (B,) or null
  T* prev;                 // (B, C, S) dense
  T* x0_out;               // (B, C, S) dense, or null
  int64_t n;               // C * S
  float clip;              // > 0: clamp x0 to [-clip, clip]

  struct Row {
    float ax, am, p0, p1, p2, std, min_log, max_log;
    float lo, hi, div;     // x0c = min(max(x0, lo), hi) [/ div when thr]
    int64_t t;
    bool ok, noisy, thr;
  };

  __device__ __forceinline__ Row row(int64_t b) const {
    const int64_t tb = t[b];
    Row r{};
    r.t = tb;
    r.ok = t_ok(tb, num_t);
    if (r.ok) {
      const float* p = table + 8 * tb;
      r.ax = p[0], r.am = p[1], r.p0 = p[2], r.p1 = p[3], r.p2 = p[4], r.std = p[5], r.min_log = p[6];
      r.max_log = p[7];
    }
    r.noisy = r.std != 0.0f;
    if (r.noisy && noise == nullptr && seeds == nullptr) r.ok = false;  // no noise to add: NaN
    r.lo = __int_as_float(int(0xff800000u));  // -inf
    r.hi = __int_as_float(0x7f800000);        // +inf
    r.div = 1.0f;
    r.thr = false;
    if (clip > 0.0f) r.lo = -clip, r.hi = clip;
    return r;
  }
  __device__ bool draws(const Row& r) const { return r.ok && r.noisy && noise == nullptr; }
  __device__ uint64_t seed(int64_t b) const { return uint64_t(seeds[b]); }
  __device__ uint64_t stream(const Row& r) const { return kStepNoiseStreamBase + uint64_t(r.t); }

  template <int N, bool kFull>
  __device__ __forceinline__ void apply(const Row& r, int64_t b, int64_t i0, int cnt, const float (&zd)[N]) const {
    float xv[N], mv[N], vv[N], z[N];
    const T* xp = x + b * x_bs + i0;
    const T* mp = m + b * m_bs + i0;
    const T* vp = v && r.noisy ? v + b * v_bs + i0 : nullptr;
    const T* np = noise && r.noisy ? noise + b * noise_bs + i0 : nullptr;
    if constexpr (kFull) {
      load_vec<T, N>(xp, xv);
      load_vec<T, N>(mp, mv);
      if (vp) load_vec<T, N>(vp, vv);
      if (np) load_vec<T, N>(np, z);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        xv[k] = k < cnt ? load1(xp + k) : 0.0f;
        mv[k] = k < cnt ? load1(mp + k) : 0.0f;
        vv[k] = vp && k < cnt ? load1(vp + k) : 0.0f;
        z[k] = np && k < cnt ? load1(np + k) : 0.0f;
      }
    }
    if (!np) {
#pragma unroll
      for (int k = 0; k < N; ++k) z[k] = zd[k];
    }
    float o1[N], o2[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float x0 = x0_of(r.ax, r.am, xv[k], mv[k]);
      float x0c = x0 < r.lo ? r.lo : x0;  // NaN stays NaN, as torch.clamp
      x0c = x0c > r.hi ? r.hi : x0c;
      if (r.thr) x0c = x0c / r.div;
      float out = r.p0 * x0c + r.p1 * xv[k] + r.p2 * mv[k];
      if (r.noisy) {
        float sigma = 1.0f;
        if (vp) {
          const float f = (vv[k] + 1.0f) * 0.5f;
          sigma = ::expf(0.5f * (f * r.max_log + (1.0f - f) * r.min_log));
        }
        out = out + r.std * sigma * z[k];
      }
      o1[k] = r.ok ? out : nan_f();
      o2[k] = r.ok ? x0c : nan_f();
    }
    T* pp = prev + b * n + i0;
    T* op = x0_out ? x0_out + b * n + i0 : nullptr;
    if constexpr (kFull) {
      store_vec<T, N>(pp, o1);
      if (op) store_vec<T, N>(op, o2);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (k < cnt) {
          pp[k] = from_float<T>(o1[k]);
          if (op) op[k] = from_float<T>(o2[k]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Dynamic thresholding: the per-sample quantile, as quantile_linear in csrc/cpu/step.cpp (which is
// torch.quantile's linear interpolation in float32).
// ---------------------------------------------------------------------------------------------
constexpr int kThrThreads = 512;
// The select's digits: 11, 10 and 10 bits, the 31 bits of a key (|x0|'s sign bit is 0), so three passes over
// the sample. Each thread sums, scans and tests 2 or 4 consecutive digits.
constexpr int kPasses = 3;
constexpr int kMaxDigits = 2048;
constexpr int kMaxDigitsPerThread = kMaxDigits / kThrThreads;
static_assert(kMaxDigits % kThrThreads == 0 && 1024 % kThrThreads == 0, "every thread owns whole digits");
constexpr unsigned int kNoKey = 0xffffffffu;

// Dynamic shared memory (the blocks of a cluster read each other's).
struct SelectShared {
  unsigned int hist[2][kMaxDigits];  // this block's digit counts; consecutive passes (across samples too)
                                     // alternate, so that the peers can still read one pass's counts while
                                     // this block fills the next
  unsigned int warp_sums[kThrThreads / 32];  // the cluster's counts of each warp's digits
  unsigned int max_key;     // this block's largest key (a NaN in |x0| when above +inf's)
  unsigned int min_above;   // this block's smallest key above the last pass's candidates
  unsigned int cluster_max, cluster_min_above;
  unsigned int digit, below;  // the digit holding rank k, the candidates below it
  unsigned int next_digit;    // the last pass's digit holding rank k + 1 (kMaxDigits: none)
};

// The keys (bit patterns of |x0|) of this block's part of sample b: the warps of the cluster take chunks of
// 128 elements in turn, alternating between the blocks (a small sample still spreads over all of them), each
// lane loading its four keys before using them (unconditionally, past the end from the last element: loads
// behind a branch would issue one key at a time).
template <class Key, class F>
__device__ __forceinline__ void for_each_key(int64_t n, int K, int rank, Key key, F f) {
  const int lane = int(threadIdx.x % 32);
  const int64_t warps = int64_t(K) * (blockDim.x / 32);
  for (int64_t base = (int64_t(threadIdx.x / 32) * K + rank) * 128; base < n; base += warps * 128) {
    unsigned int kv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = base + 32 * j + lane;
      kv[j] = key(i < n ? i : n - 1);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (base + 32 * j + lane < n) f(kv[j]);
  }
}

// The quantile of sample b over the K blocks of this cluster (K == 1: this block alone), the same value in
// every block. Radix select on the keys: per pass, every block counts the digits of its candidates (the keys
// that share the digits found so far), then each block sums the cluster's counts and finds the digit holding
// rank k itself (no broadcast). The next key up, which linear interpolation needs, is the last pass's digit
// holding rank k + 1, or else the smallest key above the candidates, which the last pass finds too: three
// passes over the sample in all. `phase` counts the block's passes (it picks the histogram buffer).
template <typename T>
__device__ float cluster_quantile(const StepOp<T>& op, const typename StepOp<T>::Row& r, int64_t b, float q,
                                  int K, int rank, unsigned int& phase, SelectShared& sh) {
  const int64_t n = op.n;
  const T* xp = op.x + b * op.x_bs;
  const T* mp = op.m + b * op.m_bs;
  auto key = [&](int64_t i) -> unsigned int {
    return __float_as_uint(x0_of(r.ax, r.am, load1(xp + i), load1(mp + i))) & 0x7fffffffu;
  };
  const float pos = q * float(n - 1);
  int64_t lo = int64_t(pos);
  lo = lo < 0 ? 0 : (lo > n - 1 ? n - 1 : lo);
  int64_t hi = int64_t(::ceilf(pos));
  hi = hi > n - 1 ? n - 1 : hi;

  unsigned int k = unsigned(lo);  // rank among the candidates (n < 2^32: the host checks)
  unsigned int prefix = 0;
  const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
  for (int pass = 0; pass < kPasses; ++pass, ++phase) {
    const bool first = pass == 0, last = pass == kPasses - 1;
    const int shift = 20 - 10 * pass, top = shift + (first ? 11 : 10), digits = 1 << (top - shift);
    const int per_thread = digits / kThrThreads;
    unsigned int* hist = sh.hist[phase & 1];
    for (int i = threadIdx.x; i < digits; i += kThrThreads) hist[i] = 0;
    if (threadIdx.x == 0) {
      if (first) sh.max_key = 0;
      if (last) sh.min_above = kNoKey;
      sh.next_digit = kMaxDigits;
    }
    __syncthreads();
    // An increment by one of shared memory compiles to ATOMS.POPC.INC: the lanes of a warp adding to the same
    // digit (|x0|'s leading digits are nearly all equal) are merged by the hardware.
    unsigned int local_max = 0, local_min = kNoKey;
    for_each_key(n, K, rank, key, [&](unsigned int kv) {
      if (first) local_max = kv > local_max ? kv : local_max;
      if ((kv >> top) == (prefix >> top))
        atomicAdd(&hist[(kv >> shift) & unsigned(digits - 1)], 1u);
      else if (last && (kv >> top) > (prefix >> top) && kv < local_min)
        local_min = kv;
    });
    if (first) atomicMax(&sh.max_key, local_max);
    if (last) atomicMin(&sh.min_above, local_min);
    if (K > 1) cluster_sync(K); else __syncthreads();
    // The cluster's counts of this thread's digits, their sum, and its inclusive prefix sum over the threads
    // (a shuffle scan per warp, plus the warps before).
    const int d0 = int(threadIdx.x) * per_thread;
    unsigned int total[kMaxDigitsPerThread], sum = 0;
#pragma unroll
    for (int j = 0; j < kMaxDigitsPerThread; ++j) {
      total[j] = 0;
      if (j < per_thread)
        for (int p = 0; p < K; ++p) total[j] += cluster_ptr(hist, K, p)[d0 + j];
      sum += total[j];
    }
    unsigned int incl = sum;
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned int up = __shfl_up_sync(0xffffffffu, incl, unsigned(off));
      if (lane >= off) incl += up;
    }
    if (lane == 31) sh.warp_sums[warp] = incl;
    if (threadIdx.x == 0 && (first || last)) {
      // The cluster's largest key (first pass) or smallest key above the candidates (last pass), each read in its
      // own pass only: a peer may be resetting the other one for its next sample.
      unsigned int* own = first ? &sh.max_key : &sh.min_above;
      unsigned int r = *own;
      for (int p = 0; p < K; ++p) {
        const unsigned int v = *cluster_ptr(own, K, p);
        r = first ? (v > r ? v : r) : (v < r ? v : r);
      }
      (first ? sh.cluster_max : sh.cluster_min_above) = r;
    }
    __syncthreads();
    unsigned int excl = incl - sum;
    for (int w = 0; w < warp; ++w) excl += sh.warp_sums[w];
#pragma unroll
    for (int j = 0; j < kMaxDigitsPerThread; ++j) {
      if (j < per_thread) {
        const unsigned int end = excl + total[j];
        if (excl <= k && k < end) sh.digit = unsigned(d0 + j), sh.below = excl;
        if (last && excl <= k + 1 && k + 1 < end) sh.next_digit = unsigned(d0 + j);
        excl = end;
      }
    }
    __syncthreads();
    k -= sh.below;
    prefix |= sh.digit << shift;
  }
  if (sh.cluster_max > 0x7f800000u) return nan_f();  // a NaN in |x0|: torch.quantile gives NaN
  const unsigned int klo = prefix;
  unsigned int khi = klo;
  if (hi > lo)  // the next key up: a tie, a larger last digit, or above the last pass's candidates
    khi = sh.next_digit < kMaxDigits ? (klo & ~1023u) | sh.next_digit : sh.cluster_min_above;
  const float below = __uint_as_float(klo), above = __uint_as_float(khi);
  const float w = __fsub_rn(pos, float(lo));
  const float diff = __fsub_rn(above, below);
  // torch.lerp: one fma (w - 1 is exact for w >= 0.5)
  return w < 0.5f ? __fmaf_rn(w, diff, below) : __fmaf_rn(__fsub_rn(w, 1.0f), diff, above);
}

// A cluster of K = `cluster` blocks per sample (kClustered), or one block (where clusters are unavailable or
// the batch fills the GPU; K a constant there, which keeps the registers of two blocks per SM): the quantile,
// then the step over the sample, each block taking every K-th unit or tile.
template <typename T, int N, bool kVecOk, bool kTiled, bool kClustered>
__global__ void __launch_bounds__(kThrThreads)
    step_threshold_kernel(StepOp<T> op, int64_t B, int64_t C, int64_t S, ClTiling tl, float ratio, float max_value,
                          int cluster) {
  const int K = kClustered ? cluster : 1;
  DDPM_DYNAMIC_SHARED(smem);
  SelectShared& sh = *reinterpret_cast<SelectShared*>(smem);
  float* zs = reinterpret_cast<float*>(smem + sizeof(SelectShared));  // kTileElems floats when kTiled
  const int rank = int(blockIdx.x % unsigned(K));
  unsigned int phase = 0;
  for (int64_t b = blockIdx.x / unsigned(K); b < B; b += gridDim.x / unsigned(K)) {
    typename StepOp<T>::Row r = op.row(b);
    float s = 1.0f;
    if (r.ok) {  // uniform per cluster
      const float q = cluster_quantile(op, r, b, ratio, K, rank, phase, sh);
      s = q < 1.0f ? 1.0f : q;  // torch.clamp(q, 1, max): NaN stays NaN
      s = s > max_value ? max_value : s;
    }
    r.lo = -s;
    r.hi = s;
    r.div = s;
    r.thr = true;
    if constexpr (kTiled) {
      for (int64_t tile = rank; tile < tl.count(); tile += K) tile_sample(op, r, b, C, S, tl, tile, zs);
    } else {
      flat_sample<N, kVecOk>(op, r, b, op.n, int64_t(rank) * blockDim.x + threadIdx.x, int64_t(K) * blockDim.x);
    }
    __syncthreads();  // sh is reused by the next sample
  }
  cluster_sync(K);  // the peers' shared memory was read: no block may leave before they are done
}

// Blocks per sample of the thresholded step: a cluster of K <= 8 on sm_90, else 1. How many samples are in flight
// at once, the occupancy calculator says (asked once per kernel, device and K): blocks of the one-block kernel
// (`single`), clusters of the clustered one (`clustered`).
// - A batch of at most half the SMs: the largest K at which all B clusters are resident, so that batch 1 is
//   not one SM's work and no second wave forms.
// - A larger batch: the smallest K at which the x and m of the samples in flight (`sample_bytes` each) fit in
//   half the L2, so that the select's later passes and the step read them there, not from DRAM (float32
//   (128,3,256,256): 200 MB, read four times); K = 1 where they fit anyway or no K makes them fit. Half: the
//   outputs stream through the L2 too, and an H100/H200's L2 is two partitions.
inline int threshold_cluster(const void* clustered, const void* single, int64_t B, size_t smem,
                             int64_t sample_bytes) {
  if (!clusters_available(clustered)) return 1;
  const DeviceProps& props = device_props();
  const int64_t sms = props.sms;
  int dev = 0;
  cudaGetDevice(&dev);
  static std::mutex mutex;
  // (kernel, device, K) -> resident clusters (blocks for K = 1)
  static std::map<std::tuple<const void*, int, int>, int> known;
  std::lock_guard<std::mutex> lock(mutex);  // once a launch
  const auto resident = [&](int K) {
    const void* kernel = K > 1 ? clustered : single;
    const auto [it, fresh] = known.try_emplace({kernel, dev, K}, 0);
    if (fresh) {
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = launch_config(unsigned(K), kThrThreads, smem, K, nullptr, attr);
      const cudaError_t err = K > 1 ? cudaOccupancyMaxActiveClusters(&it->second, kernel, &cfg)
                                    : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, kernel, kThrThreads,
                                                                                    smem);
      if (err != cudaSuccess) {
        cudaGetLastError();  // a refused query is no launch error: no cluster of this size then
        it->second = 0;
      } else if (K == 1) {
        it->second *= int(sms);
      }
    }
    return int64_t(it->second);
  };
  if (B * 2 <= sms) {
    for (int K = int(std::min<int64_t>(kMaxCluster, sms / B)); K > 1; --K)
      if (resident(K) >= B) return K;
    return 1;
  }
  const auto fit = [&](int64_t in_flight) { return std::min(in_flight, B) * sample_bytes <= props.l2_bytes / 2; };
  for (int K = 1; K <= kMaxCluster; ++K)
    if (resident(K) > 0 && fit(resident(K))) return K;
  return 1;
}

template <typename T>
void run(const StepOp<T>& op, int64_t B, int64_t C, int64_t S, bool channels_last, float threshold_ratio,
         float sample_max_value, cudaStream_t s) {
  const int64_t n = C * S;
  // Channels-last noise from seeds needs the tile walk; rows with std == 0 draw nothing in it.
  const bool tiled = channels_last && op.noise == nullptr && op.seeds != nullptr;
  const size_t e = sizeof(T);
  const bool vec = vec_ok(op.x, op.x_bs, B, e) && vec_ok(op.m, op.m_bs, B, e) && vec_ok(op.v, op.v_bs, B, e) &&
                   vec_ok(op.noise, op.noise_bs, B, e) && vec_ok(op.prev, n, B, e) && vec_ok(op.x0_out, n, B, e);
  if (threshold_ratio > 0.0f) {
    DDPM_CHECK(n < (int64_t(1) << 32), "step: dynamic thresholding counts a sample's elements in 32 bits, got ",
               n, " elements per sample");
    const auto kernel_of = [&](auto clustered) {
      constexpr bool kC = decltype(clustered)::value;
      return tiled ? step_threshold_kernel<T, 4, false, true, kC>
             : vec ? step_threshold_kernel<T, kVec<T>, true, false, kC>
                   : step_threshold_kernel<T, 4, false, false, kC>;
    };
    const auto clustered = kernel_of(std::true_type{}), single = kernel_of(std::false_type{});
    const size_t smem = sizeof(SelectShared) + (tiled ? kTileElems * sizeof(float) : 0);
    const int K = threshold_cluster(reinterpret_cast<const void*>(clustered), reinterpret_cast<const void*>(single),
                                    B, smem, 2 * n * int64_t(e));
    const auto kernel = K > 1 ? clustered : single;
    const int64_t clusters = std::min<int64_t>(B, (int64_t(1) << 20) / K);
    check_status("step", int(launch_in_clusters(kernel, unsigned(clusters * K), kThrThreads, smem, K, s, op, B, C, S,
                                                cl_tiling(C, S), threshold_ratio, sample_max_value, K)));
    return;
  }
  if (tiled)
    launch_tiles(op, B, C, S, s);
  else if (vec)
    launch_flat<StepOp<T>, true>(op, B, n, s);
  else
    launch_flat<StepOp<T>, false>(op, B, n, s);
}

}  // namespace

void step(const void* x, int64_t x_bstride, const void* m, int64_t m_bstride, const void* v, int64_t v_bstride,
          const int64_t* t, const float* table, int64_t num_t, const void* noise, int64_t noise_bstride,
          const int64_t* seeds, void* prev, void* x0_out, int64_t B, int64_t C, int64_t S, Layout layout,
          DType dtype, float clip_range, float threshold_ratio, float sample_max_value, uintptr_t cuda_stream) {
  if (!check_step_args(x, m, t, table, prev, B, C, S, layout, threshold_ratio)) return;
  DDPM_CHECK(num_t > 0, "step: the table has no rows");
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  DDPM_CUDA_DISPATCH(dtype, T, {
    const StepOp<T> op{static_cast<const T*>(x), x_bstride, static_cast<const T*>(m), m_bstride,
                       static_cast<const T*>(v), v_bstride, t, table, num_t, static_cast<const T*>(noise),
                       noise_bstride, seeds, static_cast<T*>(prev), static_cast<T*>(x0_out), C * S, clip_range};
    run(op, B, C, S, layout == Layout::ChannelsLast, threshold_ratio, sample_max_value, s);
  });
  check_launch("step");
}

}  // namespace ddpm_fast::cuda
