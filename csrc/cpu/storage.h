// Storage types of the three dtypes (math is float32 everywhere) and a dtype dispatch macro.
#pragma once

#include <cstdint>

#include "../common.h"
#include "vec_math.h"

namespace ddpm_fast::cpu {

template <DType D>
struct Storage;

template <>
struct Storage<DType::Float32> {
  using T = float;
  static DDPM_ALWAYS_INLINE float load(T v) { return v; }
  static DDPM_ALWAYS_INLINE T store(float f) { return f; }
};

template <>
struct Storage<DType::Float16> {
  using T = uint16_t;
  static DDPM_ALWAYS_INLINE float load(T v) { return half_to_float(v); }
  static DDPM_ALWAYS_INLINE T store(float f) { return float_to_half(f); }
};

template <>
struct Storage<DType::BFloat16> {
  using T = uint16_t;
  static DDPM_ALWAYS_INLINE float load(T v) { return bfloat16_to_float(v); }
  static DDPM_ALWAYS_INLINE T store(float f) { return float_to_bfloat16(f); }
};

}  // namespace ddpm_fast::cpu

// DDPM_DISPATCH_DTYPE(dtype, D, stmt): runs stmt with `constexpr DType D` bound to dtype.
#define DDPM_DISPATCH_DTYPE(dtype, D, ...)                                            \
  do {                                                                                \
    switch (dtype) {                                                                  \
      case ::ddpm_fast::DType::Float32: {                                             \
        constexpr ::ddpm_fast::DType D = ::ddpm_fast::DType::Float32;                 \
        __VA_ARGS__;                                                                  \
        break;                                                                        \
      }                                                                               \
      case ::ddpm_fast::DType::Float16: {                                             \
        constexpr ::ddpm_fast::DType D = ::ddpm_fast::DType::Float16;                 \
        __VA_ARGS__;                                                                  \
        break;                                                                        \
      }                                                                               \
      case ::ddpm_fast::DType::BFloat16: {                                            \
        constexpr ::ddpm_fast::DType D = ::ddpm_fast::DType::BFloat16;                \
        __VA_ARGS__;                                                                  \
        break;                                                                        \
      }                                                                               \
      default:                                                                        \
        DDPM_CHECK(false, "unsupported dtype code ", static_cast<int>(dtype));        \
    }                                                                                 \
  } while (0)
