// GroupNorm + time embedding + SiLU, backward, on the GPU (the design: group_norm.cuh).
#include "group_norm.cuh"

namespace ddpm_fast::cuda {
namespace {
using namespace gn;

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
  DDPM_DYNAMIC_SHARED(smem_raw);
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

// with_launch for the backward kernels.
template <typename T, class F>
void with_backward_launch(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, bool aligned, F&& f) {
  with_launch<T, 2>(
      B, C, S, G, cl, aligned,
      [](auto kcl, auto n) { return gn_backward_kernel<T, decltype(kcl)::value, decltype(n)::value>; },
      [](const Geo& g, int pairs) { return BwdSmem::bytes(g.CS, pairs); }, f);
}

}  // namespace

std::string gn::backward_refusal(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, DType dtype) {
  std::string why;
  DDPM_CUDA_DISPATCH(dtype, T, {
    why = refusal_at_any_alignment("group_norm_silu_backward", [&](bool aligned, auto&& f) {
      with_backward_launch<T>(B, C, S, G, cl, aligned, f);
    });
  });
  return why;
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
    const BwdArgs<T> args{static_cast<const T*>(dy), static_cast<const T*>(x), weight, bias, bias_in, scale, shift,
                          mean, rstd, static_cast<T*>(dx), dweight, dbias, dbias_in, dscale, dshift,
                          act == Activation::SiLU};
    with_backward_launch<T>(B, C, S, G, cl, all_aligned16({x, dy, dx}), [&](auto kernel, const Geo& g, size_t smem) {
      launch(op, kernel, args, g, smem, s);
    });
  });
  check_launch(op);
}

}  // namespace ddpm_fast::cuda
