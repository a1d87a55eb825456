"""What the Triton kernels share: the contract's noise, the launch configurations, the t-range guard.

Noise (docs/contracts.md): ``tl.philox(seed, c0, c1, c2, c3)`` is Philox4x32-10 with key
``(seed & 0xffffffff, seed >> 32)`` (the seed read as uint64) and counter ``(c0, c1, c2, c3)`` in Triton 3.x
(3.6 and 3.9 alike; ``tl.randint4x(seed, offset)`` would fix the counter to ``(offset lo, offset hi, 0, 0)``,
leaving no room for the stream). So the contract's counter ``(j lo, j hi, stream lo, stream hi)`` goes to
``tl.philox`` directly, and Triton's own ``uint_to_uniform_float`` / ``pair_uniform_to_normal`` are steps 4-5.

Blocks: on a GPU each kernel autotunes over a few configurations; under ``TRITON_INTERPRET=1`` (the CPU
interpreter, used by CI) there is one configuration with large blocks and no benchmarking, because the
interpreter's cost is per program and per operation, not per element. ``DDPM_FAST_TRITON_AUTOTUNE=0``
takes the middle GPU configuration without benchmarking: a test run on a fresh GPU would otherwise spend
minutes tuning every test shape (scripts/gpu_check.sh sets it for its test stages, not its benchmarks).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Read when this module is imported: Triton decides between compiling and interpreting when a kernel is
# defined, which happens at the import of the kernel modules, after this one.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("DDPM_FAST_TRITON_AUTOTUNE", "1") != "0"
# In-sample offsets are int32 (batch offsets are int64), and so is the end of a sample's last block (a tile
# count's cdiv adds BLOCK - 1, a chunk's end adds CHUNK): 2**16 below 2**31 leaves room for the largest.
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 2**16
# Every launch: no a * b + c -> fma contraction, so each product is rounded as in the reference's separate
# float32 ops (the kernels are memory-bound: fusion buys no time). Explicit, because Triton 3.9 warns when
# it is left to the default (which is going to change).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def configs(gpu: list[dict], interpreter: dict, num_warps: tuple[int, ...] = (4,)) -> list[triton.Config]:
    """The autotuning space: ``gpu`` block settings (each one element count: BLOCK, TILE) x ``num_warps`` on a GPU,
    but for more than 16 elements a thread; one ``interpreter`` setting on the CPU; the middle ``gpu`` setting
    alone when autotuning is off."""
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=1)]
    if not AUTOTUNE:
        return [triton.Config(gpu[len(gpu) // 2], num_warps=num_warps[0])]
    # Over 16 elements a thread (4096 on 4 warps) the sm_90 code of the channels-last noise and GroupNorm backward
    # kernels spills (Triton 3.6), and the others keep ~220 registers: unlikely the fastest, and each is a compile.
    return [triton.Config(kw, num_warps=w) for kw in gpu for w in num_warps if max(kw.values()) <= 16 * 32 * w]


def check_sizes(op: str, per_sample: int) -> None:
    if per_sample > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"{op}: the triton backend takes at most 2**31 - 2**16 elements per sample, got "
                         f"{per_sample} (the cuda and cpu backends take more)")


@triton.jit
def timestep_row(t_ptr, b, num_t):
    """Sample b's timestep, clamped into the table, and whether it was inside ``[0, num_t)``."""
    t = tl.load(t_ptr + b)
    valid = (t >= 0) & (t < num_t)
    return tl.where(valid, t, 0), valid


@triton.jit
def contract_philox(seed, j, stream_lo, stream_hi):
    """The contract's four uint32 words for group ``j`` (int32 / int64, any block shape): Philox4x32-10 with
    key = the int64 ``seed`` (a loaded scalar) read as uint64, counter (j lo, j hi, stream lo, stream hi).
    ``stream_lo`` / ``stream_hi`` may arrive as int32, int64 or a constexpr; all become uint32 blocks."""
    j = j.to(tl.int64)
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, (zero + stream_lo).to(tl.uint32), (zero + stream_hi).to(tl.uint32))


@triton.jit
def contract_normals(seed, stream_lo, stream_hi, j):
    """The contract's four normals of group ``j`` (logical indices 4 j .. 4 j + 3): one Philox call per element
    of ``j``, then Triton's randn4x conversion (steps 4-5)."""
    x0, x1, x2, x3 = contract_philox(seed, j, stream_lo, stream_hi)
    z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(x0), tl.uint_to_uniform_float(x1))
    z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(x2), tl.uint_to_uniform_float(x3))
    return z0, z1, z2, z3


@triton.jit
def load_f32(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
