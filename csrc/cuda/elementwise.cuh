// The two ways q_sample and step walk a (B, C, S) tensor while drawing the contract's noise:
//  * flat: memory order in units of N elements (one 16-byte access, or 4 elements on the scalar path).
//    Noise is drawn here only for NCHW, where the memory index is the logical index, so a unit
//    starting at i0 (a multiple of 4) takes Philox groups j = i0 / 4 .. i0 / 4 + N / 4 - 1 whole.
//    Given noise is read at the same memory index as x, in either layout.
//  * tile (channels_last with drawn noise): a block takes ct channels x ts pixels, draws each
//    channel's run of logical indices c * S + s0 .. c * S + s0 + ts - 1 into shared memory in memory
//    order (a run may start or end inside a Philox group: that group is drawn whole and only its
//    lanes inside the run are kept), then applies the op in memory order. Same tiling as the CPU
//    kernels (ClTiling, csrc/common.h).
//
// An Op provides:
//   using T;  struct Row;                      storage type, per-sample constants
//   Row row(int64_t b) const;                  reads t[b] (guarded) and the table row
//   bool draws(const Row&) const;              whether this sample's noise is drawn from the seeds
//   uint64_t seed(int64_t b) const;  uint64_t stream(const Row&) const;
//   template <int N, bool kFull> void apply(const Row&, int64_t b, int64_t i0, int cnt,
//                                           const float (&z)[N]) const;
//     elements [i0, i0 + cnt) of sample b in memory order (cnt <= N); kFull: cnt == N and 16-byte
//     access is allowed (every pointer aligned); z: the drawn noise of those elements.
#pragma once

#include "device.cuh"

namespace ddpm_fast::cuda {

// z[k] = normal of logical element i0 + k, k < N; i0 a multiple of 4.
template <int N>
__device__ __forceinline__ void draw_unit(uint64_t seed, uint64_t stream, int64_t i0, float (&z)[N]) {
  static_assert(N % 4 == 0, "units are whole Philox groups");
#pragma unroll
  for (int g = 0; g < N / 4; ++g) {
    float q[4];
    philox_normal4<AccurateMath>(seed, stream, uint64_t(i0 / 4 + g), q);
#pragma unroll
    for (int k = 0; k < 4; ++k) z[4 * g + k] = q[k];
  }
}

// Units [u0, units) step ustride of sample b (n elements).
template <int N, bool kVecOk, class Op>
__device__ __forceinline__ void flat_sample(const Op& op, const typename Op::Row& r, int64_t b, int64_t n,
                                            int64_t u0, int64_t ustride) {
  const bool draw = op.draws(r);
  const uint64_t seed = draw ? op.seed(b) : 0, stream = op.stream(r);
  const int64_t units = (n + N - 1) / N;
  for (int64_t u = u0; u < units; u += ustride) {
    const int64_t i0 = u * N;
    float z[N];
    if (draw) {
      draw_unit<N>(seed, stream, i0, z);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) z[k] = 0.0f;
    }
    const int cnt = int(n - i0 < N ? n - i0 : N);
    if constexpr (kVecOk) {
      if (cnt == N) {
        op.template apply<N, true>(r, b, i0, cnt, z);
        continue;
      }
    }
    op.template apply<N, false>(r, b, i0, cnt, z);
  }
}

// grid (x: units of a sample, y: samples, looped past 65535).
template <int N, bool kVecOk, class Op>
__global__ void __launch_bounds__(256) flat_kernel(Op op, int64_t B, int64_t n) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const typename Op::Row r = op.row(b);
    flat_sample<N, kVecOk>(op, r, b, n, int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                           int64_t(gridDim.x) * blockDim.x);
  }
}

// One tile of sample b; zs: kTileElems floats of shared memory. Called by every thread of the block.
template <class Op>
__device__ __forceinline__ void tile_sample(const Op& op, const typename Op::Row& r, int64_t b, int64_t C,
                                            int64_t S, const ClTiling& tl, int64_t tile, float* zs) {
  const auto [c0, s0, ct, ts] = tl.span(tile, C, S);
  const bool draw = op.draws(r);  // the same for the whole block
  if (draw) {
    const uint64_t seed = op.seed(b), stream = op.stream(r);
    const int64_t gpr = ts / 4 + 2;  // Philox groups a run of ts logical indices can touch
    for (int64_t idx = threadIdx.x; idx < ct * gpr; idx += blockDim.x) {
      const int64_t cl = idx / gpr, gi = idx % gpr;
      const int64_t L = (c0 + cl) * S + s0;  // logical index of (c0 + cl, s0)
      const int64_t j = (L >> 2) + gi;
      if (4 * j >= L + ts) continue;
      float q[4];
      philox_normal4<AccurateMath>(seed, stream, uint64_t(j), q);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t i = 4 * j + k;
        if (i >= L && i < L + ts) zs[(i - L) * ct + cl] = q[k];  // memory order within the tile
      }
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < ts * ct; e += blockDim.x) {
    const int64_t sl = e / ct, cl = e - sl * ct;
    const float z[1] = {draw ? zs[e] : 0.0f};
    op.template apply<1, false>(r, b, (s0 + sl) * C + c0 + cl, 1, z);
  }
  __syncthreads();  // zs is refilled by the next tile
}

// grid (x: tiles of a sample, y: samples, looped past 65535).
template <class Op>
__global__ void __launch_bounds__(256) tile_kernel(Op op, int64_t B, int64_t C, int64_t S, ClTiling tl) {
  __shared__ float zs[kTileElems];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const typename Op::Row r = op.row(b);
    for (int64_t tile = blockIdx.x; tile < tl.count(); tile += gridDim.x) tile_sample(op, r, b, C, S, tl, tile, zs);
  }
}

// Host: launch the flat or the tile walk of op over (B, C, S) on stream s.
template <class Op, bool kVecOk>
void launch_flat(const Op& op, int64_t B, int64_t n, cudaStream_t s) {
  constexpr int N = kVecOk ? kVec<typename Op::T> : 4;
  constexpr int kThreads = 256;
  const int64_t units = ceil_div<int64_t>(n, N);
  const unsigned bx = unsigned(std::min<int64_t>(ceil_div<int64_t>(units, kThreads), int64_t(1) << 20));
  const unsigned by = unsigned(std::min<int64_t>(B, kMaxGridY));
  DDPM_LAUNCH(dim3(bx, by), kThreads, 0, s, flat_kernel<N, kVecOk, Op>)(op, B, n);
}

template <class Op>
void launch_tiles(const Op& op, int64_t B, int64_t C, int64_t S, cudaStream_t s) {
  const ClTiling tl = cl_tiling(C, S);
  const unsigned bx = unsigned(std::min<int64_t>(tl.count(), int64_t(1) << 20));
  const unsigned by = unsigned(std::min<int64_t>(B, kMaxGridY));
  DDPM_LAUNCH(dim3(bx, by), 256, 0, s, tile_kernel<Op>)(op, B, C, S, tl);
}

}  // namespace ddpm_fast::cuda
