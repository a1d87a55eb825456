"""q_sample in Triton: ``x_t = a[t] * x0 + b[t] * eps`` and the target ``eps`` or ``a * eps - b * x0``
(docs/contracts.md, "q_sample table"), with eps given or drawn from the contract's Philox normals.

Mirrors csrc/cpu/q_sample.cpp. One program is one tile of one sample (see _tiles.py); float32 math.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..checks import bcs, batch_stride, check_t_range
from ._common import LAUNCH_OPTIONS, check_sizes, configs, load_f32, timestep_row
from ._tiles import CHANNELS_LAST_BLOCKS, programs_per_sample, sample_tile, tile_normals

OP = "q_sample"


@triton.autotune(configs=configs([{"BLOCK": 1024}, {"BLOCK": 2048}, {"BLOCK": 4096}], {"BLOCK": 8192},
                                 num_warps=(4, 8)),
                 key=["C", "S", "CHANNELS_LAST", "DRAW"])
@triton.heuristics(CHANNELS_LAST_BLOCKS)
# num_t (a bound check) and the stream words (Philox counter values) take no part in addresses: specialized on
# their values (== 1, divisible by 16) they would compile a kernel per stream class (a new stream per step).
@triton.jit(do_not_specialize=["num_t", "stream_lo", "stream_hi"])
def _q_sample_kernel(
    x0_ptr, x0_bs,        # (B, C, S) storage dtype, dense per sample, batch stride x0_bs
    t_ptr,                # (B,) int64
    table_ptr, num_t,     # (T, 2) float32: sqrt(ac), sqrt(1 - ac)
    noise_ptr, noise_bs,  # (B, C, S) like x0, or unused when DRAW
    seeds_ptr,            # (B,) int64 when DRAW
    stream_lo, stream_hi,  # the Philox stream's uint32 halves, as int32 (bit patterns: one argument type)
    xt_ptr, target_ptr,   # (B, C, S) dense outputs
    C, S,
    DRAW: tl.constexpr, V_TARGET: tl.constexpr, CHANNELS_LAST: tl.constexpr, S_MULTIPLE_OF_4: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offsets, j, lane, mask = sample_tile(tl.program_id(0), C, S, CHANNELS_LAST, S_MULTIPLE_OF_4, BLOCK,
                                            BLOCK_S, BLOCK_C)
    t, valid = timestep_row(t_ptr, b, num_t)
    nan = float("nan")
    a = tl.where(valid, tl.load(table_ptr + 2 * t), nan)  # a bad timestep poisons its sample (no sync)
    bb = tl.where(valid, tl.load(table_ptr + 2 * t + 1), nan)

    x0 = load_f32(x0_ptr + b * x0_bs, offsets, mask)
    if DRAW:
        eps = tile_normals(tl.load(seeds_ptr + b), stream_lo, stream_hi, j, lane, CHANNELS_LAST, S_MULTIPLE_OF_4)
    else:
        eps = load_f32(noise_ptr + b * noise_bs, offsets, mask)
    out = b * C * S + offsets
    tl.store(xt_ptr + out, (a * x0 + bb * eps).to(xt_ptr.dtype.element_ty), mask=mask)
    target = a * eps - bb * x0 if V_TARGET else eps
    tl.store(target_ptr + out, target.to(target_ptr.dtype.element_ty), mask=mask)


def launch(x0, t, table, noise, seeds, stream, target, x_t, out_target, layout):
    """The ``triton`` launcher of ops/q_sample.py (same arguments as its native one, tensors instead of pointers).

    x0, noise: (B, C, *spatial) dense per sample in ``layout``; t: (B,) int64; table: (T, 2) float32;
    seeds: (B,) int64 or None; stream: int in [0, 2**32); target: 0 epsilon, 1 v_prediction;
    x_t, out_target: preallocated like x0.
    """
    check_t_range(OP, t, table.shape[0])  # CPU tensors only: on CUDA the kernel guards instead
    B, C, S = bcs(x0)
    check_sizes(OP, C * S)
    draw = noise is None
    channels_last = layout == 1

    def grid(meta):
        return (B * programs_per_sample(meta, C, S, channels_last),)

    _q_sample_kernel[grid](
        x0, batch_stride(x0), t, table, table.shape[0], x0 if draw else noise, 0 if draw else batch_stride(noise),
        seeds if draw else t, _int32_bits(stream & 0xFFFFFFFF), _int32_bits(stream >> 32), x_t, out_target, C, S,
        DRAW=draw, V_TARGET=target == 1, CHANNELS_LAST=channels_last, **LAUNCH_OPTIONS)


def _int32_bits(word: int) -> int:
    """A uint32 word as the int32 of the same bits: Triton types an int argument by its value (int32 below 2**31,
    else int64), a second compiled variant for streams past 2**31; the kernel reads it back as uint32."""
    return word - 2**32 if word >= 2**31 else word
