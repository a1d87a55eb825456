// Shared by the CPU (.cpp) and CUDA (.cu) sides: enums, error checks, ceil_div, the contract's Philox
// noise (docs/contracts.md, "Noise") and host float16/bfloat16 conversions. No torch headers.
//
// Everything marked DDPM_HD compiles for host and device; the error helpers and the 16-bit float
// conversions are host-only (device code has __half / __nv_bfloat16 for the latter).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

namespace ddpm_fast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };
enum class Layout : int { Contiguous = 0, ChannelsLast = 1 };
enum class Activation : int { None = 0, SiLU = 1 };
enum class Target : int { Epsilon = 0, V = 1 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown dtype";
}

// ---------------------------------------------------------------------------------------------
// Errors (host only). pybind11 translates std::invalid_argument to ValueError and
// std::runtime_error to RuntimeError, so the Python caller sees the message unchanged.
// ---------------------------------------------------------------------------------------------
namespace detail {

inline void stream_all(std::ostringstream&) {}
template <class T, class... Rest>
void stream_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  stream_all(os, rest...);
}

// The arguments streamed into one string: concat("got ", n, " channels").
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  stream_all(os, args...);
  return os.str();
}

template <class E, class... Args>
[[noreturn]] void fail(const char* file, int line, const char* cond, const Args&... args) {
  throw E(concat("ddpm_fast: ", args..., " [check `", cond, "` failed at ", file, ":", line, "]"));
}

}  // namespace detail

// DDPM_CHECK(cond, "x must have ", n, " elements, got ", m): bad caller input -> ValueError.
#define DDPM_CHECK(cond, ...)                                                                   \
  do {                                                                                          \
    if (!(cond))                                                                                \
      ::ddpm_fast::detail::fail<std::invalid_argument>(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

// DDPM_CHECK_RT(cond, ...): failures that are not the caller's fault (CUDA errors, ...) -> RuntimeError.
#define DDPM_CHECK_RT(cond, ...)                                                              \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ::ddpm_fast::detail::fail<std::runtime_error>(__FILE__, __LINE__, #cond, __VA_ARGS__);  \
  } while (0)

// The argument checks the CPU and CUDA launchers of q_sample and step start with: false when there is no
// work (an empty tensor), so the launcher returns before touching a pointer.
inline bool check_q_sample_args(const void* x0, const int64_t* t, const float* table, const void* noise,
                                const int64_t* seeds, const void* x_t, const void* target, int target_kind,
                                int64_t B, int64_t C, int64_t S, Layout layout) {
  DDPM_CHECK(B >= 0 && C >= 0 && S >= 0, "q_sample: negative size B=", B, " C=", C, " S=", S);
  if (B == 0 || C == 0 || S == 0) return false;
  DDPM_CHECK(x0 && t && table && x_t && target, "q_sample: x0, t, table, x_t and target must be given");
  DDPM_CHECK(noise || seeds, "q_sample: either noise or seeds must be given");
  DDPM_CHECK(target_kind == int(Target::Epsilon) || target_kind == int(Target::V),
             "q_sample: target_kind must be 0 (epsilon) or 1 (v_prediction), got ", target_kind);
  DDPM_CHECK(layout == Layout::Contiguous || layout == Layout::ChannelsLast, "q_sample: bad layout ", int(layout));
  return true;
}

inline bool check_step_args(const void* x, const void* m, const int64_t* t, const float* table, const void* prev,
                            int64_t B, int64_t C, int64_t S, Layout layout, float threshold_ratio) {
  DDPM_CHECK(B >= 0 && C >= 0 && S >= 0, "step: negative size B=", B, " C=", C, " S=", S);
  if (B == 0 || C == 0 || S == 0) return false;
  DDPM_CHECK(x && m && t && table && prev, "step: x, m, t, table and prev must be given");
  DDPM_CHECK(layout == Layout::Contiguous || layout == Layout::ChannelsLast, "step: bad layout ", int(layout));
  DDPM_CHECK(!(threshold_ratio > 1.0f), "step: threshold_ratio must be <= 1, got ", threshold_ratio);
  return true;
}

// The size and enum checks both GroupNorm launchers (CPU and CUDA) start with; `op` names the launcher.
inline void check_group_norm_args(const char* op, int64_t B, int64_t C, int64_t S, int64_t G, Activation act,
                                  Layout layout) {
  DDPM_CHECK(B >= 0 && C >= 0 && S >= 0, op, ": negative size B=", B, " C=", C, " S=", S);
  DDPM_CHECK(G > 0 && C % G == 0, op, ": C=", C, " must be a positive multiple of G=", G);
  DDPM_CHECK(act == Activation::None || act == Activation::SiLU, op, ": bad activation ", int(act));
  DDPM_CHECK(layout == Layout::Contiguous || layout == Layout::ChannelsLast, op, ": bad layout ", int(layout));
}

// group_norm_forward's checks, shared by the CPU and CUDA entry points; false when there is nothing to do.
inline bool group_norm_forward_has_work(const void* x, const void* y, const float* mean, const float* rstd,
                                        int64_t B, int64_t C, int64_t S, int64_t G, Activation act, Layout layout) {
  check_group_norm_args("group_norm_forward", B, C, S, G, act, layout);
  if (B == 0 || C == 0) return false;
  DDPM_CHECK(S > 0, "group_norm_forward: empty spatial size (S = 0) has no statistics");
  DDPM_CHECK(x && y && mean && rstd, "group_norm_forward: x, y, mean and rstd must be given");
  return true;
}

template <class T>
DDPM_HD constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------
// Channels-last noise tiles (CPU and CUDA walk the same ones). Logical index i = c * S + s lives at
// memory offset s * C + c, so the normals of a tile of `ts` pixels x `ct` channels are drawn per
// channel (a run of logical indices) and transposed into memory order. When ct == C the tile is one
// contiguous memory range [s0 * C, (s0 + ts) * C).
// ---------------------------------------------------------------------------------------------
constexpr int kTileElems = 2048;  // 8 KiB of noise per tile: L1 (CPU) or shared memory (CUDA)

struct TileSpan {
  int64_t c0, s0, ct, ts;  // channels c0 .. c0 + ct, pixels s0 .. s0 + ts
};

struct ClTiling {
  int64_t ct, ts;            // tile size in channels and in pixels
  int64_t tiles_c, tiles_s;  // tile counts
  DDPM_HD int64_t count() const { return tiles_c * tiles_s; }
  // Tile k of a (C, S) sample, cut at the edges.
  DDPM_HD TileSpan span(int64_t k, int64_t C, int64_t S) const {
    const int64_t c0 = (k % tiles_c) * ct, s0 = (k / tiles_c) * ts;
    return {c0, s0, ct < C - c0 ? ct : C - c0, ts < S - s0 ? ts : S - s0};
  }
};

// Few channels (images: C = 3, 6): whole pixels, so a tile is contiguous in memory. Many channels:
// 64 x 32 tiles; 32-element runs per channel keep the partial-group waste <= 1/8.
inline ClTiling cl_tiling(int64_t C, int64_t S) {
  const int64_t ct = C <= 64 ? C : 64;
  int64_t ts = C <= 64 ? kTileElems / C / 4 * 4 : 32;  // >= 32, and ct * ts <= kTileElems
  ts = ts < S ? ts : S;
  ts = ts > 1 ? ts : 1;
  return {ct, ts, ceil_div(C, ct), ceil_div(S, ts)};
}

// ---------------------------------------------------------------------------------------------
// Bit casts (host: memcpy, which GCC turns into a register move and vectorizes; device: intrinsics).
// ---------------------------------------------------------------------------------------------
DDPM_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

DDPM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), exactly as docs/contracts.md step 1-3. Known-answer vectors
// (Random123 kat_vectors): ctr 0 key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump of k0 (golden ratio)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump of k1 (sqrt(3) - 1)
constexpr int kPhiloxRounds = 10;

// Stream numbers of docs/contracts.md ("Stream numbers").
constexpr uint64_t kStepNoiseStreamBase = uint64_t(1) << 32;  // + t
constexpr uint64_t kInitialNoiseStream = uint64_t(1) << 33;

// hi:lo = a * b. On the host one 64-bit product: GCC vectorizes it to vpmuludq (4 lanes per AVX2
// instruction), which is cheaper than separate low (vpmulld) and high halves.
DDPM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

DDPM_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                          uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kPhiloxM0, c0, hi0, lo0);
  mulhilo32(kPhiloxM1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// In place: (c0..c3) <- Philox4x32-10((c0..c3), (k0, k1)). Written as straight-line code (no loop)
// so that GCC vectorizes a loop over many counters with all ten rounds in registers.
DDPM_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                           uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0 + 1u * kPhiloxW0, k1 + 1u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 2u * kPhiloxW0, k1 + 2u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 3u * kPhiloxW0, k1 + 3u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 4u * kPhiloxW0, k1 + 4u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 5u * kPhiloxW0, k1 + 5u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 6u * kPhiloxW0, k1 + 6u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 7u * kPhiloxW0, k1 + 7u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 8u * kPhiloxW0, k1 + 8u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 9u * kPhiloxW0, k1 + 9u * kPhiloxW1);
}

// Contract step 1-3 for one group j of four logical elements (j = i / 4): out = Philox(ctr, key).
DDPM_HD void philox_group(uint64_t seed, uint64_t stream, uint64_t j, uint32_t out[4]) {
  uint32_t c0 = uint32_t(j), c1 = uint32_t(j >> 32), c2 = uint32_t(stream), c3 = uint32_t(stream >> 32);
  philox4x32_10(c0, c1, c2, c3, uint32_t(seed), uint32_t(seed >> 32));
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Contract step 4: uint32 -> float32 uniform in [0, 1 - 2^-24] (the float32 constant is just below 2^-31).
// Reading x as int32 and taking -x - 1 where negative equals x ^ (x >> 31) (no overflow at INT32_MIN,
// and branch-free so it vectorizes).
DDPM_HD float philox_uniform(uint32_t x) {
  const int32_t v = int32_t(x);
  const int32_t m = v ^ (v >> 31);
  return float(m) * 4.6566127342e-10f;
}

// Contract step 5 with pluggable math. A policy M provides static DDPM_HD functions
//   float log(float), float sqrt(float), void sincos(float x, float& s, float& c).
// LibmMath below uses the C library (host) / CUDA's accurate functions (device); the CUDA kernels
// may pass their own policy (__logf, __sincosf, ...), the CPU kernels pass a vectorizable one.
constexpr float kBoxMullerMinU = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

template <class M>
DDPM_HD void box_muller(float u_a, float u_b, float& z_a, float& z_b) {
  // max(u_a, 1e-7), branch-free on the bit patterns (u_a is never negative or NaN). Any `?:` here
  // (float or int) let GCC thread a branch with the constant arm's log folded away, after which the
  // Box-Muller loop no longer vectorized (18 ns per normal instead of ~2).
  const int32_t ui = int32_t(float_to_bits(u_a)), mi = int32_t(float_to_bits(kBoxMullerMinU));
  const int32_t d = ui - mi;
  const float u = bits_to_float(uint32_t(ui - (d & (d >> 31))));
  const float r = M::sqrt(-2.0f * M::log(u));
  const float th = kTwoPi * u_b;
  float s, c;
  M::sincos(th, s, c);
  z_a = r * c;
  z_b = r * s;
}

struct LibmMath {
  static DDPM_HD float log(float x) { return ::logf(x); }
  static DDPM_HD float sqrt(float x) { return ::sqrtf(x); }
  static DDPM_HD void sincos(float x, float& s, float& c) {
    s = ::sinf(x);
    c = ::cosf(x);
  }
};

// Contract steps 1-5 for group j: z[k] is the normal of logical element 4 * j + k.
template <class M = LibmMath>
DDPM_HD void philox_normal4(uint64_t seed, uint64_t stream, uint64_t j, float z[4]) {
  uint32_t x[4];
  philox_group(seed, stream, j, x);
  box_muller<M>(philox_uniform(x[0]), philox_uniform(x[1]), z[0], z[1]);
  box_muller<M>(philox_uniform(x[2]), philox_uniform(x[3]), z[2], z[3]);
}

// The normal of logical element i (scalar convenience; the kernels work on whole groups).
template <class M = LibmMath>
DDPM_HD float philox_normal(uint64_t seed, uint64_t stream, uint64_t i) {
  float z[4];
  philox_normal4<M>(seed, stream, i >> 2, z);
  return z[i & 3];
}

// ---------------------------------------------------------------------------------------------
// Host float16 / bfloat16 <-> float32, storage as plain uint16_t. Round-to-nearest-even; NaN, Inf
// and subnormals handled; NaN encodings follow c10::Half / c10::BFloat16 (0x7E00 | sign, 0x7FC0).
// Branch-free (selects only) so loops that call them vectorize.
// ---------------------------------------------------------------------------------------------
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent (15 -> 127). Subnormal (em < 0x400): em * 2^-24 exactly, computed
  // with an int -> float conversion so no denormal float is involved (robust under DAZ/FTZ).
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t subnormal = float_to_bits(float(int32_t(em)) * 5.9604644775390625e-8f);
  const uint32_t infnan = 0x7f800000u | ((em & 0x3ffu) << 13);
  const uint32_t is_sub = 0u - uint32_t(em < 0x400u), is_special = 0u - uint32_t(em >= 0x7c00u);
  uint32_t mag = (subnormal & is_sub) | (normal & ~is_sub);
  mag = (infnan & is_special) | (mag & ~is_special);
  return bits_to_float(mag | sign);
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal half range: add half an ulp (minus one when the kept lsb is even: ties to even), then drop
  // 13 bits and rebias. Values from 65520 up round into the exponent field as 0x7c00 (Inf) by
  // themselves; larger ones are clamped below.
  const uint32_t normal = (a + 0x0fffu + ((a >> 13) & 1u) - ((127u - 15u) << 23)) >> 13;
  // Below 2^-14 the result is a multiple of 2^-24: adding 0.5f (whose ulp is 2^-24) rounds |f| to
  // that grid with the FPU's round-to-nearest-even, and the low mantissa bits are the half bits.
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  // Selects as masks, not `?:`: GCC would otherwise sink the float add above into a branch and then
  // refuse to vectorize the caller's loop (-ftrapping-math).
  const uint32_t is_sub = 0u - uint32_t(a < 0x38800000u);
  const uint32_t is_inf = 0u - uint32_t(a >= 0x47800000u);  // |f| >= 65536 (and Inf) -> Inf
  const uint32_t is_nan = 0u - uint32_t(a > 0x7f800000u);   // NaN -> quiet NaN
  uint32_t h = (subnormal & is_sub) | (normal & ~is_sub);
  h = (0x7c00u & is_inf) | (h & ~is_inf);
  h = (0x7e00u & is_nan) | (h & ~is_nan);
  return uint16_t(h | sign);
}

inline float bfloat16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

}  // namespace ddpm_fast
