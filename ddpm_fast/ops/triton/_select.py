"""Dynamic thresholding's s per sample, on the device, for the Triton reverse step: an exact radix select.

    s = clamp(quantile(|x0|, ratio), 1, sample_max_value),  x0 = ax * x + am * m  (the step kernel's rounding)

with torch.quantile's linear interpolation: pos = ratio * (n - 1) in float32, the values of ranks lo = floor(pos)
and lo + 1 (where pos is not whole), ``torch.lerp`` between them (an fma); NaN if any |x0| is NaN. The algorithm of
csrc/cuda/step.cu's ``cluster_quantile``: the keys are the bit patterns of |x0| as int32 (non-negative floats
order like their bits; a NaN's key is above +inf's 0x7f800000), and the key of rank lo is found one digit at a
time, highest first, by counting the digits of the candidates (the keys whose higher digits are those found).

Launches (no host sync: CUDA-graph capturable). A sample of at most MAX_TILES blocks: one, ``_sample_kernel``
(grid (B,)), whose program makes every pass over its sample and keeps the counts in registers. A larger one:
torch.zeros of the counts, PASSES ``_pass_kernel`` (grid (B, programs per sample): each program counts the digits
of its part of one sample and adds them to the sample's histogram with atomics; a pass's program derives the
digits found so far from the earlier passes' counts, which a kernel boundary completes), then ``_finish_kernel``
(grid (B,)). Either ends in ``_threshold``: the keys of ranks lo and lo + 1, the lerp, the NaN rule and the clamp.
Pass 0 also takes the largest key (NaN present?); the last pass the smallest key above the last candidates'
group: rank lo + 1 is either in the last counts (the next digit up, or lo's own with ties) or that key, so it
costs no pass of its own.

Digits of 7 + 8 + 8 + 8 bits (bit 31 of |x0| is 0), not 11 + 10 + 10 (which would read x and m once less): Triton
3.6, which the GPU image runs, lowers tl.histogram to a ballot per bit of the digit plus a popcount per bin that a
lane owns, so its work grows with the bin count. _pass_kernel for sm_90, BLOCK 2048 on 4 warps: ~41 instructions a
key per thread at 256 bins, ~205 and 255 registers at 2048. Triton 3.7 on emits one shared-memory ATOMS.POPC.INC a
key whatever the bins (triton-lang/triton#9517); there three passes would do.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ..checks import batch_stride, bcs
from ._common import INTERPRET, LAUNCH_OPTIONS, load_f32, timestep_row

PASSES, DIGIT_BITS = tl.constexpr(4), tl.constexpr(8)
RADIX = tl.constexpr(2**DIGIT_BITS.value)  # bins of a pass's histogram ...
TOP_BINS = tl.constexpr(2 ** (31 - DIGIT_BITS.value * (PASSES.value - 1)))  # ... but pass 0's (a 7-bit digit)
# A sample's row of the counts buffer: the passes' histograms, the largest key, and the smallest key above the last
# pass's candidates as its complement KEY_MAX ^ key (a maximum too: the buffer starts at 0, read as KEY_MAX, none).
MAX_KEY_AT = PASSES * RADIX
ABOVE_AT = MAX_KEY_AT + 1
ROW = MAX_KEY_AT + 2
KEY_MAX = tl.constexpr(0x7FFFFFFF)  # the largest key (a NaN's)
INF_KEY = tl.constexpr(0x7F800000)

# Keys a program counts: whole BLOCKs, up to MAX_TILES of them, about TARGET_PROGRAMS programs per pass (~8 per SM
# of an H100/H200's 132: small batches get more, smaller programs). Fixed, not autotuned: the counts
# accumulate by atomics, so a benchmarking rerun would add them twice. Under the interpreter (whose cost is per
# program and per operation) one large block a program.
BLOCK = 8192 if INTERPRET else 2048
MAX_TILES = 1 if INTERPRET else 8
TARGET_PROGRAMS = 1024
NUM_WARPS = 4
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis (programs per sample)


@triton.jit
def _digit_of_rank(counts, k):
    """The digit whose range of ranks holds rank k (counts: (bins,) int32, the candidates per digit) and k less the
    candidates below that digit."""
    inclusive = tl.cumsum(counts, 0)
    below = inclusive <= k
    return tl.sum(below.to(tl.int32), 0), k - tl.sum(tl.where(below, counts, 0), 0)


@triton.jit
def _descend(row, k, DONE: tl.constexpr):
    """(prefix, k): the digits of the key of rank k found by the first DONE passes (their counts in ``row``), in
    place in the key, and the rank among the candidates that share them."""
    prefix = k * 0
    for p in tl.static_range(DONE):
        digit, k = _digit_of_rank(tl.load(row + p * RADIX + tl.arange(0, RADIX)), k)
        prefix |= digit << (DIGIT_BITS * (PASSES - 1 - p))
    return prefix, k


@triton.jit
def _count(x_ptr, x_bs, m_ptr, m_bs, b, ax, am, n, prefix, first_block, tiles,
           PASS: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Over blocks first_block .. first_block + tiles - 1 of sample b: the digit counts (BINS,) of pass PASS's
    candidates (the keys whose higher digits are ``prefix``'s), their largest key (pass 0) and the smallest key
    above the candidates' group (the last pass); the others' are 0 and KEY_MAX."""
    SHIFT: tl.constexpr = DIGIT_BITS * (PASSES - 1 - PASS)
    counts = tl.zeros((BINS,), tl.int32)
    largest = tl.zeros((BLOCK,), tl.int32)
    above = tl.full((BLOCK,), KEY_MAX, tl.int32)
    for i in range(tiles):
        offsets = (first_block + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x0 = ax * load_f32(x_ptr + b * x_bs, offsets, mask) + am * load_f32(m_ptr + b * m_bs, offsets, mask)
        key = x0.to(tl.int32, bitcast=True) & KEY_MAX
        if PASS == 0:
            candidate = mask
        else:  # the keys whose higher digits are the prefix's
            higher = key >> (SHIFT + DIGIT_BITS)
            candidate = mask & (higher == prefix >> (SHIFT + DIGIT_BITS))
        counts += tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=candidate)
        if PASS == 0:
            largest = tl.maximum(largest, tl.where(mask, key, 0))
        if PASS == PASSES - 1:
            above = tl.minimum(above, tl.where(mask & (higher > prefix >> DIGIT_BITS), key, KEY_MAX))
    return counts, tl.max(largest, 0), tl.min(above, 0)


@triton.jit
def _row_coefficients(t_ptr, b, table_ptr, num_t):
    """ax, am of sample b's row; t clamped (no fault on a bad t: the step kernel writes NaN for it)."""
    t, _ = timestep_row(t_ptr, b, num_t)
    return tl.load(table_ptr + 8 * t), tl.load(table_ptr + 8 * t + 1)


@triton.jit(do_not_specialize=["num_t", "rank", "tiles"])  # no address: no compiled variant per value
def _pass_kernel(
    x_ptr, x_bs,        # (B, n) the sample x_t, storage dtype, dense per sample (either layout), batch stride x_bs
    m_ptr, m_bs,        # (B, n) the model output (prediction part)
    t_ptr,              # (B,) int64
    table_ptr, num_t,   # (T, 8) float32: ax, am are a row's first two
    hist_ptr,           # (B, ROW) int32, zeroed before pass 0: PASSES histograms of RADIX, the two extreme keys
    n, rank, tiles,     # keys per sample, the rank lo, BLOCKs per program
    PASS: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass over a part of a sample (grid (B, programs per sample)), its counts added to the sample's."""
    b = tl.program_id(0).to(tl.int64)
    ax, am = _row_coefficients(t_ptr, b, table_ptr, num_t)
    row = hist_ptr + b * ROW
    prefix, _ = _descend(row, rank, PASS)
    counts, largest, above = _count(x_ptr, x_bs, m_ptr, m_bs, b, ax, am, n, prefix, tl.program_id(1) * tiles, tiles,
                                    PASS, BINS, BLOCK)
    tl.atomic_add(row + PASS * RADIX + tl.arange(0, BINS), counts, mask=counts > 0, sem="relaxed")
    if PASS == 0:
        tl.atomic_max(row + MAX_KEY_AT, largest, sem="relaxed")
    if PASS == PASSES - 1:
        tl.atomic_max(row + ABOVE_AT, above ^ KEY_MAX, sem="relaxed")


@triton.jit
def _threshold(prefix, k, counts, largest, above, need_next, w, max_value):
    """s from the last pass: the digits found before it (``prefix``), the rank k among its candidates, its counts,
    the sample's largest key and the smallest key above the last candidates: the keys of ranks lo and lo + 1, the
    lerp, the NaN rule and the clamp."""
    digits = tl.arange(0, RADIX)
    digit, k = _digit_of_rank(counts, k)
    klo = prefix | digit
    ties = tl.sum(tl.where(digits == digit, counts, 0), 0) - k  # keys equal to klo from rank lo on
    next_digit = tl.min(tl.where((digits > digit) & (counts > 0), digits, RADIX), 0)
    khi = tl.where(next_digit < RADIX, prefix | next_digit, above)
    khi = tl.where((need_next != 0) & (ties < 2), khi, klo)
    below, above = klo.to(tl.float32, bitcast=True), khi.to(tl.float32, bitcast=True)
    # torch.lerp as ATen's CPU kernel computes it: one fma with the rounded difference. Where both are +inf its
    # inf - inf makes NaN: a rule here, as that subtraction would be a RuntimeWarning (an error in the tests) under
    # the interpreter.
    same = khi == klo
    diff = tl.where(same, 0.0, above - tl.where(same, 0.0, below))
    q = tl.where(w < 0.5, tl.fma(w, diff, below), tl.fma(w - 1.0, diff, above))
    q = tl.where((largest > INF_KEY) | (klo == INF_KEY), float("nan"), q)  # a NaN; lerp(inf, inf)
    s = tl.where(q < 1.0, 1.0, q)  # comparisons: a NaN stays NaN, as torch.clamp
    return tl.where(s > max_value, max_value, s)


@triton.jit(do_not_specialize=["rank", "need_next"])
def _finish_kernel(
    hist_ptr,           # (B, ROW) int32 after the last pass
    thr_ptr,            # (B,) float32 out: s
    rank, need_next,    # the rank lo; whether rank lo + 1 is interpolated toward (1) or not (0)
    w, max_value,       # float32: pos - lo; sample_max_value
):
    b = tl.program_id(0).to(tl.int64)
    row = hist_ptr + b * ROW
    prefix, k = _descend(row, rank, PASSES - 1)
    counts = tl.load(row + (PASSES - 1) * RADIX + tl.arange(0, RADIX))
    s = _threshold(prefix, k, counts, tl.load(row + MAX_KEY_AT), tl.load(row + ABOVE_AT) ^ KEY_MAX, need_next, w,
                   max_value)
    tl.store(thr_ptr + b, s)


@triton.jit(do_not_specialize=["num_t", "rank", "tiles", "need_next"])
def _sample_kernel(
    x_ptr, x_bs, m_ptr, m_bs, t_ptr, table_ptr, num_t,  # as _pass_kernel's
    thr_ptr,            # (B,) float32 out: s
    n, rank, tiles,     # keys per sample, the rank lo, BLOCKs per sample
    need_next, w, max_value,  # as _finish_kernel's
    BLOCK: tl.constexpr,
):
    """The whole select of one sample in one program (grid (B,)): every pass over the sample, its counts kept in
    registers, then s. For samples of at most MAX_TILES blocks: one launch instead of PASSES + 2."""
    b = tl.program_id(0).to(tl.int64)
    ax, am = _row_coefficients(t_ptr, b, table_ptr, num_t)
    prefix, k = rank * 0, rank
    largest = 0
    for p in tl.static_range(PASSES):
        counts, top, above = _count(x_ptr, x_bs, m_ptr, m_bs, b, ax, am, n, prefix, 0, tiles, p,
                                    TOP_BINS if p == 0 else RADIX, BLOCK)
        if p == 0:
            largest = top
        if p < PASSES - 1:
            digit, k = _digit_of_rank(counts, k)
            prefix |= digit << (DIGIT_BITS * (PASSES - 1 - p))
    tl.store(thr_ptr + b, _threshold(prefix, k, counts, largest, above, need_next, w, max_value))


def tiling(B: int, n: int) -> tuple[int, int]:
    """(BLOCKs per program, programs per sample) of a pass over B samples of n keys."""
    blocks = triton.cdiv(n, BLOCK)
    tiles = max(1, min(triton.cdiv(B * blocks, TARGET_PROGRAMS), MAX_TILES), triton.cdiv(blocks, MAX_GRID_Y))
    return tiles, triton.cdiv(blocks, tiles)


def _float32(value: float) -> float:
    """``value`` rounded to float32: host arithmetic without the few microseconds of a torch op each."""
    return struct.unpack("f", struct.pack("f", value))[0]


def thresholds(sample, model_output, t, table, ratio: float, sample_max_value: float) -> torch.Tensor:
    """s per sample, (B,) float32 on the device, for the step's inputs (see the launcher in step.py): sample and
    model_output (B, C, *spatial) dense per sample, t (B,) int64, table (T, 8) float32; 0 < ratio <= 1."""
    B, C, S = bcs(sample)
    n = C * S
    # float32, as torch.quantile computes them (the double product of two float32 values is exact)
    pos = _float32(_float32(ratio) * _float32(n - 1))
    lo = min(int(pos), n - 1)
    hi = min(math.ceil(pos), n - 1)
    thr = torch.empty(B, dtype=torch.float32, device=sample.device)
    inputs = (sample, batch_stride(sample), model_output, batch_stride(model_output), t, table, table.shape[0])
    finish = (int(hi > lo), _float32(pos - _float32(lo)), float(sample_max_value))
    blocks = triton.cdiv(n, BLOCK)
    if blocks <= MAX_TILES:
        _sample_kernel[(B,)](*inputs, thr, n, lo, blocks, *finish, BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
        return thr
    hist = torch.zeros(B, ROW.value, dtype=torch.int32, device=sample.device)
    tiles, programs = tiling(B, n)
    for p in range(PASSES.value):
        _pass_kernel[(B, programs)](*inputs, hist, n, lo, tiles, PASS=p, BINS=TOP_BINS.value if p == 0 else RADIX.value,
                                    BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
    _finish_kernel[(B,)](hist, thr, lo, *finish, **LAUNCH_OPTIONS)
    return thr
