"""The tile of one program of an elementwise kernel (q_sample, step), for either layout.

A program covers a tile of one sample and gets, per element, its memory offset within the sample, its
Philox group ``j = i // 4`` and ``lane = i % 4`` of the logical (NCHW) index ``i``, and a mask:

* NCHW: ``BLOCK`` consecutive logical elements as a ``(BLOCK / 4, 4)`` tile: one Philox call per row;
* channels_last, ``S % 4 == 0``: ``(BLOCK_S / 4, 4, BLOCK_C)`` pixels x channels: the four values of one
  Philox call are four consecutive pixels of one channel, so again one call per (row, channel);
* channels_last otherwise (odd spatial sizes): ``(BLOCK_S, BLOCK_C)``, one Philox call per element.

Memory is contiguous along the last tile axis in every case (coalesced loads and stores).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import contract_normals


def _block_c(args: dict) -> int:
    if not args["CHANNELS_LAST"]:
        return 1
    return min(triton.next_power_of_2(args["C"]), 128, args["BLOCK"] // 4)


# triton.heuristics: a channels-last tile of BLOCK elements, up to 128 channels wide, and whether its spatial runs
# hold whole Philox groups (BLOCK_C = 1, BLOCK_S = BLOCK and S_MULTIPLE_OF_4 = False in NCHW, where none is read:
# one value each, so that C and S add no compiled variant).
CHANNELS_LAST_BLOCKS = {"BLOCK_C": _block_c, "BLOCK_S": lambda args: args["BLOCK"] // _block_c(args),
                        "S_MULTIPLE_OF_4": lambda args: bool(args["CHANNELS_LAST"]) and args["S"] % 4 == 0}


def programs_per_sample(meta: dict, C: int, S: int, channels_last: bool) -> int:
    if channels_last:
        return triton.cdiv(S, meta["BLOCK_S"]) * triton.cdiv(C, meta["BLOCK_C"])
    return triton.cdiv(C * S, meta["BLOCK"])


@triton.jit
def tiles_per_sample(C, S, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    if CHANNELS_LAST:
        return tl.cdiv(S, BLOCK_S) * tl.cdiv(C, BLOCK_C)
    return tl.cdiv(C * S, BLOCK)


@triton.jit
def sample_tile(pid, C, S, CHANNELS_LAST: tl.constexpr, S_MULTIPLE_OF_4: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """(b, offsets, j, lane, mask) of program ``pid``'s tile: its sample b (int64) and, per element, the offset
    from the sample's start (int32), the Philox group j, the lane and the in-bounds mask."""
    tiles = tiles_per_sample(C, S, CHANNELS_LAST, BLOCK, BLOCK_S, BLOCK_C)
    b = (pid // tiles).to(tl.int64)
    pid_in_sample = pid % tiles
    # One return statement: compiled Triton unifies the types of all returns, even in pruned branches.
    if not CHANNELS_LAST:
        rows = pid_in_sample * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        lane = tl.arange(0, 4)[None, :]
        offsets = rows[:, None] * 4 + lane
        j = rows[:, None]
        mask = offsets < C * S
    else:
        blocks_c = tl.cdiv(C, BLOCK_C)
        s0 = (pid_in_sample // blocks_c) * BLOCK_S
        c = (pid_in_sample % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        if S_MULTIPLE_OF_4:
            q = tl.arange(0, BLOCK_S // 4)[:, None, None]
            lane = tl.arange(0, 4)[None, :, None]
            cc = c[None, None, :]
            s = s0 + q * 4 + lane
            j = (cc * S + s0 + q * 4) // 4
        else:
            s = s0 + tl.arange(0, BLOCK_S)[:, None]
            cc = c[None, :]
            j = (cc * S + s) // 4
            lane = (cc * S + s) % 4
        offsets = s * C + cc
        mask = (s < S) & (cc < C)
    return b, offsets, j, lane, mask


@triton.jit
def _lanes_last(seed, stream_lo, stream_hi, j):
    """The four normals of each group in ``j`` on a new last axis, in lane order."""
    z0, z1, z2, z3 = contract_normals(seed, stream_lo, stream_hi, j)
    # join(join(z0, z2), join(z1, z3)) holds z0 z1 / z2 z3 on its last two axes: row-major, the lanes in order
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), j.shape + [4])


@triton.jit
def tile_normals(seed, stream_lo, stream_hi, j, lane, CHANNELS_LAST: tl.constexpr, S_MULTIPLE_OF_4: tl.constexpr):
    """The contract's normal of each element of a :func:`sample_tile` (logical index ``4 j + lane``). Where the
    tile has an axis of the four lanes, one Philox call per group serves its four elements, joined into that
    axis in lane order: ``j`` broadcast against ``lane`` would repeat the call in each of the four threads that
    hold a group's lanes (4x the instructions of the whole kernel, on the GPU). Odd spatial sizes in
    channels_last have no such axis: one call per element."""
    if not CHANNELS_LAST:  # j (R, 1), lane (1, 4)
        z = _lanes_last(seed, stream_lo, stream_hi, tl.reshape(j, (j.shape[0],)))
    elif S_MULTIPLE_OF_4:  # j (R, 1, BLOCK_C), lane (1, 4, 1)
        z = tl.permute(_lanes_last(seed, stream_lo, stream_hi, tl.reshape(j, (j.shape[0], j.shape[2]))), (0, 2, 1))
    else:  # j and lane (BLOCK_S, BLOCK_C)
        z0, z1, z2, z3 = contract_normals(seed, stream_lo, stream_hi, j)
        z = tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))
    return z
