"""step: one reverse (denoising) step of DDPM or DDIM, fused into one pass over the sample.

The scheduler's math is folded into a per-timestep coefficient table (``schedule.StepTable``,
docs/contracts.md), so one kernel serves every prediction type, variance type and per-sample timestep.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._native import launch_context, native_kernels
from ..schedule import StepTable
from .backend import derivative_refusal, on_device, resolve
from .dispatch import call, custom_op
from .triton import launcher as triton_launcher
from .checks import (DTYPE_CODE, batch_stride, bcs, check_t_range, check_tensor, dense, layout_of,
                     memory_format, seeds_tensor, timesteps)

OP = "step"


def _launch_native(backend, sample, model_output, variance, t, table, noise, seeds, clip_range, threshold_ratio,
                   sample_max_value, prev, x0, layout):
    if backend == "cpu":  # the CUDA kernels check t on the device: a check here would sync
        check_t_range(OP, t, table.shape[0])
    B, C, S = bcs(sample)
    native_kernels(backend, sample.device).step(
        sample.data_ptr(), batch_stride(sample), model_output.data_ptr(), batch_stride(model_output),
        0 if variance is None else variance.data_ptr(), 0 if variance is None else batch_stride(variance),
        t.data_ptr(), table.data_ptr(), table.shape[0],
        0 if noise is None else noise.data_ptr(), 0 if noise is None else batch_stride(noise),
        0 if seeds is None else seeds.data_ptr(), prev.data_ptr(), 0 if x0 is None else x0.data_ptr(),
        B, C, S, layout, DTYPE_CODE[sample.dtype], clip_range, threshold_ratio, sample_max_value,
        launch_context(backend, sample.device))


_LAUNCHERS = {"cpu": partial(_launch_native, "cpu"), "cuda": partial(_launch_native, "cuda"),
              "triton": triton_launcher(OP)}


@custom_op("ddpm_fast::step")
def _step_op(sample: Tensor, model_output: Tensor, variance: Optional[Tensor], t: Tensor, table: Tensor,
             noise: Optional[Tensor], seeds: Optional[Tensor], clip_range: float, threshold_ratio: float,
             sample_max_value: float, write_x0: bool, backend: str) -> tuple[Tensor, Tensor]:
    layout = layout_of(sample)
    sample, model_output = dense(sample, layout), dense(model_output, layout)
    variance = None if variance is None else dense(variance, layout)
    noise = None if noise is None else dense(noise, layout)
    prev = torch.empty_like(sample, memory_format=memory_format(layout))
    x0 = torch.empty_like(prev) if write_x0 else prev.new_empty(0)
    if sample.numel():
        with on_device(sample):
            _LAUNCHERS[backend](sample, model_output, variance, t, table, noise, seeds, clip_range,
                                threshold_ratio, sample_max_value, prev, x0 if write_x0 else None, layout)
    return prev, x0


@_step_op.register_fake
def _(sample, model_output, variance, t, table, noise, seeds, clip_range, threshold_ratio, sample_max_value,
      write_x0, backend):
    prev = torch.empty_like(sample, memory_format=memory_format(layout_of(sample)))
    return prev, (torch.empty_like(prev) if write_x0 else prev.new_empty(0))


def step(model_output: Tensor, t, sample: Tensor, table, noise: Tensor | None = None, *,
         seeds: Tensor | None = None, clip_range: float | None = None, thresholding: bool = False,
         dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
         return_pred_original: bool = True, backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """One reverse step ``x_t -> x_{prev(t)}``; returns ``(prev_sample, pred_original_sample)``.

    Args:
        model_output: (B, C, *spatial) like ``sample``; (B, 2C, *spatial) for ``learned_range`` (the second
            half is the predicted variance, as diffusers splits it).
        t: int or (B,) int64: each sample's current timestep (samples may sit at different t).
        sample: (B, C, *spatial) float32 / float16 / bfloat16, NCHW or channels_last: x_t.
        table: a :class:`~ddpm_fast.schedule.StepTable` (DDPM or DDIM, prediction and variance type).
        noise: (B, C, *spatial) like ``sample``, or None to draw it from ``seeds``
            (stream ``2**32 + t`` per sample) or when the table adds no noise (DDIM with eta = 0).
        seeds: (B,) int64 on the sample's device.
        clip_range: clamp the predicted x0 to ``[-clip_range, clip_range]`` (None: no clipping).
        thresholding: dynamic thresholding (Saharia et al.) at ``dynamic_thresholding_ratio``, bounded by
            ``sample_max_value``; it takes precedence over clipping, as in diffusers.
        return_pred_original: False skips writing the predicted x0 (one tensor less of memory traffic).

    Returns:
        prev_sample: like ``sample``; pred_original_sample: like ``sample``, or None. The memory formats kept are
        NCHW and channels_last (docs/contracts.md); any other layout, channels_last_3d included, gives contiguous
        outputs.
    """
    check_tensor(OP, "sample", sample, min_dim=2)
    check_tensor(OP, "model_output", model_output, dtypes=(sample.dtype,), device=sample.device, min_dim=2)
    if not isinstance(table, StepTable):  # before its attributes are read (a NoiseSchedule has none of them)
        raise TypeError(f"{OP}: table must be a StepTable, got {type(table).__name__}")
    learned = table.variance_type == "learned_range"
    expected = (sample.shape[0], sample.shape[1] * (2 if learned else 1), *sample.shape[2:])
    if tuple(model_output.shape) != expected:
        why = " (learned_range: the model predicts the variance as C more channels)" if learned else ""
        raise ValueError(f"{OP}: model_output must have shape {expected}{why}, got {tuple(model_output.shape)}")
    if noise is not None and seeds is not None:
        raise ValueError(f"{OP}: give at most one of noise and seeds, got both")
    if noise is not None:
        check_tensor(OP, "noise", noise, dtypes=(sample.dtype,), shape=sample.shape, device=sample.device)
    elif seeds is not None:
        seeds = seeds_tensor(OP, seeds, sample.shape[0], sample.device)
    elif table.adds_noise:
        raise ValueError(f"{OP}: this {table.kind} table adds noise ({table.variance_type}, eta={table.eta}); "
                         "give noise or seeds")
    try:  # one set of option checks, the reference's; the message gains the op's name
        reference._check_step_options(clip_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    except ValueError as error:
        raise ValueError(f"{OP}: {error}") from None
    t = timesteps(OP, t, sample.shape[0], sample.device)

    chosen = resolve(OP, tuple(_LAUNCHERS), sample.device, backend,
                     derivative_refusal((model_output, sample, noise), has_backward=False),
                     preference="step_thresholding" if thresholding else OP)
    if chosen == "torch":
        prev, x0 = reference.step(model_output, t, sample, table, noise=noise, seeds=seeds, clip_range=clip_range,
                                  thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                  sample_max_value=sample_max_value)
        return prev, (x0 if return_pred_original else None)
    variance = None
    if learned:
        model_output, variance = model_output.split(sample.shape[1], dim=1)
    prev, x0 = call(
        _step_op, sample, model_output, variance, t, table.table(sample.device), noise, seeds,
        0.0 if clip_range is None else float(clip_range),
        float(dynamic_thresholding_ratio) if thresholding else 0.0, float(sample_max_value),
        return_pred_original, chosen)
    return prev, (x0 if return_pred_original else None)
