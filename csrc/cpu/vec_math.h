// Branch-free float32 log / sincos / exp that GCC and Clang vectorize inside plain loops, plus the
// target_clones and always_inline macros the CPU kernels use.
//
// Why our own: glibc's logf/sinf/expf are scalar calls (its vector variants are only declared under
// -ffast-math, which we do not use), and a libm call in the loop stops vectorization. The polynomials
// below run 8 lanes per AVX2 instruction; Box-Muller costs ~2 ns per normal on the Zen 1 test
// machine (one core), Philox ~1.9 ns.
//
// Accuracy against double precision, held by tests/test_vec_math.py (fresh points each run, in the version
// of the kernels that the CPU takes; CI's CPU-only build tests the baseline one); measured maxima in brackets:
//   vlog_pos  on [1e-7, 1]:       relative error <= 1.0e-7 (9.6e-8)
//   vsincos   on [0, 2*pi]:       absolute error <= 1.0e-7 (9.3e-8)
//   vexp      on [-87, 87]:       relative error <= 1.0e-7 (8.1e-8); below FLT_MIN flushes to 0; NaN -> NaN
//   vsilu     on [-88.7, 100]:    relative error <= 2.0e-7 (1.7e-7, as PyTorch's); below, -0 as PyTorch's
// Normals built from them differ from a double-precision Box-Muller of the same uniforms by at
// most 6.6e-7 (measured: 2^24 normals, |z| up to 5.45).
// Coefficients are our own least-squares fits (mpmath, Chebyshev nodes, relative weighting),
// rounded to float32.
//
// Branches: every select here is written so that GCC keeps the loops branch-free. A `?:` with a
// constant arm lets GCC thread a branch and move float math into it; with -ftrapping-math (the
// default, we do not use -ffast-math) it then refuses to if-convert and the loop stays scalar.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common.h"

// Function multiversioning: an AVX2+FMA clone and the baseline x86-64 (SSE2) one; the loader picks
// per CPU through an ifunc, so the wheel stays portable. Needs ifunc support (glibc, x86-64 ELF).
// The two clones may round differently in the last ulp (FMA contraction); both meet the contract.
// "arch=x86-64-v3" (AVX2, FMA, F16C, BMI) rather than "avx2" so FMA is included; GCC 12 dispatches it
// by ISA level (checked on the AMD Zen 1 test machine). Clang uses the plain "avx2" clone.
// DDPM_NO_TARGET_CLONES (the build's DDPM_FAST_CPU_DISPATCH=OFF) compiles one version for the build's flags:
// CI's CPU-only build runs the tests on the baseline code that way.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && !defined(DDPM_NO_TARGET_CLONES)
#define DDPM_HAVE_TARGET_CLONES 1
#if defined(__clang__)
#define DDPM_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DDPM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#else
#define DDPM_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DDPM_ALWAYS_INLINE inline __attribute__((always_inline))
#define DDPM_RESTRICT __restrict__
#else
#define DDPM_ALWAYS_INLINE inline
#define DDPM_RESTRICT
#endif

namespace ddpm_fast::cpu::vm {

DDPM_ALWAYS_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
DDPM_ALWAYS_INLINE uint32_t as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Round to nearest integer (ties to even) for |x| < 2^22 without a libm call: adding 1.5 * 2^23
// pushes the fraction out of the mantissa. Relies on IEEE evaluation (no -ffast-math).
DDPM_ALWAYS_INLINE float round_small(float x) {
  const float magic = 12582912.0f;
  return (x + magic) - magic;
}

// Natural log of a positive, normal, finite float (no checks: Box-Muller calls it on [1e-7, 1]).
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log(m) = f - f^2/2 + f^3 P(f), f = m - 1 (exact).
DDPM_ALWAYS_INLINE float vlog_pos(float x) {
  const uint32_t u = as_uint(x);
  uint32_t mbits = (u & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  int32_t e = int32_t(u >> 23) - 127;
  // m > sqrt(2): halve it. Integer arithmetic rather than `?:`: GCC turns the select into a branch
  // around the float subtraction below, and with -ftrapping-math (the default) it then refuses to
  // if-convert, so the whole Box-Muller loop stayed scalar (18 ns per normal instead of ~2).
  const uint32_t big = uint32_t(mbits > 0x3fb504f3u);
  mbits -= big << 23;
  e += int32_t(big);
  const float f = as_float(mbits) - 1.0f;
  const float ef = float(e);
  const float f2 = f * f;
  float p = 0.08506953716278076f;
  p = p * f - 0.14197471737861633f;
  p = p * f + 0.14950978755950928f;
  p = p * f - 0.165879487991333f;
  p = p * f + 0.19960597157478333f;
  p = p * f - 0.250009685754776f;
  p = p * f + 0.33333972096443176f;
  // ln2 = 0.693359375 (9 bits, so ef * hi is exact) - 2.12194440e-4.
  float y = f * f2 * p + ef * -2.12194440e-4f;
  y = y - 0.5f * f2;
  return (f + y) + ef * 0.693359375f;
}

// sin and cos of x for |x| up to a few thousand (Cody-Waite reduction by pi/2 in three parts of 12,
// 12 and 24 bits, so q * part is exact for q < 2^11). Box-Muller calls it on [0, 2*pi].
DDPM_ALWAYS_INLINE void vsincos(float x, float& s_out, float& c_out) {
  const float q = round_small(x * 0.6366197466850281f);
  const int32_t iq = int32_t(q);
  float y = x - q * 1.5703125f;  // exact (Sterbenz)
  y = y - q * 4.837512969970703e-4f;
  y = y - q * 7.549790126404332e-8f;
  const float y2 = y * y;
  // Degree 7 / 8 polynomials: truncation error 3.4e-9 / 1.1e-10 on [-pi/4, pi/4], far below the
  // float32 rounding; one degree more bought nothing measurable and cost ~3 % of the Box-Muller time.
  float ps = -0.00019518152112141252f;
  ps = ps * y2 + 0.008332186378538609f;
  ps = ps * y2 - 0.16666655242443085f;
  const float s = y + y * y2 * ps;
  float pc = 2.443284392938949e-05f;
  pc = pc * y2 - 0.0013887312961742282f;
  pc = pc * y2 + 0.04166664555668831f;
  const float c = (1.0f - 0.5f * y2) + y2 * y2 * pc;
  // Quadrant q: odd quadrants swap sin and cos; sin is negated in quadrants 2, 3, cos in 1, 2.
  // Done with integer masks: cheaper than vblendvps on Zen 1 and immune to branch threading.
  const uint32_t swap = uint32_t(0) - uint32_t(iq & 1);
  const uint32_t sb = as_uint(s), cb = as_uint(c), diff = (sb ^ cb) & swap;
  const uint32_t sneg = uint32_t(iq & 2) << 30;
  const uint32_t cneg = uint32_t((iq + 1) & 2) << 30;
  s_out = as_float(sb ^ diff ^ sneg);
  c_out = as_float(cb ^ diff ^ cneg);
}

// Branch-free select: m ? a : b for an all-ones / all-zeros mask m. Why not `?:`: a select with a
// constant arm (x < lo ? lo : x) lets GCC thread a branch and fold the constant path, after which
// the float math ends up inside a branch and, with -ftrapping-math (the default), the loop is no
// longer if-converted or vectorized (GroupNorm + SiLU ran 8x slower, measured).
DDPM_ALWAYS_INLINE uint32_t mask_of(bool c) { return uint32_t(0) - uint32_t(c); }
DDPM_ALWAYS_INLINE float select_bits(uint32_t m, float a, float b) {
  return as_float((as_uint(a) & m) | (as_uint(b) & ~m));
}

// exp(x) for a finite x in [-87.5, 88.5]: k = round(x / ln2), r = x - k ln2 (two-part ln2), e^r by a
// degree-7 polynomial, times 2^k built from two exponent fields so that k = 128 does not overflow early.
DDPM_ALWAYS_INLINE float exp_finite(float x) {
  const float k = round_small(x * 1.4426950216293335f);
  const int32_t ik = int32_t(k);
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 0.0001963405084097758f;
  p = p * r + 0.0013935540337115526f;
  p = p * r + 0.008333776146173477f;
  p = p * r + 0.041666459292173386f;
  p = p * r + 0.166666641831398f;
  const float r2 = r * r;
  const float er = 1.0f + (r + r2 * (0.5f + r * p));
  const int32_t k1 = ik >> 1;
  return er * as_float(uint32_t(k1 + 127) << 23) * as_float(uint32_t(ik - k1 + 127) << 23);
}

// exp(x) for every float: exp_finite on a clamped, NaN-free copy, then underflow, overflow and NaN.
DDPM_ALWAYS_INLINE float vexp(float x) {
  const uint32_t too_small = mask_of(x < -87.33654f);       // result below FLT_MIN: flush to 0
  const uint32_t too_big = mask_of(x > 88.72283935546875f);  // overflow: +Inf
  const uint32_t is_nan = mask_of(x != x);
  // Work on a clamped, NaN-free copy so the float -> int conversion below stays in range.
  float xc = select_bits(too_small, -87.5f, x);
  xc = select_bits(too_big | is_nan, 88.5f, xc);
  float y = exp_finite(xc);
  y = as_float(as_uint(y) & ~too_small);
  y = select_bits(too_big, as_float(0x7f800000u), y);
  y = select_bits(is_nan, x, y);
  return y;
}

// exp(x) for the sigmoid only: below -87.5 the result is ~1e-38 instead of 0 or a subnormal (1 + e
// rounds to 1 either way), a NaN argument gives a finite value (the caller's numerator carries the
// NaN), overflow still gives +Inf (so silu(-Inf) = -Inf / Inf = NaN, as in PyTorch). Two selects
// fewer than vexp.
DDPM_ALWAYS_INLINE float vexp_sigmoid_arg(float x) {
  const uint32_t lo = mask_of(x < -87.5f), big = mask_of(x > 88.72283935546875f), nan = mask_of(x != x);
  float xc = select_bits(lo, -87.5f, x);
  xc = select_bits(big | nan, 0.0f, xc);
  const float y = exp_finite(xc);
  return as_float(as_uint(y) | (big & 0x7f800000u));  // xc = 0 there, so y = 1: 1 | Inf bits = Inf
}

// x * sigmoid(x) as x / (1 + exp(-x)) (what PyTorch's CPU silu computes); -Inf -> -0, +Inf -> +Inf.
DDPM_ALWAYS_INLINE float vsilu(float x) { return x / (1.0f + vexp_sigmoid_arg(-x)); }

DDPM_ALWAYS_INLINE float vsigmoid(float x) { return 1.0f / (1.0f + vexp_sigmoid_arg(-x)); }

// Box-Muller math policy for ddpm_fast::box_muller (common.h) built on the functions above.
struct VecMath {
  static DDPM_ALWAYS_INLINE float log(float x) { return vlog_pos(x); }
  static DDPM_ALWAYS_INLINE float sqrt(float x) { return __builtin_sqrtf(x); }
  static DDPM_ALWAYS_INLINE void sincos(float x, float& s, float& c) { vsincos(x, s, c); }
};

}  // namespace ddpm_fast::cpu::vm
