// q_sample: x_t = a[t] * x0 + b[t] * eps, target = eps or a * eps - b * x0 (docs/contracts.md,
// "q_sample table"), eps given or drawn from the contract's Philox normals.
//
// Work is split into items of <= 2048 elements (one sample's chunk or channels-last tile), so that
// the noise buffer stays in L1 between generation and use and both threads get balanced work.
//
// Measured (AMD EPYC Zen 1, (64, 3, 64, 64) f32, drawn noise): 3.9 ms on 1 thread, 2.15 ms on 2
// (eager PyTorch randn_like + math: 6.9 ms); ~90 % of it is Philox + Box-Muller (normal.cpp). Given
// noise is memory-bound: 0.8 ms.
#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "noise.h"
#include "parallel.h"
#include "storage.h"
#include "vec_math.h"

namespace ddpm_fast::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per item (NCHW or given noise); == kTileElems
static_assert(kChunk >= kTileElems, "the noise buffer must hold a channels-last tile");

struct QSampleJob {
  const void* x0;         // (B, C, S) dtype, batch stride x0_bs
  int64_t x0_bs;
  const void* noise;      // (B, C, S) dtype, batch stride noise_bs, or null
  int64_t noise_bs;
  const int64_t* t;       // (B,)
  const float* table;     // (T, 2)
  const int64_t* seeds;   // (B,) when noise is null
  uint64_t stream;
  void* x_t;              // (B, C, S) dtype, dense
  void* target;           // (B, C, S) dtype, dense
  bool v_target;
  int64_t C, S;
  bool channels_last;
  bool draw;              // noise drawn here (tiles matter) rather than read
  ClTiling tiling;
  int64_t items_per_sample;
};

// out = a * x0 + b * z and target = z or a * z - b * x0 on n contiguous elements (z: float32).
template <DType D>
DDPM_ALWAYS_INLINE void qs_elementwise(const typename Storage<D>::T* DDPM_RESTRICT x0,
                                       const float* DDPM_RESTRICT z, typename Storage<D>::T* DDPM_RESTRICT xt,
                                       typename Storage<D>::T* DDPM_RESTRICT tgt, int64_t n, float a, float b,
                                       bool v_target) {
  using St = Storage<D>;
  if (v_target) {
    for (int64_t k = 0; k < n; ++k) {
      const float x = St::load(x0[k]), e = z[k];
      xt[k] = St::store(a * x + b * e);
      tgt[k] = St::store(a * e - b * x);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const float x = St::load(x0[k]), e = z[k];
      xt[k] = St::store(a * x + b * e);
      tgt[k] = St::store(e);
    }
  }
}

template <DType D>
DDPM_TARGET_CLONES void qs_items(const QSampleJob& J, int64_t begin, int64_t end) {
  using St = Storage<D>;
  using T = typename St::T;
  alignas(64) float zbuf[kChunk];
  alignas(64) float scratch[kTileElems];
  const int64_t n = J.C * J.S;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / J.items_per_sample, k = item % J.items_per_sample;
    const float* row = J.table + 2 * J.t[b];
    const float a = row[0], bb = row[1];
    const T* x0 = static_cast<const T*>(J.x0) + b * J.x0_bs;
    T* xt = static_cast<T*>(J.x_t) + b * n;
    T* tgt = static_cast<T*>(J.target) + b * n;
    if (!J.draw || !J.channels_last) {
      // Memory chunk [p0, p0 + len): for NCHW also logical indices [p0, p0 + len).
      const int64_t p0 = k * kChunk, len = std::min(kChunk, n - p0);
      const float* z = zbuf;
      if (J.draw) {
        normal_range(PhiloxKey(J.seeds[b]), J.stream, uint64_t(p0), len, zbuf);
      } else {
        const T* nz = static_cast<const T*>(J.noise) + b * J.noise_bs + p0;
        if constexpr (D == DType::Float32) {
          z = nz;
        } else {
          for (int64_t q = 0; q < len; ++q) zbuf[q] = St::load(nz[q]);
        }
      }
      qs_elementwise<D>(x0 + p0, z, xt + p0, tgt + p0, len, a, bb, J.v_target);
    } else {
      const auto [c0, s0, ct, ts] = J.tiling.span(k, J.C, J.S);
      normal_tile_cl(PhiloxKey(J.seeds[b]), J.stream, J.S, c0, ct, s0, ts, scratch, zbuf);
      if (ct == J.C) {  // whole pixels: one contiguous memory range
        const int64_t p0 = s0 * J.C;
        qs_elementwise<D>(x0 + p0, zbuf, xt + p0, tgt + p0, ts * ct, a, bb, J.v_target);
      } else {
        for (int64_t s = 0; s < ts; ++s) {
          const int64_t p0 = (s0 + s) * J.C + c0;
          qs_elementwise<D>(x0 + p0, zbuf + s * ct, xt + p0, tgt + p0, ct, a, bb, J.v_target);
        }
      }
    }
  }
}

}  // namespace

void q_sample(const void* x0, int64_t x0_bstride, const int64_t* t, const float* table, int64_t num_t,
              const void* noise, int64_t noise_bstride, const int64_t* seeds, uint64_t stream,
              void* x_t, void* target, int target_kind, int64_t B, int64_t C, int64_t S, Layout layout,
              DType dtype, int num_threads) {
  if (!check_q_sample_args(x0, t, table, noise, seeds, x_t, target, target_kind, B, C, S, layout)) return;
  for (int64_t b = 0; b < B; ++b)
    DDPM_CHECK(t[b] >= 0 && t[b] < num_t, "q_sample: t[", b, "] = ", t[b], " is outside [0, ", num_t, ")");

  QSampleJob J{x0, x0_bstride, noise, noise_bstride, t, table, seeds, stream, x_t, target,
               target_kind == int(Target::V), C, S, layout == Layout::ChannelsLast, noise == nullptr,
               cl_tiling(C, S), 0};
  const int64_t n = C * S;
  J.items_per_sample = (J.draw && J.channels_last) ? J.tiling.count() : ceil_div(n, kChunk);
  // Thread start-up is ~30 us; drawing costs ~2 ns per element per core (64K elements ~ 130 us),
  // the given-noise form is memory-bound at ~0.3 ns per element.
  const int64_t grain = J.draw ? (int64_t(1) << 16) : (int64_t(1) << 18);
  const int nt = threads_for(B * n, grain, num_threads);
  DDPM_DISPATCH_DTYPE(dtype, D, parallel_for(B * J.items_per_sample, nt,
                                             [&](int64_t b0, int64_t b1) { qs_items<D>(J, b0, b1); }));
}

}  // namespace ddpm_fast::cpu
