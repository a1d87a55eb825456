// Bulk generation of the contract's normals (docs/contracts.md, "Noise") for runs of logical
// indices, shared by q_sample.cpp, step.cpp and normal.cpp (which holds the implementation).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace ddpm_fast::cpu {

// Philox key of a sample's seed (the int64 seed read as uint64).
struct PhiloxKey {
  uint32_t k0, k1;
  explicit PhiloxKey(int64_t seed) : k0(uint32_t(uint64_t(seed))), k1(uint32_t(uint64_t(seed) >> 32)) {}
};

// z[4 * g + k] (float32, 4 * n values) = normal of logical element 4 * (j0 + g) + k, g in [0, n).
// Runtime dispatch: AVX2+FMA intrinsics for Philox where the CPU has them, portable loops otherwise.
void normal_groups(PhiloxKey key, uint64_t stream, uint64_t j0, int64_t n, float* z);

// z[k] (float32, len values) = normal of logical element L + k, k in [0, len); any alignment of L
// and any len (a partial group at either end computes its whole group and keeps the lanes it needs).
void normal_range(PhiloxKey key, uint64_t stream, uint64_t L, int64_t len, float* z);

// Channels-last tiles. Logical index i = c * S + s lives at memory offset s * C + c, so the normals
// of a tile of `ts` spatial positions x `ct` channels are generated per channel (a contiguous run of
// logical indices) and transposed into memory order `zm[(s - s0) * ct + (c - c0)]`. When ct == C
// the tile is one contiguous memory range [s0 * C, (s0 + ts) * C).
constexpr int64_t kTileElems = 2048;  // 8 KiB of noise per tile: stays in L1 next to the operands

struct ClTiling {
  int64_t ct, ts;            // tile size in channels and in spatial positions
  int64_t tiles_c, tiles_s;  // tile counts
  ClTiling(int64_t C, int64_t S) {
    // Few channels (images: C = 3, 6): whole pixels, so the tile is contiguous in memory. Many
    // channels: 64 x 32 tiles; 32-element runs per channel keep the partial-group waste <= 1/8.
    if (C <= 64) {
      ct = C;
      ts = kTileElems / C / 4 * 4;  // >= 32, and ct * ts <= kTileElems
    } else {
      ct = 64;
      ts = 32;
    }
    ts = std::max<int64_t>(1, std::min(ts, S));
    tiles_c = ceil_div(C, ct);
    tiles_s = ceil_div(S, ts);
  }
  int64_t count() const { return tiles_c * tiles_s; }
  int64_t max_elems() const { return ct * ts; }
};

// Noise of the tile (channels c0 .. c0 + ct, spatial s0 .. s0 + ts) of a (C, S) sample, in memory
// order, into zm (ct * ts floats); scratch must hold ct * ts floats too.
inline void normal_tile_cl(PhiloxKey key, uint64_t stream, int64_t S, int64_t c0, int64_t ct,
                           int64_t s0, int64_t ts, float* scratch, float* zm) {
  for (int64_t c = 0; c < ct; ++c) normal_range(key, stream, uint64_t((c0 + c) * S + s0), ts, scratch + c * ts);
  for (int64_t s = 0; s < ts; ++s)
    for (int64_t c = 0; c < ct; ++c) zm[s * ct + c] = scratch[c * ts + s];
}

}  // namespace ddpm_fast::cpu
