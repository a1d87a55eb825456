"""group_norm_silu: GroupNorm + time-embedding bias or scale/shift + SiLU, forward and backward, fused.

Both U-Net forms of the time embedding (docs/contracts.md): ``bias_in`` added per (B, C) before the norm
(the DDPM ResBlock) and ``y * (1 + scale) + shift`` after it (improved DDPM / diffusers "scale_shift").
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._native import launch_context, native_kernels
from .backend import derivative_refusal, on_device, resolve
from .dispatch import call, custom_op
from .triton import launcher as triton_launcher
from .checks import DTYPE_CODE, bcs, check_tensor, layout_of, memory_format

OP = "group_norm_silu"
ACTIVATIONS = {"none": 0, "silu": 1}


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _forward_native(backend, x, weight, bias, bias_in, scale, shift, y, mean, rstd, G, eps, act, layout):
    B, C, S = bcs(x)
    native_kernels(backend, x.device).group_norm_forward(
        x.data_ptr(), _ptr(weight), _ptr(bias), _ptr(bias_in), _ptr(scale), _ptr(shift), y.data_ptr(),
        mean.data_ptr(), rstd.data_ptr(), B, C, S, G, eps, act, layout, DTYPE_CODE[x.dtype],
        launch_context(backend, x.device))


def _backward_native(backend, dy, x, weight, bias, bias_in, scale, shift, mean, rstd, dx, grads, G, act, layout):
    B, C, S = bcs(x)
    native_kernels(backend, x.device).group_norm_backward(
        dy.data_ptr(), x.data_ptr(), _ptr(weight), _ptr(bias), _ptr(bias_in), _ptr(scale), _ptr(shift),
        mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), *(_ptr(g) for g in grads), B, C, S, G, act, layout,
        DTYPE_CODE[x.dtype], launch_context(backend, x.device))


_FORWARD = {"cpu": partial(_forward_native, "cpu"), "cuda": partial(_forward_native, "cuda"),
            "triton": triton_launcher("group_norm", "forward")}
_BACKWARD = {"cpu": partial(_backward_native, "cpu"), "cuda": partial(_backward_native, "cuda"),
             "triton": triton_launcher("group_norm", "backward")}


def _dense(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The kernels read the small tensors densely. The wrapper passes them contiguous, but the dispatcher may
    hand over another layout: it materialises a zero tensor (autograd's) as a stride-0 expanded zero."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


@custom_op("ddpm_fast::group_norm_silu")
def _forward_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], bias_in: Optional[Tensor],
                scale: Optional[Tensor], shift: Optional[Tensor], num_groups: int, eps: float, act: int,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    layout = layout_of(x)
    x = x.contiguous(memory_format=memory_format(layout))
    weight, bias, bias_in, scale, shift = _dense(weight, bias, bias_in, scale, shift)
    y = torch.empty_like(x)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel():
        with on_device(x):
            _FORWARD[backend](x, weight, bias, bias_in, scale, shift, y, mean, rstd, num_groups, eps, act, layout)
    return y, mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, bias_in, scale, shift, num_groups, eps, act, backend):
    y = torch.empty_like(x, memory_format=memory_format(layout_of(x)))
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return y, mean, torch.empty_like(mean)


def _grad_buffers(x, weight, bias, bias_in, scale, shift):
    """float32 gradient buffers for the small inputs; an empty tensor stands for an absent input."""
    def like(p):
        return torch.empty_like(p) if p is not None else x.new_empty(0, dtype=torch.float32)
    return tuple(like(p) for p in (weight, bias, bias_in, scale, shift))


@custom_op("ddpm_fast::group_norm_silu_backward")
def _backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 bias_in: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor,
                 rstd: Tensor, num_groups: int, act: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                  Tensor, Tensor]:
    layout = layout_of(x)
    fmt = memory_format(layout)
    x = x.contiguous(memory_format=fmt)
    dy = dy.contiguous(memory_format=fmt)
    weight, bias, bias_in, scale, shift, mean, rstd = _dense(weight, bias, bias_in, scale, shift, mean, rstd)
    dx = torch.empty_like(x)
    small = _grad_buffers(x, weight, bias, bias_in, scale, shift)
    if x.numel():
        present = [g if p is not None else None for g, p in zip(small, (weight, bias, bias_in, scale, shift))]
        with on_device(x):
            _BACKWARD[backend](dy, x, weight, bias, bias_in, scale, shift, mean, rstd, dx, present, num_groups,
                               act, layout)
    else:
        for g in small:
            g.zero_()
    return (dx, *small)


@_backward_op.register_fake
def _(dy, x, weight, bias, bias_in, scale, shift, mean, rstd, num_groups, act, backend):
    return (torch.empty_like(x, memory_format=memory_format(layout_of(x))),
            *_grad_buffers(x, weight, bias, bias_in, scale, shift))


def _setup_context(ctx, inputs, output):
    x, weight, bias, bias_in, scale, shift, num_groups, eps, act, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, bias_in, scale, shift, mean, rstd)
    ctx.num_groups, ctx.act, ctx.backend = num_groups, act, backend


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, bias_in, scale, shift, mean, rstd = ctx.saved_tensors
    dx, *small = call(_backward_op, dy, x, weight, bias, bias_in, scale, shift, mean, rstd, ctx.num_groups, ctx.act,
                      ctx.backend)
    small = [g if p is not None else None for g, p in zip(small, (weight, bias, bias_in, scale, shift))]
    return (dx, *small, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The CUDA kernels hold a region's per-channel sums in shared memory. Groups of up to this many channels fit
# on every GPU they target, in either direction, layout and dtype (tests/test_cuda_emulator.py, on the one
# with the least: 99 KB a block); only a wider group asks the launcher whether this GPU has room for it.
_CUDA_FITS_EVERYWHERE = 1024


def _cuda_refusal(x: Tensor, num_groups: int, params: tuple, candidate: str) -> str | None:
    """Why the cuda kernels cannot take this call, or None: a group too wide for this GPU's shared memory, in
    the forward or (when autograd will run it) the backward. The automatic choice then takes the next
    backend and an explicit request raises, before the forward runs: a training step cannot fail in its
    backward after a forward that ran."""
    if candidate != "cuda":
        return None
    backward = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, *params))
    return _launcher_refusal(x.device, *bcs(x), num_groups, layout_of(x), DTYPE_CODE[x.dtype], backward) or None


@torch.compiler.assume_constant_result  # a shape's answer: torch.compile asks once, while it traces
def _launcher_refusal(device: torch.device, B: int, C: int, S: int, G: int, layout: int, dtype: int,
                      backward: bool) -> str:
    with on_device(device):
        return native_kernels("cuda", device).group_norm_refusal(B, C, S, G, layout, dtype, backward)


def _per_sample_channel(name: str, value, x: Tensor) -> Tensor | None:
    """(B, C) or (B, C, 1, ..., 1) -> (B, C); None stays None."""
    if value is None:
        return None
    B, C = x.shape[:2]
    check_tensor(OP, name, value, device=x.device)
    trailing = value.dim() - 2
    if value.shape[:2] != (B, C) or (trailing > 0 and any(n != 1 for n in value.shape[2:])):
        raise ValueError(f"{OP}: {name} must have shape ({B}, {C}) or ({B}, {C}, 1, 1), got {tuple(value.shape)}")
    return value if trailing == 0 else value.reshape(B, C)  # a view costs ~3 us: only when there is one to make


def _float32(value: Tensor | None) -> Tensor | None:
    """The kernels take the small per-channel tensors as contiguous float32 (a differentiable cast)."""
    return None if value is None else value.float().contiguous()


def group_norm_silu(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float = 1e-5,
                    bias_in: Tensor | None = None, scale: Tensor | None = None, shift: Tensor | None = None,
                    act: str = "silu", *, backend: str | None = None) -> Tensor:
    """``act(GroupNorm(x + bias_in) * (1 + scale) + shift)``, statistics in float32.

    Args:
        x: (B, C, *spatial), at least one spatial dim; float32 / float16 / bfloat16, NCHW or channels_last.
        weight, bias: (C,) GroupNorm affine parameters, or None.
        num_groups: G, dividing C.
        bias_in: (B, C) (or (B, C, 1, 1)) added before the norm (DDPM ResBlock time embedding), or None.
        scale, shift: (B, C) (or (B, C, 1, 1)) applied after the norm (improved-DDPM scale/shift), or None.
        act: "silu" or "none".

    Returns:
        (B, C, *spatial) in x's dtype and memory format (NCHW or channels_last; any other layout, such as
        channels_last_3d, gives a contiguous output). Differentiable in x, weight, bias, bias_in, scale, shift.
    """
    check_tensor(OP, "x", x, min_dim=3)
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"{OP}: num_groups must be a positive int dividing the channels of x (C={C}), "
                         f"got {num_groups!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{OP}: act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{OP}: eps must be a float, got {type(eps).__name__} {eps!r}")
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be positive, got {eps!r}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_tensor(OP, name, value, shape=(C,), device=x.device)
    bias_in, scale, shift = (_per_sample_channel(n, v, x)
                             for n, v in (("bias_in", bias_in), ("scale", scale), ("shift", shift)))

    params = (weight, bias, bias_in, scale, shift)
    refuses = derivative_refusal((x, *params), has_backward=True)
    if refuses is None and C // num_groups > _CUDA_FITS_EVERYWHERE:
        refuses = partial(_cuda_refusal, x, num_groups, params)
    chosen = resolve(OP, tuple(_FORWARD), x.device, backend, refuses)
    if chosen == "torch":
        return reference.group_norm_silu(x, weight, bias, num_groups, eps, bias_in=bias_in, scale=scale,
                                         shift=shift, act=act)
    small = (_float32(v) for v in params)
    y, _, _ = call(_forward_op, x, *small, num_groups, float(eps), ACTIVATIONS[act], chosen)
    return y
