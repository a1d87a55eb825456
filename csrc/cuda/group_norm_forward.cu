// GroupNorm + time embedding + SiLU, forward, on the GPU (the design: group_norm.cuh).
#include "group_norm.cuh"

namespace ddpm_fast::cuda {
namespace {
using namespace gn;

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

// The statistics' shift of channel c over pixels [s0, s1): the median of five pixels spread over them (the
// first, the last, three between). Shifted float sums lose ((shift - mean) / std)^2 of their precision: the
// first pixel alone, 100 std off (a corner after zero padding), cost rstd 1e-4 of its value in a group of
// 2**15; a median of five passes over two such pixels.
template <bool kCL, typename T>
__device__ __forceinline__ float statistics_shift(const Geo& g, const T* xs, int64_t c, int64_t s0, int64_t s1) {
  float v[5];
  const int64_t last = s1 - 1 - s0;
#pragma unroll
  for (int i = 0; i < 5; ++i) v[i] = load1(xs + offset<kCL>(g, c, s0 + last * i / 4));
#pragma unroll
  for (int i = 1; i < 5; ++i) {  // insertion sort (a NaN among them may land anywhere: the group's sums are NaN)
    for (int j = i; j > 0 && v[j] < v[j - 1]; --j) {
      const float t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
    }
  }
  return v[2];
}

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
  DDPM_DYNAMIC_SHARED(smem_raw);
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
    sm.shift[cl] = statistics_shift<kCL>(g, xs, c, R.s0, R.s1) + h;
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

// with_launch for the forward kernels.
template <typename T, class F>
void with_forward_launch(int64_t B, int64_t C, int64_t S, int64_t G, bool cl, bool aligned, F&& f) {
  with_launch<T, 1>(
      B, C, S, G, cl, aligned,
      [](auto kcl, auto n) { return gn_forward_kernel<T, decltype(kcl)::value, decltype(n)::value>; },
      [](const Geo& g, int pairs) { return FwdSmem::bytes(g.CS, g.GS, pairs); }, f);
}

}  // namespace

std::string group_norm_refusal(int64_t B, int64_t C, int64_t S, int64_t G, Layout layout, DType dtype,
                               bool backward) {
  check_group_norm_args("group_norm_refusal", B, C, S, G, Activation::SiLU, layout);
  std::string why = channels_refusal(C / G);
  if (!why.empty() || B == 0 || C == 0 || S == 0) return why;
  const bool cl = layout == Layout::ChannelsLast;
  DDPM_CUDA_DISPATCH(dtype, T, {
    why = refusal_at_any_alignment("group_norm_silu", [&](bool aligned, auto&& f) {
      with_forward_launch<T>(B, C, S, G, cl, aligned, f);
    });
  });
  return why.empty() && backward ? gn::backward_refusal(B, C, S, G, cl, dtype) : why;
}

void group_norm_forward(const void* x, const float* weight, const float* bias, const float* bias_in,
                        const float* scale, const float* shift, void* y, float* mean, float* rstd, int64_t B,
                        int64_t C, int64_t S, int64_t G, float eps, Activation act, Layout layout, DType dtype,
                        uintptr_t cuda_stream) {
  if (!group_norm_forward_has_work(x, y, mean, rstd, B, C, S, G, act, layout)) return;
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  const bool cl = layout == Layout::ChannelsLast;
  DDPM_CUDA_DISPATCH(dtype, T, {
    const FwdArgs<T> args{static_cast<const T*>(x), weight, bias, bias_in, scale, shift, static_cast<T*>(y),
                          mean, rstd, eps, act == Activation::SiLU};
    with_forward_launch<T>(B, C, S, G, cl, all_aligned16({x, y}), [&](auto kernel, const Geo& g, size_t smem) {
      launch("group_norm_silu", kernel, args, g, smem, s);
    });
  });
  check_launch("group_norm_silu");
}

}  // namespace ddpm_fast::cuda
