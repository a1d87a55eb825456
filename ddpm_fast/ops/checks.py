"""Input validation at the op boundary, and the (B, C, S) view every kernel takes.

Messages name the op, the argument, what was expected and what arrived.
"""

from __future__ import annotations

import math

import torch

from ..reference import check_dense, memory_format_of, samples_are_dense

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CONTIGUOUS, CHANNELS_LAST = 0, 1


def check_tensor(op: str, name: str, value, *, dtypes=FLOAT_DTYPES, shape=None, device=None, min_dim=0):
    """Raise TypeError / ValueError unless ``value`` is a tensor with an allowed dtype, shape and device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    check_dense(name, value, prefix=f"{op}: ")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if value.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {value.device}")
    return value


def timesteps(op: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` (an int, a 0-d or a (B,) integer tensor) as an int64 (B,) tensor on ``device``."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"{op}: t must be an int or an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if isinstance(t, int):
        if not -2**63 <= t < 2**63:  # torch.full would raise a bare OverflowError
            raise ValueError(f"{op}: t must be a timestep in [0, num_train_timesteps), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    check_dense("t", t, prefix=f"{op}: ")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: t must be an integer tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{op}: t must be an int or have shape ({batch},) (one timestep per sample), "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: t must be on {device} like the sample, got {t.device}")
    return (t if t.dtype == torch.int64 else t.to(torch.int64)).contiguous()  # .to() itself costs ~3 us


def check_t_range(op: str, t: torch.Tensor, num_train_timesteps: int) -> None:
    """Checks the timesteps' values; callers skip it on CUDA, where reading them back would sync."""
    if t.numel() and t.device.type == "cpu":
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= num_train_timesteps:
            raise ValueError(f"{op}: t must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps), "
                             f"got min {low}, max {high}")


def seeds_tensor(op: str, seeds, batch: int, device: torch.device) -> torch.Tensor:
    check_tensor(op, "seeds", seeds, dtypes=(torch.int64,))
    if tuple(seeds.shape) != (batch,):
        raise ValueError(f"{op}: seeds must have shape ({batch},) (one int64 seed per sample), "
                         f"got {tuple(seeds.shape)}")
    if seeds.device != device:
        raise ValueError(f"{op}: seeds must be on {device} like the sample, got {seeds.device}")
    return seeds.contiguous()


def layout_of(x: torch.Tensor) -> int:
    """The layout (contracts.md) in which the kernels read x and write the outputs: reference.memory_format_of."""
    return CHANNELS_LAST if memory_format_of(x) == torch.channels_last else CONTIGUOUS


def memory_format(layout: int) -> torch.memory_format:
    return torch.channels_last if layout == CHANNELS_LAST else torch.contiguous_format


def dense(x: torch.Tensor, layout: int) -> torch.Tensor:
    """``x`` itself when each sample is dense in ``layout``, else a copy that is."""
    fmt = memory_format(layout)
    return x if samples_are_dense(x, fmt) else x.contiguous(memory_format=fmt)


def batch_stride(x: torch.Tensor) -> int:
    return x.stride(0) if x.shape[0] > 1 else math.prod(x.shape[1:])


def bcs(x: torch.Tensor) -> tuple[int, int, int]:
    """(B, C, S): batch, channels, and the product of the spatial sizes (1 for a (B, C) tensor)."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])
