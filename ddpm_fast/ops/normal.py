"""randn: the contract's Gaussian noise (docs/contracts.md) for a batch of per-sample seeds.

Samplers draw their starting noise x_T with it, so a sample's seed fixes its whole trajectory whatever
the batch it runs in, the device or the backend.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from .. import reference
from .._native import launch_context, native_kernels
from .backend import on_device, resolve
from .checks import DTYPE_CODE, FLOAT_DTYPES, check_tensor

OP = "randn"


def _launch_native(backend, seeds, stream, out):
    native_kernels(backend, out.device).normal(seeds.data_ptr(), stream, out.data_ptr(), out.shape[0],
                                               out.shape[1], DTYPE_CODE[out.dtype], launch_context(backend, out.device))


_LAUNCHERS = {"cpu": partial(_launch_native, "cpu"), "cuda": partial(_launch_native, "cuda")}


@torch.library.custom_op("ddpm_fast::randn", mutates_args=())
def _randn_op(seeds: Tensor, numel: int, stream: int, dtype: torch.dtype, backend: str) -> Tensor:
    out = seeds.new_empty((seeds.shape[0], numel), dtype=dtype)
    if out.numel():
        with on_device(seeds):
            _LAUNCHERS[backend](seeds, stream, out)
    return out


@_randn_op.register_fake
def _(seeds, numel, stream, dtype, backend):
    return seeds.new_empty((seeds.shape[0], numel), dtype=dtype)


def randn(seeds: Tensor, shape, stream: int = reference.INITIAL_NOISE_STREAM, dtype: torch.dtype = torch.float32,
          *, backend: str | None = None) -> Tensor:
    """Standard normals of shape ``(B, *shape)`` on the seeds' device: sample b's values are
    Philox(seeds[b], stream, logical index), so they do not depend on the batch they are drawn in.

    Args:
        seeds: (B,) int64.
        shape: the per-sample shape, e.g. (3, 32, 32), or an int for a 1-d one.
        stream: the noise stream, ``0 <= stream < 2**63`` (default: the samplers' initial-noise stream).
        dtype: float32, float16 or bfloat16 (values are computed in float32 and rounded).
    """
    check_tensor(OP, "seeds", seeds, dtypes=(torch.int64,))
    if seeds.dim() != 1:
        raise ValueError(f"{OP}: seeds must have shape (B,) (one int64 seed per sample), got {tuple(seeds.shape)}")
    seeds = seeds.contiguous()
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)  # an int too, as torch.randn takes
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in dims):
        raise ValueError(f"{OP}: shape must be a non-negative int or a tuple of them, got {shape!r}")
    shape = dims
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: dtype must be float32, float16 or bfloat16, got {dtype}")
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**63:
        raise ValueError(f"{OP}: stream must be an int in [0, 2**63), got {stream!r}")
    numel = math.prod(shape)
    if numel >= 2**63:  # the op's numel is an int64
        raise ValueError(f"{OP}: shape must hold fewer than 2**63 values per sample, got {shape} ({numel})")
    chosen = resolve(OP, tuple(_LAUNCHERS), seeds.device, backend)
    if chosen == "torch":
        flat = reference.philox_normal(seeds, stream, numel).to(dtype)
    else:
        flat = torch.ops.ddpm_fast.randn(seeds, numel, stream, dtype, chosen)
    return flat.reshape(seeds.shape[0], *shape)
