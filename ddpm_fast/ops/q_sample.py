"""q_sample: the forward noising ``x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * eps`` in one pass.

The training form draws ``eps`` inside the kernel from the Philox contract (docs/contracts.md) and writes
``x_t`` and the training target, so the noise never makes a round trip through memory.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._native import launch_context, native_kernels
from ..schedule import NoiseSchedule
from .backend import derivative_refusal, on_device, resolve
from .dispatch import call, custom_op
from .triton import launcher as triton_launcher
from .checks import (DTYPE_CODE, batch_stride, bcs, check_t_range, check_tensor, dense, layout_of,
                     memory_format, seeds_tensor, timesteps)

OP = "q_sample"
TARGETS = ("epsilon", "v_prediction", "sample")
_TARGET_CODE = {"epsilon": 0, "v_prediction": 1}


def _launch_native(backend, x0, t, table, noise, seeds, stream, target, x_t, out_target, layout):
    if backend == "cpu":  # the CUDA kernels check t on the device: a check here would sync
        check_t_range(OP, t, table.shape[0])
    B, C, S = bcs(x0)
    native_kernels(backend, x0.device).q_sample(
        x0.data_ptr(), batch_stride(x0), t.data_ptr(), table.data_ptr(), table.shape[0],
        0 if noise is None else noise.data_ptr(), 0 if noise is None else batch_stride(noise),
        0 if seeds is None else seeds.data_ptr(), stream, x_t.data_ptr(), out_target.data_ptr(),
        target, B, C, S, layout, DTYPE_CODE[x0.dtype], launch_context(backend, x0.device))


_LAUNCHERS = {"cpu": partial(_launch_native, "cpu"), "cuda": partial(_launch_native, "cuda"),
              "triton": triton_launcher(OP)}


@custom_op("ddpm_fast::q_sample")
def _q_sample_op(x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], seeds: Optional[Tensor],
                 stream: int, target: int, backend: str) -> tuple[Tensor, Tensor]:
    layout = layout_of(x0)
    x0 = dense(x0, layout)
    noise = None if noise is None else dense(noise, layout)
    x_t = torch.empty_like(x0, memory_format=memory_format(layout))
    out_target = torch.empty_like(x_t)
    if x0.numel():
        with on_device(x0):
            _LAUNCHERS[backend](x0, t, table, noise, seeds, stream, target, x_t, out_target, layout)
    return x_t, out_target


@_q_sample_op.register_fake
def _(x0, t, table, noise, seeds, stream, target, backend):
    x_t = torch.empty_like(x0, memory_format=memory_format(layout_of(x0)))
    return x_t, torch.empty_like(x_t)


def q_sample(x0: Tensor, t, schedule, noise: Tensor | None = None, *, seeds: Tensor | None = None,
             stream: int = 0, target: str = "epsilon", backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` to timestep ``t``; returns ``(x_t, target)``.

    Args:
        x0: (B, C, *spatial) float32 / float16 / bfloat16, NCHW or channels_last.
        t: int or (B,) int64, each in ``[0, schedule.num_train_timesteps)``.
        schedule: a :class:`~ddpm_fast.schedule.NoiseSchedule`.
        noise: (B, C, *spatial) like ``x0``, or None to draw it from ``seeds``.
        seeds: (B,) int64 on x0's device: sample b's noise is Philox(seeds[b], stream, logical index).
        stream: the noise stream, ``0 <= stream < 2**32``; training uses a new one per step or new seeds.
        target: what the second output is: "epsilon" (the noise), "v_prediction" (``a * eps - b * x0``)
            or "sample" (``x0`` itself).
        backend: "cuda" | "triton" | "cpu" | "torch", or None to choose (see :mod:`ddpm_fast.ops.backend`).

    Returns:
        x_t: like x0 (dtype and memory format); target: like x0. The memory formats kept are NCHW and channels_last
        (docs/contracts.md); any other layout, channels_last_3d included, gives contiguous outputs.
    """
    check_tensor(OP, "x0", x0, min_dim=2)
    if not isinstance(schedule, NoiseSchedule):  # the kernels' path reads schedule.q_table: say so before
        raise TypeError(f"{OP}: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if (noise is None) == (seeds is None):
        raise ValueError(f"{OP}: give exactly one of noise and seeds, got "
                         f"{'both' if noise is not None else 'neither'}")
    if noise is not None:
        check_tensor(OP, "noise", noise, dtypes=(x0.dtype,), shape=x0.shape, device=x0.device)
    else:
        seeds = seeds_tensor(OP, seeds, x0.shape[0], x0.device)
    if target not in TARGETS:
        raise ValueError(f"{OP}: target must be one of {TARGETS}, got {target!r}")
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"{OP}: stream must be an int in [0, 2**32), got {stream!r}")
    t = timesteps(OP, t, x0.shape[0], x0.device)

    chosen = resolve(OP, tuple(_LAUNCHERS), x0.device, backend, derivative_refusal((x0, noise), has_backward=False))
    if chosen == "torch":
        x_t, eps = reference.q_sample(x0, t, schedule, noise=noise, seeds=seeds, stream=stream)
        if target == "epsilon":
            return x_t, eps
        return x_t, reference.training_target(x0, eps, t, schedule, target)
    table = schedule.q_table(x0.device)
    x_t, out = call(_q_sample_op, x0, t, table, noise, seeds, stream, _TARGET_CODE.get(target, 0), chosen)
    return x_t, (x0 if target == "sample" else out)
