// GroupNorm + time-embedding scale/shift + optional SiLU, forward and backward
// (docs/contracts.md, "GroupNorm + time embedding + SiLU").
//
// Work is described by regions (b, channels [c0, c1), spatial [s0, s1)) of one sample:
//  * NCHW: a channel's spatial row is contiguous, so loops run channel-outer / spatial-inner;
//  * channels-last: a pixel's channels are contiguous, so loops run spatial-outer / channel-inner with
//    per-channel accumulators (vectorized along channels, no strided access).
// "Fused" items are whole groups (NCHW) or whole samples (channels-last): statistics, then the
// normalization, while the data is still in L1/L2 (an NCHW group of 4 x 32 x 32 floats is 16 KiB).
// When there are too few of them to keep every thread busy (e.g. batch 1), the work is split along
// the spatial axis into three parallel phases (partial sums, partial second moments, normalize).
//
// Measured (AMD EPYC Zen 1, (16, 128, 32, 32) f32, G = 32, weight/bias/scale/shift + SiLU): forward
// 6.6 ms on 1 thread, 3.5 ms on 2 (eager PyTorch group_norm + scale/shift + silu: 9.8 ms); without
// SiLU 1.6 ms on 2 threads: the SiLU's exp + division costs more than the memory traffic on Zen 1.
// Backward with all gradients and SiLU: 5.0 ms on 2 threads.
//
// Accuracy: sums run in float over short runs (16 lanes x 16 elements, or 64 pixels per channel)
// and are accumulated in double, and the variance is a true two-pass sum of (h - mean)^2, so the
// statistics are at least as accurate as PyTorch's float32 GroupNorm.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "storage.h"
#include "vec_math.h"

namespace ddpm_fast::cpu {
namespace {

constexpr int kLanes = 16;       // independent float accumulators (two AVX2 registers)
constexpr int64_t kRun = 256;    // elements summed in float before flushing into double
constexpr int64_t kClRows = 64;  // channels-last: pixels summed in float per channel before flushing

// Sum over k in [0, n) of f(k): 16 float lanes per run of 256 elements, runs added in double.
// (A plain `acc += f(k)` loop would stay scalar: without -ffast-math GCC may not reorder a float
// reduction. Lane arrays are independent sums, so the inner loop vectorizes.)
template <class F>
DDPM_ALWAYS_INLINE double lane_sum(int64_t n, F&& f) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kRun) {
    const int64_t len = std::min(kRun, n - k0);
    float acc[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= len; k += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += f(k0 + k + l);
    float tail = 0.0f;
    for (; k < len; ++k) tail += f(k0 + k);
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    total += double(acc[0]) + double(tail);
  }
  return total;
}

// Two sums at once (backward: sum dy1 and sum dy1 * xhat), f(k, a, b) returns both via references.
template <class F>
DDPM_ALWAYS_INLINE void lane_sum2(int64_t n, F&& f, double& out_a, double& out_b) {
  double ta = 0.0, tb = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kRun) {
    const int64_t len = std::min(kRun, n - k0);
    float acc_a[kLanes] = {}, acc_b[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= len; k += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        float a, b;
        f(k0 + k + l, a, b);
        acc_a[l] += a;
        acc_b[l] += b;
      }
    float tail_a = 0.0f, tail_b = 0.0f;
    for (; k < len; ++k) {
      float a, b;
      f(k0 + k, a, b);
      tail_a += a;
      tail_b += b;
    }
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) {
        acc_a[l] += acc_a[l + w];
        acc_b[l] += acc_b[l + w];
      }
    ta += double(acc_a[0]) + double(tail_a);
    tb += double(acc_b[0]) + double(tail_b);
  }
  out_a += ta;
  out_b += tb;
}

// A region of one sample: channels [c0, c1) x spatial [s0, s1).
struct Region {
  int64_t b, c0, c1, s0, s1;
  int64_t nc() const { return c1 - c0; }
  int64_t ns() const { return s1 - s0; }
};

struct GnShape {
  int64_t B, C, S, G, Cg;
  bool cl;
};

// A fused work item -> (sample b, groups [g0, g1)). channels_last items are whole samples (a group's
// channels are interleaved with the others' in memory); NCHW items are single groups.
struct ItemGroups {
  int64_t b, g0, g1;
};
template <bool CL>
inline ItemGroups item_groups(const GnShape& sh, int64_t item) {
  if (CL) return {item, 0, sh.G};
  return {item / sh.G, item % sh.G, item % sh.G + 1};
}

// =============================================================================================
// Forward
// =============================================================================================
struct FwdJob {
  const void* x;  // (B, C, S) dtype, dense
  const float *weight, *bias;              // (C,) or null
  const float *bias_in, *scale, *shift;    // (B, C) or null
  void* y;                                 // (B, C, S) dtype, dense
  float *mean, *rstd;                      // (B, G)
  float eps;
  GnShape sh;
};

// Per-channel sums of x over a region into out[c - c0] (+=).
template <DType D, bool CL>
DDPM_ALWAYS_INLINE void fwd_sum(const FwdJob& J, const Region& r, double* out, float* DDPM_RESTRICT acc) {
  using St = Storage<D>;
  using T = typename St::T;
  const int64_t C = J.sh.C, S = J.sh.S;
  const T* xs = static_cast<const T*>(J.x) + r.b * C * S;
  if constexpr (!CL) {
    for (int64_t c = r.c0; c < r.c1; ++c) {
      const T* row = xs + c * S + r.s0;
      out[c - r.c0] += lane_sum(r.ns(), [&](int64_t k) { return St::load(row[k]); });
    }
  } else {
    const int64_t nc = r.nc();
    for (int64_t p0 = r.s0; p0 < r.s1; p0 += kClRows) {
      const int64_t p1 = std::min(r.s1, p0 + kClRows);
      std::fill(acc, acc + nc, 0.0f);
      for (int64_t s = p0; s < p1; ++s) {
        const T* px = xs + s * C + r.c0;
        for (int64_t c = 0; c < nc; ++c) acc[c] += St::load(px[c]);
      }
      for (int64_t c = 0; c < nc; ++c) out[c] += double(acc[c]);
    }
  }
}

// Per-channel sums of (h - mu[c])^2, h = x + hb[c], over a region into out[c - c0] (+=); mu and hb
// (the group mean and bias_in of each channel) are indexed by channel.
template <DType D, bool CL>
DDPM_ALWAYS_INLINE void fwd_m2(const FwdJob& J, const Region& r, const float* mu, const float* hb, double* out,
                               float* DDPM_RESTRICT acc) {
  using St = Storage<D>;
  using T = typename St::T;
  const int64_t C = J.sh.C, S = J.sh.S;
  const T* xs = static_cast<const T*>(J.x) + r.b * C * S;
  if constexpr (!CL) {
    for (int64_t c = r.c0; c < r.c1; ++c) {
      const T* row = xs + c * S + r.s0;
      const float dc = mu[c], hc = hb[c];
      out[c - r.c0] += lane_sum(r.ns(), [&](int64_t k) {
        const float e = (St::load(row[k]) + hc) - dc;
        return e * e;
      });
    }
  } else {
    const int64_t nc = r.nc();
    const float* dd = mu + r.c0;
    const float* hh = hb + r.c0;
    for (int64_t p0 = r.s0; p0 < r.s1; p0 += kClRows) {
      const int64_t p1 = std::min(r.s1, p0 + kClRows);
      std::fill(acc, acc + nc, 0.0f);
      for (int64_t s = p0; s < p1; ++s) {
        const T* px = xs + s * C + r.c0;
        for (int64_t c = 0; c < nc; ++c) {
          const float e = (St::load(px[c]) + hh[c]) - dd[c];
          acc[c] += e * e;
        }
      }
      for (int64_t c = 0; c < nc; ++c) out[c] += double(acc[c]);
    }
  }
}

// y = act(((x + hb[c]) - mu[c]) * A[c] + Bc[c]) over a region. A and Bc fold rstd, weight/bias and
// scale/shift. h = x + bias_in is rounded to float first, as PyTorch's separate add would (with one
// element per group that makes h - mean exactly 0, as in PyTorch); subtracting the mean before
// scaling keeps large means from cancelling.
template <DType D, bool CL, bool SiLU>
DDPM_ALWAYS_INLINE void fwd_norm(const FwdJob& J, const Region& r, const float* mu, const float* hb, const float* A,
                                 const float* Bc) {
  using St = Storage<D>;
  using T = typename St::T;
  const int64_t C = J.sh.C, S = J.sh.S;
  const T* xs = static_cast<const T*>(J.x) + r.b * C * S;
  T* ys = static_cast<T*>(J.y) + r.b * C * S;
  if constexpr (!CL) {
    for (int64_t c = r.c0; c < r.c1; ++c) {
      const T* DDPM_RESTRICT row = xs + c * S + r.s0;
      T* DDPM_RESTRICT out = ys + c * S + r.s0;
      const float dc = mu[c], hc = hb[c], a = A[c], bc = Bc[c];
      const int64_t n = r.ns();
      for (int64_t k = 0; k < n; ++k) {
        const float v = ((St::load(row[k]) + hc) - dc) * a + bc;
        out[k] = St::store(SiLU ? vm::vsilu(v) : v);
      }
    }
  } else {
    const int64_t nc = r.nc();
    const float* DDPM_RESTRICT dd = mu + r.c0;
    const float* DDPM_RESTRICT hh = hb + r.c0;
    const float* DDPM_RESTRICT aa = A + r.c0;
    const float* DDPM_RESTRICT bb = Bc + r.c0;
    for (int64_t s = r.s0; s < r.s1; ++s) {
      const T* DDPM_RESTRICT px = xs + s * C + r.c0;
      T* DDPM_RESTRICT out = ys + s * C + r.c0;
      for (int64_t c = 0; c < nc; ++c) {
        const float v = ((St::load(px[c]) + hh[c]) - dd[c]) * aa[c] + bb[c];
        out[c] = St::store(SiLU ? vm::vsilu(v) : v);
      }
    }
  }
}

// Per-channel constants of sample b for channels [c0, c1) from the group statistics.
void fwd_consts(const FwdJob& J, int64_t b, int64_t c0, int64_t c1, const float* gmean, const float* grstd,
                float* mu, float* A, float* Bc) {
  const int64_t C = J.sh.C, Cg = J.sh.Cg;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t g = c / Cg;
    const float w = J.weight ? J.weight[c] : 1.0f;
    const float bi = J.bias ? J.bias[c] : 0.0f;
    const float sc1 = 1.0f + (J.scale ? J.scale[b * C + c] : 0.0f);
    const float shf = J.shift ? J.shift[b * C + c] : 0.0f;
    mu[c] = gmean[g];
    A[c] = grstd[g] * w * sc1;
    Bc[c] = bi * sc1 + shf;
  }
}

// Group statistics of sample b, groups [g0, g1), from per-channel sums over all S (sums indexed by
// c - g0 * Cg). Writes mean into gmean[g] (float) and the output tensor.
void fwd_mean(const FwdJob& J, int64_t b, int64_t g0, int64_t g1, const double* csum, float* gmean) {
  const int64_t C = J.sh.C, S = J.sh.S, Cg = J.sh.Cg, G = J.sh.G;
  for (int64_t g = g0; g < g1; ++g) {
    double tot = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
      tot += csum[c - g0 * Cg] + (J.bias_in ? double(S) * double(J.bias_in[b * C + c]) : 0.0);
    gmean[g] = float(tot / double(Cg * S));
    J.mean[b * G + g] = gmean[g];
  }
}

void fwd_rstd(const FwdJob& J, int64_t b, int64_t g0, int64_t g1, const double* cm2, float* grstd) {
  const int64_t S = J.sh.S, Cg = J.sh.Cg, G = J.sh.G;
  for (int64_t g = g0; g < g1; ++g) {
    double m2 = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m2 += cm2[c - g0 * Cg];
    const double var = m2 / double(Cg * S);
    grstd[g] = float(1.0 / std::sqrt(var + double(J.eps)));
    J.rstd[b * G + g] = grstd[g];
  }
}

// Fused item: sample b, groups [g0, g1) over all S. Scratch per thread: see FwdScratch.
struct FwdScratch {
  std::vector<double> sum, m2;
  std::vector<float> acc, d, A, Bc, gmean, grstd, zeros;
  explicit FwdScratch(const GnShape& s)
      : sum(size_t(s.C)), m2(size_t(s.C)), acc(size_t(s.C)), d(size_t(s.C)), A(size_t(s.C)), Bc(size_t(s.C)),
        gmean(size_t(s.G)), grstd(size_t(s.G)), zeros(size_t(s.C)) {}
};

template <DType D, bool CL, bool SiLU>
DDPM_TARGET_CLONES void fwd_fused_items(const FwdJob& J, int64_t begin, int64_t end) {
  const GnShape& sh = J.sh;
  FwdScratch w(sh);
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, g0, g1] = item_groups<CL>(sh, item);
    const Region r{b, g0 * sh.Cg, g1 * sh.Cg, 0, sh.S};
    std::fill(w.sum.begin(), w.sum.begin() + r.nc(), 0.0);
    std::fill(w.m2.begin(), w.m2.begin() + r.nc(), 0.0);
    fwd_sum<D, CL>(J, r, w.sum.data(), w.acc.data());
    fwd_mean(J, b, g0, g1, w.sum.data(), w.gmean.data());
    const float* hb = J.bias_in ? J.bias_in + b * sh.C : w.zeros.data();
    for (int64_t c = r.c0; c < r.c1; ++c) w.d[c] = w.gmean[c / sh.Cg];
    fwd_m2<D, CL>(J, r, w.d.data(), hb, w.m2.data(), w.acc.data());
    fwd_rstd(J, b, g0, g1, w.m2.data(), w.grstd.data());
    fwd_consts(J, b, r.c0, r.c1, w.gmean.data(), w.grstd.data(), w.d.data(), w.A.data(), w.Bc.data());
    fwd_norm<D, CL, SiLU>(J, r, w.d.data(), hb, w.A.data(), w.Bc.data());
  }
}

// Split phases: item = (b, spatial chunk k) over all channels; partial sums at part[(b * K + k) * C].
template <DType D, bool CL>
DDPM_TARGET_CLONES void fwd_split_sum(const FwdJob& J, int64_t K, int64_t chunk, int64_t begin, int64_t end,
                                      double* part, const float* mu /* (B, C) or null */) {
  const GnShape& sh = J.sh;
  std::vector<float> acc(size_t(sh.C)), zeros(size_t(sh.C));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / K, k = item % K;
    const Region r{b, 0, sh.C, k * chunk, std::min(sh.S, (k + 1) * chunk)};
    double* out = part + item * sh.C;
    std::fill(out, out + sh.C, 0.0);
    if (mu)
      fwd_m2<D, CL>(J, r, mu + b * sh.C, J.bias_in ? J.bias_in + b * sh.C : zeros.data(), out, acc.data());
    else
      fwd_sum<D, CL>(J, r, out, acc.data());
  }
}

template <DType D, bool CL, bool SiLU>
DDPM_TARGET_CLONES void fwd_split_norm(const FwdJob& J, int64_t K, int64_t chunk, int64_t begin, int64_t end,
                                       const float* mu, const float* A, const float* Bc) {
  const GnShape& sh = J.sh;
  std::vector<float> zeros(size_t(sh.C));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / K, k = item % K;
    const Region r{b, 0, sh.C, k * chunk, std::min(sh.S, (k + 1) * chunk)};
    fwd_norm<D, CL, SiLU>(J, r, mu + b * sh.C, J.bias_in ? J.bias_in + b * sh.C : zeros.data(), A + b * sh.C,
                          Bc + b * sh.C);
  }
}

// Sum the K chunk partials of each (b, c) in a fixed order (deterministic).
void reduce_chunks(const double* part, int64_t B, int64_t K, int64_t C, double* out /* (B, C) */) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += part[(b * K + k) * C + c];
      out[b * C + c] = s;
    }
}

// How to split: fused items when there are enough of them, else K spatial chunks per sample.
struct Plan {
  bool fused;
  int64_t items;  // fused items, or B * K
  int64_t K, chunk;
  int nt;
};

Plan make_plan(const GnShape& sh, int num_threads, int64_t grain) {
  Plan p{};
  p.nt = threads_for(sh.B * sh.C * sh.S, grain, num_threads);
  const int64_t fused_items = sh.cl ? sh.B : sh.B * sh.G;
  // Fused when every thread gets the same number of items or at least 4 (imbalance <= 25 %).
  p.fused = p.nt == 1 || fused_items >= 4 * p.nt || (fused_items >= p.nt && fused_items % p.nt == 0);
  if (p.fused) {
    p.items = fused_items;
    p.K = 1;
    p.chunk = sh.S;
  } else {
    const int64_t want = ceil_div<int64_t>(4 * p.nt, sh.B);  // chunks per sample
    p.chunk = std::max<int64_t>(std::min<int64_t>(64, sh.S), ceil_div(sh.S, want));
    p.K = ceil_div(sh.S, p.chunk);
    p.items = sh.B * p.K;
  }
  return p;
}

template <DType D, bool CL, bool SiLU>
void run_forward(const FwdJob& J, int num_threads) {
  const GnShape& sh = J.sh;
  // Memory-bound, ~0.5 ns per element per core: 128 Ki elements (~65 us) per extra thread.
  const Plan p = make_plan(sh, num_threads, int64_t(1) << 17);
  if (p.fused) {
    parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) { fwd_fused_items<D, CL, SiLU>(J, i0, i1); });
    return;
  }
  const int64_t B = sh.B, C = sh.C;
  std::vector<double> part(size_t(p.items * C)), red(size_t(B * C));
  std::vector<float> d(size_t(B * C)), A(size_t(B * C)), Bc(size_t(B * C)), gmean(size_t(sh.G)), grstd(size_t(sh.G));
  parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
    fwd_split_sum<D, CL>(J, p.K, p.chunk, i0, i1, part.data(), nullptr);
  });
  reduce_chunks(part.data(), B, p.K, C, red.data());
  std::vector<float> gm(size_t(B * sh.G));
  for (int64_t b = 0; b < B; ++b) {
    fwd_mean(J, b, 0, sh.G, red.data() + b * C, gm.data() + b * sh.G);
    for (int64_t c = 0; c < C; ++c) d[b * C + c] = gm[b * sh.G + c / sh.Cg];
  }
  parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
    fwd_split_sum<D, CL>(J, p.K, p.chunk, i0, i1, part.data(), d.data());
  });
  reduce_chunks(part.data(), B, p.K, C, red.data());
  for (int64_t b = 0; b < B; ++b) {
    fwd_rstd(J, b, 0, sh.G, red.data() + b * C, grstd.data());
    fwd_consts(J, b, 0, C, gm.data() + b * sh.G, grstd.data(), d.data() + b * C, A.data() + b * C,
               Bc.data() + b * C);
  }
  parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
    fwd_split_norm<D, CL, SiLU>(J, p.K, p.chunk, i0, i1, d.data(), A.data(), Bc.data());
  });
}

// =============================================================================================
// Backward
// =============================================================================================
struct BwdJob {
  const void *dy, *x;                      // (B, C, S) dtype, dense
  const float *weight, *bias;              // (C,) or null
  const float *bias_in, *scale, *shift;    // (B, C) or null
  const float *mean, *rstd;                // (B, G)
  void* dx;                                // (B, C, S) dtype or null
  float *dweight, *dbias;                  // (C,) or null
  float *dbias_in, *dscale, *dshift;       // (B, C) or null
  GnShape sh;
};

// Per-channel constants of one sample (arrays indexed by channel):
//   xhat = ((x + hb) - d) * rstd  (hb = bias_in, d = the group mean);  y1 = xhat * W + B1 (only for SiLU);  dxhat = dy1 * k;
//   dh = rstd * (dxhat - m1 - xhat * m2)
struct BwdConsts {
  std::vector<float> d, hb, rstd, W, B1, k, m1, m2;
  explicit BwdConsts(int64_t n)
      : d(size_t(n)), hb(size_t(n)), rstd(size_t(n)), W(size_t(n)), B1(size_t(n)), k(size_t(n)), m1(size_t(n)),
        m2(size_t(n)) {}
};

void bwd_consts(const BwdJob& J, int64_t b, int64_t c0, int64_t c1, BwdConsts& K) {
  float *d = K.d.data(), *hb = K.hb.data(), *rs = K.rstd.data(), *W = K.W.data(), *B1 = K.B1.data(), *k = K.k.data();
  const int64_t C = J.sh.C, G = J.sh.G, Cg = J.sh.Cg;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t g = c / Cg;
    const float w = J.weight ? J.weight[c] : 1.0f;
    const float bi = J.bias ? J.bias[c] : 0.0f;
    const float sc1 = 1.0f + (J.scale ? J.scale[b * C + c] : 0.0f);
    const float shf = J.shift ? J.shift[b * C + c] : 0.0f;
    d[c] = J.mean[b * G + g];
    hb[c] = J.bias_in ? J.bias_in[b * C + c] : 0.0f;
    rs[c] = J.rstd[b * G + g];
    W[c] = w * sc1;
    B1[c] = bi * sc1 + shf;
    k[c] = sc1 * w;
  }
}

// dy1 = dy * silu'(y1) (or dy) of one element.
template <bool SiLU>
DDPM_ALWAYS_INLINE float dy1_of(float dy, float xhat, float W, float B1) {
  if constexpr (SiLU) {
    const float y1 = xhat * W + B1;
    const float sg = vm::vsigmoid(y1);
    return dy * (sg * (1.0f + y1 * (1.0f - sg)));
  } else {
    (void)xhat, (void)W, (void)B1;
    return dy;
  }
}

// One channels-last pixel of pass 1. A separate function because GCC only trusts `restrict` on
// parameters: with local restrict pointers it wanted 15 run-time alias checks (limit 10) and left
// the loop scalar (50 ms instead of ~10 ms for (16, 128, 32, 32)).
template <DType D, bool SiLU>
DDPM_ALWAYS_INLINE void bwd1_cl_pixel(const typename Storage<D>::T* DDPM_RESTRICT px,
                                      const typename Storage<D>::T* DDPM_RESTRICT pd, const float* DDPM_RESTRICT dd,
                                      const float* DDPM_RESTRICT hh, const float* DDPM_RESTRICT rr,
                                      const float* DDPM_RESTRICT WW, const float* DDPM_RESTRICT BB,
                                      float* DDPM_RESTRICT br, float* DDPM_RESTRICT acc1, float* DDPM_RESTRICT acc2,
                                      int64_t nc) {
  using St = Storage<D>;
  for (int64_t c = 0; c < nc; ++c) {
    const float xh = ((St::load(px[c]) + hh[c]) - dd[c]) * rr[c];
    const float g = dy1_of<SiLU>(St::load(pd[c]), xh, WW[c], BB[c]);
    br[c] = g;
    acc1[c] += g;
    acc2[c] += g * xh;
  }
}

// Pass 1 over a region: dy1 into buf (region order: NCHW (c - c0) * ns + s - s0, channels-last
// (s - s0) * nc + c - c0) and per-channel sums S1 += sum dy1, S2 += sum dy1 * xhat (index c - c0).
template <DType D, bool CL, bool SiLU>
DDPM_ALWAYS_INLINE void bwd_pass1(const BwdJob& J, const Region& r, const BwdConsts& K, float* DDPM_RESTRICT buf,
                                  double* S1, double* S2, float* DDPM_RESTRICT acc1, float* DDPM_RESTRICT acc2) {
  using St = Storage<D>;
  using T = typename St::T;
  const int64_t C = J.sh.C, S = J.sh.S, ns = r.ns(), nc = r.nc();
  const T* xs = static_cast<const T*>(J.x) + r.b * C * S;
  const T* dys = static_cast<const T*>(J.dy) + r.b * C * S;
  if constexpr (!CL) {
    for (int64_t c = r.c0; c < r.c1; ++c) {
      const T* xr = xs + c * S + r.s0;
      const T* dr = dys + c * S + r.s0;
      float* br = buf + (c - r.c0) * ns;
      const float dc = K.d[c], hc = K.hb[c], rs = K.rstd[c], W = K.W[c], B1 = K.B1[c];
      lane_sum2(
          ns,
          [&](int64_t q, float& a, float& bq) {
            const float xh = ((St::load(xr[q]) + hc) - dc) * rs;
            const float g = dy1_of<SiLU>(St::load(dr[q]), xh, W, B1);
            br[q] = g;
            a = g;
            bq = g * xh;
          },
          S1[c - r.c0], S2[c - r.c0]);
    }
  } else {
    const float* DDPM_RESTRICT dd = K.d.data() + r.c0;
    const float* DDPM_RESTRICT hh = K.hb.data() + r.c0;
    const float* DDPM_RESTRICT rr = K.rstd.data() + r.c0;
    const float* DDPM_RESTRICT WW = K.W.data() + r.c0;
    const float* DDPM_RESTRICT BB = K.B1.data() + r.c0;
    for (int64_t p0 = r.s0; p0 < r.s1; p0 += kClRows) {
      const int64_t p1 = std::min(r.s1, p0 + kClRows);
      std::fill(acc1, acc1 + nc, 0.0f);
      std::fill(acc2, acc2 + nc, 0.0f);
      for (int64_t s = p0; s < p1; ++s) {
        const T* DDPM_RESTRICT px = xs + s * C + r.c0;
        const T* DDPM_RESTRICT pd = dys + s * C + r.c0;
        bwd1_cl_pixel<D, SiLU>(px, pd, dd, hh, rr, WW, BB, buf + (s - r.s0) * nc, acc1, acc2, nc);
      }
      for (int64_t c = 0; c < nc; ++c) {
        S1[c] += double(acc1[c]);
        S2[c] += double(acc2[c]);
      }
    }
  }
}

// Pass 2 over a region: dh = rstd * (k * dy1 - m1 - xhat * m2) -> dx (if given), and per-channel
// sums of dh into DB[c - c0] (if DB is given).
template <DType D, bool CL>
DDPM_ALWAYS_INLINE void bwd_pass2(const BwdJob& J, const Region& r, const BwdConsts& K, const float* DDPM_RESTRICT buf,
                                  double* DB, float* DDPM_RESTRICT acc1) {
  using St = Storage<D>;
  using T = typename St::T;
  const int64_t C = J.sh.C, S = J.sh.S, ns = r.ns(), nc = r.nc();
  const T* xs = static_cast<const T*>(J.x) + r.b * C * S;
  T* dxs = J.dx ? static_cast<T*>(J.dx) + r.b * C * S : nullptr;
  if constexpr (!CL) {
    for (int64_t c = r.c0; c < r.c1; ++c) {
      const T* DDPM_RESTRICT xr = xs + c * S + r.s0;
      const float* DDPM_RESTRICT br = buf + (c - r.c0) * ns;
      const float dc = K.d[c], hc = K.hb[c], rs = K.rstd[c], kk = K.k[c], m1 = K.m1[c], m2 = K.m2[c];
      auto dh_at = [&](int64_t q) {
        const float xh = ((St::load(xr[q]) + hc) - dc) * rs;
        return rs * (kk * br[q] - m1 - xh * m2);
      };
      if (dxs) {
        T* DDPM_RESTRICT out = dxs + c * S + r.s0;
        for (int64_t q = 0; q < ns; ++q) out[q] = St::store(dh_at(q));
      }
      if (DB) DB[c - r.c0] += lane_sum(ns, dh_at);
    }
  } else {
    const float* DDPM_RESTRICT dd = K.d.data() + r.c0;
    const float* DDPM_RESTRICT hh = K.hb.data() + r.c0;
    const float* DDPM_RESTRICT rr = K.rstd.data() + r.c0;
    const float* DDPM_RESTRICT kk = K.k.data() + r.c0;
    const float* DDPM_RESTRICT mm1 = K.m1.data() + r.c0;
    const float* DDPM_RESTRICT mm2 = K.m2.data() + r.c0;
    for (int64_t p0 = r.s0; p0 < r.s1; p0 += kClRows) {
      const int64_t p1 = std::min(r.s1, p0 + kClRows);
      if (DB) std::fill(acc1, acc1 + nc, 0.0f);
      for (int64_t s = p0; s < p1; ++s) {
        const T* DDPM_RESTRICT px = xs + s * C + r.c0;
        const float* DDPM_RESTRICT br = buf + (s - r.s0) * nc;
        if (dxs) {
          T* DDPM_RESTRICT out = dxs + s * C + r.c0;
          for (int64_t c = 0; c < nc; ++c) {
            const float xh = ((St::load(px[c]) + hh[c]) - dd[c]) * rr[c];
            out[c] = St::store(rr[c] * (kk[c] * br[c] - mm1[c] - xh * mm2[c]));
          }
        }
        if (DB) {
          for (int64_t c = 0; c < nc; ++c) {
            const float xh = ((St::load(px[c]) + hh[c]) - dd[c]) * rr[c];
            acc1[c] += rr[c] * (kk[c] * br[c] - mm1[c] - xh * mm2[c]);
          }
        }
      }
      if (DB)
        for (int64_t c = 0; c < nc; ++c) DB[c] += double(acc1[c]);
    }
  }
}

// From per-channel S1, S2 of sample b (all S; arrays indexed by c - c0, whole groups g0..g1):
// the (B, C) outputs, the dweight / dbias partials (pw, pb: (B, C) double) and m1 / m2.
void bwd_finish_stats(const BwdJob& J, int64_t b, int64_t g0, int64_t g1, const double* S1, const double* S2,
                      BwdConsts& K, double* pw, double* pb) {
  const GnShape& sh = J.sh;
  const int64_t C = sh.C, Cg = sh.Cg, c0 = g0 * Cg;
  const double inv_n = 1.0 / double(Cg * sh.S);
  for (int64_t g = g0; g < g1; ++g) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      const double s1 = S1[c - c0], s2 = S2[c - c0];
      const float w = J.weight ? J.weight[c] : 1.0f;
      const float bi = J.bias ? J.bias[c] : 0.0f;
      const double sc1 = 1.0 + (J.scale ? double(J.scale[b * C + c]) : 0.0);
      if (J.dshift) J.dshift[b * C + c] = float(s1);
      if (J.dscale) J.dscale[b * C + c] = float(double(w) * s2 + double(bi) * s1);  // sum dy1 * y0
      pw[b * C + c] = sc1 * s2;   // sum dy0 * xhat
      pb[b * C + c] = sc1 * s1;   // sum dy0
      a1 += double(K.k[c]) * s1;  // sum dxhat
      a2 += double(K.k[c]) * s2;  // sum dxhat * xhat
    }
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      K.m1[c] = float(a1 * inv_n);
      K.m2[c] = float(a2 * inv_n);
    }
  }
}

struct BwdScratch {
  BwdConsts K;
  std::vector<double> S1, S2, DB;
  std::vector<float> acc1, acc2, buf;
  BwdScratch(const GnShape& s, int64_t buf_elems)
      : K(s.C), S1(size_t(s.C)), S2(size_t(s.C)), DB(size_t(s.C)), acc1(size_t(s.C)), acc2(size_t(s.C)),
        buf(size_t(buf_elems)) {}
};

template <DType D, bool CL, bool SiLU>
DDPM_TARGET_CLONES void bwd_fused_items(const BwdJob& J, int64_t begin, int64_t end, double* pw, double* pb) {
  const GnShape& sh = J.sh;
  BwdScratch w(sh, CL ? sh.C * sh.S : sh.Cg * sh.S);  // dy1 of one item stays in cache for pass 2
  const bool pass2 = J.dx || J.dbias_in;
  for (int64_t item = begin; item < end; ++item) {
    const auto [b, g0, g1] = item_groups<CL>(sh, item);
    const Region r{b, g0 * sh.Cg, g1 * sh.Cg, 0, sh.S};
    bwd_consts(J, b, r.c0, r.c1, w.K);
    std::fill(w.S1.begin(), w.S1.begin() + r.nc(), 0.0);
    std::fill(w.S2.begin(), w.S2.begin() + r.nc(), 0.0);
    bwd_pass1<D, CL, SiLU>(J, r, w.K, w.buf.data(), w.S1.data(), w.S2.data(), w.acc1.data(), w.acc2.data());
    bwd_finish_stats(J, b, g0, g1, w.S1.data(), w.S2.data(), w.K, pw, pb);
    if (!pass2) continue;
    double* DB = J.dbias_in ? w.DB.data() : nullptr;
    if (DB) std::fill(w.DB.begin(), w.DB.begin() + r.nc(), 0.0);
    bwd_pass2<D, CL>(J, r, w.K, w.buf.data(), DB, w.acc1.data());
    if (DB)
      for (int64_t c = r.c0; c < r.c1; ++c) J.dbias_in[b * sh.C + c] = float(DB[c - r.c0]);
  }
}

// Split phase 1 (second == false): partial S1 / S2 per (b, chunk) at p1 / p2[(b * K + k) * C].
// Split phase 2 (second == true): dy1 recomputed, dh -> dx, partial dbias_in at p1.
template <DType D, bool CL, bool SiLU>
DDPM_TARGET_CLONES void bwd_split_items(const BwdJob& J, int64_t K, int64_t chunk, int64_t begin, int64_t end,
                                        const BwdConsts* consts /* per sample b */, bool second, double* p1,
                                        double* p2) {
  const GnShape& sh = J.sh;
  std::vector<float> buf(size_t(sh.C * chunk)), acc1(size_t(sh.C)), acc2(size_t(sh.C));
  std::vector<double> junk1(size_t(sh.C)), junk2(size_t(sh.C));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / K, k = item % K;
    const Region r{b, 0, sh.C, k * chunk, std::min(sh.S, (k + 1) * chunk)};
    const BwdConsts& Kc = consts[b];
    if (!second) {
      double* o1 = p1 + item * sh.C;
      double* o2 = p2 + item * sh.C;
      std::fill(o1, o1 + sh.C, 0.0);
      std::fill(o2, o2 + sh.C, 0.0);
      bwd_pass1<D, CL, SiLU>(J, r, Kc, buf.data(), o1, o2, acc1.data(), acc2.data());
    } else {
      bwd_pass1<D, CL, SiLU>(J, r, Kc, buf.data(), junk1.data(), junk2.data(), acc1.data(), acc2.data());
      double* DB = J.dbias_in ? p1 + item * sh.C : nullptr;
      if (DB) std::fill(DB, DB + sh.C, 0.0);
      bwd_pass2<D, CL>(J, r, Kc, buf.data(), DB, acc1.data());
    }
  }
}

template <DType D, bool CL, bool SiLU>
void run_backward(const BwdJob& J, int num_threads) {
  const GnShape& sh = J.sh;
  const int64_t B = sh.B, C = sh.C;
  std::vector<double> pw(size_t(B * C)), pb(size_t(B * C));
  // Backward reads two tensors and writes one: ~1 ns per element per core with SiLU.
  const Plan p = make_plan(sh, num_threads, int64_t(1) << 16);
  if (p.fused) {
    parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
      bwd_fused_items<D, CL, SiLU>(J, i0, i1, pw.data(), pb.data());
    });
  } else {
    std::vector<BwdConsts> consts;
    consts.reserve(size_t(B));
    for (int64_t b = 0; b < B; ++b) {
      consts.emplace_back(C);
      BwdConsts& K = consts.back();
      bwd_consts(J, b, 0, C, K);
    }
    std::vector<double> p1(size_t(p.items * C)), p2(size_t(p.items * C)), S1(size_t(B * C)), S2(size_t(B * C));
    parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
      bwd_split_items<D, CL, SiLU>(J, p.K, p.chunk, i0, i1, consts.data(), false, p1.data(), p2.data());
    });
    reduce_chunks(p1.data(), B, p.K, C, S1.data());
    reduce_chunks(p2.data(), B, p.K, C, S2.data());
    for (int64_t b = 0; b < B; ++b)
      bwd_finish_stats(J, b, 0, sh.G, S1.data() + b * C, S2.data() + b * C, consts[size_t(b)], pw.data(), pb.data());
    if (J.dx || J.dbias_in) {
      parallel_for(p.items, p.nt, [&](int64_t i0, int64_t i1) {
        bwd_split_items<D, CL, SiLU>(J, p.K, p.chunk, i0, i1, consts.data(), true, p1.data(), nullptr);
      });
      if (J.dbias_in) {
        reduce_chunks(p1.data(), B, p.K, C, S1.data());
        for (int64_t i = 0; i < B * C; ++i) J.dbias_in[i] = float(S1[size_t(i)]);
      }
    }
  }
  // dweight / dbias: sum the per-sample partials over b in a fixed order (deterministic).
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      sw += pw[size_t(b * C + c)];
      sb += pb[size_t(b * C + c)];
    }
    if (J.dweight) J.dweight[c] = float(sw);
    if (J.dbias) J.dbias[c] = float(sb);
  }
}

}  // namespace

void group_norm_forward(const void* x, const float* weight, const float* bias, const float* bias_in,
                        const float* scale, const float* shift, void* y, float* mean, float* rstd, int64_t B,
                        int64_t C, int64_t S, int64_t G, float eps, Activation act, Layout layout, DType dtype,
                        int num_threads) {
  if (!group_norm_forward_has_work(x, y, mean, rstd, B, C, S, G, act, layout)) return;
  const FwdJob J{x, weight, bias, bias_in, scale, shift, y, mean, rstd, eps,
                 GnShape{B, C, S, G, C / G, layout == Layout::ChannelsLast}};
  const bool silu = act == Activation::SiLU;
  DDPM_DISPATCH_DTYPE(dtype, D, {
    if (J.sh.cl) {
      if (silu) run_forward<D, true, true>(J, num_threads);
      else run_forward<D, true, false>(J, num_threads);
    } else {
      if (silu) run_forward<D, false, true>(J, num_threads);
      else run_forward<D, false, false>(J, num_threads);
    }
  });
}

void group_norm_backward(const void* dy, const void* x, const float* weight, const float* bias,
                         const float* bias_in, const float* scale, const float* shift, const float* mean,
                         const float* rstd, void* dx, float* dweight, float* dbias, float* dbias_in, float* dscale,
                         float* dshift, int64_t B, int64_t C, int64_t S, int64_t G, Activation act, Layout layout,
                         DType dtype, int num_threads) {
  check_group_norm_args("group_norm_backward", B, C, S, G, act, layout);
  if (C == 0) return;
  if (B == 0 || S == 0) {  // empty sums: zero gradients of the parameters
    for (int64_t c = 0; c < C; ++c) {
      if (dweight) dweight[c] = 0.0f;
      if (dbias) dbias[c] = 0.0f;
    }
    for (int64_t i = 0; i < B * C; ++i) {
      if (dbias_in) dbias_in[i] = 0.0f;
      if (dscale) dscale[i] = 0.0f;
      if (dshift) dshift[i] = 0.0f;
    }
    return;
  }
  DDPM_CHECK(dy && x && mean && rstd, "group_norm_backward: dy, x, mean and rstd must be given");
  const BwdJob J{dy, x, weight, bias, bias_in, scale, shift, mean, rstd, dx, dweight, dbias, dbias_in, dscale,
                 dshift, GnShape{B, C, S, G, C / G, layout == Layout::ChannelsLast}};
  const bool silu = act == Activation::SiLU;
  DDPM_DISPATCH_DTYPE(dtype, D, {
    if (J.sh.cl) {
      if (silu) run_backward<D, true, true>(J, num_threads);
      else run_backward<D, true, false>(J, num_threads);
    } else {
      if (silu) run_backward<D, false, true>(J, num_threads);
      else run_backward<D, false, false>(J, num_threads);
    }
  });
}

}  // namespace ddpm_fast::cpu
