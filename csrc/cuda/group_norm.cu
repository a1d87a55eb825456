// GroupNorm + time-embedding bias / scale-shift + optional SiLU on the GPU, forward and backward
// (docs/contracts.md, "GroupNorm + time embedding + SiLU"), the same math as csrc/cpu/group_norm.cpp.
//
// Work: a block takes a region = (sample b, GS whole groups = CS channels, a chunk of the pixels).
// Inside a region every thread owns one channel at a time (threads never straddle channels), so
// per-channel sums need no atomics and come out in a fixed order:
//  * NCHW: a channel's pixels are contiguous; `tpc` consecutive lanes of a warp share a channel
//    (16-byte accesses where aligned) and reduce with shuffles; the block has CS x tpc threads (<= 256,
//    fewer lanes per channel when needed), so no lane group waits for a second round of channels;
//  * channels_last: a pixel's channels are contiguous; thread l of a row of min(CS, 256) threads owns
//    channel l, ~256 / CS rows of threads walk the pixels, and a shared-memory pass sums the rows.
// Statistics: per channel, float sums of d = h - h(c, s0) (shifted, so no cancellation) over runs
// of 16 accesses flushed into double; then per group a Chan combine (exact in double) of the
// channel means / M2 over the channels and over the region's pixel chunks.
//
// Small batch x groups (batch 1 at 64x64x320): on sm_90 the pixel axis of a region is split over a
// thread-block cluster of K <= 8 blocks that combine their per-channel partial sums through
// distributed shared memory, so there are >= 2 blocks per SM with no scratch memory and no extra
// launch. Elsewhere (or when there are enough regions) K = 1. The normalize pass re-reads the
// region right after the statistics pass; the regions are small (<= 8192 elements NCHW, or a pixel
// chunk of <= 128 channels) so that re-read should come from L2 and DRAM see x once (to be confirmed
// with ncu on the GPU; caching the region in shared memory is the fallback if it does not).
//
// Backward: per-channel S1 = sum dy1, S2 = sum dy1 * xhat (dy1 = dy * silu'(y1)), combined over the
// cluster; the rank-0 block writes dshift, dscale and adds sc1 * S2, sc1 * S1 into dweight / dbias
// with float atomics (zeroed first on the stream): their summation order over samples is not fixed,
// so dweight / dbias may differ in the last bits between runs (everything else is deterministic).
// Then dx = rstd * (k * dy1 - m1 - xhat * m2) and dbias_in = sum dx over the region.
#include <cooperative_groups.h>

#include <cmath>

#include "device.cuh"

namespace ddpm_fast::cuda {
namespace {

constexpr int kMaxThreads = 256;  // with 2 blocks per SM: <= 128 registers, no spills (ptxas -v)
constexpr int kFlush = 16;        // accesses summed in float before flushing into double
constexpr int kMaxCluster = 8;    // portable cluster size
constexpr int kMaxChannels = 4096;  // channels of one region (its shared-memory arrays; the launch says when too big)

struct Geo {
  int64_t B, C, S, G, Cg;
  int GS, CS;        // groups / channels per region
  int RPS;           // regions per sample = G / GS
  int K;             // blocks (pixel chunks) per region = cluster size
  int64_t chunk;     // pixels per chunk
  int tpc;           // NCHW: threads per channel (power of two <= 32)
  int threads;       // block size: NCHW channels x tpc (no idle lanes), channels_last whole pixel rows
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

// Visit every element of the region with owned channels: f.template run<N>(cl, off, a, b) handles N
// elements [off, off + N) of local channel cl (N = NV on the NCHW vector path, else 1) and adds two
// float partial sums into a, b. When out1 is given, the per-channel totals (double) land in
// out1[cl], out2[cl] (shared memory). red: 2 * blockDim doubles of shared scratch (channels_last).
// Ends with __syncthreads.
template <bool kCL, bool kVecPath, int NV, class F>
__device__ void region_sums(const Geo& g, const Region& R, F& f, double* out1, double* out2, double* red) {
  const int tid = threadIdx.x, T = blockDim.x;
  if constexpr (!kCL) {
    const int tpc = g.tpc, slots = T / tpc, slot = tid / tpc, lane = tid % tpc;
    constexpr int N = kVecPath ? NV : 1;
    const int64_t units = (R.s1 - R.s0) / N;  // the vector path has (s1 - s0) % NV == 0
    for (int cb = 0; cb < R.cs; cb += slots) {
      const int cl = cb + slot;
      double A = 0.0, Bd = 0.0;
      if (cl < R.cs) {
        const int64_t row = offset<false>(g, R.c0 + cl, R.s0);
        for (int64_t q0 = lane; q0 < units; q0 += int64_t(tpc) * kFlush) {
          float a = 0.0f, b = 0.0f;
#pragma unroll 4
          for (int it = 0; it < kFlush; ++it) {
            const int64_t q = q0 + int64_t(it) * tpc;
            if (q >= units) break;
            f.template run<N>(cl, row + q * N, a, b);
          }
          A += a;
          Bd += b;
        }
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
    const int ct = R.cs < T ? R.cs : T, rows = T / ct, row = tid / ct, lane = tid % ct;
    for (int cb = 0; cb < R.cs; cb += ct) {
      const int cl = cb + lane;
      double A = 0.0, Bd = 0.0;
      if (row < rows && cl < R.cs) {
        for (int64_t p0 = R.s0 + row; p0 < R.s1; p0 += int64_t(rows) * kFlush) {
          float a = 0.0f, b = 0.0f;
#pragma unroll 4
          for (int it = 0; it < kFlush; ++it) {
            const int64_t s = p0 + int64_t(it) * rows;
            if (s >= R.s1) break;
            f.template run<1>(cl, offset<true>(g, R.c0 + cl, s), a, b);
          }
          A += a;
          Bd += b;
        }
      }
      if (out1) {
        red[tid] = A;
        red[T + tid] = Bd;
        __syncthreads();
        if (tid < ct && cb + tid < R.cs) {
          double s1 = 0.0, s2 = 0.0;
          for (int r = 0; r < rows; ++r) {
            s1 += red[r * ct + tid];
            s2 += red[T + r * ct + tid];
          }
          out1[cb + tid] = s1;
          out2[cb + tid] = s2;
        }
      }
      __syncthreads();
    }
  }
}

// N elements at p (16-byte aligned when N > 1) as float.
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* p, float (&v)[N]) {
  if constexpr (N == 1)
    v[0] = load1(p);
  else
    load_vec<T, N>(p, v);
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* p, const float (&v)[N]) {
  if constexpr (N == 1)
    p[0] = from_float<T>(v[0]);
  else
    store_vec<T, N>(p, v);
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

// Shared memory of one forward block (cs channels, gs groups, T threads).
struct FwdSmem {
  double *sum1, *sum2, *red;
  float *shift, *hb, *mu, *A, *Bc, *gmean, *grstd;
  static __host__ __device__ size_t bytes(int cs, int gs, int T) {
    return sizeof(double) * (2 * size_t(cs) + 2 * size_t(T)) + sizeof(float) * (5 * size_t(cs) + 2 * size_t(gs));
  }
  __device__ FwdSmem(void* base, int cs, int gs, int T) {
    double* d = static_cast<double*>(base);
    sum1 = d;
    sum2 = d + cs;
    red = d + 2 * cs;
    float* f = reinterpret_cast<float*>(red + 2 * T);
    shift = f;
    hb = f + cs;
    mu = f + 2 * cs;
    A = f + 3 * cs;
    Bc = f + 4 * cs;
    gmean = f + 5 * cs;
    grstd = gmean + gs;
  }
};

template <typename T>
struct StatsF {  // d = (x + hb) - shift: (sum d, sum d^2)
  const T* xs;
  const float *hb, *shift;
  template <int N>
  __device__ __forceinline__ void run(int cl, int64_t off, float& a, float& b) const {
    float v[N];
    load_n<T, N>(xs + off, v);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float d = (v[k] + hb[cl]) - shift[cl];
      a += d;
      b += d * d;
    }
  }
};

template <typename T>
struct NormF {  // y = act(((x + hb) - mu) * A + Bc)
  const T* xs;
  T* ys;
  const float *hb, *mu, *A, *Bc;
  bool silu;
  template <int N>
  __device__ __forceinline__ void run(int cl, int64_t off, float&, float&) const {
    float v[N];
    load_n<T, N>(xs + off, v);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float y1 = ((v[k] + hb[cl]) - mu[cl]) * A[cl] + Bc[cl];
      v[k] = silu ? y1 * sigmoid_f(y1) : y1;
    }
    store_n<T, N>(ys + off, v);
  }
};

template <typename T, bool kCL, bool kVecPath>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_forward_kernel(FwdArgs<T> a, Geo g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int NV = kVec<T>;
  const Region R = region_of(g);
  FwdSmem sm(smem_raw, R.cs, g.GS, blockDim.x);
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
  region_sums<kCL, kVecPath, NV>(g, R, stats, sm.sum1, sm.sum2, sm.red);

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
  region_sums<kCL, kVecPath, NV>(g, R, norm, nullptr, nullptr, sm.red);
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
  static __host__ __device__ size_t bytes(int cs, int T) {
    return sizeof(double) * (4 * size_t(cs) + 2 * size_t(T)) + sizeof(float) * 8 * size_t(cs);
  }
  __device__ BwdSmem(void* base, int cs, int T) {
    double* p = static_cast<double*>(base);
    S1 = p;
    S2 = p + cs;
    T1 = p + 2 * cs;
    T2 = p + 3 * cs;
    red = p + 4 * cs;
    float* f = reinterpret_cast<float*>(red + 2 * T);
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

template <typename T>
struct Bwd1F {  // (sum dy1, sum dy1 * xhat)
  const T *xs, *dys;
  BwdSmem sm;
  bool silu;
  template <int N>
  __device__ __forceinline__ void run(int cl, int64_t off, float& a, float& b) const {
    float xv[N], dv[N];
    load_n<T, N>(xs + off, xv);
    load_n<T, N>(dys + off, dv);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      const float xh = ((xv[q] + sm.hb[cl]) - sm.d[cl]) * sm.rs[cl];
      const float g1 = dy1_of(silu, dv[q], xh, sm.W[cl], sm.B1[cl]);
      a += g1;
      b += g1 * xh;
    }
  }
};

template <typename T>
struct Bwd2F {  // dh = rstd * (k * dy1 - m1 - xhat * m2) -> dx; (sum dh, 0)
  const T *xs, *dys;
  T* dxs;
  BwdSmem sm;
  bool silu;
  template <int N>
  __device__ __forceinline__ void run(int cl, int64_t off, float& a, float&) const {
    float xv[N], dv[N];
    load_n<T, N>(xs + off, xv);
    load_n<T, N>(dys + off, dv);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      const float rs = sm.rs[cl];
      const float xh = ((xv[q] + sm.hb[cl]) - sm.d[cl]) * rs;
      const float g1 = dy1_of(silu, dv[q], xh, sm.W[cl], sm.B1[cl]);
      xv[q] = rs * (sm.k[cl] * g1 - sm.m1[cl] - xh * sm.m2[cl]);
      a += xv[q];
    }
    if (dxs) store_n<T, N>(dxs + off, xv);
  }
};

template <typename T, bool kCL, bool kVecPath>
__global__ void __launch_bounds__(kMaxThreads, 2) gn_backward_kernel(BwdArgs<T> a, Geo g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int NV = kVec<T>;
  const Region R = region_of(g);
  BwdSmem sm(smem_raw, R.cs, blockDim.x);
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

  Bwd1F<T> f1{a.x + base, a.dy + base, sm, a.silu};
  region_sums<kCL, kVecPath, NV>(g, R, f1, sm.S1, sm.S2, sm.red);

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

  Bwd2F<T> f2{a.x + base, a.dy + base, a.dx ? a.dx + base : nullptr, sm, a.silu};
  region_sums<kCL, kVecPath, NV>(g, R, f2, a.dbias_in ? sm.S1 : nullptr, sm.S2, sm.red);
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

Geo plan(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, int nv) {
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
  const int64_t regions = B * g.RPS;
  // Split the pixels over a cluster when there are fewer than two regions per SM (sm_90 only).
  int64_t K = 1;
  const int64_t want = 2 * int64_t(sm_count());
  if (regions < want && compute_major() >= 9) K = std::min<int64_t>(kMaxCluster, ceil_div(want, regions));
  const int64_t step = cl ? 1 : nv;  // NCHW vector path: chunks start on a vector
  int64_t chunk = ceil_div(ceil_div(S, K), step) * step;
  K = ceil_div(S, chunk);  // no empty chunk
  g.K = int(K);
  g.chunk = chunk;
  if (!cl) {  // lanes per channel: about 4 accesses each, a power of two <= 32
    const int64_t units = ceil_div<int64_t>(chunk, nv);
    int tpc = 1;
    while (tpc < 32 && int64_t(tpc) * 4 < units) tpc *= 2;
    // One lane group per channel when they fit, fewer lanes per channel when not: 10 channels take
    // 10 x 16 = 160 threads (a 256-thread block would leave 6 of 16 lane groups idle).
    while (tpc > 1 && int64_t(g.CS) * tpc > kMaxThreads) tpc /= 2;
    g.tpc = tpc;
    g.threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(64, ceil_div<int64_t>(g.CS * tpc, 32) * 32)));
  } else {
    g.tpc = 1;
    // Rows of CS threads (one per channel) that fill about kMaxThreads threads.
    g.threads = g.CS >= kMaxThreads ? kMaxThreads : g.CS * (kMaxThreads / g.CS);
  }
  return g;
}

template <class Kernel, class Args>
void launch(const char* op, Kernel kernel, const Args& args, const Geo& g, size_t smem, cudaStream_t s) {
  if (smem > 48 * 1024) {
    check_status(op, int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem))));
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(g.B * g.RPS * g.K));
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

// NCHW 16-byte path: every channel row starts on 16 bytes.
template <typename T>
bool nchw_vec_ok(int64_t S, const Geo& g, std::initializer_list<const void*> ptrs) {
  if (S % kVec<T> != 0 || g.chunk % kVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
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
    const Geo g = plan(B, C, S, G, cl, kVec<T>);
    const FwdArgs<T> args{static_cast<const T*>(x), weight, bias, bias_in, scale, shift, static_cast<T*>(y),
                          mean, rstd, eps, act == Activation::SiLU};
    const size_t smem = FwdSmem::bytes(g.CS, g.GS, g.threads);
    if (cl)
      launch("group_norm_silu", gn_forward_kernel<T, true, false>, args, g, smem, s);
    else if (nchw_vec_ok<T>(S, g, {x, y}))
      launch("group_norm_silu", gn_forward_kernel<T, false, true>, args, g, smem, s);
    else
      launch("group_norm_silu", gn_forward_kernel<T, false, false>, args, g, smem, s);
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
    const Geo g = plan(B, C, S, G, cl, kVec<T>);
    const BwdArgs<T> args{static_cast<const T*>(dy), static_cast<const T*>(x), weight, bias, bias_in, scale, shift,
                          mean, rstd, static_cast<T*>(dx), dweight, dbias, dbias_in, dscale, dshift,
                          act == Activation::SiLU};
    const size_t smem = BwdSmem::bytes(g.CS, g.threads);
    if (cl)
      launch(op, gn_backward_kernel<T, true, false>, args, g, smem, s);
    else if (nchw_vec_ok<T>(S, g, {x, dy, dx}))
      launch(op, gn_backward_kernel<T, false, true>, args, g, smem, s);
    else
      launch(op, gn_backward_kernel<T, false, false>, args, g, smem, s);
  });
  check_launch(op);
}

}  // namespace ddpm_fast::cuda
