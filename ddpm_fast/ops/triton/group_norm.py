"""GroupNorm + time-embedding bias or scale/shift + optional SiLU in Triton, forward and backward
(docs/contracts.md, "GroupNorm + time embedding + SiLU"). Mirrors csrc/cpu/group_norm.cpp's math:

    forward:  h = x + bias_in;  mean, rstd over the group (two passes, float32);
              y = act(((h - mean) * A + Bc)),  A = rstd * w * (1 + scale),  Bc = bias * (1 + scale) + shift
    backward: xhat = (h - mean) * rstd;  dy1 = dy * act'(y1);  per channel S1 = sum dy1, S2 = sum dy1 * xhat;
              dshift = S1;  dscale = w * S2 + bias * S1;  dweight = sum_b (1 + scale) S2;  dbias = sum_b (1 + scale) S1;
              dh = rstd * (k * dy1 - mean_c(k S1) - xhat * mean_c(k S2)),  k = w * (1 + scale);  dx = dh;
              dbias_in = sum_s dh

One program is one (sample, group); it walks the group in (channels x spatial) tiles, so any group size
works. The forward reads the group three times (mean, centred second moment, output) and the backward
twice; for the usual U-Net groups (4 channels x 32 x 32 floats = 16 KiB) the re-reads should come from L2
(not yet measured on a GPU). B * G programs: a batch-1 call with few groups leaves most SMs idle (a
split-S reduction would be the fix if benchmarks show it matters). dweight / dbias sum per-sample partials
over the batch afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import bcs
from ._common import LAUNCH_OPTIONS, check_sizes, configs


def _block_cg(args: dict) -> int:
    return min(triton.next_power_of_2(args["Cg"]), args["TILE"])


# triton.heuristics: a (channels, spatial) tile of about TILE elements over one group.
_GROUP_TILE = {"BLOCK_CG": _block_cg,
               "BLOCK_S": lambda args: max(1, min(triton.next_power_of_2(args["S"]), args["TILE"] // _block_cg(args)))}
_CONFIGS = configs([{"TILE": 1024}, {"TILE": 2048}, {"TILE": 4096}], {"TILE": 4096}, num_warps=(4, 8))


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
def _load_h(x_ptr, bin_ptr, base, b, c, s, cmask, C, S, HAS_BIN: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """h = x + bias_in over a tile (float32; bias_in added in float32, as the reference's separate add; 0
    outside the group), and the tile's mask."""
    mask = cmask & (s < S)
    h = tl.load(x_ptr + base + _offsets(c, s, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIN:
        h = tl.where(mask, h + tl.load(bin_ptr + b * C + c, mask=cmask, other=0.0), 0.0)
    return h, mask


@triton.autotune(configs=_CONFIGS, key=["Cg", "S", "CHANNELS_LAST"])
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _forward_kernel(
    x_ptr,                # (B, C, S) storage dtype, dense in its layout
    w_ptr, bias_ptr,      # (C,) float32 when HAS_W / HAS_BIAS
    bin_ptr, scale_ptr, shift_ptr,  # (B, C) float32 when HAS_BIN / HAS_SCALE / HAS_SHIFT
    y_ptr,                # (B, C, S) like x
    mean_ptr, rstd_ptr,   # (B, G) float32 outputs
    C, S, G, Cg, group_size, eps,  # group_size = Cg * S as a float
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b, g = (pid // G).to(tl.int64), pid % G
    base = b * C * S
    cr = tl.arange(0, BLOCK_CG)[:, None]
    sr = tl.arange(0, BLOCK_S)[None, :]

    acc = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_CG):
        cmask = c0 + cr < Cg
        for s0 in range(0, S, BLOCK_S):
            h, _ = _load_h(x_ptr, bin_ptr, base, b, g * Cg + c0 + cr, s0 + sr, cmask, C, S, HAS_BIN, CHANNELS_LAST)
            acc += h
    mean = tl.div_rn(tl.sum(tl.sum(acc, axis=1), axis=0), group_size)

    acc = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_CG):
        cmask = c0 + cr < Cg
        for s0 in range(0, S, BLOCK_S):
            h, mask = _load_h(x_ptr, bin_ptr, base, b, g * Cg + c0 + cr, s0 + sr, cmask, C, S, HAS_BIN,
                              CHANNELS_LAST)
            d = tl.where(mask, h - mean, 0.0)
            acc += d * d
    var = tl.div_rn(tl.sum(tl.sum(acc, axis=1), axis=0), group_size)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(mean_ptr + b * G + g, mean)
    tl.store(rstd_ptr + b * G + g, rstd)

    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        A = rstd * w * sc1
        Bc = bi * sc1 + shf
        for s0 in range(0, S, BLOCK_S):
            h, mask = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, C, S, HAS_BIN, CHANNELS_LAST)
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


@triton.autotune(configs=_CONFIGS, key=["Cg", "S", "CHANNELS_LAST"])
@triton.heuristics(_GROUP_TILE)
@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr,        # (B, C, S) storage dtype, dense in the same layout
    w_ptr, bias_ptr,      # (C,) float32 when HAS_W / HAS_BIAS
    bin_ptr, scale_ptr, shift_ptr,  # (B, C) float32 when present
    mean_ptr, rstd_ptr,   # (B, G) float32 saved by the forward
    dx_ptr,               # (B, C, S) like x
    dbin_ptr, dscale_ptr, dshift_ptr,  # (B, C) float32 when DBIN / DSCALE / DSHIFT
    pw_ptr, pb_ptr,       # (B, C) float32 per-sample partials of dweight / dbias when DW / DB
    C, S, G, Cg, group_size,  # group_size = Cg * S as a float
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIN: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, DBIN: tl.constexpr, DSCALE: tl.constexpr, DSHIFT: tl.constexpr, DW: tl.constexpr,
    DB: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    TILE: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b, g = (pid // G).to(tl.int64), pid % G
    base = b * C * S
    mean = tl.load(mean_ptr + b * G + g)
    rstd = tl.load(rstd_ptr + b * G + g)
    cr = tl.arange(0, BLOCK_CG)[:, None]
    sr = tl.arange(0, BLOCK_S)[None, :]

    # Pass 1: per-channel S1, S2 -> the (B, C) gradients and the group's sums of k * S1, k * S2.
    a1 = tl.zeros((BLOCK_CG, 1), tl.float32)
    a2 = tl.zeros((BLOCK_CG, 1), tl.float32)
    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        W = w * sc1
        B1 = bi * sc1 + shf
        acc1 = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
        acc2 = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            h, mask = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, C, S, HAS_BIN, CHANNELS_LAST)
            xhat = (h - mean) * rstd
            dy1 = _dy1(dy_ptr, base, _offsets(c, s0 + sr, C, S, CHANNELS_LAST), mask, xhat, W, B1, SILU)
            acc1 += dy1
            acc2 += dy1 * xhat
        s1 = tl.sum(acc1, axis=1)[:, None]
        s2 = tl.sum(acc2, axis=1)[:, None]
        if DSHIFT:
            tl.store(dshift_ptr + b * C + c, s1, mask=cmask)
        if DSCALE:
            tl.store(dscale_ptr + b * C + c, w * s2 + bi * s1, mask=cmask)
        if DW:
            tl.store(pw_ptr + b * C + c, sc1 * s2, mask=cmask)
        if DB:
            tl.store(pb_ptr + b * C + c, sc1 * s1, mask=cmask)
        a1 += tl.where(cmask, W * s1, 0.0)
        a2 += tl.where(cmask, W * s2, 0.0)
    m1 = tl.div_rn(tl.sum(a1, axis=0), group_size)  # (1,): mean of dxhat over the group
    m2 = tl.div_rn(tl.sum(a2, axis=0), group_size)  # (1,): mean of dxhat * xhat

    # Pass 2: dh -> dx and dbias_in.
    for c0 in range(0, Cg, BLOCK_CG):
        c = g * Cg + c0 + cr
        cmask = c0 + cr < Cg
        w, bi, sc1, shf = _channel_params(b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_BIAS,
                                          HAS_SCALE, HAS_SHIFT)
        W = w * sc1
        B1 = bi * sc1 + shf
        acc1 = tl.zeros((BLOCK_CG, BLOCK_S), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            h, mask = _load_h(x_ptr, bin_ptr, base, b, c, s0 + sr, cmask, C, S, HAS_BIN, CHANNELS_LAST)
            xhat = (h - mean) * rstd
            offsets = _offsets(c, s0 + sr, C, S, CHANNELS_LAST)
            dy1 = _dy1(dy_ptr, base, offsets, mask, xhat, W, B1, SILU)
            dh = rstd * (W * dy1 - m1[None, :] - xhat * m2[None, :])
            tl.store(dx_ptr + base + offsets, dh.to(dx_ptr.dtype.element_ty), mask=mask)
            if DBIN:
                acc1 += tl.where(mask, dh, 0.0)
        if DBIN:
            tl.store(dbin_ptr + b * C + c, tl.sum(acc1, axis=1)[:, None], mask=cmask)


def _placeholder(x: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
    """An absent pointer argument (its HAS_ flag keeps the kernel from reading it)."""
    return x if value is None else value


def forward(x, weight, bias, bias_in, scale, shift, y, mean, rstd, G, eps, act, layout):
    """The ``triton`` forward launcher of ops/group_norm.py.

    x: (B, C, *spatial) dense in ``layout``; weight, bias: (C,) float32 or None; bias_in, scale, shift:
    (B, C) float32 or None; y: like x, mean, rstd: (B, G) float32, all preallocated; act: 1 SiLU, 0 none.
    """
    B, C, S = bcs(x)
    check_sizes("group_norm_silu", C * S)
    _forward_kernel[(B * G,)](
        x, *(_placeholder(x, v) for v in (weight, bias, bias_in, scale, shift)), y, mean, rstd, C, S, G, C // G,
        float(C // G * S), float(eps), HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_BIN=bias_in is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=act == 1,
        CHANNELS_LAST=layout == 1, **LAUNCH_OPTIONS)


def backward(dy, x, weight, bias, bias_in, scale, shift, mean, rstd, dx, grads, G, act, layout):
    """The ``triton`` backward launcher of ops/group_norm.py.

    dy, x: (B, C, *spatial) dense in ``layout``; mean, rstd: (B, G) from the forward; dx: like x;
    grads: float32 buffers for (dweight (C,), dbias (C,), dbias_in, dscale, dshift (B, C)), None where the
    input is absent.
    """
    B, C, S = bcs(x)
    dweight, dbias, dbias_in, dscale, dshift = grads
    # dweight / dbias: one partial per sample from the kernel, summed over the batch here.
    pw = x.new_empty((B, C), dtype=torch.float32) if dweight is not None else None
    pb = x.new_empty((B, C), dtype=torch.float32) if dbias is not None else None
    _backward_kernel[(B * G,)](
        dy, x, *(_placeholder(x, v) for v in (weight, bias, bias_in, scale, shift)), mean, rstd, dx,
        *(_placeholder(x, v) for v in (dbias_in, dscale, dshift, pw, pb)), C, S, G, C // G,
        float(C // G * S),
        HAS_W=weight is not None, HAS_BIAS=bias is not None, HAS_BIN=bias_in is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, DBIN=dbias_in is not None,
        DSCALE=dscale is not None, DSHIFT=dshift is not None, DW=pw is not None, DB=pb is not None,
        SILU=act == 1, CHANNELS_LAST=layout == 1, **LAUNCH_OPTIONS)
    if pw is not None:
        torch.sum(pw, dim=0, out=dweight)
    if pb is not None:
        torch.sum(pb, dim=0, out=dbias)
