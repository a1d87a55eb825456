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

// Noise of the tile (channels c0 .. c0 + ct, spatial s0 .. s0 + ts) of a (C, S) sample, in memory
// order, into zm (ct * ts floats); scratch must hold ct * ts floats too.
inline void normal_tile_cl(PhiloxKey key, uint64_t stream, int64_t S, int64_t c0, int64_t ct,
                           int64_t s0, int64_t ts, float* scratch, float* zm) {
  for (int64_t c = 0; c < ct; ++c) normal_range(key, stream, uint64_t((c0 + c) * S + s0), ts, scratch + c * ts);
  for (int64_t s = 0; s < ts; ++s)
    for (int64_t c = 0; c < ct; ++c) zm[s * ct + c] = scratch[c * ts + s];
}

}  // namespace ddpm_fast::cpu
