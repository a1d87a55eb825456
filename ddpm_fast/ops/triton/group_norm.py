"""GroupNorm + time-embedding bias or scale/shift + optional SiLU in Triton, forward and backward
(docs/contracts.md, "GroupNorm + time embedding + SiLU"). Mirrors csrc/cpu/group_norm.cpp's math:

    forward:  h = x + bias_in;  mean, rstd over the group (float32);
              y = act(((h - mean) * A + Bc)),  A = rstd * w * (1 + scale),  Bc = bias * (1 + scale) + shift
    backward: xhat = (h - mean) * rstd;  dy1 = dy * act'(y1);  per channel S1 = sum dy1, S2 = sum dy1 * xhat;
              dshift = S1;  dscale = w * S2 + bias * S1;  dweight = sum_b (1 + scale) S2;  dbias = sum_b (1 + scale) S1;
              dh = rstd * (k * dy1 - mean_c(k S1) - xhat * mean_c(k S2)),  k = w * (1 + scale);  dx = dh;
              dbias_in = sum_s dh

Work: a program is one (sample, group, chunk), a chunk being a range of pixels [split * CHUNK, ...) of all
the group's channels (so loads stay coalesced in both layouts); it walks the chunk in (channels x spatial)
tiles, so any group size works. Each op reads x (and dy) twice, never three times:

* forward statistics in one pass: per channel, sums of (h - k) and (h - k)^2 shifted by the channel's first
  value k (no E[x^2] - E[x]^2 cancellation: |mean - k| is of the order of the spread), kept per lane in the
  loop (elementwise: no cross-thread reduction, i.e. no barriers, per tile), reduced per channel at the
  end; channels, channel tiles and chunks are merged with Chan's formula, all in float32;
* one chunk per group (SPLIT = 1, B * G programs fill the GPU): one kernel computes the statistics and then
  normalises (the second read of a group of at most a few hundred KiB should mostly hit L2; not measured);
* SPLIT > 1 (few groups: batch 1 at (1, 320, 64, 64) has 32 groups for 132 SMs): a statistics kernel writes
  per-chunk (mean, M2) partials (forward) or per-channel (S1, S2) partials (backward) to a small float32
  scratch; then each (group, chunk) program of the second kernel merges its group's partials in a fixed
  order (deterministic, no atomics), the chunk-0 program stores the per-group / per-channel results, and
  every program writes its chunk. dbias_in is summed over the chunks afterwards, dweight / dbias over the
  batch (fixed-order torch.sum).

choose_split() decides SPLIT (1 off the GPU; tests replace it to force the split path on the interpreter).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..checks import bcs
from ._common import LAUNCH_OPTIONS, check_sizes, configs

# Split the pixel axis when B * G programs would leave SMs idle. Not yet tuned on a GPU (no H200 run of
# this version): aim for about SPLIT_PROGRAMS_PER_SM programs per SM, each chunk keeping at least
# SPLIT_MIN_CHUNK_ELEMENTS elements (below that a program's fixed latency dominates), at most MAX_SPLIT
# chunks (the merges load a group's partials as one vector per channel).
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_CHUNK_ELEMENTS = 4096
MAX_SPLIT = 32


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split(groups: int, Cg: int, S: int, device: torch.device) -> int:
    """How many chunks to split each group's S pixels into, for ``groups`` = B * G groups of Cg x S elements."""
    if device.type != "cuda":
        return 1  # the interpreter pays per program: never split there unless a test asks
    target = SPLIT_PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else
                                               torch.cuda.current_device())
    if groups >= target:
        return 1
    return max(1, min(triton.cdiv(target, groups), Cg * S // SPLIT_MIN_CHUNK_ELEMENTS, MAX_SPLIT))


def _chunking(S: int, split: int) -> tuple[int, int]:
    """(split, CHUNK): chunks of CHUNK pixels, a multiple of 128 (whole tiles) or 16 (aligned starts) when
    that is small next to the chunk; the split actually used has no empty chunk."""
    chunk = triton.cdiv(S, max(1, min(split, S)))
    for align in (128, 16):
        if chunk >= 4 * align:
            chunk = triton.cdiv(chunk, align) * align
            break
    return triton.cdiv(S, chunk), chunk


def _block_cg(args: dict) -> int:
    return min(triton.next_power_of_2(args["Cg"]), args["TILE"])


# triton.heuristics: a (channels, spatial) tile of about TILE elements over one chunk of a group; for the
# merge of the backward's per-channel partials a (channels, SPLIT_P2) tile of at most TILE elements.
_GROUP_TILE = {"BLOCK_CG": _block_cg,
               "BLOCK_S": lambda args: max(1, min(triton.next_power_of_2(args["CHUNK"]),
                                                  args["TILE"] // _block_cg(args))),
               "SPLIT_P2": lambda args: triton.next_power_of_2(args["SPLIT"]),
               "BLOCK_CP": lambda args: max(1, min(_block_cg(args),
                                                   args["TILE"] // triton.next_power_of_2(args["SPLIT"])))}
_CONFIGS = configs([{"TILE": 1024}, {"TILE": 2048}, {"TILE": 4096}], {"TILE": 4096}, num_warps=(4, 8))
_KEY = ["Cg", "S", "CHUNK", "CHANNELS_LAST"]


@triton.jit
def _offsets(c, s, C, S, CHANNELS_LAST: tl.constexpr):
    """Element offsets within a sample of channels c (BLOCK_CG, 1) x spatial s (1, BLOCK_S)."""
    if CHANNELS_LAST:
        return s * C + c
    return c * S + s


@triton.jit
def _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr,
                    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(weight, bias, 1 + scale, shift) of channels c of sample b, float32, identity values where absent."""
    w = tl.load(w_ptr + c, mask=cmask, other=1.0) if HAS_W else tl.full(c.shape, 1.0, tl.float32)
    bi = tl.load(bias_ptr + c, mask=cmask, other=0.0) if HAS_BIAS else tl.zeros(c.shape, tl.float32)
    sc1 = 1.0 + tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0) if HAS_SCALE else tl.full(c.shape, 1.0,
                                                                                                 tl.float32)
    shf = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0) if HAS_SHIFT else tl.zeros(c.shape, tl.float32)
    return w, bi, sc1, shf


@triton.jit
def _load_h(x_ptr, bin_ptr, base, b, c, s, cmask, mask, C, S, HAS_BIN: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """h = x + bias_in over a tile, float32 (bias_in added in float32, as the reference's separate add).
    Outside ``mask`` the value is finite but meaningless: the statistics mask it out, the other passes
    replace it by the mean (a lane far from the mean would overflow exp in the SiLU: harmless on a GPU, a
    RuntimeWarning, which the tests make an error, on the interpreter)."""
    h = tl.load(x_ptr + base + _offsets(c, s, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIN:
        h = h + tl.load(bin_ptr + b * C + c, mask=cmask, other=0.0)
    return h


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's parallel combine of two (count, mean, M2) summaries (float32 scalars); a summary with count 0 is
    neutral (its mean may be anything finite)."""
    n = n_a + n_b
    frac = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _merge(n, mean, m2):
    """The (count, mean, M2) float32 scalars of a block of summaries (count 0 for empty ones): the mean is
    the count-weighted mean of means, M2 = sum M2 + sum n (mean_i - mean)^2 (Chan's formula for many parts at
    once: exact algebra, no cancellation; plain tl.sum, as tl.reduce with a custom combine runs element by
    element on the interpreter)."""
    total = tl.sum(n)
    inv = tl.div_rn(1.0, tl.maximum(total, 1.0))
    mu = tl.sum(n * mean) * inv
    # One correction step: its sum is centred, so the mean ends within about an ulp of its value however
    # large its offset (the first sum's rounding scales with |mean| and the number of terms).
    mu = mu + tl.sum(n * (mean - mu)) * inv
    d = mean - mu
    return total, mu, tl.sum(m2 + n * d * d)


@triton.jit
def _tile_stats(x_ptr, bin_ptr, base, b, c, cmask, s_begin, s_end, C, S,
                HAS_BIN: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of h over channels c (BLOCK_CG, 1) (``cmask``: inside the group) x pixels
    [s_begin, s_end) of sample b: float32 scalars, from one read.

    Shifted sums: per channel, d = h - k and d * d are summed, k being the mean of the channel's first tile
    in the range, so |mean - k| is of the order of the spread and S2 - S1^2 / n loses a few bits at most,
    whatever the offset of the mean (E[x^2] - E[x]^2 would lose them all). A single first value would do
    unless it is an outlier: the loss grows with ((k - mean) / std)^2, and a pixel 100 std off (a corner
    after zero padding) cost rstd 3e-4 of its value in a group of 2**16. The loop keeps two per-lane sums
    and is elementwise (no cross-thread reduction per tile); per channel they are reduced at the end, and
    the channels merged with Chan's formula."""
    sr = tl.arange(0, BLOCK_S)[None, :]
    mask = cmask & (s_begin + sr < s_end)
    h = _load_h(x_ptr, bin_ptr, base, b, c, s_begin + sr, cmask, mask, C, S, HAS_BIN, CHANNELS_LAST)
    inv = 1.0 / tl.maximum(tl.minimum(s_end - s_begin, BLOCK_S), 1).to(tl.float32)
    k = tl.sum(tl.where(mask, h * inv, 0.0), axis=1)[:, None]  # scaled first: no overflow near float32's max
    s1 = tl.where(mask, h - k, 0.0)
    s2 = s1 * s1
    for s0 in range(s_begin + BLOCK_S, s_end, BLOCK_S):
        mask = cmask & (s0 + sr < s_end)
        h = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, mask, C, S, HAS_BIN, CHANNELS_LAST)
        d = tl.where(mask, h - k, 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, axis=1)[:, None]
    t2 = tl.sum(s2, axis=1)[:, None]
    n = tl.where(cmask, (s_end - s_begin).to(tl.float32), 0.0)
    q = t1 / tl.maximum(n, 1.0)
    return _merge(n, k + q, tl.maximum(t2 - t1 * q, 0.0))


@triton.jit
def _chunk_stats(x_ptr, bin_ptr, base, b, g, s_begin, s_end, C, S, Cg,
                 HAS_BIN: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of h over group g's channels x pixels [s_begin, s_end) of sample b: float32 scalars,
    from one read, one channel tile after the other (combined with Chan's formula)."""
    cr = tl.arange(0, BLOCK_CG)[:, None]
    n, mean, m2 = _tile_stats(x_ptr, bin_ptr, base, b, g * Cg + cr, cr < Cg, s_begin, s_end, C, S, HAS_BIN,
                              CHANNELS_LAST, BLOCK_S)
    for c0 in range(BLOCK_CG, Cg, BLOCK_CG):  # groups of more than BLOCK_CG channels only
        n_b, mean_b, m2_b = _tile_stats(x_ptr, bin_ptr, base, b, g * Cg + c0 + cr, c0 + cr < Cg, s_begin, s_end, C,
                                        S, HAS_BIN, CHANNELS_LAST, BLOCK_S)
        n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit
def _chunk_of(S, CHUNK):
    """This program's (b, g) row index, chunk index and pixel range [s_begin, s_end)."""
    split = tl.program_id(1)
    s_begin = split * CHUNK
    return tl.program_id(0), split, s_begin, tl.minimum(s_begin + CHUNK, S)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _forward_stats_kernel(
    x_ptr,                # (B, C, S) storage dtype, dense in its layout
    bin_ptr,              # (B, C) float32 when HAS_BIN
    part_ptr,             # (B * G, 2, SPLIT) float32 output: each chunk's mean and M2
    C, S, G, Cg, CHUNK, SPLIT,
    HAS_BIN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
    BLOCK_CP: tl.constexpr,
):
    """Split path, kernel 1 of 2; grid (B * G, SPLIT)."""
    pid, split, s_begin, s_end = _chunk_of(S, CHUNK)
    b, g = (pid // G).to(tl.int64), pid % G
    _, mean, m2 = _chunk_stats(x_ptr, bin_ptr, b * C * S, b, g, s_begin, s_end, C, S, Cg, HAS_BIN, CHANNELS_LAST,
                               BLOCK_CG, BLOCK_S)
    tl.store(part_ptr + pid * 2 * SPLIT + split, mean)
    tl.store(part_ptr + (pid * 2 + 1) * SPLIT + split, m2)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _forward_kernel(
    x_ptr,                # (B, C, S) storage dtype, dense in its layout
    w_ptr, bias_ptr,      # (C,) float32 when HAS_W / HAS_BIAS
    bin_ptr, scale_ptr, shift_ptr,  # (B, C) float32 when HAS_BIN / HAS_SCALE / HAS_SHIFT
    part_ptr,             # (B * G, 2, SPLIT) float32 from _forward_stats_kernel when PARTIALS
    y_ptr,                # (B, C, S) like x
    mean_ptr, rstd_ptr,   # (B, G) float32 outputs
    C, S, G, Cg, CHUNK, SPLIT, group_size, eps,  # group_size = Cg * S as a float
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr, PARTIALS: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
    BLOCK_CP: tl.constexpr,
):
    """Grid (B * G, SPLIT): the group's statistics (its own pass when not PARTIALS, then SPLIT == 1 and
    CHUNK == S; else a merge of the chunks' partials), then the output over the program's chunk."""
    pid, split, s_begin, s_end = _chunk_of(S, CHUNK)
    b, g = (pid // G).to(tl.int64), pid % G
    base = b * C * S
    if PARTIALS:
        k = tl.arange(0, SPLIT_P2)[None, :]
        kmask = k < SPLIT
        pm = tl.load(part_ptr + pid * 2 * SPLIT + k, mask=kmask, other=0.0)
        pq = tl.load(part_ptr + (pid * 2 + 1) * SPLIT + k, mask=kmask, other=0.0)
        pn = tl.where(kmask, (tl.minimum(S, (k + 1) * CHUNK) - k * CHUNK).to(tl.float32) * Cg, 0.0)
        _, mean, m2 = _merge(pn, pm, pq)
    else:
        _, mean, m2 = _chunk_stats(x_ptr, bin_ptr, base, b, g, s_begin, s_end, C, S, Cg, HAS_BIN, CHANNELS_LAST,
                                   BLOCK_CG, BLOCK_S)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(m2, group_size) + eps))
    tl.store(mean_ptr + b * G + g, mean, mask=split == 0)
    tl.store(rstd_ptr + b * G + g, rstd, mask=split == 0)

    cr = tl.arange(0, BLOCK_CG)[:, None]
    sr = tl.arange(0, BLOCK_S)[None, :]
    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        A = rstd * w * sc1
        Bc = bi * sc1 + shf
        for s0 in range(s_begin, s_end, BLOCK_S):
            mask = cmask & (s0 + sr < s_end)
            h = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, mask, C, S, HAS_BIN, CHANNELS_LAST)
            h = tl.where(mask, h, mean)
            y = (h - mean) * A + Bc
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_ptr + base + _offsets(c, s0 + sr, C, S, CHANNELS_LAST), y.to(y_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def _dy1(dy_ptr, base, offsets, mask, xhat, W, B1, SILU: tl.constexpr):
    """dy1 = dy * silu'(y1), y1 = xhat * W + B1 (or dy without the activation); 0 outside the mask."""
    dy = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y1 = xhat * W + B1
        sg = tl.sigmoid(y1)
        dy = dy * (sg * (1.0 + y1 * (1.0 - sg)))
    return tl.where(mask, dy, 0.0)


@triton.jit
def _channel_sums(dy_ptr, x_ptr, bin_ptr, base, b, c, cmask, s_begin, s_end, mean, rstd, W, B1, C, S,
                  HAS_BIN: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    """(S1, S2) = (sum dy1, sum dy1 * xhat) over pixels [s_begin, s_end) of channels c (BLOCK_CG, 1): two
    (BLOCK_CG, 1) float32 blocks (per-lane sums in the loop, one reduction at the end)."""
    sr = tl.arange(0, BLOCK_S)[None, :]
    acc1 = tl.zeros((c.shape[0], BLOCK_S), tl.float32)
    acc2 = tl.zeros((c.shape[0], BLOCK_S), tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        mask = cmask & (s0 + sr < s_end)
        h = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, mask, C, S, HAS_BIN, CHANNELS_LAST)
        h = tl.where(mask, h, mean)
        xhat = (h - mean) * rstd
        dy1 = _dy1(dy_ptr, base, _offsets(c, s0 + sr, C, S, CHANNELS_LAST), mask, xhat, W, B1, SILU)
        acc1 += dy1
        acc2 += dy1 * xhat
    return tl.sum(acc1, axis=1)[:, None], tl.sum(acc2, axis=1)[:, None]


@triton.jit
def _channel_grads(b, c, cmask, split, s1, s2, w, bi, sc1, W, C, dscale_ptr, dshift_ptr, pw_ptr, pb_ptr,
                   DSCALE: tl.constexpr, DSHIFT: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr):
    """Stores the (B, C) gradients of channels c from their S1, S2 (the chunk-0 program); returns W * S1, W * S2
    (0 outside the group), whose group sums the input gradient needs."""
    smask = cmask & (c * 0 + split == 0)  # (not cmask & (split == 0): the interpreter rejects that mask)
    if DSHIFT:
        tl.store(dshift_ptr + b * C + c, s1, mask=smask)
    if DSCALE:
        tl.store(dscale_ptr + b * C + c, w * s2 + bi * s1, mask=smask)
    if DW:
        tl.store(pw_ptr + b * C + c, sc1 * s2, mask=smask)
    if DB:
        tl.store(pb_ptr + b * C + c, sc1 * s1, mask=smask)
    return tl.where(cmask, W * s1, 0.0), tl.where(cmask, W * s2, 0.0)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _backward_stats_kernel(
    dy_ptr, x_ptr,        # (B, C, S) storage dtype, dense in the same layout
    w_ptr, bias_ptr,      # (C,) float32 when HAS_W / HAS_BIAS
    bin_ptr, scale_ptr, shift_ptr,  # (B, C) float32 when present
    mean_ptr, rstd_ptr,   # (B, G) float32 saved by the forward
    part_ptr,             # (B, C, 2, SPLIT) float32 output: each chunk's S1, S2 per channel
    C, S, G, Cg, CHUNK, SPLIT,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
    BLOCK_CP: tl.constexpr,
):
    """Split path, kernel 1 of 2; grid (B * G, SPLIT)."""
    pid, split, s_begin, s_end = _chunk_of(S, CHUNK)
    b, g = (pid // G).to(tl.int64), pid % G
    base = b * C * S
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    cr = tl.arange(0, BLOCK_CG)[:, None]
    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        s1, s2 = _channel_sums(dy_ptr, x_ptr, bin_ptr, base, b, c, cmask, s_begin, s_end, mean, rstd, w * sc1,
                               bi * sc1 + shf, C, S, HAS_BIN, SILU, CHANNELS_LAST, BLOCK_S)
        row = part_ptr + (b * C + c) * 2 * SPLIT + split
        tl.store(row, s1, mask=cmask)
        tl.store(row + SPLIT, s2, mask=cmask)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr,        # (B, C, S) storage dtype, dense in the same layout
    w_ptr, bias_ptr,      # (C,) float32 when HAS_W / HAS_BIAS
    bin_ptr, scale_ptr, shift_ptr,  # (B, C) float32 when present
    mean_ptr, rstd_ptr,   # (B, G) float32 saved by the forward
    part_ptr,             # (B, C, 2, SPLIT) float32 from _backward_stats_kernel when PARTIALS
    dx_ptr,               # (B, C, S) like x
    dbin_ptr,             # (B, C, SPLIT) float32 when DBIN: each chunk's sum of dh (dbias_in when SPLIT == 1)
    dscale_ptr, dshift_ptr,  # (B, C) float32 when DSCALE / DSHIFT
    pw_ptr, pb_ptr,       # (B, C) float32 per-sample partials of dweight / dbias when DW / DB
    C, S, G, Cg, CHUNK, SPLIT, group_size,  # group_size = Cg * S as a float
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, DBIN: tl.constexpr, DSCALE: tl.constexpr, DSHIFT: tl.constexpr, DW: tl.constexpr,
    DB: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr, PARTIALS: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
    BLOCK_CP: tl.constexpr,
):
    """Grid (B * G, SPLIT): per channel S1, S2 (its own pass over the group when not PARTIALS, then SPLIT == 1
    and CHUNK == S; else the sum of the chunks' partials, in chunk order) -> the (B, C) gradients (stored by
    the chunk-0 program) and the group means m1, m2 -> dx and dbias_in over the program's chunk."""
    pid, split, s_begin, s_end = _chunk_of(S, CHUNK)
    b, g = (pid // G).to(tl.int64), pid % G
    base = b * C * S
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)

    # Phase 1: per-channel S1, S2 -> the (B, C) gradients and the group's sums of k * S1, k * S2.
    if PARTIALS:
        cr = tl.arange(0, BLOCK_CP)[:, None]
        kk = tl.arange(0, SPLIT_P2)[None, :]
        a1 = tl.zeros((BLOCK_CP, 1), tl.float32)
        a2 = tl.zeros((BLOCK_CP, 1), tl.float32)
        for c0 in range(0, Cg, BLOCK_CP):
            c = g * Cg + c0 + cr
            cmask = c0 + cr < Cg
            w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W,
                                              HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            row = part_ptr + (b * C + c) * 2 * SPLIT + kk
            pmask = cmask & (kk < SPLIT)
            s1 = tl.sum(tl.load(row, mask=pmask, other=0.0), axis=1)[:, None]
            s2 = tl.sum(tl.load(row + SPLIT, mask=pmask, other=0.0), axis=1)[:, None]
            t1, t2 = _channel_grads(b, c, cmask, split, s1, s2, w, bi, sc1, w * sc1, C, dscale_ptr, dshift_ptr,
                                    pw_ptr, pb_ptr, DSCALE, DSHIFT, DW, DB)
            a1 += t1
            a2 += t2
    else:
        cr = tl.arange(0, BLOCK_CG)[:, None]
        a1 = tl.zeros((BLOCK_CG, 1), tl.float32)
        a2 = tl.zeros((BLOCK_CG, 1), tl.float32)
        for c0 in range(0, Cg, BLOCK_CG):
            c = g * Cg + c0 + cr
            cmask = c0 + cr < Cg
            w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W,
                                              HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            s1, s2 = _channel_sums(dy_ptr, x_ptr, bin_ptr, base, b, c, cmask, s_begin, s_end, mean, rstd, w * sc1,
                                   bi * sc1 + shf, C, S, HAS_BIN, SILU, CHANNELS_LAST, BLOCK_S)
            t1, t2 = _channel_grads(b, c, cmask, split, s1, s2, w, bi, sc1, w * sc1, C, dscale_ptr, dshift_ptr,
                                    pw_ptr, pb_ptr, DSCALE, DSHIFT, DW, DB)
            a1 += t1
            a2 += t2
    m1 = tl.div_rn(tl.sum(a1), group_size)  # mean of dxhat over the group
    m2 = tl.div_rn(tl.sum(a2), group_size)  # mean of dxhat * xhat

    # Phase 2: dh over the chunk -> dx and the chunk's dbias_in.
    cr = tl.arange(0, BLOCK_CG)[:, None]
    sr = tl.arange(0, BLOCK_S)[None, :]
    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        W = w * sc1
        B1 = bi * sc1 + shf
        acc = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            mask = cmask & (s0 + sr < s_end)
            h = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, mask, C, S, HAS_BIN, CHANNELS_LAST)
            h = tl.where(mask, h, mean)
            xhat = (h - mean) * rstd
            offsets = _offsets(c, s0 + sr, C, S, CHANNELS_LAST)
            dy1 = _dy1(dy_ptr, base, offsets, mask, xhat, W, B1, SILU)
            dh = rstd * (W * dy1 - m1 - xhat * m2)
            tl.store(dx_ptr + base + offsets, dh.to(dx_ptr.dtype.element_ty), mask=mask)
            if DBIN:
                acc += tl.where(mask, dh, 0.0)
        if DBIN:
            tl.store(dbin_ptr + (b * C + c) * SPLIT + split, tl.sum(acc, axis=1)[:, None], mask=cmask)


def _placeholder(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    """An absent pointer argument (its HAS_ flag keeps the kernel from reading it)."""
    return x if value is None else value


def _plan(x: torch.Tensor, G: int) -> tuple[int, int, int, int, int]:
    """(B, C, S, SPLIT, CHUNK) of a launch."""
    B, C, S = bcs(x)
    check_sizes("group_norm_silu", C * S)
    split, chunk = _chunking(S, choose_split(B * G, C // G, S, x.device))
    return B, C, S, split, chunk


def forward(x, weight, bias, bias_in, scale, shift, y, mean, rstd, G, eps, act, layout):
    """The ``triton`` forward launcher of ops/group_norm.py.

    x: (B, C, *spatial) dense in ``layout``; weight, bias: (C,) float32 or None; bias_in, scale, shift:
    (B, C) float32 or None; y: like x, mean, rstd: (B, G) float32, all preallocated; act: 1 SiLU, 0 none.
    """
    B, C, S, split, chunk = _plan(x, G)
    Cg = C // G
    bin_arg = _placeholder(x, bias_in)
    part = mean  # unread placeholder unless split
    if split > 1:
        part = x.new_empty((B * G, 2, split), dtype=torch.float32)
        _forward_stats_kernel[(B * G, split)](
            x, bin_arg, part, C, S, G, Cg, chunk, split, HAS_BIN=bias_in is not None, CHANNELS_LAST=layout == 1,
            **LAUNCH_OPTIONS)
    _forward_kernel[(B * G, split)](
        x, *(_placeholder(x, v) for v in (weight, bias)), bin_arg, *(_placeholder(x, v) for v in (scale, shift)),
        part, y, mean, rstd, C, S, G, Cg, chunk, split, float(Cg * S), float(eps), HAS_W=weight is not None,
        HAS_BIAS=bias is not None, HAS_BIN=bias_in is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, SILU=act == 1, CHANNELS_LAST=layout == 1, PARTIALS=split > 1,
        **LAUNCH_OPTIONS)


def backward(dy, x, weight, bias, bias_in, scale, shift, mean, rstd, dx, grads, G, act, layout):
    """The ``triton`` backward launcher of ops/group_norm.py.

    dy, x: (B, C, *spatial) dense in ``layout``; mean, rstd: (B, G) from the forward; dx: like x;
    grads: float32 buffers for (dweight (C,), dbias (C,), dbias_in, dscale, dshift (B, C)), None where the
    input is absent.
    """
    B, C, S, split, chunk = _plan(x, G)
    Cg = C // G
    dweight, dbias, dbias_in, dscale, dshift = grads
    # dweight / dbias: one partial per sample from the kernel, summed over the batch here.
    pw = x.new_empty((B, C), dtype=torch.float32) if dweight is not None else None
    pb = x.new_empty((B, C), dtype=torch.float32) if dbias is not None else None
    small = [_placeholder(x, v) for v in (weight, bias, bias_in, scale, shift)]
    flags = dict(HAS_W=weight is not None, HAS_BIAS=bias is not None, HAS_BIN=bias_in is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=act == 1, CHANNELS_LAST=layout == 1)
    part, dbin = mean, dbias_in  # unread placeholder / dbias_in itself unless split
    if split > 1:
        part = x.new_empty((B, C, 2, split), dtype=torch.float32)
        if dbias_in is not None:
            dbin = x.new_empty((B, C, split), dtype=torch.float32)  # per-chunk sums, added up below
        _backward_stats_kernel[(B * G, split)](
            dy, x, *small, mean, rstd, part, C, S, G, Cg, chunk, split,
            **flags, **LAUNCH_OPTIONS)
    _backward_kernel[(B * G, split)](
        dy, x, *small, mean, rstd, part, dx, *(_placeholder(x, v) for v in (dbin, dscale, dshift, pw, pb)),
        C, S, G, Cg, chunk, split, float(Cg * S), DBIN=dbias_in is not None, DSCALE=dscale is not None,
        DSHIFT=dshift is not None, DW=pw is not None, DB=pb is not None, PARTIALS=split > 1, **flags,
        **LAUNCH_OPTIONS)
    if split > 1 and dbias_in is not None:
        torch.sum(dbin, dim=2, out=dbias_in)
    if pw is not None:
        torch.sum(pw, dim=0, out=dweight)
    if pb is not None:
        torch.sum(pb, dim=0, out=dbias)
