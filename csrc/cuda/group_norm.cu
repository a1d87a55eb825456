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
// Statistics: per channel, float sums of d = h - h(c, s0) (shifted, so no cancellation) over runs
// of 16 accesses flushed into double; then per group a Chan combine (exact in double) of the
// channel means / M2 over the channels and over the region's pixel chunks.
//
// Small batch x groups (batch 1 at 64x64x320): on sm_90 the pixel axis of a region is split over a
// thread-block cluster of K <= 8 blocks that combine their per-channel partial sums through
// distributed shared memory, so there are about 2 blocks per SM with no scratch memory and no extra
// launch. Elsewhere (or when there are enough regions) K = 1. The normalize pass re-reads the
// region right after the statistics pass; the regions are small (<= 8192 elements NCHW, or a pixel
// chunk of <= 128 channels; the target shapes keep <= 21 MB in flight per wave) so that re-read
// should come from L2 and DRAM see x once (scripts/gpu_check.sh's ncu stage measures the DRAM bytes;
// caching the region in shared memory is the fallback if they show a second read).
//
// Backward: per-channel S1 = sum dy1, S2 = sum dy1 * xhat (dy1 = dy * silu'(y1)), combined over the
// cluster; the rank-0 block writes dshift, dscale and adds sc1 * S2, sc1 * S1 into dweight / dbias
// with float atomics (zeroed first on the stream): their summation order over samples is not fixed,
// so dweight / dbias may differ in the last bits between runs (everything else is deterministic).
// Then dx = rstd * (k * dy1 - m1 - xhat * m2) and dbias_in = sum dx over the region.
#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <type_traits>

#include "device.cuh"

namespace ddpm_fast::cuda {
namespace {

constexpr int kMaxThreads = 256;  // with 2 blocks per SM: <= 128 registers, no spills (ptxas -v)
constexpr int kFlush = 16;        // accesses summed in float before flushing into double
// Accesses of one thread loaded before their uses: 64 bytes in flight per thread on the 16-byte path.
constexpr int kBytesInFlight = 64;
constexpr int kMaxCluster = 8;    // portable cluster size
// Channels of one group: a region's per-channel shared-memory arrays grow with it, and the launch raises
// where they do not fit (the backward's reach ~3500 channels on an H200, ~2500 on an A100).
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

__device__ __forceinline__ void cluster_sync(int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (K > 1) cooperative_groups::this_cluster().sync();
#else
  (void)K;
#endif
}

// p in the shared memory of block `rank` of this cluster (p itself when K == 1).
template <class P>
__device__ __forceinline__ P* cluster_ptr(P* p, int K, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (K > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)K, (void)rank;
#endif
  return p;
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

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
  const T* x;                            // (B, C, S) dense in the layout
  const float *weight, *bias;            // (C,) or null
  const float *bias_in, *scale, *shift;  // (B, C) or null
  T* y;                                  // (B, C, S)
  float *mean, *rstd;                    // (B, G)
  float eps;
  bool silu;
};

// Shared memory of one forward block (cs channels, gs groups, `slots` pairs of reduction scratch).
struct FwdSmem {
  double *sum1, *sum2, *red;
  float *shift, *hb, *mu, *A, *Bc, *gmean, *grstd;
  static __host__ __device__ size_t bytes(int cs, int gs, int slots) {
    return sizeof(double) * (2 * size_t(cs) + 2 * size_t(slots)) + sizeof(float) * (5 * size_t(cs) + 2 * size_t(gs));
  }
  __device__ FwdSmem(void* base, int cs, int gs, int slots) {
    double* d = static_cast<double*>(base);
    sum1 = d;
    sum2 = d + cs;
    red = d + 2 * cs;
    float* f = reinterpret_cast<float*>(red + 2 * slots);
    shift = f;
    hb = f + cs;
    mu = f + 2 * cs;
    A = f + 3 * cs;
    Bc = f + 4 * cs;
    gmean = f + 5 * cs;
    grstd = gmean + gs;
  }
};

// Channel of element k of an access at local channel cl, and the partial sum it adds to (see Partial).
template <bool kCL>
__device__ __forceinline__ int channel_of(int cl, int k) { return kCL ? cl + k : cl; }
template <bool kCL>
__device__ __forceinline__ int partial_of(int k) { return kCL ? k : 0; }

template <typename T_>
struct StatsF {  // d = (x + hb) - shift: (sum d, sum d^2)
  using T = T_;
  static constexpr int kInputs = 1;
  const T* xs;
  const float *hb, *shift;
  template <int N>
  __device__ __forceinline__ void load(int64_t off, Access<T, N, 1>& r) const { load_raw(xs + off, r.v[0]); }
  template <int N, bool kCL>
  __device__ __forceinline__ void use(int cl, int64_t, const Access<T, N, 1>& r, Partial<kCL ? N : 1>& p) const {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int c = channel_of<kCL>(cl, k), q = partial_of<kCL>(k);
      const float d = (to_float(r.v[0][k]) + hb[c]) - shift[c];
      p.a[q] += d;
      p.b[q] += d * d;
    }
  }
};

template <typename T_>
struct NormF {  // y = act(((x + hb) - mu) * A + Bc)
  using T = T_;
  static constexpr int kInputs = 1;
  const T* xs;
  T* ys;
  const float *hb, *mu, *A, *Bc;
  bool silu;
  template <int N>
  __device__ __forceinline__ void load(int64_t off, Access<T, N, 1>& r) const { load_raw(xs + off, r.v[0]); }
  template <int N, bool kCL>
  __device__ __forceinline__ void use(int cl, int64_t off, const Access<T, N, 1>& r, Partial<kCL ? N : 1>&) const {
    float v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int c = channel_of<kCL>(cl, k);
      const float y1 = ((to_float(r.v[0][k]) + hb[c]) - mu[c]) * A[c] + Bc[c];
      v[k] = silu ? y1 * sigmoid_f(y1) : y1;
    }
    store_n<T, N>(ys + off, v);
  }
};

template <typename T, bool kCL, int N>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_forward_kernel(FwdArgs<T> a, Geo g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using Acc = Access<T, N, 1>;
  const Region R = region_of(g);
  FwdSmem sm(smem_raw + cache_bytes<Acc>(g.cache_slots, blockDim.x), R.cs, g.GS,
             red_pairs<kCL, N>(R.cs, blockDim.x));
  Acc* const kept = reinterpret_cast<Acc*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t C = g.C, base = R.b * C * g.S;
  const T* xs = a.x + base;

  for (int cl = tid; cl < R.cs; cl += blockDim.x) {
    const int64_t c = R.c0 + cl;
    const float h = a.bias_in ? a.bias_in[R.b * C + c] : 0.0f;
    sm.hb[cl] = h;
    sm.shift[cl] = load1(xs + offset<kCL>(g, c, R.s0)) + h;
  }
  __syncthreads();

  StatsF<T> stats{xs, sm.hb, sm.shift};
  region_sums<kCL, N>(g, R, stats, sm.sum1, sm.sum2, sm.red, Cache<Acc>{kept, g.cache_slots, true});

  // Per channel: mean and M2 over this chunk (replacing the sums).
  const double np = double(R.s1 - R.s0);
  for (int cl = tid; cl < R.cs; cl += blockDim.x) {
    const double s1 = sm.sum1[cl], s2 = sm.sum2[cl];
    sm.sum1[cl] = double(sm.shift[cl]) + s1 / np;
    const double m2 = s2 - s1 * s1 / np;
    sm.sum2[cl] = m2 < 0.0 ? 0.0 : m2;  // NaN stays NaN
  }
  __syncthreads();
  cluster_sync(g.K);

  // Per group: Chan's combine over the chunks (cluster ranks) and channels, in a fixed order.
  for (int gl = tid; gl < g.GS; gl += blockDim.x) {
    const double n_total = double(g.Cg) * double(g.S);
    double tot = 0.0;
    for (int r = 0; r < g.K; ++r) {
      const double* mr = cluster_ptr(sm.sum1, g.K, r);
      const double nr = double(chunk_pixels(g, r));
      for (int64_t c = gl * g.Cg; c < (gl + 1) * g.Cg; ++c) tot += nr * mr[c];
    }
    const double mean = tot / n_total;
    double m2 = 0.0;
    for (int r = 0; r < g.K; ++r) {
      const double* mr = cluster_ptr(sm.sum1, g.K, r);
      const double* qr = cluster_ptr(sm.sum2, g.K, r);
      const double nr = double(chunk_pixels(g, r));
      for (int64_t c = gl * g.Cg; c < (gl + 1) * g.Cg; ++c) {
        const double d = mr[c] - mean;
        m2 += qr[c] + nr * d * d;
      }
    }
    const float gm = float(mean), gr = float(1.0 / std::sqrt(m2 / n_total + double(a.eps)));
    sm.gmean[gl] = gm;
    sm.grstd[gl] = gr;
    if (R.rank == 0) {
      const int64_t gi = R.b * g.G + R.c0 / g.Cg + gl;
      a.mean[gi] = gm;
      a.rstd[gi] = gr;
    }
  }
  cluster_sync(g.K);  // the peers' shared memory is read; no block may leave before that
  __syncthreads();

  for (int cl = tid; cl < R.cs; cl += blockDim.x) {
    const int64_t c = R.c0 + cl;
    const int gl = int(cl / g.Cg);
    const float w = a.weight ? a.weight[c] : 1.0f;
    const float bi = a.bias ? a.bias[c] : 0.0f;
    const float sc1 = 1.0f + (a.scale ? a.scale[R.b * C + c] : 0.0f);
    const float shf = a.shift ? a.shift[R.b * C + c] : 0.0f;
    sm.mu[cl] = sm.gmean[gl];
    sm.A[cl] = sm.grstd[gl] * w * sc1;
    sm.Bc[cl] = bi * sc1 + shf;
  }
  __syncthreads();

  NormF<T> norm{xs, a.y + base, sm.hb, sm.mu, sm.A, sm.Bc, a.silu};
  region_sums<kCL, N>(g, R, norm, nullptr, nullptr, sm.red, Cache<Acc>{kept, g.cache_slots, false});
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  const T *dy, *x;                       // (B, C, S)
  const float *weight, *bias;            // (C,) or null
  const float *bias_in, *scale, *shift;  // (B, C) or null
  const float *mean, *rstd;              // (B, G)
  T* dx;                                 // (B, C, S) or null
  float *dweight, *dbias;                // (C,) or null (zeroed before the launch)
  float *dbias_in, *dscale, *dshift;     // (B, C) or null
  bool silu;
};

struct BwdSmem {
  double *S1, *S2, *T1, *T2, *red;
  float *d, *hb, *rs, *W, *B1, *k, *m1, *m2;
  static __host__ __device__ size_t bytes(int cs, int slots) {
    return sizeof(double) * (4 * size_t(cs) + 2 * size_t(slots)) + sizeof(float) * 8 * size_t(cs);
  }
  __device__ BwdSmem(void* base, int cs, int slots) {
    double* p = static_cast<double*>(base);
    S1 = p;
    S2 = p + cs;
    T1 = p + 2 * cs;
    T2 = p + 3 * cs;
    red = p + 4 * cs;
    float* f = reinterpret_cast<float*>(red + 2 * slots);
    d = f;
    hb = f + cs;
    rs = f + 2 * cs;
    W = f + 3 * cs;
    B1 = f + 4 * cs;
    k = f + 5 * cs;
    m1 = f + 6 * cs;
    m2 = f + 7 * cs;
  }
};

// dy1 = dy * silu'(y1) with y1 = xhat * W + B1 (or dy without the activation).
__device__ __forceinline__ float dy1_of(bool silu, float dy, float xh, float W, float B1) {
  if (!silu) return dy;
  const float y1 = xh * W + B1;
  const float sg = sigmoid_f(y1);
  return dy * (sg * (1.0f + y1 * (1.0f - sg)));
}

template <typename T_>
struct BwdLoad {  // x and dy of an access
  using T = T_;
  static constexpr int kInputs = 2;
  const T *xs, *dys;
  template <int N>
  __device__ __forceinline__ void load(int64_t off, Access<T, N, 2>& r) const {
    load_raw(xs + off, r.v[0]);
    load_raw(dys + off, r.v[1]);
  }
};

template <typename T>
struct Bwd1F : BwdLoad<T> {  // (sum dy1, sum dy1 * xhat)
  BwdSmem sm;
  bool silu;
  template <int N, bool kCL>
  __device__ __forceinline__ void use(int cl, int64_t, const Access<T, N, 2>& r, Partial<kCL ? N : 1>& p) const {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int c = channel_of<kCL>(cl, k), q = partial_of<kCL>(k);
      const float xh = ((to_float(r.v[0][k]) + sm.hb[c]) - sm.d[c]) * sm.rs[c];
      const float g1 = dy1_of(silu, to_float(r.v[1][k]), xh, sm.W[c], sm.B1[c]);
      p.a[q] += g1;
      p.b[q] += g1 * xh;
    }
  }
};

template <typename T>
struct Bwd2F : BwdLoad<T> {  // dh = rstd * (k * dy1 - m1 - xhat * m2) -> dx; (sum dh, 0)
  T* dxs;
  BwdSmem sm;
  bool silu;
  template <int N, bool kCL>
  __device__ __forceinline__ void use(int cl, int64_t off, const Access<T, N, 2>& r, Partial<kCL ? N : 1>& p) const {
    float dh[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int c = channel_of<kCL>(cl, k), q = partial_of<kCL>(k);
      const float rs = sm.rs[c];
      const float xh = ((to_float(r.v[0][k]) + sm.hb[c]) - sm.d[c]) * rs;
      const float g1 = dy1_of(silu, to_float(r.v[1][k]), xh, sm.W[c], sm.B1[c]);
      dh[k] = rs * (sm.k[c] * g1 - sm.m1[c] - xh * sm.m2[c]);
      p.a[q] += dh[k];
    }
    if (dxs) store_n<T, N>(dxs + off, dh);
  }
};

template <typename T, bool kCL, int N>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_backward_kernel(BwdArgs<T> a, Geo g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using Acc = Access<T, N, 2>;
  const Region R = region_of(g);
  BwdSmem sm(smem_raw + cache_bytes<Acc>(g.cache_slots, blockDim.x), R.cs, red_pairs<kCL, N>(R.cs, blockDim.x));
  Acc* const kept = reinterpret_cast<Acc*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t C = g.C, G = g.G, base = R.b * C * g.S;

  for (int cl = tid; cl < R.cs; cl += blockDim.x) {
    const int64_t c = R.c0 + cl, gi = R.b * G + c / g.Cg;
    const float w = a.weight ? a.weight[c] : 1.0f;
    const float bi = a.bias ? a.bias[c] : 0.0f;
    const float sc1 = 1.0f + (a.scale ? a.scale[R.b * C + c] : 0.0f);
    const float shf = a.shift ? a.shift[R.b * C + c] : 0.0f;
    sm.d[cl] = a.mean[gi];
    sm.hb[cl] = a.bias_in ? a.bias_in[R.b * C + c] : 0.0f;
    sm.rs[cl] = a.rstd[gi];
    sm.W[cl] = w * sc1;
    sm.B1[cl] = bi * sc1 + shf;
    sm.k[cl] = sc1 * w;
  }
  __syncthreads();

  Bwd1F<T> f1{{a.x + base, a.dy + base}, sm, a.silu};
  region_sums<kCL, N>(g, R, f1, sm.S1, sm.S2, sm.red, Cache<Acc>{kept, g.cache_slots, true});

  // Totals over the cluster's chunks, in rank order.
  cluster_sync(g.K);
  for (int cl = tid; cl < R.cs; cl += blockDim.x) {
    double t1 = 0.0, t2 = 0.0;
    for (int r = 0; r < g.K; ++r) {
      t1 += cluster_ptr(sm.S1, g.K, r)[cl];
      t2 += cluster_ptr(sm.S2, g.K, r)[cl];
    }
    sm.T1[cl] = t1;
    sm.T2[cl] = t2;
  }
  cluster_sync(g.K);  // S1 / S2 are reused below
  __syncthreads();

  if (R.rank == 0) {
    for (int cl = tid; cl < R.cs; cl += blockDim.x) {
      const int64_t c = R.c0 + cl;
      const double s1 = sm.T1[cl], s2 = sm.T2[cl];
      const float w = a.weight ? a.weight[c] : 1.0f;
      const float bi = a.bias ? a.bias[c] : 0.0f;
      const double sc1 = 1.0 + (a.scale ? double(a.scale[R.b * C + c]) : 0.0);
      if (a.dshift) a.dshift[R.b * C + c] = float(s1);
      if (a.dscale) a.dscale[R.b * C + c] = float(double(w) * s2 + double(bi) * s1);  // sum dy1 * y0
      if (a.dweight) atomicAdd(a.dweight + c, float(sc1 * s2));                     // sum dy0 * xhat
      if (a.dbias) atomicAdd(a.dbias + c, float(sc1 * s1));                         // sum dy0
    }
  }
  const double inv_n = 1.0 / (double(g.Cg) * double(g.S));
  for (int gl = tid; gl < g.GS; gl += blockDim.x) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t cl = gl * g.Cg; cl < (gl + 1) * g.Cg; ++cl) {
      a1 += double(sm.k[cl]) * sm.T1[cl];  // sum dxhat
      a2 += double(sm.k[cl]) * sm.T2[cl];  // sum dxhat * xhat
    }
    for (int64_t cl = gl * g.Cg; cl < (gl + 1) * g.Cg; ++cl) {
      sm.m1[cl] = float(a1 * inv_n);
      sm.m2[cl] = float(a2 * inv_n);
    }
  }
  __syncthreads();
  if (!a.dx && !a.dbias_in) return;

  Bwd2F<T> f2{{a.x + base, a.dy + base}, a.dx ? a.dx + base : nullptr, sm, a.silu};
  region_sums<kCL, N>(g, R, f2, a.dbias_in ? sm.S1 : nullptr, sm.S2, sm.red, Cache<Acc>{kept, g.cache_slots, false});
  if (a.dbias_in) {
    cluster_sync(g.K);
    if (R.rank == 0) {
      for (int cl = tid; cl < R.cs; cl += blockDim.x) {
        double t = 0.0;
        for (int r = 0; r < g.K; ++r) t += cluster_ptr(sm.S1, g.K, r)[cl];
        a.dbias_in[R.b * C + R.c0 + cl] = float(t);
      }
    }
    cluster_sync(g.K);
  }
}

// ---------------------------------------------------------------------------------------------
// Host: geometry and launch
// ---------------------------------------------------------------------------------------------
// Largest divisor of G that is <= limit (>= 1).
int64_t divisor_at_most(int64_t G, int64_t limit) {
  for (int64_t d = std::max<int64_t>(1, std::min(G, limit)); d > 1; --d)
    if (G % d == 0) return d;
  return 1;
}

// Whether the kernels of this build can use thread-block clusters on the current device: an sm_90 GPU
// running code compiled for sm_90 (a build for older architectures runs on an H100 through PTX compiled
// for them, where the cluster code is compiled out). Cached per device.
bool clusters_available() {
  static std::atomic<int> known[64];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  cudaGetDevice(&dev);
  const int cached = dev < 64 ? known[dev].load(std::memory_order_relaxed) : 0;
  if (cached) return cached == 1;
  cudaFuncAttributes attr{};
  const bool ok = device_props().major >= 9 &&
                  cudaFuncGetAttributes(&attr, gn_forward_kernel<float, false, 1>) == cudaSuccess &&
                  attr.ptxVersion >= 90;
  if (dev < 64) known[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// The 16-byte path needs every access aligned: NCHW, each channel row of the region starts on 16
// bytes (S % nv == 0); channels_last, each pixel's slice of a region (C % nv == 0, CS % nv == 0).
Geo plan(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, int nv, bool aligned) {
  Geo g{};
  g.B = B, g.C = C, g.S = S, g.G = G, g.Cg = C / G;
  DDPM_CHECK(g.Cg <= kMaxChannels, "group_norm_silu: at most ", kMaxChannels, " channels per group on CUDA, got ",
             g.Cg);
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
  if (regions < want && clusters_available()) {
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
int64_t accesses_per_thread(const Geo& g, bool cl) {
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
void allow_max_smem(const char* op, const void* kernel) {
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
  DDPM_CHECK(smem <= size_t(std::max(device_props().smem_optin, 48 * 1024)), op, ": needs ", smem,
             " bytes of shared memory per block, the device allows ", device_props().smem_optin);
  if (smem > 48 * 1024) allow_max_smem(op, reinterpret_cast<const void*>(kernel));
  const int64_t blocks = g.B * g.RPS * g.K;
  DDPM_CHECK(blocks <= int64_t(INT32_MAX), op, ": ", blocks, " blocks exceed a CUDA grid");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(unsigned(g.threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  if (g.K > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(g.K);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  check_status(op, int(cudaLaunchKernelEx(&cfg, kernel, args, g)));
}

bool all_aligned16(std::initializer_list<const void*> ptrs) {
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

}  // namespace

void group_norm_forward(const void* x, const float* weight, const float* bias, const float* bias_in,
                        const float* scale, const float* shift, void* y, float* mean, float* rstd, int64_t B,
                        int64_t C, int64_t S, int64_t G, float eps, Activation act, Layout layout, DType dtype,
                        uintptr_t cuda_stream) {
  check_group_norm_args("group_norm_forward", B, C, S, G, act, layout);
  if (B == 0 || C == 0) return;
  DDPM_CHECK(S > 0, "group_norm_forward: empty spatial size (S = 0) has no statistics");
  DDPM_CHECK(x && y && mean && rstd, "group_norm_forward: x, y, mean and rstd must be given");
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  const bool cl = layout == Layout::ChannelsLast;
  DDPM_CUDA_DISPATCH(dtype, T, {
    const Geo g = plan(B, C, S, G, cl, kVec<T>, all_aligned16({x, y}));
    const FwdArgs<T> args{static_cast<const T*>(x), weight, bias, bias_in, scale, shift, static_cast<T*>(y),
                          mean, rstd, eps, act == Activation::SiLU};
    with_variant<T>(cl, g, [&](auto kcl, auto n) {
      constexpr bool kCL = decltype(kcl)::value;
      constexpr int N = decltype(n)::value;
      const auto [gc, smem] = with_cache<Access<T, N, 1>>(g, cl, FwdSmem::bytes(g.CS, g.GS, red_pairs<kCL, N>(g.CS, g.threads)));
      launch("group_norm_silu", gn_forward_kernel<T, kCL, N>, args, gc, smem, s);
    });
  });
  check_launch("group_norm_silu");
}

void group_norm_backward(const void* dy, const void* x, const float* weight, const float* bias,
                         const float* bias_in, const float* scale, const float* shift, const float* mean,
                         const float* rstd, void* dx, float* dweight, float* dbias, float* dbias_in, float* dscale,
                         float* dshift, int64_t B, int64_t C, int64_t S, int64_t G, Activation act, Layout layout,
                         DType dtype, uintptr_t cuda_stream) {
  check_group_norm_args("group_norm_backward", B, C, S, G, act, layout);
  if (C == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  const char* op = "group_norm_silu_backward";
  // dweight / dbias are sums over samples by atomics; empty inputs leave every gradient zero.
  if (dweight) check_status(op, int(cudaMemsetAsync(dweight, 0, size_t(C) * sizeof(float), s)));
  if (dbias) check_status(op, int(cudaMemsetAsync(dbias, 0, size_t(C) * sizeof(float), s)));
  if (B == 0 || S == 0) {
    for (float* p : {dbias_in, dscale, dshift})
      if (p) check_status(op, int(cudaMemsetAsync(p, 0, size_t(B * C) * sizeof(float), s)));
    return;
  }
  DDPM_CHECK(dy && x && mean && rstd, "group_norm_backward: dy, x, mean and rstd must be given");
  const bool cl = layout == Layout::ChannelsLast;
  DDPM_CUDA_DISPATCH(dtype, T, {
    const Geo g = plan(B, C, S, G, cl, kVec<T>, all_aligned16({x, dy, dx}));
    const BwdArgs<T> args{static_cast<const T*>(dy), static_cast<const T*>(x), weight, bias, bias_in, scale, shift,
                          mean, rstd, static_cast<T*>(dx), dweight, dbias, dbias_in, dscale, dshift,
                          act == Activation::SiLU};
    with_variant<T>(cl, g, [&](auto kcl, auto n) {
      constexpr bool kCL = decltype(kcl)::value;
      constexpr int N = decltype(n)::value;
      const auto [gc, smem] = with_cache<Access<T, N, 2>>(g, cl, BwdSmem::bytes(g.CS, red_pairs<kCL, N>(g.CS, g.threads)));
      launch(op, gn_backward_kernel<T, kCL, N>, args, gc, smem, s);
    });
  });
  check_launch(op);
}

}  // namespace ddpm_fast::cuda
