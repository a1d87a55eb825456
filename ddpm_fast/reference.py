"""Pure-PyTorch reference of every fused op: the definition of "correct" (docs/contracts.md).

Differentiable, device-agnostic, no compiled extension. Each fast backend must match these functions
(bit-exact for the Philox uint32 stream, to a derived tolerance for floating-point results).

Shapes: B is the batch, C channels, S = prod(spatial); T the number of train timesteps.
Compute dtype: float32 for float16/bfloat16 inputs, otherwise the input's own dtype; results come
back in the input's dtype and memory format: NCHW or (4-D) channels_last, the layouts of contracts.md; any
other layout, channels_last_3d included, comes back contiguous, as from the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .schedule import COEF_COLUMNS, PREDICTION_TYPES, NoiseSchedule, StepTable, _check_choice, _check_schedule

__all__ = [
    "INITIAL_NOISE_STREAM",
    "STEP_STREAM_BASE",
    "group_norm_silu",
    "l_simple_loss",
    "philox4x32_10",
    "philox_normal",
    "q_sample",
    "step",
    "training_target",
]

# Philox stream numbers (contracts.md): q_sample uses the caller's stream in [0, 2**32); the reverse
# step of a sample at timestep t uses STEP_STREAM_BASE + t; a sampler's initial x_T uses
# INITIAL_NOISE_STREAM. The ranges are disjoint, so no two uses ever share noise.
STEP_STREAM_BASE = 2**32
INITIAL_NOISE_STREAM = 2**33

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers (Salmon et al. 2011)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key bumps (golden ratio, sqrt(3) - 1)
# Triton's constant (randn4x). In float32 it is the float just below 2**-31, so the top words, whose int32 ->
# float32 conversion rounds up to 2**31, give u = 1 - 2**-24: u lies in [0, 1 - 2**-24], never 1.
_UINT_TO_UNIFORM = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_MIN_UNIFORM = 1e-7  # keeps log(u) finite; Triton's choice
_STD = COEF_COLUMNS.index("std")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16-bit floats (7-10 bit mantissas would round the coefficients away), else dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an op's outputs for input ``x``, on every backend: channels_last for a 4-D x whose
    samples are each stored NHWC (and not also NCHW), whatever its batch stride (``x[::2]`` of a channels_last
    batch stays channels_last, as in PyTorch's elementwise ops); else contiguous. contracts.md's layouts are
    NCHW and 4-D channels_last: channels_last_3d input gives contiguous output."""
    if x.dim() != 4 or x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    nhwc = samples_are_dense(x, torch.channels_last) and not samples_are_dense(x, torch.contiguous_format)
    return torch.channels_last if nhwc else torch.contiguous_format


def samples_are_dense(x: torch.Tensor, memory_format: torch.memory_format) -> bool:
    """Whether every sample x[b] is dense in ``memory_format`` (contiguous, or channels_last for 4-D x), whatever
    the batch stride: what the kernels read in place, each tensor with its own batch stride."""
    if x.is_contiguous(memory_format=memory_format):
        return True  # the common case, without the loop below (~4 us a tensor)
    sizes, strides = x.shape[1:], x.stride()[1:]
    if memory_format == torch.channels_last:
        c, h, w = sizes
        expected = (1, w * c, c)
    else:
        expected = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    return all(s == e for s, e, n in zip(strides, expected, sizes) if n > 1)


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out cast to x's dtype and laid out in x's memory format."""
    return out.to(dtype=x.dtype).contiguous(memory_format=memory_format_of(x))


def check_dense(name: str, x: torch.Tensor, prefix: str = "") -> None:
    """The reference and the kernels read dense memory: a sparse or nested tensor is refused by name, not deep
    inside a copy. ``prefix``: the op's name, for the ops' own checks."""
    if x.layout != torch.strided or x.is_nested:
        got = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
        raise TypeError(f"{prefix}{name} must be a dense (strided) tensor, got a {got} one")


def _check_float_tensor(name: str, x, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    return x


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def _check_int64_vector(name: str, x, batch: int) -> torch.Tensor:
    """x: (batch,) integer tensor -> int64."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be an int64 tensor of shape ({batch},), got {got}")
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one per sample), got {tuple(x.shape)}")
    return x.long()


def _require(ok: torch.Tensor, what: str, got) -> None:
    """A check on tensor values: ValueError(f"{what}, got {got()}"). Under torch.compile, which cannot branch on
    values it does not know until the graph runs, a runtime assert with `what` instead, so the graph stays whole."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), what)
    elif not bool(ok.all()):
        raise ValueError(f"{what}, got {got()}")


def _timesteps(t, batch: int, num_train_timesteps: int) -> torch.Tensor:
    """t: int or (B,) integer tensor -> (B,) int64 CPU tensor, each in [0, T)."""
    what = f"t must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps)"
    if isinstance(t, torch.Tensor):
        if t.dim() == 0:
            t = t.expand(batch)
        t = _check_int64_vector("t", t, batch).cpu()
        _require((t >= 0) & (t < num_train_timesteps), what, lambda: f"min {int(t.min())}, max {int(t.max())}")
        return t
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"t must be an int or an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if not 0 <= t < num_train_timesteps:  # before torch.full, which raises a bare OverflowError past int64
        raise ValueError(f"{what}, got min {t}, max {t}")  # the words of every backend
    return torch.full((batch,), t, dtype=torch.int64)


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``. To a GPU through pinned memory and without waiting: a copy from pageable
    memory first waits for every kernel already queued, which leaves the GPU idle behind the host. (A tensor
    already pinned is copied from as it is: it must not change until the copy is done.)"""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _per_sample(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gather per-sample coefficient rows, ready to broadcast against `like`.

    Args:
        coef: (T, K) float64 CPU table; t: (B,) int64 CPU; like: (B, ...) the tensor they will scale.
    Returns:
        K tensors of shape (B, 1, ..., 1) in `dtype` on like's device (cast from float64 once).
    """
    rows = coef[t].to(device=like.device, dtype=dtype)
    view = (t.numel(),) + (1,) * (like.dim() - 1)
    return [rows[:, k].reshape(view) for k in range(coef.shape[1])]


# --------------------------------------------------------------------------------------------------
# Philox4x32-10 and the normal stream
# --------------------------------------------------------------------------------------------------


def _mulhilo32(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * multiplier for uint32 values held in int64.

    The 64-bit product may wrap past int64's sign bit; its low 64 bits are still exact (two's
    complement), and the mask after the arithmetic shift drops the sign extension.
    """
    p = a * multiplier
    return (p >> 32) & _MASK32, p & _MASK32


def _check_uint32(name: str, x, last: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be an int64 tensor holding uint32 values, got {got}")
    if x.dim() < 1 or x.shape[-1] != last:
        raise ValueError(f"{name} must have shape (..., {last}), got {tuple(x.shape)}")
    _require((x >= 0) & (x <= _MASK32), f"{name} values must be in [0, 2**32)",
             lambda: f"min {int(x.min())}, max {int(x.max())}")
    return x


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """The Philox4x32 bijection of Random123 (Salmon et al. 2011), vectorised.

    Args:
        counter: (..., 4) int64 holding uint32 values.
        key: (..., 2) int64 holding uint32 values; its leading dims broadcast against counter's.
        rounds: number of rounds (10 is the standard, crush-resistant choice).
    Returns:
        (..., 4) int64 holding uint32 values.
    """
    _check_uint32("counter", counter, 4)
    _check_uint32("key", key, 2)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for r in range(rounds):
        if r:  # the key is bumped between rounds, not before the first
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Contracts step 4: uint32 (in int64) -> float32 uniform in [0, 1), as Triton's uint_to_uniform_float."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # the same bits read as int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # [0, 2**31): both halves map onto it
    scale = torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32, device=x.device)
    # int32 -> float32 rounds to nearest, as the kernels' conversion does.
    return folded.to(torch.int32).to(torch.float32) * scale


def _box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contracts step 5 in float32: two uniforms -> two independent standard normals."""
    floor = torch.tensor(_MIN_UNIFORM, dtype=torch.float32, device=u_radius.device)
    two_pi = torch.tensor(_TWO_PI, dtype=torch.float32, device=u_radius.device)
    r = torch.sqrt(-2.0 * torch.log(torch.maximum(u_radius, floor)))
    theta = two_pi * u_angle
    return r * torch.cos(theta), r * torch.sin(theta)


def _bits_to_normal(bits: torch.Tensor) -> torch.Tensor:
    """Contracts steps 4-6: Philox words (..., 4) int64 holding uint32 -> normals (..., 4) float32."""
    u = _uint32_to_uniform(bits)
    z0, z1 = _box_muller(u[..., 0], u[..., 1])
    z2, z3 = _box_muller(u[..., 2], u[..., 3])
    return torch.stack([z0, z1, z2, z3], dim=-1)


def _stream_vector(stream, batch: int, device: torch.device) -> torch.Tensor:
    """stream: int or (B,) int64 tensor, each in [0, 2**63) -> (B,) int64 on device."""
    if isinstance(stream, torch.Tensor):
        s = _check_int64_vector("stream", stream, batch).to(device)
    elif isinstance(stream, int) and not isinstance(stream, bool):
        if not 0 <= stream < 2**63:
            raise ValueError(f"stream must be in [0, 2**63), got {stream}")
        return torch.full((batch,), stream, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"stream must be an int or an int64 tensor of shape ({batch},), got {type(stream).__name__}")
    _require(s >= 0, "stream must be in [0, 2**63)", lambda: f"min {int(s.min())}")
    return s


def philox_normal(seeds: torch.Tensor, stream, numel: int) -> torch.Tensor:
    """Standard normals that are a pure function of (seeds[b], stream, logical index i): contracts.md.

    One Philox call makes the four values of logical indices 4j .. 4j+3, so a sample's noise does not
    depend on the batch it sits in, nor on the device or the kernel's thread layout.

    Args:
        seeds: (B,) int64; read as uint64, the Philox key.
        stream: int, or (B,) int64 tensor (one stream per sample), in [0, 2**63).
        numel: values per sample (C * S), >= 0.
    Returns:
        (B, numel) float32 on seeds' device, contiguous.
    """
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1:
        got = tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must be a (B,) int64 tensor, got {got}")
    seeds = _check_int64_vector("seeds", seeds, seeds.shape[0])
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    B, device = seeds.shape[0], seeds.device
    s = _stream_vector(stream, B, device)
    if B == 0 or numel == 0:  # no draws: the (B, J) counters below would still be allocated for J = numel / 4
        return torch.empty((B, numel), dtype=torch.float32, device=device)

    j = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)[None, :]  # (1, J)
    s = s[:, None]  # (B, 1)
    counter = torch.stack(torch.broadcast_tensors(j & _MASK32, j >> 32, s & _MASK32, s >> 32), dim=-1)  # (B, J, 4)
    key = torch.stack([seeds & _MASK32, (seeds >> 32) & _MASK32], dim=-1)[:, None, :]  # (B, 1, 2)
    z = _bits_to_normal(philox4x32_10(counter, key))  # (B, J, 4)
    # contiguous: a slice of the last group of four leaves rows 4 * J apart, and .view(B, ...) would fail
    return z.reshape(B, 4 * j.shape[1])[:, :numel].contiguous()


def _noise_from(noise, seeds, stream, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exactly one of noise (shape of like) or seeds ((B,) int64, Philox in logical NCHW order).

    Returns: like's shape, in `dtype`.
    """
    if (noise is None) == (seeds is None):
        raise ValueError("exactly one of noise and seeds must be given, got "
                         + ("both" if noise is not None else "neither"))
    if noise is not None:
        _check_float_tensor("noise", noise)
        _check_same_shape("noise", noise, "the sample", like)
        return noise.to(dtype)
    seeds = _check_int64_vector("seeds", seeds, like.shape[0]).to(like.device)
    numel = math.prod(like.shape[1:])  # not like[0].numel(): B may be 0
    return philox_normal(seeds, stream, numel).reshape(like.shape).to(dtype)


# --------------------------------------------------------------------------------------------------
# forward process and training
# --------------------------------------------------------------------------------------------------


def q_sample(
    x0: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise.

    Args:
        x0: (B, ...) any float dtype, NCHW or channels_last.
        t: int or (B,) int64, in [0, T).
        noise: (B, ...) like x0, or None when seeds are given.
        seeds: (B,) int64: noise = philox_normal(seeds, stream, numel) in logical NCHW order.
        stream: the Philox stream, in [0, 2**32).
    Returns:
        (x_t, noise), both (B, ...) in x0's dtype and memory format.
    """
    _check_float_tensor("x0", x0)
    schedule = _check_schedule(schedule)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    t = _timesteps(t, x0.shape[0], schedule.num_train_timesteps)
    dtype = _compute_dtype(x0.dtype)
    eps = _noise_from(noise, seeds, stream, x0, dtype)
    a, b = _per_sample(schedule.q_coef, t, x0, dtype)
    return _like(a * x0.to(dtype) + b * eps, x0), _like(eps, x0)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t, schedule: NoiseSchedule, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """What the model learns to predict at x_t = q_sample(x0, t, noise).

    epsilon: noise; sample: x0; v_prediction: v = sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * x0.

    Args:
        x0, noise: (B, ...) same shape.
        t: int or (B,) int64.
    Returns:
        (B, ...) in x0's dtype and memory format.
    """
    _check_float_tensor("x0", x0)
    _check_float_tensor("noise", noise)
    _check_same_shape("noise", noise, "x0", x0)
    schedule = _check_schedule(schedule)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    t = _timesteps(t, x0.shape[0], schedule.num_train_timesteps)
    if prediction_type == "epsilon":
        return _like(noise, x0)
    if prediction_type == "sample":
        return _like(x0, x0)
    dtype = _compute_dtype(x0.dtype)
    a, b = _per_sample(schedule.q_coef, t, x0, dtype)
    return _like(a * noise.to(dtype) - b * x0.to(dtype), x0)


def l_simple_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Ho et al.'s L_simple (mean squared error), optionally min-SNR-gamma weighted (Hang et al. 2023).

    With snr = ac[t] / (1 - ac[t]), sample b's mean squared error is weighted by min(snr, gamma)
    divided by the factor that turns the x0-error into the predicted quantity's error: snr for
    epsilon, 1 for sample, snr + 1 for v_prediction. Weights are exact at snr = 0 (zero terminal SNR).

    Args:
        prediction, target: (B, ...) same shape.
        t: int or (B,) int64; on the CPU it costs a GPU no wait (a GPU t is read back to check its range).
        min_snr_gamma: None (unweighted) or gamma > 0.
    Returns:
        () scalar in float32 (float64 for float64 inputs).
    """
    _check_float_tensor("prediction", prediction)
    _check_float_tensor("target", target)
    _check_same_shape("target", target, "prediction", prediction)
    schedule = _check_schedule(schedule)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    t = _timesteps(t, prediction.shape[0], schedule.num_train_timesteps)
    dtype = _compute_dtype(prediction.dtype)
    per_sample = (prediction.to(dtype) - target.to(dtype)).square().flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    gamma = float(min_snr_gamma)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma!r}")
    ac = schedule.alphas_cumprod[t]
    snr = ac / (1.0 - ac)
    if prediction_type == "epsilon":
        weight = torch.clamp(gamma / snr, max=1.0)  # = min(snr, gamma) / snr, and 1 at snr == 0
    elif prediction_type == "sample":
        weight = torch.clamp(snr, max=gamma)
    else:
        weight = torch.clamp(snr, max=gamma) / (snr + 1.0)
    return (per_sample * _copy_to(weight.to(dtype), prediction.device)).mean()


# --------------------------------------------------------------------------------------------------
# the reverse step
# --------------------------------------------------------------------------------------------------


def _row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(rows, q, dim=1), bit for bit, in the ops it is made of (linear interpolation between the
    sorted values; a row holding NaN gives NaN): torch 2.11's dynamo cannot trace torch.quantile itself, and
    the reference must trace whole (torch.compile(fullgraph=True))."""
    last = rows.shape[1] - 1
    ranks = torch.full((rows.shape[0], 1), q, dtype=rows.dtype, device=rows.device) * last
    ranks = ranks.masked_fill(rows.isnan().any(dim=1, keepdim=True), last)
    below = ranks.long()
    ordered = rows.sort(dim=1).values
    return ordered.gather(1, below).lerp(ordered.gather(1, ranks.ceil().long()), ranks - below).squeeze(1)


def _threshold(x0: torch.Tensor, ratio: float, sample_max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022), per sample, as diffusers' _threshold_sample.

    x0: (B, ...) in the compute dtype. Returns the same shape: clamp(x0, -s, s) / s with
    s = clamp(quantile(|x0|, ratio), 1, sample_max_value) per sample.
    """
    if x0.numel() == 0:  # no sample, or samples of no elements: nothing to threshold (quantile would raise)
        return x0
    s = _row_quantile(x0.abs().flatten(1), ratio)
    s = s.clamp(min=1.0, max=sample_max_value).reshape((-1,) + (1,) * (x0.dim() - 1))
    return torch.clamp(x0, -s, s) / s


# Plain floats: torch 2.5's dynamo cannot compare a finfo's attributes inside a compiled function.
_FLOAT32_TINY, _FLOAT32_MAX = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)


def _check_float32_option(name: str, value) -> None:
    """The kernels take the step options as float32 (0 meaning "off"): refuse a positive value below its
    smallest normal number (it rounds to 0, or to a denormal that flush-to-zero reads as 0: the clipping or
    thresholding asked for would silently not happen) or a finite one above its largest (it becomes inf)."""
    value = float(value)
    if value < _FLOAT32_TINY:
        raise ValueError(f"{name} must be at least {_FLOAT32_TINY!r} (float32's smallest normal number: the kernels "
                         f"take it as float32, where a smaller value reads as 0, that is off), got {value!r}")
    if _FLOAT32_MAX < value < math.inf:
        raise ValueError(f"{name} must be at most {_FLOAT32_MAX!r} (float32's largest: the kernels take it as "
                         f"float32, where a larger value overflows) or inf, got {value!r}")


def _check_step_options(clip_range, thresholding, dynamic_thresholding_ratio, sample_max_value) -> None:
    if clip_range is not None:
        if not float(clip_range) > 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range!r}")
        _check_float32_option("clip_range", clip_range)
    if thresholding:
        if not 0.0 < float(dynamic_thresholding_ratio) <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
        if not float(sample_max_value) >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value!r}")
        _check_float32_option("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
        _check_float32_option("sample_max_value", sample_max_value)


def step(
    model_output: torch.Tensor,
    t,
    sample: torch.Tensor,
    table: StepTable,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    clip_range: float | None = None,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step x_t -> x_prev(t) from the table's coefficients (contracts.md).

        x0   = ax * x + am * m
        x0c  = threshold(x0) if thresholding else clamp(x0, +-clip_range) if clip_range else x0
        mean = p0 * x0c + p1 * x + p2 * m
        prev = mean + std * sigma * z,  sigma = exp(0.5 * (f * max_log + (1 - f) * min_log)), f = (v + 1) / 2
               for learned_range (v: the model's variance channels), else sigma = 1; where std == 0 (DDPM
               at t = 0) no noise term at all, as diffusers: a NaN in v or z does not reach prev there

    Args:
        model_output: (B, C, ...), or (B, 2C, ...) for learned_range (m, v split on dim 1).
        t: int or (B,) int64: per-sample timesteps, any t in [0, T) (rows exist off the schedule too).
        sample: (B, C, ...) x_t, any float dtype, NCHW or channels_last.
        table: a StepTable (schedule.ddpm_table / ddim_table).
        noise: (B, C, ...) standard normal z, or None.
        seeds: (B,) int64: z = philox_normal(seeds, STEP_STREAM_BASE + t, C * S) in logical NCHW order.
            Exactly one of noise / seeds, unless std == 0 for every sample (then neither is needed).
        clip_range: None or > 0; ignored when thresholding (as diffusers).
    Returns:
        (prev_sample, pred_original_sample): (B, C, ...) each, in sample's dtype and memory format;
        pred_original_sample is x0c.
    """
    _check_float_tensor("sample", sample, min_dim=2)
    _check_float_tensor("model_output", model_output, min_dim=2)
    if not isinstance(table, StepTable):
        raise TypeError(f"table must be a StepTable, got {type(table).__name__}")
    _check_step_options(clip_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    if table.variance_type == "learned_range":
        C = sample.shape[1]
        expected = (sample.shape[0], 2 * C) + tuple(sample.shape[2:])
        if model_output.shape != expected:
            raise ValueError(
                f"model_output must have shape {expected} (2C channels: prediction and variance) for "
                f"variance_type='learned_range', got {tuple(model_output.shape)}"
            )
        m, v = model_output[:, :C], model_output[:, C:]
    else:
        _check_same_shape("model_output", model_output, "sample", sample)
        m, v = model_output, None
    if model_output.device != sample.device:
        raise ValueError(f"model_output must be on sample's device {sample.device}, got {model_output.device}")
    t = _timesteps(t, sample.shape[0], table.num_train_timesteps)

    dtype = _compute_dtype(sample.dtype)
    x, m = sample.to(dtype), m.to(dtype)
    ax, am, p0, p1, p2, std, min_log, max_log = _per_sample(table.coef, t, x, dtype)
    x0 = ax * x + am * m
    if thresholding:
        x0c = _threshold(x0, float(dynamic_thresholding_ratio), float(sample_max_value))
    elif clip_range is not None:
        x0c = x0.clamp(-float(clip_range), float(clip_range))
    else:
        x0c = x0
    prev = p0 * x0c + p1 * x + p2 * m

    if noise is None and seeds is None:  # allowed where no sample draws: std == 0 (DDPM at t = 0, DDIM eta = 0)
        _require(table.coef[t, _STD] == 0, "exactly one of noise and seeds must be given", lambda: "neither")
    else:
        stream = STEP_STREAM_BASE + t.to(sample.device)
        z = _noise_from(noise, seeds, stream, sample, dtype)
        if v is not None:
            f = (v.to(dtype) + 1.0) * 0.5
            z = torch.exp(0.5 * (f * max_log + (1.0 - f) * min_log)) * z
        prev = prev + torch.where(std != 0, std * z, 0.0)
    return _like(prev, sample), _like(x0c, sample)


# --------------------------------------------------------------------------------------------------
# GroupNorm + time embedding + SiLU
# --------------------------------------------------------------------------------------------------


def _check_optional_param(name: str, p, shape: tuple, x: torch.Tensor) -> None:
    if p is None:
        return
    _check_float_tensor(name, p)
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} or be None, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {p.device}")


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    bias_in: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str = "silu",
) -> torch.Tensor:
    """GroupNorm with a per-sample input bias, an affine time-embedding modulation and SiLU (contracts.md).

        h   = x + bias_in[b, c]
        y0  = (h - mean[b, g]) * rstd[b, g] * weight[c] + bias[c]
        y1  = y0 * (1 + scale[b, c]) + shift[b, c]
        out = silu(y1) if act == "silu" else y1

    Args:
        x: (B, C, *spatial), at least one spatial dim, NCHW or channels_last.
        weight, bias: (C,) or None.
        num_groups: G, dividing C.
        eps: added to the biased group variance.
        bias_in, scale, shift: (B, C) or None, independently.
        act: "silu" or "none".
    Returns:
        (B, C, *spatial) in x's dtype and memory format. Statistics are float32 (float64 for float64 x);
        differentiable in every tensor argument.
    """
    _check_float_tensor("x", x, min_dim=3)
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing C={C}, got {num_groups!r}")
    if act not in ("silu", "none"):
        raise ValueError(f"act must be 'silu' or 'none', got {act!r}")
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        _check_optional_param(name, p, (C,), x)
    for name, p in (("bias_in", bias_in), ("scale", scale), ("shift", shift)):
        _check_optional_param(name, p, (B, C), x)

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    channel = (1, C) + (1,) * (x.dim() - 2)  # broadcasts a (C,) vector over x
    per_sample = (B, C) + (1,) * (x.dim() - 2)  # broadcasts a (B, C) matrix over x
    h = x.to(dtype)
    if bias_in is not None:
        h = h + bias_in.to(dtype).reshape(per_sample)
    if h.numel():
        groups = h.reshape(B, num_groups, -1)
        mean = groups.mean(dim=2, keepdim=True)
        var = groups.var(dim=2, unbiased=False, keepdim=True)
        y = ((groups - mean) * torch.rsqrt(var + float(eps))).reshape(h.shape)
    else:  # nothing to normalize (the -1 above is ambiguous at B == 0, and var() of no elements warns)
        y = h
    if weight is not None:
        y = y * weight.to(dtype).reshape(channel)
    if bias is not None:
        y = y + bias.to(dtype).reshape(channel)
    if scale is not None:
        y = y * (1.0 + scale.to(dtype).reshape(per_sample))
    if shift is not None:
        y = y + shift.to(dtype).reshape(per_sample)
    if act == "silu":
        y = F.silu(y)
    return _like(y, x)
