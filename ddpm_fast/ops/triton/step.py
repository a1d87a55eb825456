"""The reverse step in Triton (DDPM or DDIM, folded into the coefficient table), docs/contracts.md
"Reverse-step coefficient table":

    x0 = ax * x + am * m;  x0c = clip / threshold(x0);  mean = p0 * x0c + p1 * x + p2 * m;
    prev = mean + std * sigma * z   (z given, or Philox(seeds[b], 2**32 + t[b], i); only where std != 0)

Mirrors csrc/cpu/step.cpp. One program is one tile of one sample (see _tiles.py); float32 math. Dynamic
thresholding needs each sample's quantile of |x0| first: Triton kernels compute it on the device (_select.py:
an exact radix select, no host sync, torch.quantile's linear interpolation as reference.step), then the step
kernel reads one float per sample.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..checks import bcs, batch_stride, check_t_range
from ._common import LAUNCH_OPTIONS, check_sizes, configs, load_f32, timestep_row
from ._select import thresholds
from ._tiles import CHANNELS_LAST_BLOCKS, programs_per_sample, sample_tile, tile_normals

OP = "step"
NO_NOISE, GIVEN_NOISE, DRAWN_NOISE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # NOISE


@triton.autotune(configs=configs([{"BLOCK": 1024}, {"BLOCK": 2048}, {"BLOCK": 4096}], {"BLOCK": 8192},
                                 num_warps=(4, 8)),
                 key=["C", "S", "CHANNELS_LAST", "NOISE", "HAS_V", "WRITE_X0"])
@triton.heuristics(CHANNELS_LAST_BLOCKS)
@triton.jit(do_not_specialize=["num_t"])  # a bound check, in no address: no variant per table length
def _step_kernel(
    x_ptr, x_bs,          # (B, C, S) the sample x_t, storage dtype, dense per sample, batch stride x_bs
    m_ptr, m_bs,          # (B, C, S) the model output (prediction part)
    v_ptr, v_bs,          # (B, C, S) learned_range's variance fraction v, when HAS_V
    t_ptr,                # (B,) int64
    table_ptr, num_t,     # (T, 8) float32 rows ax, am, p0, p1, p2, std, min_log, max_log
    noise_ptr, noise_bs,  # (B, C, S) when NOISE == GIVEN_NOISE
    seeds_ptr,            # (B,) int64 when NOISE == DRAWN_NOISE
    prev_ptr, x0_ptr,     # (B, C, S) dense outputs; x0_ptr used when WRITE_X0
    thr_ptr,              # (B,) float32 threshold s per sample when THRESHOLD
    clip,                 # clip range when CLIP
    C, S,
    NOISE: tl.constexpr, HAS_V: tl.constexpr, WRITE_X0: tl.constexpr, THRESHOLD: tl.constexpr,
    CLIP: tl.constexpr, CHANNELS_LAST: tl.constexpr, S_MULTIPLE_OF_4: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offsets, j, lane, mask = sample_tile(tl.program_id(0), C, S, CHANNELS_LAST, S_MULTIPLE_OF_4, BLOCK,
                                            BLOCK_S, BLOCK_C)
    t, valid = timestep_row(t_ptr, b, num_t)
    row = table_ptr + 8 * t
    ax, am = tl.load(row), tl.load(row + 1)
    p0, p1, p2, std = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)

    x = load_f32(x_ptr + b * x_bs, offsets, mask)
    m = load_f32(m_ptr + b * m_bs, offsets, mask)
    x0 = ax * x + am * m
    x0c = x0
    if THRESHOLD:
        s = tl.load(thr_ptr + b)
        x0c = tl.where(x0c < -s, -s, x0c)  # comparisons, not min/max: a NaN stays NaN, as torch.clamp
        x0c = tl.div_rn(tl.where(x0c > s, s, x0c), s + tl.zeros_like(x0c))
    elif CLIP:
        x0c = tl.where(x0c < -clip, -clip, x0c)
        x0c = tl.where(x0c > clip, clip, x0c)
    prev = p0 * x0c + p1 * x + p2 * m

    if NOISE == NO_NOISE:
        prev = tl.where(std != 0.0, float("nan"), prev)  # noise was due but none given (the cpu backend raises)
    elif std != 0.0:  # rows without noise (DDPM's t = 0, DDIM with eta = 0) draw and read nothing
        if NOISE == DRAWN_NOISE:
            # stream 2**32 + t (contracts.md): low word t, high word 1 (0 <= t < 2**32).
            z = tile_normals(tl.load(seeds_ptr + b), t & 0xFFFFFFFF, 1 + (t >> 32), j, lane, CHANNELS_LAST,
                             S_MULTIPLE_OF_4)
        else:
            z = load_f32(noise_ptr + b * noise_bs, offsets, mask)
        if HAS_V:
            min_log, max_log = tl.load(row + 6), tl.load(row + 7)
            f = (load_f32(v_ptr + b * v_bs, offsets, mask) + 1.0) * 0.5
            prev = prev + std * tl.exp(0.5 * (f * max_log + (1.0 - f) * min_log)) * z
        else:
            prev = prev + std * z

    prev = tl.where(valid, prev, float("nan"))  # a bad timestep poisons its sample (a check would sync)
    out = b * C * S + offsets
    tl.store(prev_ptr + out, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        x0c = tl.where(valid, x0c, float("nan"))
        tl.store(x0_ptr + out, x0c.to(x0_ptr.dtype.element_ty), mask=mask)


def launch(sample, model_output, variance, t, table, noise, seeds, clip_range, threshold_ratio, sample_max_value,
           prev, x0, layout):
    """The ``triton`` launcher of ops/step.py (same arguments as its native one, tensors instead of pointers).

    sample, model_output, variance, noise: (B, C, *spatial) dense per sample in ``layout`` (variance and
    noise may be None); t: (B,) int64; table: (T, 8) float32; seeds: (B,) int64 or None; clip_range > 0
    clips, threshold_ratio > 0 thresholds (and wins); prev, x0: preallocated outputs (x0 may be None).
    """
    check_t_range(OP, t, table.shape[0])  # CPU tensors only: on CUDA the kernel guards instead
    B, C, S = bcs(sample)
    check_sizes(OP, C * S)
    if threshold_ratio > 1.0:
        raise ValueError(f"{OP}: threshold_ratio must be <= 1, got {threshold_ratio}")
    noise_kind = GIVEN_NOISE if noise is not None else DRAWN_NOISE if seeds is not None else NO_NOISE
    if noise_kind == NO_NOISE and t.device.type == "cpu":  # as the cpu backend; on CUDA the kernel writes NaN
        stds = table[t, 5]
        if bool((stds != 0).any()):
            b = int((stds != 0).nonzero()[0, 0])
            raise ValueError(f"{OP}: timestep t[{b}] = {int(t[b])} adds noise (std = {float(stds[b])}) but "
                             "neither noise nor seeds was given")
    thresholding = threshold_ratio > 0.0
    thr = thresholds(sample, model_output, t, table, threshold_ratio, sample_max_value) if thresholding else t
    channels_last = layout == 1

    def grid(meta):
        return (B * programs_per_sample(meta, C, S, channels_last),)

    _step_kernel[grid](
        sample, batch_stride(sample), model_output, batch_stride(model_output),
        sample if variance is None else variance, 0 if variance is None else batch_stride(variance),
        t, table, table.shape[0], sample if noise is None else noise, 0 if noise is None else batch_stride(noise),
        t if seeds is None else seeds, prev, prev if x0 is None else x0, thr, float(clip_range), C, S,
        NOISE=noise_kind, HAS_V=variance is not None, WRITE_X0=x0 is not None, THRESHOLD=thresholding,
        CLIP=clip_range > 0.0, CHANNELS_LAST=channels_last, **LAUNCH_OPTIONS)
