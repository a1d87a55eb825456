"""DDPM / DDIM sampling loops over any ``model(x, t)``, with optional CUDA-graph capture, and a PNG grid writer.

A sample's whole trajectory is a function of its seed alone (docs/contracts.md): ``x_T`` is the
initial-noise stream ``2**33`` of the seed, and the step at timestep ``t`` draws stream ``2**32 + t``.
So the same seed gives the same image at batch 1 and inside a batch of 8, on any backend (up to the
few float32 ulp the backends' ``log`` / ``sin`` / ``cos`` may differ by, and the model's own batch
invariance).

The loop keeps everything on the device: the timesteps of every step are one (N, B) int64 tensor made
before the loop, the seeds are a (B,) int64 device tensor, and nothing is read back to the host. With
``cuda_graph=True`` one replay of a captured graph is one whole step: it picks its timesteps from that
tensor by a device step counter and advances x in place.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from typing import Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import reference
from ._native import backend_missing_reason
from .ops import get_backend, randn, step
from .ops.checks import FLOAT_DTYPES
from .schedule import (PREDICTION_TYPES, TIMESTEP_SPACINGS, NoiseSchedule, StepTable, _check_choice, _check_int,
                       _check_timesteps, ddim_table, ddpm_table, sampling_timesteps)
from .weight_casts import WeightCasts, parameter_slots, storage_key

__all__ = ["METHODS", "NonFiniteImagesWarning", "Sampler", "save_image_grid", "scheduler_options"]

METHODS = ("ddpm", "ddim")


# --------------------------------------------------------------------------------------------------
# argument checks (messages name the argument, what is allowed and what arrived)
# --------------------------------------------------------------------------------------------------


def _prefixed(check, *args):
    """Run one of schedule.py's argument checks; its message gains the "Sampler: " prefix."""
    try:
        return check(*args)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Sampler: {error}") from None


def _choice(name: str, value, choices: Sequence[str]) -> str:
    return _prefixed(_check_choice, name, value, choices)


def _int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    return _prefixed(_check_int, name, value, lo, hi)


def _positive_float(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Sampler: {name} must be a number{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Sampler: {name} must be a finite number > 0{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def _seeds_tensor(seeds, device) -> Tensor:
    """seeds: (B,) integer tensor, or a sequence of ints (read as int64; [2**63, 2**64) wrap as uint64).

    Returns (B,) int64 contiguous on ``device`` (the seeds' own device when ``device`` is None).
    """
    if not isinstance(seeds, (Tensor, Sequence)) and hasattr(seeds, "__array__"):  # a numpy array: np.arange(8)
        # an object array (Python ints, as large as uint64's) reads as the list it holds
        seeds = seeds.tolist() if getattr(getattr(seeds, "dtype", None), "kind", "") == "O" else torch.as_tensor(seeds)
    if isinstance(seeds, Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise TypeError(f"Sampler.sample: seeds must be an int64 tensor or a list of ints, got dtype {seeds.dtype}")
        if seeds.dim() != 1:
            raise ValueError(f"Sampler.sample: seeds must have shape (B,) (one seed per sample), "
                             f"got {tuple(seeds.shape)}")
        return seeds.to(device=seeds.device if device is None else device, dtype=torch.int64).contiguous()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"Sampler.sample: seeds must be a (B,) int64 tensor or a list of ints, "
                        f"got {type(seeds).__name__}")
    values = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):  # numpy's integers are Integral too
            raise TypeError(f"Sampler.sample: seeds[{i}] must be an int, got {type(s).__name__} {s!r}")
        s = int(s)
        if not -(2**63) <= s < 2**64:
            raise ValueError(f"Sampler.sample: seeds[{i}] must fit in 64 bits ([-2**63, 2**64)), got {s}")
        values.append(s - 2**64 if s >= 2**63 else s)  # the same uint64 key, stored as int64
    return torch.tensor(values, dtype=torch.int64, device="cpu" if device is None else device)


def _model_kwargs(model_kwargs, device: torch.device) -> dict:
    """sample's model_kwargs as a dict, the tensors in it (also inside lists, tuples and dicts) on ``device``."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"Sampler.sample: model_kwargs must be a mapping of argument names to values, got "
                        f"{type(model_kwargs).__name__}")
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, Tensor) else v, dict(model_kwargs))


def _kwargs_key(model_kwargs: Mapping) -> tuple:
    """What a graph (or the hoisted casts) bakes in of the model's keyword arguments: their structure, each tensor's
    shape, dtype and device (its values are copied in on each call), a number's or string's type and value, any
    other object's identity (an array's == would not give one bool)."""
    def key(v):
        if isinstance(v, Tensor):
            return "tensor", tuple(v.shape), v.dtype, v.device
        if v is None or isinstance(v, (bool, int, float, str)):
            return type(v).__name__, repr(v)  # 1, 1.0 and True apart; a NaN equal to itself
        return "object", id(v)
    leaves, spec = pytree.tree_flatten(dict(model_kwargs))
    return str(spec), tuple(key(v) for v in leaves)


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"Sampler.sample: shape must be a tuple (C, H, W), got {type(shape).__name__}")
    shape = tuple(shape)
    if len(shape) < 1 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"Sampler.sample: shape must be a tuple of positive ints (C, H, W), got {shape!r}")
    return shape


def _infer_shape(model) -> tuple[int, int, int]:
    """(C, H, W) from ``model.config`` (our UNet's UNetConfig, a diffusers model's config): in_channels and
    sample_size (an int or an (H, W) pair)."""
    config = getattr(model, "config", None)
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    channels, size = (None, None) if config is None else (get("in_channels"), get("sample_size"))
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(channels, int) or not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"Sampler.sample: give shape=(C, H, W); it cannot be read from this model "
                         f"({type(model).__name__} has no config with in_channels and sample_size)")
    return _shape((channels, *size))


def _parameter_dtype(model) -> torch.dtype | None:
    """The dtype of an nn.Module's first floating-point parameter (diffusers' ``ModelMixin.dtype`` rule)."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def _default_device(model, seeds) -> torch.device:
    """The device of the model's first parameter (or buffer), else the seeds' (a tensor's), else the CPU."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return seeds.device if isinstance(seeds, Tensor) else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------------


class _StderrBar:
    """A minimal progress bar for when tqdm is not installed: one carriage-return line on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.start = total, desc, 0, time.monotonic()
        self._draw()

    def _draw(self):
        width = 30
        done = width * self.n // max(self.total, 1)
        rate = self.n / max(time.monotonic() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.desc}: [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                         f"{rate:.1f} it/s")
        sys.stderr.flush()

    def update(self, n: int = 1):
        self.n += n
        self._draw()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoBar:
    def update(self, n: int = 1):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool, desc: str):
    """tqdm when importable (it is optional), else the stderr bar; a no-op when not enabled."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _StderrBar(total, desc)
    return tqdm(total=total, desc=desc)


# --------------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------------


# diffusers' scheduler classes -> the method that samples as they do (ours are named by their own modules).
_SCHEDULER_METHODS = {"DDPMScheduler": "ddpm", "FastDDPMScheduler": "ddpm", "DDIMScheduler": "ddim",
                      "FastDDIMScheduler": "ddim"}


def scheduler_options(config: Mapping, method: str) -> dict:
    """The Sampler options that a diffusers DDPM / DDIM scheduler config holds, for sampling with ``method``.

    Fields the config lacks are left out: the Sampler's defaults are diffusers'. ``variance_type`` is DDPM's
    and ``set_alpha_to_one`` DDIM's, so each is taken only for its method.
    """
    _choice("method", method, METHODS)
    keys = ("prediction_type", "timestep_spacing", "steps_offset", "thresholding", "dynamic_thresholding_ratio",
            "sample_max_value", "variance_type" if method == "ddpm" else "set_alpha_to_one")
    options = {k: config[k] for k in keys if k in config}
    if "clip_sample" in config or "clip_sample_range" in config:
        options["clip_range"] = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
    return options


def _unwrap(output, expected: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The model's output as a tensor of shape ``expected`` in ``dtype``.

    Accepts a tensor, an object with a ``.sample`` tensor (diffusers' UNet2DOutput) or a 1-tuple
    (diffusers with ``return_dict=False``). Only metadata is read: no host sync.
    """
    if not isinstance(output, Tensor):
        if isinstance(getattr(output, "sample", None), Tensor):
            output = output.sample
        elif isinstance(output, (tuple, list)) and len(output) == 1 and isinstance(output[0], Tensor):
            output = output[0]
        else:
            raise TypeError(f"Sampler: model(x, t) must return a tensor, an object with a .sample tensor or a "
                            f"1-tuple of a tensor, got {type(output).__name__}")
    if tuple(output.shape) != expected:
        raise ValueError(f"Sampler: model(x, t) must return shape {expected}, got {tuple(output.shape)}")
    return output if output.dtype == dtype else output.to(dtype)


class NonFiniteImagesWarning(RuntimeWarning):
    """Sampler.sample's images that end holding NaN or infinity (clamped, an infinity would pass for a saturated
    pixel); ``seeds`` names them."""

    def __init__(self, message: str, seeds: list[int]):
        super().__init__(message)
        self.seeds = seeds


def seed_list(seeds: Sequence[int], shown: int = 8) -> str:
    """The first ``shown`` seeds, comma-separated, with "..." when there are more (for messages)."""
    return ", ".join(map(str, seeds[:shown])) + (", ..." if len(seeds) > shown else "")


def _warn_non_finite(x: Tensor, seeds: Tensor) -> None:
    """Warn, naming the seeds, when a sampled image holds NaN or infinity."""
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bad.any():
        names = seeds[bad.to(seeds.device)].tolist()
        shown = seed_list(names)
        cause = "the model diverged" + (", or float16 overflowed" if x.dtype == torch.float16 else "")
        warnings.warn(NonFiniteImagesWarning(
            f"Sampler.sample: {len(names)} of {x.shape[0]} images end holding NaN or infinity (seeds {shown}; "
            f"{cause}): clamped to [-1, 1], an infinity would pass for a saturated pixel", names), stacklevel=4)


class Sampler:
    """DDPM (ancestral) or DDIM sampling for any callable ``model(x, t) -> output``.

    ``x: (B, C, H, W)`` in the sampling dtype, ``t: (B,)`` int64 on x's device (the same timestep for
    every sample); the output is ``(B, C, H, W)`` (``(B, 2C, H, W)`` for ``variance_type="learned_range"``),
    a tensor, an object with a ``.sample`` tensor (a diffusers ``UNet2DModel``) or a 1-tuple of one.

    Args:
        model: the denoiser. It is called under ``torch.no_grad()``; put it in eval mode yourself.
        schedule: the :class:`~ddpm_fast.schedule.NoiseSchedule` the model was trained with.
        method: "ddpm" (ancestral, diffusers' DDPMScheduler) or "ddim" (diffusers' DDIMScheduler).
        num_steps: number of sampling steps, in [1, T]; None: all T train timesteps (or those of ``timesteps``).
        timesteps: DDPM only: the timesteps to visit, strictly descending in [0, T) (diffusers' custom timesteps,
            ``set_timesteps(timesteps=...)``); each step lands on the next one, the last on x_0. Instead of
            num_steps, timestep_spacing and steps_offset.
        eta: DDIM only, >= 0 (0: deterministic DDIM, 1: DDPM's posterior variance). DDPM refuses eta != 0.
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: DDPM only: "fixed_small", "fixed_small_log", "fixed_large" or "learned_range".
        timestep_spacing: "leading", "linspace" or "trailing" (diffusers' rules); steps_offset shifts "leading".
        clip_range: clamp the predicted x0 to [-clip_range, clip_range]; None: no clipping.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding (takes precedence
            over clipping, as in diffusers).
        set_alpha_to_one, use_clipped_model_output: DDIM's options (diffusers' meaning).
        backend: force the ops' backend ("cpu", "torch", ...; "triton" for the steps, x_T by device); None
            chooses by device.

    Attributes:
        table: the :class:`~ddpm_fast.schedule.StepTable`, built once here.
        timesteps: (N,) int64 CPU, descending: the timesteps the loop visits.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, *, method: str = "ddpm", num_steps: int | None = None,
                 timesteps: Sequence[int] | Tensor | None = None, eta: float = 0.0,
                 prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                 timestep_spacing: str = "leading", steps_offset: int = 0, clip_range: float | None = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, set_alpha_to_one: bool = True,
                 use_clipped_model_output: bool = False, backend: str | None = None):
        if not callable(model):
            raise TypeError(f"Sampler: model must be callable as model(x, t), got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"Sampler: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        _choice("method", method, METHODS)
        _choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        T = schedule.num_train_timesteps
        N = T if num_steps is None else _int("num_steps", num_steps, lo=1, hi=T)
        if timesteps is not None:
            if num_steps is not None:
                raise ValueError(f"Sampler: give num_steps or timesteps, got both (num_steps={num_steps!r})")
            if method != "ddpm":  # DDIM steps T // N back from each timestep (diffusers' rule): no custom sequence
                raise ValueError("Sampler: timesteps (a custom sequence) apply to method='ddpm' only, as diffusers' "
                                 "set_timesteps(timesteps=...) does; DDIM takes num_steps and timestep_spacing (to "
                                 "from_scheduler too, where they override a DDPM scheduler's custom timesteps)")
            try:
                timesteps = _check_timesteps(timesteps, T)
            except (TypeError, ValueError) as error:
                raise type(error)(f"Sampler: {error}") from None
            N = len(timesteps)
        steps_offset = _int("steps_offset", steps_offset, lo=0)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"Sampler: eta must be a finite number >= 0, got {eta!r}")
        if method == "ddpm" and eta != 0:
            raise ValueError(f"Sampler: eta applies to method='ddim' only (DDPM always adds its full posterior "
                             f"noise), got eta={eta!r} with method='ddpm'")
        if method == "ddim" and variance_type != "fixed_small":
            raise ValueError(f"Sampler: variance_type applies to method='ddpm' only (DDIM's noise is set by eta), "
                             f"got variance_type={variance_type!r} with method='ddim'")
        self.clip_range = _positive_float("clip_range", clip_range, allow_none=True)
        if not isinstance(thresholding, bool):
            raise TypeError(f"Sampler: thresholding must be a bool, got {type(thresholding).__name__}")
        ratio = _positive_float("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
        if ratio > 1.0:
            raise ValueError(f"Sampler: dynamic_thresholding_ratio must be in (0, 1], got {ratio!r}")
        if not _positive_float("sample_max_value", sample_max_value) >= 1.0:
            raise ValueError(f"Sampler: sample_max_value must be >= 1, got {sample_max_value!r}")
        try:  # what the kernels would read otherwise (a clip_range below float32's range as off): found here
            reference._check_step_options(self.clip_range, thresholding, ratio, sample_max_value)
        except ValueError as error:
            raise ValueError(f"Sampler: {error}") from None

        try:  # the schedule's own checks (e.g. steps_offset pushing a timestep past T, zero-SNR epsilon)
            if timesteps is None:
                timesteps = sampling_timesteps(T, N, timestep_spacing, steps_offset)
            if method == "ddpm":
                table = ddpm_table(schedule, timesteps, prediction_type, variance_type)
            else:
                table = ddim_table(schedule, timesteps, prediction_type, float(eta), set_alpha_to_one,
                                   use_clipped_model_output)
        except ValueError as error:
            raise ValueError(f"Sampler: {error}") from None

        self.model, self.schedule, self.method = model, schedule, method
        self.num_steps, self.eta, self.prediction_type = N, float(eta), prediction_type
        self.variance_type = variance_type if method == "ddpm" else None
        self.timestep_spacing, self.steps_offset = timestep_spacing, steps_offset
        self.thresholding, self.dynamic_thresholding_ratio = thresholding, ratio
        self.sample_max_value = float(sample_max_value)
        self.backend = backend
        self.table: StepTable = table
        self.timesteps: Tensor = table.timesteps
        self._out_channels_factor = 2 if self.variance_type == "learned_range" else 1
        self._graph: _GraphedStep | None = None  # the captured step of cuda_graph=True
        self._casts: tuple[tuple, WeightCasts | None] | None = None  # (key, the model's hoisted weight casts)

    @classmethod
    def from_scheduler(cls, model: Callable, scheduler, **options) -> "Sampler":
        """A Sampler that samples as ``scheduler`` does: a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` (or
        ours), or its config. Its schedule and the options it holds carry over (prediction and variance type,
        timestep spacing and offset, clipping, thresholding, set_alpha_to_one), as do the number of steps
        or the custom timesteps of ``set_timesteps``; ``options`` (those of the constructor: method, num_steps,
        eta, ...) override. A config that names no DDPM or DDIM scheduler needs ``method``."""
        if isinstance(scheduler, Mapping):
            config, name = scheduler, scheduler.get("_class_name")
        elif isinstance(getattr(scheduler, "config", None), Mapping):
            config, name = scheduler.config, type(scheduler).__name__
            steps = getattr(scheduler, "num_inference_steps", None)
            if {"num_steps", "timesteps"}.isdisjoint(options):
                if getattr(scheduler, "custom_timesteps", False):  # set_timesteps(timesteps=[...])
                    options["timesteps"] = torch.as_tensor(scheduler.timesteps).cpu()
                elif steps is not None:
                    options["num_steps"] = steps
        else:
            raise TypeError(f"Sampler.from_scheduler: scheduler must be a diffusers scheduler or its config (a "
                            f"mapping), got {type(scheduler).__name__}")
        method = options.pop("method", None) or _SCHEDULER_METHODS.get(name)
        if method is None and name is None:  # a scheduler's in-memory .config: only a saved one names its class
            raise ValueError("Sampler.from_scheduler: the config has no _class_name to say whether it is a DDPM or a "
                             "DDIM scheduler's; pass the scheduler itself, or method='ddpm' or 'ddim'")
        if method is None:
            raise ValueError(f"Sampler.from_scheduler: {name} is not a DDPM or DDIM scheduler; pass method='ddpm' "
                             f"or 'ddim' to sample with its schedule anyway")
        return cls(model, NoiseSchedule.from_config(config), method=method,
                   **{**scheduler_options(config, method), **options})

    def __repr__(self) -> str:
        return (f"Sampler(method={self.method!r}, num_steps={self.num_steps}, eta={self.eta}, "
                f"prediction_type={self.prediction_type!r}, variance_type={self.variance_type!r}, "
                f"timestep_spacing={self.timestep_spacing!r}, clip_range={self.clip_range}, "
                f"thresholding={self.thresholding})")

    # ---------------------------------------------------------------------------------------- one step

    def _step(self, x: Tensor, t: Tensor, seeds: Tensor | None, model_kwargs: Mapping) -> Tensor:
        """model + reverse step: x (B, C, ...) at timesteps t (B,) -> x at prev(t). No host sync."""
        expected = (x.shape[0], x.shape[1] * self._out_channels_factor, *x.shape[2:])
        out = _unwrap(self.model(x, t, **model_kwargs), expected, x.dtype)
        prev, _ = step(out, t, x, self.table, seeds=seeds, clip_range=self.clip_range,
                       thresholding=self.thresholding, dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                       sample_max_value=self.sample_max_value, return_pred_original=False, backend=self.backend)
        return prev

    # ----------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, seeds, shape=None, *, device=None, dtype: torch.dtype | None = None,
               model_kwargs: Mapping | None = None, progress: bool = False, return_trajectory: bool = False,
               cuda_graph: bool = False):
        """Draw one image per seed.

        Args:
            seeds: (B,) int64 tensor or a list of B ints; sample b's trajectory depends on seeds[b] only.
            shape: the per-sample shape (C, H, W); None: ``(in_channels, sample_size, sample_size)`` from
                ``model.config`` (our UNet, a diffusers UNet2DModel).
            device: where to sample; None: the model's device (an nn.Module's first parameter's), else the
                seeds' device (a tensor's), else the CPU.
            dtype: float32, float16 or bfloat16: the dtype of x and of what the model receives; None: the
                model's (an nn.Module's first floating-point parameter's, as diffusers' pipelines take
                ``unet.dtype``), float32 for a plain callable. Under ``torch.autocast`` a float32 model computes
                in bfloat16 while x stays float32; ``dtype=torch.bfloat16`` keeps x in bfloat16 too (for a model
                whose forward casts for itself).
            model_kwargs: keyword arguments of every model call, e.g. ``{"class_labels": labels}`` for a
                class-conditional model, with ``labels[b]`` for ``seeds[b]`` (an image then depends on its seed
                and its own conditioning only); tensors are moved to ``device``. Under ``cuda_graph`` the
                tensors are copied into the graph's buffers on each call; other values are part of its key.
            progress: show a progress bar (tqdm when installed, else a line on stderr).
            return_trajectory: also return every x_t, x_T first (unclamped).
            cuda_graph: on CUDA, capture model + step once (per batch shape, dtype, autocast state and
                model parameters) and replay it for every step; later calls reuse the graph with new seeds.
                Needs the cuda or triton step kernel; falls back to the eager loop with a warning naming
                the reason where capture is impossible.

        Casts of the model's parameters that every step would repeat (autocast's, entered around this
        call or inside the model; a bfloat16 model's norm weights to float32) are made once per call
        (:mod:`ddpm_fast.weight_casts`): the first call for a batch shape runs the model once more to
        learn which, and the images are the same, bit for bit. During the call the casts sit in the
        model's parameter slots, so another thread should not use the model meanwhile.

        Returns:
            images: (B, C, H, W) in ``dtype``, clamped to [-1, 1]; with ``return_trajectory``,
            ``(images, trajectory)`` where trajectory is (N + 1, B, C, H, W). An image that ends holding NaN
            or infinity (a diverged model, float16 overflow) gets a RuntimeWarning naming its seed: clamped,
            an infinity would pass for a saturated pixel.
        """
        if device is None:
            device = _default_device(self.model, seeds)
        seeds = _seeds_tensor(seeds, device)
        model_kwargs = _model_kwargs(model_kwargs, seeds.device)
        shape = _infer_shape(self.model) if shape is None else _shape(shape)
        if dtype is None:
            dtype = _parameter_dtype(self.model) or torch.float32
            if dtype not in FLOAT_DTYPES:
                raise TypeError(f"Sampler.sample: the model's parameters are {dtype}, and sampling runs in float32, "
                                f"float16 or bfloat16: convert the model (model.float()) or pass dtype=")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Sampler.sample: dtype must be float32, float16 or bfloat16, got {dtype}")
        for name, flag in (("progress", progress), ("return_trajectory", return_trajectory),
                           ("cuda_graph", cuda_graph)):
            if not isinstance(flag, bool):
                raise TypeError(f"Sampler.sample: {name} must be a bool, got {type(flag).__name__}")
        B, N = seeds.shape[0], self.num_steps
        if B == 0:
            empty = torch.empty((0, *shape), dtype=dtype, device=seeds.device)
            return (empty, empty.new_empty((N + 1, 0, *shape))) if return_trajectory else empty

        # randn has no Triton kernel: under backend="triton" x_T takes the automatic choice (the same normals)
        x = randn(seeds, shape, reference.INITIAL_NOISE_STREAM, dtype,
                  backend=None if self.backend == "triton" else self.backend)
        # Every step's (B,) timesteps, made once: row i is a contiguous device tensor, read without a sync.
        ts = self.timesteps.to(seeds.device)[:, None].expand(N, B).contiguous()
        step_seeds = seeds if self.table.adds_noise else None  # DDIM with eta = 0 draws nothing
        trajectory = [x] if return_trajectory else None

        # The model's tensors and what its keyword arguments bake in, found once per call: the keys of the
        # hoisted casts and of the graph read them.
        slots = parameter_slots(self.model) if isinstance(self.model, torch.nn.Module) else []
        inputs = (storage_key(slots), _kwargs_key(model_kwargs))
        with self._explained_dtype_errors(x):
            casts = self._weight_casts(x, ts[0], model_kwargs, inputs)
            with casts.swapped(slots) if casts is not None else contextlib.nullcontext():
                # The casts themselves in the key: compared by identity, and kept alive while a graph reads them.
                graphed = (self._graphed_loop(x, ts, step_seeds, model_kwargs, (*inputs, casts)) if cuda_graph
                           else None)
                if graphed is not None:
                    x = graphed.x  # the graph's own buffer: each replay advances it by one step in place

                bar = _progress_bar(N, progress, f"{self.method.upper()} sampling")
                try:
                    for i in range(N):
                        if graphed is not None:
                            graphed.graph.replay()
                        else:
                            x = self._step(x, ts[i], step_seeds, model_kwargs)
                        if trajectory is not None:
                            trajectory.append(x.clone() if graphed is not None else x)
                        bar.update(1)
                finally:
                    bar.close()
        _warn_non_finite(x, seeds)  # after the loop: its one host sync
        images = x.clamp(-1.0, 1.0)  # a new tensor: the graph's buffer is never handed out
        if return_trajectory:
            return images, torch.stack(trajectory)
        return images

    @contextlib.contextmanager
    def _explained_dtype_errors(self, x: Tensor):
        """A model that fails on x because its weights are another dtype (conv: "Input type (c10::BFloat16) and
        bias type (float) should be the same") fails with a message that says so and what to do."""
        try:
            yield
        except RuntimeError as error:
            weights = _parameter_dtype(self.model)
            if (isinstance(error, torch.OutOfMemoryError) or weights in (None, x.dtype)
                    or torch.is_autocast_enabled(x.device.type)):
                raise
            in_its_dtype = f"sample in its dtype (dtype=None or dtype={weights}), " if weights in FLOAT_DTYPES else ""
            raise TypeError(f"Sampler.sample: the model failed on {x.dtype} input, and its parameters are {weights}: "
                            f"{in_its_dtype}convert it (model.to({x.dtype})) or sample under torch.autocast "
                            f"({error})") from error

    def _weight_casts(self, x: Tensor, t: Tensor, model_kwargs: Mapping, inputs: tuple) -> WeightCasts | None:
        """The model's weight casts to hoist out of the loop (None: nothing to hoist), recorded by one forward
        on ``x``, ``t`` the first time this model (``inputs``: its tensors' storage and its keyword arguments'
        key), batch and autocast state are seen."""
        model = self.model
        if not isinstance(model, torch.nn.Module):
            return None
        dev = x.device.type
        key = (id(model), tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(dev),
               torch.get_autocast_dtype(dev), inputs)
        if self._casts is None or self._casts[0] != key:
            # A compiled model, or one holding a compiled module, makes its casts inside its own graph (Inductor
            # fuses them into the kernels that read them). Recording it under a dispatch mode would make dynamo
            # compile frame by frame, and swapped parameters would fail its guards: it is left alone.
            casts = None if _holds_compiled(model) else WeightCasts.record(model, lambda: model(x, t, **model_kwargs))
            self._casts = key, (casts if casts is not None and casts.plan else None)
        return self._casts[1]

    # ---------------------------------------------------------------------------------------- CUDA graph

    def _graph_key(self, x: Tensor, seeded: bool, model_key: tuple) -> tuple:
        """What a captured graph bakes in besides the values in its buffers: the batch's shape, dtype and
        device, whether the step draws noise, the step's options and table (kernel arguments), the autocast
        state, the model and ``model_key``: its tensors' storage (a graph reads parameters by address, so
        ``model.half()`` or ``model.to(...)`` after a capture needs a new one), what its keyword arguments bake in
        (:func:`_kwargs_key`) and its hoisted casts."""
        dev = x.device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        options = (self.clip_range, self.thresholding, self.dynamic_thresholding_ratio, self.sample_max_value,
                   id(self.table), self.backend or get_backend())
        return tuple(x.shape), x.dtype, x.device, seeded, options, autocast, id(self.model), model_key

    def _graphed_loop(self, x: Tensor, ts: Tensor, seeds: Tensor | None, model_kwargs: Mapping,
                      model_key: tuple) -> "_GraphedStep | None":
        """The captured model + step, loaded with this call's x_T, timesteps and seeds; or None after a
        warning naming why the eager loop runs instead.

        One graph is kept per :meth:`_graph_key`; a later call with the same key only copies its x_T, seeds
        and timesteps into the graph's buffers (device-to-device, no host sync) and rewinds its step index.
        """
        reason = _graph_unavailable_reason(x.device, self.backend or get_backend())
        # the warnings' stacklevel 4 is sample's caller: past this method, sample and its torch.no_grad wrapper
        if reason is not None:
            warnings.warn(f"Sampler.sample: {reason}; using the eager loop", RuntimeWarning, stacklevel=4)
            return None
        key = self._graph_key(x, seeds is not None, model_key)
        if self._graph is None or self._graph.key != key:
            self._graph = None  # free the old graph's memory pool before capturing a new one
            try:
                self._graph = _GraphedStep.capture(self._step, key, x, ts, seeds, model_kwargs)
            except _CaptureFailed as error:  # the model's own errors (in the warm-up) are raised as they are
                warnings.warn(f"Sampler.sample: CUDA-graph capture failed ({error}); using the eager loop",
                              RuntimeWarning, stacklevel=4)
                return None
        self._graph.load(x, ts, seeds, model_kwargs)
        return self._graph


class _GraphedStep:
    """One model + reverse step captured as a CUDA graph that advances its own state.

    Replay k reads row k of the timesteps buffer ``ts`` ((N, B) int64) through the device step index
    ``index`` ((1,) int64), runs ``x <- step(model(x, t), t, x, seeds)`` in place on ``x`` and increments
    ``index``: one replay per step, nothing copied or read back between replays. Every input lives in a
    buffer captured by address, so :meth:`load` (in-place copies) prepares a new trajectory.
    """

    def __init__(self, key, graph, x: Tensor, ts: Tensor, index: Tensor, seeds: Tensor | None, kwargs: dict):
        self.key, self.graph, self.x, self.ts, self.index, self.seeds = key, graph, x, ts, index, seeds
        self.kwargs = kwargs

    @staticmethod
    def _body(step_fn, x: Tensor, ts: Tensor, index: Tensor, seeds: Tensor | None, kwargs: dict) -> None:
        t = ts.index_select(0, index).view(-1)  # (B,): this replay's timesteps, chosen on the device
        x.copy_(step_fn(x, t, seeds, kwargs))
        index.add_(1)

    @classmethod
    def capture(cls, step_fn, key, x: Tensor, ts: Tensor, seeds: Tensor | None,
                model_kwargs: Mapping) -> "_GraphedStep":
        x, ts = x.clone(), ts.clone()
        index = torch.zeros(1, dtype=torch.int64, device=x.device)
        seeds = None if seeds is None else seeds.clone()
        # The model's tensor arguments in buffers of the graph's own (the caller's may be freed or reused).
        kwargs = pytree.tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, dict(model_kwargs))
        dev = x.device.type
        # Under autocast, casts must happen inside the graph: with autocast's weight cache the graph would
        # read bf16 copies made before the capture, which the enclosing autocast region frees when it ends.
        autocast = (torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False)
                    if torch.is_autocast_enabled(dev) else contextlib.nullcontext())
        with autocast:
            graph = _capture_graph(lambda: cls._body(step_fn, x, ts, index, seeds, kwargs), x.device,
                                   before_each_warmup=index.zero_)
        return cls(key, graph, x, ts, index, seeds, kwargs)

    def load(self, x: Tensor, ts: Tensor, seeds: Tensor | None, model_kwargs: Mapping) -> None:
        """Start a trajectory: x_T (B, C, H, W), the timesteps (N, B), the seeds (B,) and the model's tensor
        arguments into the buffers."""
        self.x.copy_(x)
        self.ts.copy_(ts)
        self.index.zero_()
        if seeds is not None:
            self.seeds.copy_(seeds)
        # The same structure (it is in the graph's key), so the leaves pair up in order.
        for buffer, value in zip(pytree.tree_leaves(self.kwargs), pytree.tree_leaves(dict(model_kwargs))):
            if isinstance(value, Tensor):
                buffer.copy_(value)


def _holds_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or one of its modules is ``torch.compile``d (a wrapper, or ``Module.compile()``)."""
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _graph_unavailable_reason(device: torch.device, backend: str | None) -> str | None:
    """Why a sampling step on ``device`` cannot be captured as a CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"cuda_graph=True needs CUDA tensors, but sampling runs on {device}"
    if backend == "torch" or all(backend_missing_reason(b) for b in ("cuda", "triton")):
        # The torch reference step reads the timesteps back to the host, which a capture forbids.
        why = ("backend='torch' was asked for" if backend == "torch" else
               f"cuda: {backend_missing_reason('cuda')}; triton: {backend_missing_reason('triton')}")
        return f"cuda_graph=True needs the cuda or triton step kernel, but the step would run on torch ({why})"
    return None


class _CaptureFailed(RuntimeError):
    """The step cannot be captured: it synchronizes with the host, or the capture itself failed."""


def _capture_graph(run: Callable[[], None], device: torch.device, before_each_warmup: Callable[[], object],
                   cuda=torch.cuda):
    """``run`` captured as a ``torch.cuda.CUDAGraph`` (its ``replay()`` re-runs it on the device).

    Warms up twice on a side stream first (lazy initialisation, cuDNN and Triton autotuning), as PyTorch's
    CUDA-graph notes require; ``before_each_warmup`` resets whatever ``run`` advances. The second warm-up runs
    under the sync debug mode "error" (process-wide, for its duration): a step that synchronizes with the
    host, which no capture holds, is found there and no capture is tried. Raises _CaptureFailed for a step
    that cannot be captured, after ending the capture and releasing its memory pool, with the caller's stream
    current again: ``torch.cuda.graph`` leaves its capture stream current and the allocator capturing when
    ``capture_end`` fails, which the eager loop and every later capture would inherit. Errors of the warm-up
    itself (the model's) are raised as they are. ``cuda``: torch.cuda (tests pass a stand-in).
    """
    with cuda.device(device):
        side = cuda.Stream(device=device)
        side.wait_stream(cuda.current_stream(device))
        with cuda.stream(side):
            before_each_warmup()
            run()
            before_each_warmup()
            mode = cuda.get_sync_debug_mode()
            cuda.set_sync_debug_mode("error")
            try:
                run()
            except RuntimeError as error:
                if "synchronizing" not in str(error):
                    raise
                raise _CaptureFailed(f"the step synchronizes with the host, which a graph cannot hold: {error}") \
                    from error
            finally:
                cuda.set_sync_debug_mode(mode)
        cuda.current_stream(device).wait_stream(side)
        cuda.synchronize(device)
        graph, pool = cuda.CUDAGraph(), cuda.graph_pool_handle()
        with cuda.stream(cuda.Stream(device=device)):  # the caller's stream is current again however this ends
            graph.capture_begin(pool=pool)
            try:
                run()
            except BaseException as error:  # a Ctrl-C mid-capture too leaves no capture open
                _end_failed_capture(graph, device, pool)
                if not isinstance(error, Exception):
                    raise
                raise _CaptureFailed(f"{type(error).__name__}: {error}") from error
            try:
                graph.capture_end()
            except RuntimeError as error:
                _release_capture_pool(device, pool)
                raise _CaptureFailed(f"{type(error).__name__}: {error}") from error
    return graph


def _end_failed_capture(graph, device: torch.device, pool) -> None:
    """End a capture whose step raised: ``capture_end`` takes the stream out of capture mode; when the capture
    was invalidated it raises before it stops the allocator's capture, which is then stopped here."""
    try:
        graph.capture_end()  # a valid partial graph: its pool goes with it when it is dropped
    except RuntimeError:
        _release_capture_pool(device, pool)


def _release_capture_pool(device: torch.device, pool) -> None:
    """Stop the allocator's capture into ``pool`` and release the pool (PyTorch's own calls, where it has them)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        release = getattr(torch._C, name, None)
        if release is not None:
            try:
                release(index, pool)
            except RuntimeError:  # already stopped by capture_end
                pass


# --------------------------------------------------------------------------------------------------
# image grid
# --------------------------------------------------------------------------------------------------

_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_PIL_MODE = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bytes(pixels: bytes, width: int, height: int, channels: int) -> bytes:
    """A PNG of 8-bit ``pixels`` (height rows of width * channels bytes), no filtering, zlib level 6."""
    stride = width * channels
    raw = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))


def _encode_png(grid: Tensor) -> bytes:
    """grid: (H, W, C) uint8 CPU -> PNG bytes (Pillow when importable, else the writer above)."""
    height, width, channels = grid.shape
    pixels = grid.contiguous().numpy().tobytes()
    try:
        from PIL import Image
    except ImportError:
        return _png_bytes(pixels, width, height, channels)
    import io
    buffer = io.BytesIO()
    Image.frombytes(_PIL_MODE[channels], (width, height), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_grid(images: Tensor, path, nrow: int | None = None, *, padding: int = 0, scale: int = 1,
                    pad_value: float = -1.0) -> None:
    """Write ``images`` as one PNG grid, atomically (a temporary file in the same folder, then os.replace).

    Args:
        images: (B, C, H, W) floats in [-1, 1] (clamped), C in {1, 2, 3, 4} (grey, grey+alpha, RGB, RGBA).
        path: the PNG to write; its folder must exist. On any failure no file (and no partial file) is left.
        nrow: images per row; None: ceil(sqrt(B)).
        padding: pixels between images and around the grid, of ``pad_value`` (in [-1, 1]; -1 is black).
        scale: each image enlarged ``scale`` times (nearest neighbour), so small images stay legible.

    The grid is ``rows * H + (rows + 1) * padding`` pixels high and ``nrow * W + (nrow + 1) * padding`` wide,
    with ``rows = ceil(B / nrow)`` (H, W after ``scale``).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"save_image_grid: images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"save_image_grid: images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] not in _PNG_COLOR_TYPE or min(images.shape[2:]) < 1:
        raise ValueError(f"save_image_grid: images must have shape (B, C, H, W) with B >= 1, C in (1, 2, 3, 4) "
                         f"and H, W >= 1, got {tuple(images.shape)}")
    B, C, H, W = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(B))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"save_image_grid: nrow must be a positive int or None, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"save_image_grid: padding must be an int >= 0, got {padding!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_image_grid: path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"save_image_grid: scale must be an int >= 1, got {scale!r}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not -1.0 <= pad_value <= 1.0:
        raise ValueError(f"save_image_grid: pad_value must be a number in [-1, 1], got {pad_value!r}")
    path = os.fspath(path)

    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        H, W = H * scale, W * scale
    nrow = min(nrow, B)
    rows = math.ceil(B / nrow)
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    grid = torch.full((rows * H + (rows + 1) * padding, nrow * W + (nrow + 1) * padding, C),
                      round((pad_value + 1.0) * 127.5), dtype=torch.uint8)
    for b in range(B):
        r, c = divmod(b, nrow)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y:y + H, x:x + W] = pixels[b].permute(1, 2, 0)
    write_atomically(path, _encode_png(grid))


def write_atomically(path, data: bytes) -> None:
    """``path`` holds ``data`` or, after any failure, what it held before: a temporary file in the same
    folder, synced, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # else mkstemp's error names the temporary file, not the one asked for
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: its folder {folder!r} {why}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an output is meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
