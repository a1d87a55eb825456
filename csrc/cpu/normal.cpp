// The contract's normals in bulk (normal_groups / normal_range, used by q_sample and step) and the
// `normal` launcher: out (B, N) = normals of logical indices [0, N) of each sample.
//
// Philox is integer work dominated by 32x32->64-bit products. GCC's auto-vectorization of those
// either shuffles hi/lo words around (uint32 lanes: 6.8 ns per normal on the 2-core Zen 1 test
// machine) or synthesizes 64-bit products from shifts (uint64 lanes: 8.3 ns), so the AVX2 path
// uses intrinsics: one vpmuludq per 4 products on even lanes, one on odd lanes, two blends to split
// hi / lo (~18 instructions per round for 8 groups). Box-Muller is a plain loop over the block that
// GCC vectorizes with our polynomial log / sincos (vec_math.h).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "noise.h"
#include "parallel.h"
#include "storage.h"
#include "vec_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DDPM_NO_AVX2_PHILOX)
#define DDPM_HAVE_AVX2_PHILOX 1
#include <immintrin.h>
#endif

namespace ddpm_fast::cpu {
namespace {

constexpr int kBlockGroups = 64;  // groups per Philox/Box-Muller block: 4 x 256 B of uniforms on the stack

// Box-Muller of a block: z[4 g + k] from the uniforms of group g's words k.
DDPM_ALWAYS_INLINE void box_muller_block(int n, const float* DDPM_RESTRICT u0, const float* DDPM_RESTRICT u1,
                                         const float* DDPM_RESTRICT u2, const float* DDPM_RESTRICT u3,
                                         float* DDPM_RESTRICT z) {
  for (int g = 0; g < n; ++g) {
    float z0, z1, z2, z3;
    box_muller<vm::VecMath>(u0[g], u1[g], z0, z1);
    box_muller<vm::VecMath>(u2[g], u3[g], z2, z3);
    z[4 * g + 0] = z0;
    z[4 * g + 1] = z1;
    z[4 * g + 2] = z2;
    z[4 * g + 3] = z3;
  }
}

// Groups in the next block starting at group j0 (n left): at most kBlockGroups, and never across a
// wrap of the counter's low word, so a block's counters are jlo + g with one jhi. (A plain loop in
// each caller rather than a lambda: lambdas do not inherit the AVX2 function's target attribute.)
DDPM_ALWAYS_INLINE int block_groups(uint64_t j0, int64_t n) {
  const uint64_t to_wrap = (uint64_t(1) << 32) - uint32_t(j0);
  return int(std::min<uint64_t>({uint64_t(n), to_wrap, uint64_t(kBlockGroups)}));
}

// Portable path: plain loops (GCC vectorizes them for SSE2 / NEON as well as it can).
void normal_groups_portable(PhiloxKey key, uint64_t stream, uint64_t j0, int64_t n, float* z) {
  const uint32_t s0 = uint32_t(stream), s1 = uint32_t(stream >> 32);
  for (int m; n > 0; z += 4 * m, j0 += uint64_t(m), n -= m) {
    m = block_groups(j0, n);
    const uint32_t jlo = uint32_t(j0), jhi = uint32_t(j0 >> 32);
    float u0[kBlockGroups], u1[kBlockGroups], u2[kBlockGroups], u3[kBlockGroups];
    for (int g = 0; g < m; ++g) {
      uint32_t c0 = jlo + uint32_t(g), c1 = jhi, c2 = s0, c3 = s1;
      philox4x32_10(c0, c1, c2, c3, key.k0, key.k1);
      u0[g] = philox_uniform(c0);
      u1[g] = philox_uniform(c1);
      u2[g] = philox_uniform(c2);
      u3[g] = philox_uniform(c3);
    }
    box_muller_block(m, u0, u1, u2, u3, z);
  }
}

#if defined(DDPM_HAVE_AVX2_PHILOX)
#define DDPM_AVX2_FN __attribute__((target("avx2,fma")))

// hi, lo = m * c on each of the 8 uint32 lanes.
DDPM_AVX2_FN inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                         // lanes 0, 2, 4, 6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);   // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Contract step 4 on 8 lanes: int32 x -> x ^ (x >> 31) -> float * 2^-31.
DDPM_AVX2_FN inline __m256 uniform8(__m256i x) {
  const __m256i m = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(4.6566127342e-10f));
}

DDPM_AVX2_FN void normal_groups_avx2(PhiloxKey key, uint64_t stream, uint64_t j0, int64_t n, float* z) {
  const __m256i M0 = _mm256_set1_epi32(int(kPhiloxM0));
  const __m256i M1 = _mm256_set1_epi32(int(kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i S0 = _mm256_set1_epi32(int(uint32_t(stream)));
  const __m256i S1 = _mm256_set1_epi32(int(uint32_t(stream >> 32)));
  for (int m; n > 0; z += 4 * m, j0 += uint64_t(m), n -= m) {
    m = block_groups(j0, n);
    const uint32_t jlo = uint32_t(j0), jhi = uint32_t(j0 >> 32);
    alignas(32) float u0[kBlockGroups], u1[kBlockGroups], u2[kBlockGroups], u3[kBlockGroups];
    // Whole vectors of 8 groups; lanes past m (< 8 of them) are computed and never read.
    for (int g = 0; g < m; g += 8) {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(jlo + uint32_t(g))), iota);
      __m256i c1 = _mm256_set1_epi32(int(jhi)), c2 = S0, c3 = S1;
      uint32_t k0 = key.k0, k1 = key.k1;
      for (int r = 0; r < kPhiloxRounds; ++r) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(M0, c0, hi0, lo0);
        mulhilo8(M1, c2, hi1, lo1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
        c1 = lo1;
        c3 = lo0;
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      _mm256_store_ps(u0 + g, uniform8(c0));
      _mm256_store_ps(u1 + g, uniform8(c1));
      _mm256_store_ps(u2 + g, uniform8(c2));
      _mm256_store_ps(u3 + g, uniform8(c3));
    }
    box_muller_block(m, u0, u1, u2, u3, z);  // inlined here, so vectorized for AVX2 + FMA
  }
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

template <DType D>
DDPM_TARGET_CLONES void store_block(const float* DDPM_RESTRICT z, typename Storage<D>::T* DDPM_RESTRICT out,
                                    int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = Storage<D>::store(z[k]);
}

// AVX2 + FMA intrinsics where the CPU has them, else the portable loops (as on ARM). DDPM_FAST_PORTABLE_PHILOX=1,
// read once, takes the portable ones anyway: how the tests reach them on an x86 machine.
bool avx2_philox() {
#if defined(DDPM_HAVE_AVX2_PHILOX)
  static const bool avx2 = [] {
    const char* portable = std::getenv("DDPM_FAST_PORTABLE_PHILOX");
    return !(portable && std::strcmp(portable, "1") == 0) && cpu_has_avx2_fma();
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace

const char* philox_path() { return avx2_philox() ? "avx2" : "portable"; }

void normal_groups(PhiloxKey key, uint64_t stream, uint64_t j0, int64_t n, float* z) {
#if defined(DDPM_HAVE_AVX2_PHILOX)
  if (avx2_philox()) {
    normal_groups_avx2(key, stream, j0, n, z);
    return;
  }
#endif
  normal_groups_portable(key, stream, j0, n, z);
}

void normal_range(PhiloxKey key, uint64_t stream, uint64_t L, int64_t len, float* z) {
  uint64_t j = L >> 2;
  const int off = int(L & 3u);
  if (off != 0 && len > 0) {
    float t[4];
    normal_groups(key, stream, j, 1, t);
    const int take = int(std::min<int64_t>(4 - off, len));
    for (int k = 0; k < take; ++k) z[k] = t[off + k];
    z += take;
    len -= take;
    ++j;
  }
  const int64_t full = len >> 2;
  normal_groups(key, stream, j, full, z);
  z += 4 * full;
  j += uint64_t(full);
  len -= 4 * full;
  if (len > 0) {
    float t[4];
    normal_groups(key, stream, j, 1, t);
    for (int k = 0; k < len; ++k) z[k] = t[k];
  }
}

void normal(const int64_t* seeds, uint64_t stream, void* out, int64_t B, int64_t N, DType dtype,
            int num_threads) {
  if (B <= 0 || N <= 0) return;
  DDPM_CHECK(seeds != nullptr, "normal: seeds must be given");
  DDPM_CHECK(out != nullptr, "normal: out must be given");
  // Work items: (sample, chunk of kChunk logical elements). kChunk is a multiple of 4, so chunks
  // start on group boundaries and only a sample's last chunk can end mid-group.
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = ceil_div(N, kChunk);
  const int64_t items = B * chunks;
  // ~1.5 ns per normal per core: 64 Ki normals (~100 us) per extra thread.
  const int nt = threads_for(B * N, int64_t(1) << 16, num_threads);
  DDPM_DISPATCH_DTYPE(dtype, D, {
    using T = typename Storage<D>::T;
    T* o = static_cast<T*>(out);
    parallel_for(items, nt, [&](int64_t begin, int64_t end) {
      alignas(64) float z[kChunk];
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / chunks, i0 = (it % chunks) * kChunk;
        const int64_t len = std::min(kChunk, N - i0);
        T* dst = o + b * N + i0;
        if constexpr (D == DType::Float32) {
          normal_range(PhiloxKey(seeds[b]), stream, uint64_t(i0), len, reinterpret_cast<float*>(dst));
        } else {
          normal_range(PhiloxKey(seeds[b]), stream, uint64_t(i0), len, z);
          store_block<D>(z, dst, len);
        }
      }
    });
  });
}

}  // namespace ddpm_fast::cpu
