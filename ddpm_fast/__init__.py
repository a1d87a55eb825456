"""ddpm_fast: fused kernels for DDPM noising, reverse steps and time-embedding GroupNorm."""

__version__ = "0.1.0"

from . import reference  # noqa: E402
from ._native import build_info  # noqa: E402
from .ops import (BACKENDS, get_backend, group_norm_silu, q_sample, randn, set_backend, step,  # noqa: E402
                  use_backend)
from .schedule import NoiseSchedule, StepTable, ddim_table, ddpm_table, sampling_timesteps  # noqa: E402
from .sampler import Sampler, save_image_grid  # noqa: E402
from .unet import UNet, UNetConfig  # noqa: E402
from .train import TrainConfig, Trainer, load_model  # noqa: E402

__all__ = ["BACKENDS", "FastDDIMScheduler", "FastDDPMScheduler", "NoiseSchedule", "StepTable", "build_info",
           "ddim_table", "ddpm_table", "get_backend", "group_norm_silu", "q_sample", "randn", "reference", "Sampler",
           "sampling_timesteps", "save_image_grid", "set_backend", "step", "TrainConfig", "Trainer", "UNet",
           "UNetConfig", "load_model", "use_backend"]


def __getattr__(name: str):
    # The diffusers-compatible schedulers import diffusers (for its SchedulerMixin) where it is installed,
    # ~3 s: only for the programs that use them.
    if name in ("FastDDIMScheduler", "FastDDPMScheduler"):
        from . import diffusers_compat
        return getattr(diffusers_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
