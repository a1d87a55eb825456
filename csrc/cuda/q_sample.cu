// q_sample on the GPU: x_t = a[t] * x0 + b[t] * eps, target = eps or a * eps - b * x0
// (docs/contracts.md, "q_sample table"); eps given or drawn in the kernel from the contract's Philox
// normals, so the training form reads x0 once and writes x_t and the target (12 bytes per float32).
//
// NCHW or given noise: the flat walk (16-byte accesses where every pointer allows, one Philox call
// per 4 elements); channels_last with drawn noise: the tile walk (elementwise.cuh).
// A timestep outside [0, num_t) writes NaN to both outputs of its sample (it is never used as an
// index); the host cannot check it without a device sync.
#include "elementwise.cuh"

namespace ddpm_fast::cuda {
namespace {

template <typename T_>
struct QSampleOp {
  using T = T_;
  const T* x0;             // (B, C, S), batch stride x0_bs
  int64_t x0_bs;
  const T* noise;          // (B, C, S), batch stride noise_bs, or null (drawn)
  int64_t noise_bs;
  const int64_t* t;        // (B,)
  const float* table;      // (num_t, 2)
  int64_t num_t;
  const int64_t* seeds;    // (B,) when noise is null
  uint64_t noise_stream;
  T* x_t;                  // (B, C, S) dense
  T* target;               // (B, C, S) dense
  bool v_target;
  int64_t n;               // C * S

  struct Row {
    float a, b;
    bool ok;
  };

  __device__ __forceinline__ Row row(int64_t b) const {
    const int64_t tb = t[b];
    Row r{0.0f, 0.0f, t_ok(tb, num_t)};
    if (r.ok) {
      r.a = table[2 * tb];
      r.b = table[2 * tb + 1];
    }
    return r;
  }
  __device__ bool draws(const Row&) const { return noise == nullptr; }
  __device__ uint64_t seed(int64_t b) const { return uint64_t(seeds[b]); }
  __device__ uint64_t stream(const Row&) const { return noise_stream; }

  template <int N, bool kFull>
  __device__ __forceinline__ void apply(const Row& r, int64_t b, int64_t i0, int cnt, const float (&zd)[N]) const {
    float x[N], z[N], o1[N], o2[N];
    const T* xp = x0 + b * x0_bs + i0;
    const T* np = noise ? noise + b * noise_bs + i0 : nullptr;
    if constexpr (kFull) {
      load_vec<T, N>(xp, x);
      if (np) load_vec<T, N>(np, z);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        x[k] = k < cnt ? load1(xp + k) : 0.0f;
        z[k] = np && k < cnt ? load1(np + k) : 0.0f;
      }
    }
    if (!np) {
#pragma unroll
      for (int k = 0; k < N; ++k) z[k] = zd[k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      o1[k] = r.a * x[k] + r.b * z[k];
      o2[k] = v_target ? r.a * z[k] - r.b * x[k] : z[k];
      if (!r.ok) o1[k] = o2[k] = nan_f();
    }
    T* xt = x_t + b * n + i0;
    T* tg = target + b * n + i0;
    if constexpr (kFull) {
      store_vec<T, N>(xt, o1);
      store_vec<T, N>(tg, o2);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (k < cnt) {
          xt[k] = from_float<T>(o1[k]);
          tg[k] = from_float<T>(o2[k]);
        }
      }
    }
  }
};

template <typename T>
void run(const QSampleOp<T>& op, int64_t B, int64_t C, int64_t S, bool channels_last, cudaStream_t s) {
  const int64_t n = C * S;
  if (channels_last && op.noise == nullptr) {
    launch_tiles(op, B, C, S, s);
    return;
  }
  const size_t e = sizeof(T);
  const bool vec = vec_ok(op.x0, op.x0_bs, B, e) && vec_ok(op.noise, op.noise_bs, B, e) &&
                   vec_ok(op.x_t, n, B, e) && vec_ok(op.target, n, B, e);
  if (vec)
    launch_flat<QSampleOp<T>, true>(op, B, n, s);
  else
    launch_flat<QSampleOp<T>, false>(op, B, n, s);
}

}  // namespace

void q_sample(const void* x0, int64_t x0_bstride, const int64_t* t, const float* table, int64_t num_t,
              const void* noise, int64_t noise_bstride, const int64_t* seeds, uint64_t stream, void* x_t,
              void* target, int target_kind, int64_t B, int64_t C, int64_t S, Layout layout, DType dtype,
              uintptr_t cuda_stream) {
  if (!check_q_sample_args(x0, t, table, noise, seeds, x_t, target, target_kind, B, C, S, layout)) return;
  DDPM_CHECK(num_t > 0, "q_sample: the table has no rows");
  auto s = reinterpret_cast<cudaStream_t>(cuda_stream);
  DDPM_CUDA_DISPATCH(dtype, T, {
    const QSampleOp<T> op{static_cast<const T*>(x0), x0_bstride, static_cast<const T*>(noise), noise_bstride, t,
                          table, num_t, seeds, stream, static_cast<T*>(x_t), static_cast<T*>(target),
                          target_kind == int(Target::V), C * S};
    run(op, B, C, S, layout == Layout::ChannelsLast, s);
  });
  check_launch("q_sample");
}

}  // namespace ddpm_fast::cuda
