// GroupNorm + time-embedding bias / scale-shift + optional SiLU on the GPU, forward and backward
// (docs/contracts.md, "GroupNorm + time embedding + SiLU"), the same math as csrc/cpu/group_norm.cpp.
//
// Work: a block takes a region = (sample b, GS whole groups = CS channels, a chunk of the pixels).
// Inside a region every thread owns whole channels (threads never straddle a channel's sums), so
// per-channel sums need no atomics and come out in a fixed order:
//  * NCHW: a channel's pixels are contiguous; `tpc` consecutive lanes of a warp share a channel
//    (16-byte accesses of N pixels where aligned) and reduce with shuffles; the block has CS x tpc
//    threads (<= 256, fewer lanes per channel when needed), so no lane group waits for a second round;
//  * channels_last: a pixel's channels are contiguous; thread l of a row of threads owns the N channels
//    of access l of the pixel's slice (N = 8 halves / 4 floats on the 16-byte path, else 1); ~256 / (CS / N)
//    rows of threads walk the pixels, and a shared-memory pass sums the rows.
// Each thread loads a batch of accesses (64 bytes) before using them, so that enough reads are in
// flight to cover DRAM latency at 2 blocks of 256 threads per SM.
// Statistics: per channel, float sums of d = h - k (k: the median of five of the channel's pixels, near
// its mean, so no cancellation) over runs of 16 accesses flushed into double; then per group a Chan
// combine (exact in double) of the channel means / M2 over the channels and over the region's pixel chunks.
//
// Small batch x groups (batch 1 at 64x64x320): on sm_90 the pixel axis of a region is split over a
// thread-block cluster of K <= 8 blocks that combine their per-channel partial sums through
// distributed shared memory, so there are about 2 blocks per SM with no scratch memory and no extra
// launch. Elsewhere (or when there are enough regions) K = 1. The normalize pass reads the region again
// right after the statistics pass: from shared memory, where each thread kept its accesses in its own
// visiting order (Cache; sized to keep two blocks per SM), and for what did not fit from L2 (the regions
// are small: <= 8192 elements NCHW, or a pixel chunk of <= 128 channels), so that DRAM sees x once
// (scripts/gpu_check.sh's ncu stage measures it; DDPM_FAST_GN_CACHE=0 turns the cache off).
//
// Backward: per-channel S1 = sum dy1, S2 = sum dy1 * xhat (dy1 = dy * silu'(y1)), combined over the
// cluster; the rank-0 block writes dshift, dscale and adds sc1 * S2, sc1 * S1 into dweight / dbias
// with float atomics (zeroed first on the stream): their summation order over samples is not fixed,
// so dweight / dbias may differ in the last bits between runs (everything else is deterministic).
// Then dx = rstd * (k * dy1 - m1 - xhat * m2) and dbias_in = sum dx over the region.
//
// This header is shared by group_norm_forward.cu and group_norm_backward.cu (two translation units, so
// that they compile in parallel): the region geometry, the batched walk over a region, the shared-memory
// cache, the reductions, and the host-side plan and launch.
#pragma once

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <type_traits>

#include "device.cuh"

namespace ddpm_fast::cuda::gn {

constexpr int kMaxThreads = 256;  // with 2 blocks per SM: <= 128 registers, no spills (ptxas -v)
constexpr int kFlush = 16;        // accesses summed in float before flushing into double
// Accesses of one thread loaded before their uses: 64 bytes in flight per thread on the 16-byte path.
constexpr int kBytesInFlight = 64;
// Channels of one group: a region's per-channel shared-memory arrays grow with it, and the launch raises
// where they do not fit (the backward's reach 3632 channels on an H200, 2608 on an A100, 1584 on an L4);
// group_norm_refusal tells the automatic backend choice beforehand.
constexpr int kMaxChannels = 4096;

struct Geo {
  int64_t B, C, S, G, Cg;
  int GS, CS;        // groups / channels per region
  int RPS;           // regions per sample = G / GS
  int K;             // blocks (pixel chunks) per region = cluster size
  int64_t chunk;     // pixels per chunk
  int tpc;           // NCHW: threads per channel (power of two <= 32)
  int threads;       // block size: NCHW channels x tpc (no idle lanes), channels_last whole pixel rows
  int n;             // elements per access: kVec<T> on the 16-byte path, 1 on the scalar one
  int cache_slots;   // accesses per thread kept in shared memory between the two passes (see Cache)
};

struct Region {
  int64_t b;
  int c0, cs;        // channels [c0, c0 + cs)
  int64_t s0, s1;    // pixels [s0, s1)
  int rank;
};

__device__ __forceinline__ Region region_of(const Geo& g) {
  Region r;
  const int64_t reg = blockIdx.x / g.K;
  r.rank = int(blockIdx.x % g.K);
  r.b = reg / g.RPS;
  r.c0 = int(reg % g.RPS) * g.CS;
  r.cs = g.CS;
  r.s0 = r.rank * g.chunk;
  r.s1 = r.s0 + g.chunk < g.S ? r.s0 + g.chunk : g.S;
  return r;
}

// Pixels of chunk `rank`.
__device__ __forceinline__ int64_t chunk_pixels(const Geo& g, int rank) {
  const int64_t s0 = rank * g.chunk;
  const int64_t s1 = s0 + g.chunk < g.S ? s0 + g.chunk : g.S;
  return s1 - s0;
}

// Element offset within a sample of (channel c, pixel s).
template <bool kCL>
__device__ __forceinline__ int64_t offset(const Geo& g, int64_t c, int64_t s) {
  return kCL ? s * g.C + c : c * g.S + s;
}

// The raw storage of one access: N elements of each of I inputs (v[0] = x; v[1] = dy in the backward),
// converted when used.
template <typename T, int N, int I>
struct Access {
  alignas(N * sizeof(T)) T v[I][N];
};

// A shared-memory copy of the accesses a thread makes, in its visiting order: slot i of thread t at
// base[i * blockDim + t]. Both passes over a region visit the same accesses in the same order, so the
// first pass stores its first `slots` accesses (fill) and the second reads them back instead of
// loading them again: x (and dy) then leave DRAM / L2 once for what fits.
template <class A>
struct Cache {
  A* base;    // null: no cache
  int slots;  // per thread
  bool fill;
};

// Bytes of a cache of `slots` accesses per thread (a multiple of 16: the rest of shared memory follows).
template <class A>
__host__ __device__ __forceinline__ size_t cache_bytes(int slots, int threads) {
  return (size_t(slots) * size_t(threads) * sizeof(A) + 15) / 16 * 16;
}

template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* p, T (&r)[N]) {
  if constexpr (N == 1)
    r[0] = __ldg(p);
  else
    *reinterpret_cast<uint4*>(r) = __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, const float (&v)[N]) {
  if constexpr (N == 1)
    p[0] = from_float<T>(v[0]);
  else
    store_vec<T, N>(p, v);
}

// Float partial sums of one thread over a run of accesses: one channel on NCHW (an access holds N
// pixels of one channel), N channels on the channels-last vector path (an access holds N channels).
template <int NA>
struct Partial {
  float a[NA], b[NA];
};

// One thread's accesses q = q0, q0 + stride, ... < end (offset off(q)): f.load, then f.use, which adds to
// the partial sums of the access's channels; the float sums of each run of kFlush accesses go to
// flush(partial), which adds them into double. kBatch accesses are loaded before their uses, so that
// several 16-byte reads are in flight per thread (a load behind a loop-exit branch would wait for the
// previous one).
// n counts the thread's accesses (its cache slot); cache: see Cache.
template <int N, bool kCL, class F, class Off, class Flush, class Acc>
__device__ __forceinline__ void walk(const F& f, int cl, int64_t q0, int64_t stride, int64_t end, Off off,
                                     Flush flush, const Cache<Acc>& cache, int& n) {
  constexpr int NA = kCL ? N : 1, kBatch = kBytesInFlight / 16 / F::kInputs;
  for (int64_t qr = q0; qr < end; qr += stride * kFlush) {
    Partial<NA> p;
#pragma unroll
    for (int k = 0; k < NA; ++k) p.a[k] = p.b[k] = 0.0f;
#pragma unroll
    for (int i0 = 0; i0 < kFlush; i0 += kBatch) {
      if (qr + i0 * stride >= end) break;
      Acc v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t q = qr + (i0 + i) * stride;
        if (q < end) {
          const int slot = n++;
          Acc* const kept = slot < cache.slots ? cache.base + size_t(slot) * blockDim.x + threadIdx.x : nullptr;
          if (kept && !cache.fill) {
            v[i] = *kept;
          } else {
            f.load(off(q), v[i]);
            if (kept) *kept = v[i];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t q = qr + (i0 + i) * stride;
        if (q < end) f.template use<N, kCL>(cl, off(q), v[i], p);
      }
    }
    flush(p);
  }
}

// The channels-last thread layout of a region of cs channels: rows of ct threads, each thread owning the
// N channels of one access of a pixel (units accesses per pixel); the rows walk the pixels.
struct ClRows {
  int units, ct, rows;
  __host__ __device__ ClRows(int cs, int n, int threads)
      : units(cs / n), ct(units < threads ? units : threads), rows(threads / ct) {}
};

// Pairs of doubles of region_sums' reduction scratch `red`: one per thread and channel when several rows
// of threads share a channel (channels_last); none on NCHW (shuffles) or with one row (sums go straight
// to out1 / out2).
template <bool kCL, int N>
__host__ __device__ __forceinline__ int red_pairs(int cs, int threads) {
  if constexpr (!kCL) {
    return 0;
  } else {
    const ClRows l(cs, N, threads);
    return l.rows > 1 ? l.rows * l.ct * N : 0;
  }
}

// Visit every element of the region with owned channels through f (f.load / f.use, see walk): N
// elements per access (N > 1: the 16-byte path; NCHW: N pixels of one channel, channels_last: N
// channels of one pixel). When out1 is given, the per-channel totals (double) of the two partial sums
// land in out1[cl], out2[cl] (shared memory; out2 is given whenever out1 is). red: shared scratch of
// 2 * red_pairs doubles. cache: see Cache. Ends with __syncthreads.
template <bool kCL, int N, class F, class Acc>
__device__ void region_sums(const Geo& g, const Region& R, const F& f, double* out1, double* out2, double* red,
                            const Cache<Acc>& cache) {
  const int tid = threadIdx.x, T = blockDim.x;
  int n = 0;  // accesses made by this thread
  if constexpr (!kCL) {
    const int tpc = g.tpc, slots = T / tpc, slot = tid / tpc, lane = tid % tpc;
    const int64_t units = (R.s1 - R.s0) / N;  // the vector path has (s1 - s0) % N == 0
    for (int cb = 0; cb < R.cs; cb += slots) {
      const int cl = cb + slot;
      double A = 0.0, Bd = 0.0;
      if (cl < R.cs) {
        const int64_t row = offset<false>(g, R.c0 + cl, R.s0);
        walk<N, false>(f, cl, lane, tpc, units, [row](int64_t q) { return row + q * N; },
                       [&](const Partial<1>& p) {
                         A += p.a[0];
                         Bd += p.b[0];
                       },
                       cache, n);
      }
      for (int o = tpc / 2; o > 0; o >>= 1) {  // lanes of one channel are consecutive in one warp
        A += __shfl_xor_sync(0xffffffffu, A, o);
        Bd += __shfl_xor_sync(0xffffffffu, Bd, o);
      }
      if (out1 && cl < R.cs && lane == 0) {
        out1[cl] = A;
        out2[cl] = Bd;
      }
    }
    __syncthreads();
  } else {
    // A thread's double sums live in shared memory (N per thread would not fit in registers next to the
    // loads): its slots of red when several rows share a channel, else the channel's out1 / out2.
    const ClRows l(R.cs, N, T);
    const int row = tid / l.ct, lane = tid % l.ct;
    const int width = l.ct * N;  // channels of one round
    const bool direct = l.rows == 1;
    for (int cb = 0; cb < l.units; cb += l.ct) {
      const int cl = (cb + lane) * N;
      const bool mine = row < l.rows && cb + lane < l.units;
      double *ra = nullptr, *rb = nullptr;
      if (out1) {
        ra = direct ? out1 + cl : red + row * width + lane * N;
        rb = direct ? out2 + cl : red + (l.rows + row) * width + lane * N;
      }
      if (out1 && mine) {
#pragma unroll
        for (int k = 0; k < N; ++k) ra[k] = rb[k] = 0.0;
      }
      if (mine) {
        const int64_t c = R.c0 + cl;
        walk<N, true>(f, cl, R.s0 + row, l.rows, R.s1, [&g, c](int64_t s) { return offset<true>(g, c, s); },
                      [&](const Partial<N>& p) {
                        if (!out1) return;
#pragma unroll
                        for (int k = 0; k < N; ++k) {
                          ra[k] += p.a[k];
                          rb[k] += p.b[k];
                        }
                      },
                      cache, n);
      }
      if (out1 && !direct) {
        __syncthreads();
        for (int i = tid; i < width && cb * N + i < R.cs; i += T) {
          double s1 = 0.0, s2 = 0.0;
          for (int r = 0; r < l.rows; ++r) {
            s1 += red[r * width + i];
            s2 += red[(l.rows + r) * width + i];
          }
          out1[cb * N + i] = s1;
          out2[cb * N + i] = s2;
        }
      }
      __syncthreads();
    }
  }
}

// Channel of element k of an access at local channel cl, and the partial sum it adds to (see Partial).
template <bool kCL>
__device__ __forceinline__ int channel_of(int cl, int k) { return kCL ? cl + k : cl; }
template <bool kCL>
__device__ __forceinline__ int partial_of(int k) { return kCL ? k : 0; }

// ---------------------------------------------------------------------------------------------
// Host: geometry and launch
// ---------------------------------------------------------------------------------------------
// Largest divisor of G that is <= limit (>= 1).
inline int64_t divisor_at_most(int64_t G, int64_t limit) {
  for (int64_t d = std::max<int64_t>(1, std::min(G, limit)); d > 1; --d)
    if (G % d == 0) return d;
  return 1;
}

// The launchers' refusals as the messages they raise ("" when there is none): a group wider than
// kMaxChannels (bad input: ValueError), a block needing more shared memory than the current device gives
// one (a device limit: RuntimeError). group_norm_refusal asks them before a launch.
inline std::string channels_refusal(int64_t Cg) {
  if (Cg <= kMaxChannels) return "";
  return detail::concat("group_norm_silu: at most ", kMaxChannels, " channels per group on CUDA, got ", Cg);
}

inline std::string smem_refusal(const char* op, size_t smem) {
  const int optin = device_props().smem_optin;
  if (smem <= size_t(std::max(optin, 48 * 1024))) return "";
  return detail::concat(op, ": needs ", smem, " bytes of shared memory per block, the device allows ", optin);
}

// group_norm_backward's refusal for either alignment (group_norm_backward.cu).
std::string backward_refusal(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, DType dtype);

// The 16-byte path needs every access aligned: NCHW, each channel row of the region starts on 16
// bytes (S % nv == 0); channels_last, each pixel's slice of a region (C % nv == 0, CS % nv == 0).
inline Geo plan(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, int nv, bool aligned,
                const void* kernel) {
  Geo g{};
  g.B = B, g.C = C, g.S = S, g.G = G, g.Cg = C / G;
  const std::string too_wide = channels_refusal(g.Cg);
  DDPM_CHECK(too_wide.empty(), too_wide);
  // Regions: channels_last takes up to 128 channels of whole groups (a pixel's slice is contiguous);
  // NCHW groups are contiguous, so several small groups share a block (<= 8192 elements).
  const int64_t gs = cl ? divisor_at_most(G, std::max<int64_t>(1, 128 / g.Cg))
                        : divisor_at_most(G, std::max<int64_t>(1, std::min<int64_t>(8192 / (g.Cg * S), 512 / g.Cg)));
  g.GS = int(gs);
  g.CS = int(gs * g.Cg);
  g.RPS = int(G / gs);
  g.n = aligned && (cl ? C % nv == 0 && g.CS % nv == 0 : S % nv == 0) ? nv : 1;
  const int64_t regions = B * g.RPS;
  // Split the pixels over a cluster when there are fewer than two regions per SM (sm_90 only): between
  // the K just below and just above two blocks per SM, the one whose last wave is fuller (ties: the
  // larger K, smaller regions). Batch 128 x 1 region: K = 2 (256 blocks, one wave), not 3 (1.45 waves).
  int64_t K = 1;
  const int64_t want = 2 * int64_t(device_props().sms);
  if (regions < want && clusters_available(kernel)) {
    const auto fill = [&](int64_t k) {
      const int64_t blocks = regions * k;
      return double(blocks) / double(ceil_div(blocks, want) * want);
    };
    const int64_t lo = std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, want / regions));
    const int64_t hi = std::min<int64_t>(kMaxCluster, ceil_div(want, regions));
    K = fill(hi) >= fill(lo) ? hi : lo;
  }
  const int64_t step = cl ? 1 : g.n;  // NCHW vector path: chunks start on a vector
  int64_t chunk = ceil_div(ceil_div(S, K), step) * step;
  K = ceil_div(S, chunk);  // no empty chunk
  g.K = int(K);
  g.chunk = chunk;
  if (!cl) {  // lanes per channel: about 4 accesses each, a power of two <= 32
    const int64_t units = ceil_div<int64_t>(chunk, g.n);
    int tpc = 1;
    while (tpc < 32 && int64_t(tpc) * 4 < units) tpc *= 2;
    // One lane group per channel when they fit, fewer lanes per channel when not: 10 channels take
    // 10 x 16 = 160 threads (a 256-thread block would leave 6 of 16 lane groups idle).
    while (tpc > 1 && int64_t(g.CS) * tpc > kMaxThreads) tpc /= 2;
    g.tpc = tpc;
    g.threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, ceil_div<int64_t>(g.CS * tpc, 32) * 32)));
  } else {
    g.tpc = 1;
    // Rows of one thread per access of a pixel's CS channels (ClRows), filling about kMaxThreads threads.
    const int units = g.CS / g.n;
    g.threads = units >= kMaxThreads ? kMaxThreads : units * (kMaxThreads / units);
  }
  return g;
}

// Accesses the busiest thread makes over a region (each of the two passes makes the same ones).
inline int64_t accesses_per_thread(const Geo& g, bool cl) {
  if (!cl) {
    const int64_t rounds = ceil_div<int64_t>(g.CS, g.threads / g.tpc);
    return rounds * ceil_div<int64_t>(ceil_div<int64_t>(g.chunk, g.n), g.tpc);
  }
  const ClRows l(g.CS, g.n, g.threads);
  return ceil_div<int64_t>(l.units, l.ct) * ceil_div<int64_t>(g.chunk, l.rows);
}

// g with its cache (see Cache) of accesses of type A, beside `other` bytes of shared memory; and the
// block's shared memory in all. The cache keeps every access when two blocks per SM still fit, else as
// many as fit. DDPM_FAST_GN_CACHE=0 turns it off (read once; for measuring what it saves).
template <class A>
std::pair<Geo, size_t> with_cache(Geo g, bool cl, size_t other) {
  static const bool enabled = [] {
    const char* v = std::getenv("DDPM_FAST_GN_CACHE");
    return !(v && std::string(v) == "0");
  }();
  const DeviceProps& dev = device_props();
  const int64_t budget = std::min<int64_t>(dev.smem_per_sm / 2 - 1024, dev.smem_optin) - int64_t(other) - 16;
  g.cache_slots = 0;
  if (enabled && budget > 0)
    g.cache_slots = int(std::min<int64_t>(accesses_per_thread(g, cl), budget / int64_t(sizeof(A) * g.threads)));
  return {g, other + cache_bytes<A>(g.cache_slots, g.threads)};
}

// Lets `kernel` use the device's maximum dynamic shared memory, once per kernel and device (the attribute
// stays set; one fixed value, as a per-launch size would race other host threads launching it).
inline void allow_max_smem(const char* op, const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, dev})) return;
  check_status(op, int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            device_props().smem_optin)));
  done.insert({kernel, dev});
}

template <class Kernel, class Args>
void launch(const char* op, Kernel kernel, const Args& args, const Geo& g, size_t smem, cudaStream_t s) {
  // A device limit, not bad input: RuntimeError, as a launch the device refuses.
  const std::string refusal = smem_refusal(op, smem);
  DDPM_CHECK_RT(refusal.empty(), refusal);
  if (smem > 48 * 1024) allow_max_smem(op, reinterpret_cast<const void*>(kernel));
  const int64_t blocks = g.B * g.RPS * g.K;
  DDPM_CHECK_RT(blocks <= int64_t(INT32_MAX), op, ": ", blocks, " blocks exceed a CUDA grid");
  check_status(op, int(launch_in_clusters(kernel, unsigned(blocks), g.threads, smem, g.K, s, args, g)));
}

inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

// f(kCL, N) with the layout and the access width as compile-time constants (std::integral_constant).
template <typename T, class F>
void with_variant(bool cl, const Geo& g, F&& f) {
  using Vec = std::integral_constant<int, kVec<T>>;
  using One = std::integral_constant<int, 1>;
  if (cl)
    g.n > 1 ? f(std::true_type{}, Vec{}) : f(std::true_type{}, One{});
  else
    g.n > 1 ? f(std::false_type{}, Vec{}) : f(std::false_type{}, One{});
}

// Calls f(kernel, geometry with its cache, shared memory) for the launch a call makes: the launcher's plan,
// and group_norm_refusal's. kernel_of(kCL, N) is the kernel of a variant, smem_of(g, red_pairs) its shared
// memory besides the cache; kStreams, the tensors it reads per access.
template <typename T, int kStreams, class KernelOf, class SmemOf, class F>
void with_launch(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, bool aligned, KernelOf kernel_of,
                 SmemOf smem_of, F&& f) {
  const auto any_variant = kernel_of(std::false_type{}, std::integral_constant<int, 1>{});
  const Geo g = plan(B, C, S, G, cl, kVec<T>, aligned, reinterpret_cast<const void*>(any_variant));
  with_variant<T>(cl, g, [&](auto kcl, auto n) {
    constexpr bool kCL = decltype(kcl)::value;
    constexpr int N = decltype(n)::value;
    const auto [gc, smem] = with_cache<Access<T, N, kStreams>>(g, cl, smem_of(g, red_pairs<kCL, N>(g.CS, g.threads)));
    f(kernel_of(kcl, n), gc, smem);
  });
}

// The launcher's refusal of a call whatever the alignment of its pointers ("" when none):
// with_aligned(aligned, f) calls f as with_launch does.
template <class WithAligned>
std::string refusal_at_any_alignment(const char* op, WithAligned with_aligned) {
  std::string why;
  for (const bool aligned : {false, true})
    with_aligned(aligned, [&](auto, const Geo&, size_t smem) {
      if (why.empty()) why = smem_refusal(op, smem);
    });
  return why;
}

}  // namespace ddpm_fast::cuda::gn
