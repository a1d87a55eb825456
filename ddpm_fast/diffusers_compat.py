"""Drop-in replacements for diffusers' DDPMScheduler and DDIMScheduler on the fused ops.

`FastDDPMScheduler` and `FastDDIMScheduler` take the same config fields (and defaults) as diffusers'
schedulers, read and write the same `scheduler_config.json`, and expose what diffusers' pipelines and
typical user code touch (`config`, `timesteps`, `set_timesteps`, `step`, `add_noise`, `init_noise_sigma`,
`scale_model_input`, `order`, ...). Where diffusers is installed they subclass its `SchedulerMixin`, the
one thing taken from it: its pipelines accept a scheduler in `from_pretrained(..., scheduler=...)`, save it
with the pipeline and load it back only then. Without diffusers they stand alone (diffusers is no runtime
dependency), and `import ddpm_fast` imports this module (and so diffusers) only when they are first used.

What differs inside:

* the schedule is float64 (`schedule.NoiseSchedule`) and each step reads a float32 coefficient table
  rounded once from it (`schedule.ddpm_table` / `ddim_table`, cached per (timesteps, eta, ...)), so
  `step` is one fused kernel (`ddpm_fast.step`) instead of ~15 elementwise torch ops; results agree with
  diffusers' up to diffusers' own float32 rounding (its cumulative product drifts by ~1e-6 relative);
* float64 tensors (a float64 reference run, e.g. `unet.double()`) go to the PyTorch reference
  (`ddpm_fast.reference`) on the float64 coefficients: the kernels store float32 / float16 / bfloat16 only;
* the variance noise is drawn exactly as diffusers' `randn_tensor` draws it (same generator, shape,
  dtype and device, drawn under the same conditions), so a seeded generator gives diffusers' noise.

Usage with a pipeline::

    pipe = DDPMPipeline(unet=unet, scheduler=FastDDPMScheduler.from_config(pipe_or_sched.config))
    # DDIMPipeline re-creates a DDIMScheduler in its __init__, so assign after construction:
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)

Deliberate differences from diffusers (each raises a clear error instead of returning NaN/garbage):
variance types "learned" and "fixed_large_log" (see `schedule._REFUSED_VARIANCE_TYPES`), a "leading"
steps_offset that pushes a timestep past T - 1. For the
(T, N) where diffusers' "trailing" spacing yields N + 1 timesteps ending in -1, we return the first N
(`schedule.sampling_timesteps`). Assigning `betas`, `alphas`, `alphas_cumprod` (or DDIM's
`final_alpha_cumprod`) other values raises: the steps read the float64 schedule built from the config, so
new values would be ignored (the same values, e.g. moved to a device, are taken); build a scheduler for
another schedule with `from_config(config, trained_betas=...)`. An assigned `timesteps` must be strictly
descending in [0, T) (or empty), the only sequences a step table can follow. An override that is no field of
the scheduler (`from_config(config, clip_smaple=False)`) raises TypeError, where diffusers ignores it, unless
`return_unused_kwargs=True` asks for it back. `add_noise`'s samples and noise broadcast as in diffusers, but
must have as many dims (else the timestep factor lines up with the wrong axis there); 1-D samples step on
DDPM too, where diffusers' DDPM fails on the missing channel axis.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import reference
from .ops import q_sample, step as fused_step
from .sampler import write_atomically
from .schedule import (_REFUSED_VARIANCE_TYPES, PREDICTION_TYPES, TIMESTEP_SPACINGS, VARIANCE_TYPES, NoiseSchedule,
                       StepTable, _check_choice, _check_int, _check_timesteps, ddim_table, ddpm_table,
                       sampling_timesteps)

__all__ = ["FastDDIMScheduler", "FastDDPMScheduler", "FastSchedulerOutput", "SchedulerConfig"]

CONFIG_NAME = "scheduler_config.json"


def _diffusers_scheduler_base() -> type:
    try:
        from diffusers.schedulers.scheduling_utils import SchedulerMixin as base
    except Exception:  # not installed (or an install that does not import): no pipeline to take part in
        return object
    return base


# Also the name under which diffusers' pipeline loader looks up, in a saved component's module, the base
# class that tells it how to load the component (here: from_pretrained).
SchedulerMixin = _diffusers_scheduler_base()
# How many step tables a scheduler keeps (one per (timesteps, eta, use_clipped_model_output)).
_TABLE_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------------
# config and output containers
# --------------------------------------------------------------------------------------------------


class SchedulerConfig(dict):
    """A read-only dict with attribute access, like diffusers' FrozenDict (`config.num_train_timesteps`).

    A dict subclass, so diffusers' own `from_config` accepts it (`DDIMScheduler.from_config(fast.config)`).
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no field {name!r}; fields: {', '.join(self)}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("the scheduler config is read-only; build a new scheduler with "
                        "from_config(scheduler.config, field=value)")

    __setattr__ = __setitem__ = __delitem__ = __delattr__ = _frozen
    clear = pop = popitem = setdefault = update = __ior__ = _frozen

    def __reduce__(self):  # copy / deepcopy / pickle without going through the blocked __setitem__
        return (SchedulerConfig, (dict(self),))


def _output_field(name: str) -> property:
    return property(lambda self: self[name], lambda self, value: self.__setitem__(name, value))


class FastSchedulerOutput(OrderedDict):
    """What `step` returns: like diffusers' DDPMSchedulerOutput / DDIMSchedulerOutput, an ordered dict (as
    their BaseOutput) of

    prev_sample: (B, C, ...) x at the previous timestep; pred_original_sample: (B, C, ...) the predicted
    x0 after clipping / thresholding,

    read as attributes, by key or by position (`out[0]`), or as `to_tuple()`. Iterating yields the keys,
    as for any dict (and diffusers' outputs): unpack with `prev, x0 = out.to_tuple()` (or step(...,
    return_dict=False)).
    """

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor):
        super().__init__(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    prev_sample = _output_field("prev_sample")
    pred_original_sample = _output_field("pred_original_sample")

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.values())

    def __getitem__(self, key):  # out["prev_sample"], and out[0] / out[:1] by position, as BaseOutput
        return super().__getitem__(key) if isinstance(key, str) else self.to_tuple()[key]

    def __reduce__(self):  # copy / pickle through __init__'s signature (OrderedDict's would call it bare)
        return (type(self), self.to_tuple())


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def _randn_like_diffusers(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `utils.torch_utils.randn_tensor` draws it.

    A CPU generator with a non-CPU device draws on the CPU and moves the result; a list of generators
    draws one (1, ...) slice per generator and concatenates; no generator uses torch's global RNG on
    `device`. So the same seeded generator(s) give bit-identical noise to diffusers'.
    """
    rand_device = device
    if generator is not None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        if not isinstance(first, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(first).__name__}")
        gen_type = first.device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"generator is on {first.device} but the noise must be made on {device}; "
                             "use a generator on that device or on the CPU")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of generators needs one per sample ({shape[0]}), got {len(generator)}")
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator], 0)
        return noise.to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def _broadcast_shape(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> tuple:
    """The shape diffusers' arithmetic on x and other gives, where they have as many dims (else a ValueError)."""
    if other.dim() == x.dim():
        try:
            return tuple(torch.broadcast_shapes(x.shape, other.shape))
        except RuntimeError:
            pass
    raise ValueError(f"{other_name} must have {name}'s shape {tuple(x.shape)} or broadcast with it (a size 1 "
                     f"where they differ), got {tuple(other.shape)}")


class _TimestepsKey:
    """A table-cache key for a timestep sequence that hashes once (a 1000-tuple would rehash every step)."""

    __slots__ = ("values", "_hash")

    def __init__(self, ts: torch.Tensor):
        self.values = tuple(ts.tolist())
        self._hash = hash(self.values)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _TimestepsKey) and self._hash == other._hash and self.values == other.values


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _uses_reference(x: torch.Tensor) -> bool:
    """float64 (a float64 reference run, e.g. `unet.double()`, which diffusers supports) is computed by the
    PyTorch reference on the float64 coefficients: the kernels store float32 / float16 / bfloat16 only."""
    return x.dtype == torch.float64


class _ScheduleTensor:
    """A public schedule tensor (`betas`, `alphas`, ...), float32 as diffusers' and re-assignable as there.

    The steps read the float64 `schedule`, so a changed tensor would be silently ignored: assignment takes
    the same values on any device and in any dtype that holds them exactly (diffusers' own code does
    `self.alphas_cumprod = self.alphas_cumprod.to(device)`) and refuses other values, saying how to get them.
    """

    def __init__(self, values, how: str):
        self.values, self.how = values, how  # values: scheduler -> its float64 CPU tensor

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, scheduler, owner=None):
        if scheduler is None:
            return self
        try:
            return vars(scheduler)[self.name]
        except KeyError:  # not set yet: an AttributeError, so that hasattr / getattr(..., default) work
            raise AttributeError(self.name) from None

    def __set__(self, scheduler, value) -> None:
        value = torch.as_tensor(value)
        expected = self.values(scheduler).float().double()  # the float32 values, exactly
        got = value.detach().to("cpu", torch.float64)
        if got.shape != expected.shape:
            raise ValueError(f"{self.name} must keep shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if not torch.equal(got, expected):
            raise ValueError(
                f"{self.name} can only be re-assigned its own values (e.g. moved to a device): the steps read the "
                f"float64 schedule built from the config, so changed values (max |difference| "
                f"{(got - expected).abs().max().item():.3g}) would be ignored; {self.how}")
        vars(scheduler)[self.name] = value


_OTHER_BETAS = "for another schedule build a scheduler from its betas: from_config(scheduler.config, trained_betas=...)"


# --------------------------------------------------------------------------------------------------
# the shared scheduler machinery
# --------------------------------------------------------------------------------------------------


class _FastScheduler(SchedulerMixin):
    """Config handling, timesteps, add_noise and the table cache shared by the two schedulers (SchedulerMixin
    only marks them as schedulers for diffusers' pipelines: each method it has, they define)."""

    # field -> default, in diffusers' order; subclasses set it.
    _DEFAULTS: dict[str, Any] = {}
    order = 1
    init_noise_sigma = 1.0
    betas = _ScheduleTensor(lambda s: s.schedule.betas, _OTHER_BETAS)
    alphas = _ScheduleTensor(lambda s: s.schedule.alphas, _OTHER_BETAS)
    alphas_cumprod = _ScheduleTensor(lambda s: s.schedule.alphas_cumprod,
                                     _OTHER_BETAS + " (betas = 1 - alphas_cumprod[t] / alphas_cumprod[t - 1])")

    def _setup(self, values: dict) -> None:
        values = {k: values[k] for k in self._DEFAULTS}
        T = _check_int("num_train_timesteps", values["num_train_timesteps"], lo=1)
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr") + self._EXTRA_BOOLS:
            values[name] = _check_bool(name, values[name])
        for name in ("beta_start", "beta_end", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value"):
            values[name] = _check_float(name, values[name])
        _check_choice("prediction_type", values["prediction_type"], PREDICTION_TYPES)
        _check_choice("timestep_spacing", values["timestep_spacing"], TIMESTEP_SPACINGS)
        _check_int("steps_offset", values["steps_offset"], lo=0)
        if values["clip_sample"] and not values["clip_sample_range"] > 0:
            raise ValueError("clip_sample_range must be > 0 when clip_sample=True, "
                             f"got {values['clip_sample_range']!r}")
        if values["thresholding"] and not 0 < values["dynamic_thresholding_ratio"] <= 1:
            raise ValueError("dynamic_thresholding_ratio must be in (0, 1] when thresholding=True, "
                             f"got {values['dynamic_thresholding_ratio']!r}")
        if values["thresholding"] and not values["sample_max_value"] >= 1:
            raise ValueError("sample_max_value must be >= 1 when thresholding=True, "
                             f"got {values['sample_max_value']!r}")
        for name, used in (("clip_sample_range", values["clip_sample"]), ("sample_max_value", values["thresholding"]),
                           ("dynamic_thresholding_ratio", values["thresholding"])):
            if used:  # the kernels take them as float32: refused here rather than at the first step
                reference._check_float32_option(name, values[name])
        # Validates beta_schedule, beta_start/end, trained_betas (naming the field) and builds float64 betas.
        self.schedule = NoiseSchedule(**{k: values[k] for k in NoiseSchedule.CONFIG_KEYS})
        tb = values["trained_betas"]
        values["trained_betas"] = None if tb is None else _jsonable(tb)
        self.config = SchedulerConfig(values)

        # diffusers' public tensors, float32 rounded once from the float64 schedule.
        self.betas = self.schedule.betas.float()
        self.alphas = self.schedule.alphas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self._set_schedule_timesteps(torch.arange(T - 1, -1, -1, dtype=torch.int64), None)
        self._tables: dict = {}

    @staticmethod
    def _clip_range(config) -> float | None:
        return float(config["clip_sample_range"]) if config["clip_sample"] else None

    # ---- construction from configs and directories ----

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **overrides):
        """Build from a config mapping (ours, or diffusers' `scheduler.config`), or from a scheduler object.

        Keys that start with "_" (`_class_name`, `_diffusers_version`) and fields of other schedulers (e.g.
        DDPM's `variance_type` when building a DDIM scheduler) are ignored, as diffusers ignores them; missing
        fields, and those `_use_default_values` lists (absent from the file the config was loaded from), take
        this class's defaults. `overrides` must be fields of this class, unless return_unused_kwargs=True:
        then, as diffusers, returns (scheduler, unused) where unused holds the other overrides and the config
        entries that are not fields of this class (`_class_name` naming it, the fields listed in
        `_use_default_values` left out).
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
            config = config.config  # a scheduler (ours or diffusers') passed directly
        if not isinstance(config, Mapping):
            raise TypeError("config must be a mapping (e.g. scheduler.config) or a scheduler, "
                            f"got {type(config).__name__}")
        unknown = {k: v for k, v in overrides.items() if k not in cls._DEFAULTS}
        if unknown and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.from_config got unknown field(s) {sorted(unknown)}; "
                            f"fields: {', '.join(cls._DEFAULTS)}")
        # Fields a loaded config lacked hold the defaults of the class that loaded it: this class's come instead.
        defaulted = {"_use_default_values", *config.get("_use_default_values", ())}
        kwargs = {k: config[k] for k in cls._DEFAULTS if k in config and k not in defaulted}
        kwargs.update((k, v) for k, v in overrides.items() if k not in unknown)
        scheduler = cls(**kwargs)
        if not return_unused_kwargs:
            return scheduler
        unused = {k: v for k, v in config.items() if k not in cls._DEFAULTS and k not in defaulted}
        if "_class_name" in unused:
            unused["_class_name"] = cls.__name__
        return scheduler, {**unused, **unknown}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        return_unused_kwargs: bool = False,
                        *, cache_dir=None, force_download: bool = False, proxies=None, token=None, revision=None,
                        local_files_only: bool = False, **overrides):
        """Read `scheduler_config.json` from a local directory (`pretrained_model_name_or_path`, diffusers' name
        for it, or its `subfolder`).

        Hub model ids are not downloaded: a path that is not an existing directory raises FileNotFoundError.
        diffusers' download options (cache_dir, force_download, proxies, token, revision, local_files_only) are
        accepted and have nothing to do for a local directory. return_unused_kwargs: see `from_config`.
        """
        path = pretrained_model_name_or_path
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"pretrained_model_name_or_path must be a str or os.PathLike, got {type(path).__name__}")
        directory = Path(path) if subfolder is None else Path(path) / subfolder
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {str(directory)!r} is not an existing local directory "
                "(Hub downloads are not supported; download the model first and pass its directory)")
        file = directory / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {CONFIG_NAME} in {str(directory)!r}")
        with open(file, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{cls.__name__}.from_pretrained: {str(file)!r} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cls.__name__}.from_pretrained: {str(file)!r} must hold a JSON object")
        return cls.from_config(config, return_unused_kwargs, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> Path:
        """Write `scheduler_config.json` (diffusers' format) into `save_directory`, atomically (a failed write
        leaves the previous file whole); returns the file's path. diffusers' signature: its other keywords are
        for the Hub, which we do not push to."""
        if push_to_hub:
            raise NotImplementedError(f"{type(self).__name__}.save_pretrained: push_to_hub is not supported; save, "
                                      "then upload the folder with huggingface_hub")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"save_directory must be a str or os.PathLike, got {type(save_directory).__name__}")
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {str(directory)!r} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, **{k: _jsonable(v) for k, v in self.config.items()}}
        file = directory / CONFIG_NAME
        write_atomically(file, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        return file

    # ---- timesteps ----

    @property
    def timesteps(self) -> torch.Tensor:
        """(N,) int64, descending: the sampling timesteps. Assignable, as in diffusers (e.g. a suffix,
        `scheduler.timesteps = scheduler.timesteps[k:]`): DDPM then steps along the assigned sequence; DDIM
        steps T // num_inference_steps (itself assignable) whatever it holds (diffusers' rules for each)."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value) -> None:
        value = torch.as_tensor(value)
        if value.numel():
            ts = _check_timesteps(value.detach(), self.config.num_train_timesteps)
        else:  # nothing left to sample (a suffix past the end), as diffusers allows
            ts = torch.empty(0, dtype=torch.int64)
        self._timesteps = value
        self._timesteps_assigned(ts)

    def _timesteps_assigned(self, ts: torch.Tensor) -> None:
        """ts: (N,) int64 CPU, the new `timesteps`. DDIM's steps do not depend on them (see DDPM's override)."""

    def _set_table_timesteps(self, ts: torch.Tensor) -> None:
        self._ts_cpu, self._ts_key = ts, _TimestepsKey(ts)

    def _set_schedule_timesteps(self, ts: torch.Tensor, device) -> None:
        """set_timesteps' result ts ((N,) int64 CPU, valid by construction): what the step tables are built for,
        and `timesteps` on `device`, until `timesteps` is assigned."""
        self._set_table_timesteps(ts)
        self._timesteps = ts.to(device) if device is not None else ts

    def _inference_timesteps(self, num_inference_steps) -> torch.Tensor:
        T = self.config.num_train_timesteps
        N = _check_int("num_inference_steps", num_inference_steps, lo=1, hi=T)
        return sampling_timesteps(T, N, self.config.timestep_spacing, self.config.steps_offset)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM / DDIM do not scale the model input); exists for pipeline interchangeability."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def compatibles(self) -> list[type]:
        """The schedulers that can be built from this one's config: diffusers' list for DDPM / DDIM (where
        diffusers is installed) and ours."""
        ours = [FastDDPMScheduler, FastDDIMScheduler]
        if SchedulerMixin is object:
            return ours
        from diffusers import DDPMScheduler
        return DDPMScheduler._get_compatibles() + ours

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails. diffusers' ConfigMixin answers config fields read as attributes
        # (deprecated: a FutureWarning, its message); so do we. vars(): no recursion before `config` exists.
        config = vars(self).get("config")
        if config is None or name not in config:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        cls = type(self).__name__
        warnings.warn(f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. "
                      f"Please access '{name}' over '{cls}'s config object instead, e.g. 'scheduler.config.{name}'.",
                      FutureWarning, stacklevel=2)
        return config[name]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"{type(self).__name__}({fields})"

    # ---- forward process ----

    def _batch_timesteps(self, timesteps, batch: int, device: torch.device, name: str, flatten: bool = False):
        """An int, a 0-d, (1,) or (B,) integer tensor -> int or (B,) int64 tensor on `device`, range-checked.

        One timestep for a batch is broadcast, as diffusers broadcasts it. flatten: any shape of 1 or B
        values, e.g. (B, 1), as diffusers' add_noise / get_velocity flatten them.
        """
        T = self.config.num_train_timesteps
        shapes = f"(), (1,) or ({batch},)" + (f", or any shape of 1 or {batch} values" if flatten else "")
        if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
            return _check_int(name, timesteps, lo=0, hi=T - 1)
        if not isinstance(timesteps, torch.Tensor):
            raise TypeError(f"{name} must be an int or an integer tensor of shape {shapes}, "
                            f"got {type(timesteps).__name__}")
        if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {timesteps.dtype}")
        if timesteps.dim() == 0:
            return _check_int(name, int(timesteps), lo=0, hi=T - 1)
        shape = tuple(timesteps.shape)
        if flatten:
            timesteps = timesteps.flatten()
        if tuple(timesteps.shape) == (1,):
            timesteps = timesteps.expand(batch)
        if tuple(timesteps.shape) != (batch,):
            raise ValueError(f"{name} must be an int or have shape {shapes} (one per sample), got shape {shape}")
        t = timesteps.to(device=device, dtype=torch.int64)
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"{name} must lie in [0, {T - 1}] (num_train_timesteps={T}), "
                             f"got min {int(t.min())}, max {int(t.max())}")
        return t.contiguous()

    def _noising_operands(self, x_name: str, x, noise, timesteps):
        """(x, noise, t, out_shape) for add_noise / get_velocity, broadcast as diffusers' arithmetic broadcasts
        them: a (1, ...) noise serves a batch, one sample serves B timesteps; 1-D samples hold one value per
        sample. The kernels take equal (B, C, ...) shapes, so x and noise come back expanded (a stride-0 view is
        copied once) and a 1-D batch as (B, 1)."""
        for name, value in ((x_name, x), ("noise", noise)):
            if not isinstance(value, torch.Tensor) or value.dim() < 1:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{name} must be a tensor of shape (B, ...), got {got}")
        shape = _broadcast_shape(x_name, x, "noise", noise)
        n_t = timesteps.numel() if isinstance(timesteps, torch.Tensor) else 1
        if shape[0] == 1 and n_t > 1:
            shape = (n_t, *shape[1:])
        t = self._batch_timesteps(timesteps, shape[0], x.device, "timesteps", flatten=True)
        x, noise = x.expand(shape), noise.expand(shape)
        if len(shape) == 1:
            x, noise = x[:, None], noise[:, None]
        return x, noise, t, shape

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise, with the given noise, in one fused pass.

        Args:
            original_samples: (B, ...) float32 / float16 / bfloat16, or float64 (the reference computes it).
            noise: like original_samples, or broadcasting with it (e.g. (1, C, H, W)).
            timesteps: int, or an integer tensor of 1 or B values: (), (1,), (B,), (B, 1), ...
        """
        x, noise, t, shape = self._noising_operands("original_samples", original_samples, noise, timesteps)
        if _uses_reference(x):
            return reference.q_sample(x, t, self.schedule, noise=noise)[0].reshape(shape)
        return q_sample(x, t, self.schedule, noise=noise)[0].reshape(shape)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(ac[t]) noise - sqrt(1 - ac[t]) sample (the v-prediction training target), broadcast as
        add_noise."""
        x, noise, t, shape = self._noising_operands("sample", sample, noise, timesteps)
        if _uses_reference(x):
            return reference.training_target(x, noise, t, self.schedule, "v_prediction").reshape(shape)
        return q_sample(x, t, self.schedule, noise=noise, target="v_prediction")[1].reshape(shape)

    # ---- the step ----

    def _cached_table(self, key, build) -> StepTable:
        table = self._tables.pop(key, None)  # re-inserted below: the dict's order is least recently used first
        if table is None:
            if len(self._tables) >= _TABLE_CACHE_SIZE:
                self._tables.pop(next(iter(self._tables)))
            table = build()
        self._tables[key] = table
        return table

    def _check_step_tensors(self, model_output, sample) -> None:
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if sample.dim() < 1:
            raise ValueError(f"sample must have shape (B, ...), got {tuple(sample.shape)}")

    def _fused(self, table, model_output, t, sample, noise, return_dict):
        dtypes = {model_output.dtype, sample.dtype} | (set() if noise is None else {noise.dtype})
        if len(dtypes) > 1 and all(dtype.is_floating_point for dtype in dtypes):
            # diffusers' arithmetic promotes them (a bf16-autocast model's output for a float32 sample, DDIM's
            # variance_noise in another float dtype): so do we, for the kernels, which take one dtype.
            dtype = functools.reduce(torch.promote_types, dtypes)
            model_output, sample = model_output.to(dtype), sample.to(dtype)
            noise = None if noise is None else noise.to(dtype)
        shape = sample.shape
        if sample.dim() == 1:  # one value per sample: the kernels' (B, C, ...) with C = 1
            if model_output.shape != shape:
                raise ValueError(f"model_output must have sample's shape {tuple(shape)}, "
                                 f"got {tuple(model_output.shape)}")
            model_output, sample = model_output[:, None], sample[:, None]
            noise = None if noise is None else noise.reshape(-1, 1)
        step = fused_step
        if _uses_reference(sample):
            if model_output.dtype != sample.dtype:  # the kernels' rule, which the reference would not enforce
                raise TypeError(f"model_output must have sample's dtype {sample.dtype}, got {model_output.dtype}")
            step = reference.step
        prev, x0 = step(model_output, t, sample, table, noise=noise, clip_range=self._clip_range(self.config),
                        thresholding=self.config.thresholding,
                        dynamic_thresholding_ratio=self.config.dynamic_thresholding_ratio,
                        sample_max_value=self.config.sample_max_value)
        prev, x0 = prev.reshape(shape), x0.reshape(shape)
        if not return_dict:
            return (prev, x0)
        return FastSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# --------------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------------


class FastDDPMScheduler(_FastScheduler):
    """diffusers' DDPMScheduler (ancestral sampling, Ho et al. 2020) on the fused `ddpm_fast.step`.

    Same constructor fields and defaults as diffusers' DDPMScheduler. `variance_type` "learned" and
    "fixed_large_log" are refused (diffusers computes NaN or a non-variance for them; see schedule.py).
    """

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                     thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                     sample_max_value=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
    _EXTRA_BOOLS = ()

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type in _REFUSED_VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r} is not supported: "
                             f"{_REFUSED_VARIANCE_TYPES[variance_type]}")
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._setup(locals())
        self.variance_type = variance_type
        # Tables are built on first use: e.g. zero terminal SNR with epsilon prediction is valid for
        # timesteps that skip t = T - 1, and ddpm_table explains the failure when they do not.

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Set the sampling timesteps (N of them, by `timestep_spacing`), or custom descending `timesteps`.

        `self.timesteps` becomes an int64 (N,) tensor on `device` (CPU when None), as diffusers'.
        """
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("give one of num_inference_steps and timesteps, got both")
        if timesteps is not None:
            ts = _check_timesteps(timesteps, self.config.num_train_timesteps)
            self.custom_timesteps, self.num_inference_steps = True, None
        else:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or timesteps, got neither")
            ts = self._inference_timesteps(num_inference_steps)
            self.custom_timesteps, self.num_inference_steps = False, int(num_inference_steps)
        self._set_schedule_timesteps(ts, device)

    def _timesteps_assigned(self, ts: torch.Tensor) -> None:
        # diffusers' previous_timestep walks `self.timesteps`, so an assigned sequence is the one stepped along.
        self._set_table_timesteps(ts)

    def _table(self) -> StepTable:
        # Before set_timesteps diffusers steps t -> t - 1 whatever `timesteps` holds: the full chain.
        full = not (self.custom_timesteps or self.num_inference_steps)
        return self._cached_table(None if full else self._ts_key, lambda: ddpm_table(
            self.schedule, None if full else self._ts_cpu, self.config.prediction_type, self.config.variance_type))

    def step_table(self) -> StepTable:
        """The coefficient table `step` uses for the current timesteps (built once, cached)."""
        return self._table()

    def previous_timestep(self, timestep):
        """The timestep a step from `timestep` lands on (-1 after the last). A tensor in gives a tensor of its
        shape on its device; an int gives, as diffusers, an int (t - 1) before set_timesteps, else a 0-d tensor."""
        if isinstance(timestep, torch.Tensor):
            return self._table().prev_timestep(timestep.to("cpu")).to(timestep.device)
        prev = self._table().prev_timestep(timestep)
        if not (self.custom_timesteps or self.num_inference_steps):
            return prev
        return torch.tensor(prev, device=self.timesteps.device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral step x_t -> x_prev(t), fused; noise drawn as diffusers draws it.

        Args:
            model_output: like sample, or (B, 2C, ...) for variance_type="learned_range".
            timestep: int, or an integer tensor of shape (), (1,) (both: for every sample) or (B,) (per sample).
            sample: (B, ...) float32 / float16 / bfloat16, or float64 (the reference computes it).
            generator: torch.Generator (or a list, one per sample), or None for torch's global RNG. As in
                diffusers, noise is drawn only when some timestep is > 0.
        Returns:
            FastSchedulerOutput(prev_sample, pred_original_sample), or the tuple when return_dict=False.
        """
        self._check_step_tensors(model_output, sample)
        t = self._batch_timesteps(timestep, sample.shape[0], sample.device, "timestep")
        table = self._table()
        draws = (t > 0) if isinstance(t, int) else bool((t > 0).any())
        if draws:
            noise = _randn_like_diffusers(sample.shape, generator, model_output.device, model_output.dtype)
        elif table.adds_noise:
            # Every t is 0, where the table's std is 0: diffusers draws nothing, the op still wants a tensor.
            noise = torch.zeros_like(sample)
        else:
            noise = None
        return self._fused(table, model_output, t, sample, noise, return_dict)


# --------------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------------


class FastDDIMScheduler(_FastScheduler):
    """diffusers' DDIMScheduler (Song et al. 2021) on the fused `ddpm_fast.step`.

    Same constructor fields and defaults as diffusers' DDIMScheduler; `eta` and
    `use_clipped_model_output` are per-`step` arguments, as in diffusers.
    """

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                     clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False)
    _EXTRA_BOOLS = ("set_alpha_to_one",)
    final_alpha_cumprod = _ScheduleTensor(
        lambda s: torch.tensor(1.0, dtype=torch.float64) if s.config.set_alpha_to_one else s.schedule.alphas_cumprod[0],
        "it follows set_alpha_to_one: from_config(scheduler.config, set_alpha_to_one=...)")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._setup(locals())
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.schedule.alphas_cumprod[0].float()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the N sampling timesteps by `timestep_spacing`; `self.timesteps`: int64 (N,) on `device`."""
        ts = self._inference_timesteps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._set_schedule_timesteps(ts, device)

    def step_table(self, eta: float = 0.0, use_clipped_model_output: bool = False) -> StepTable:
        """The coefficient table `step` uses for the current timesteps and (eta, use_clipped_model_output)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) first")
        eta, use_clipped, N = float(eta), bool(use_clipped_model_output), self.num_inference_steps
        # The step size is T // num_inference_steps, as in diffusers, also where the attribute was assigned.
        return self._cached_table((self._ts_key, eta, use_clipped, N), lambda: ddim_table(
            self.schedule, self._ts_cpu, self.config.prediction_type, eta, self.config.set_alpha_to_one,
            use_clipped, N))

    def previous_timestep(self, timestep):
        """t - T // N, diffusers' DDIM rule (negative: before the start). int or tensor in, same out."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before previous_timestep")
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """One DDIM step x_t -> x_{t - T//N}, fused; noise (eta > 0) drawn as diffusers draws it.

        Args:
            model_output: like sample.
            timestep: int, or an integer tensor of shape (), (1,) (both: for every sample) or (B,) (per sample).
            sample: (B, ...) float32 / float16 / bfloat16, or float64 (the reference computes it).
            eta: >= 0; 0 is deterministic DDIM, 1 has DDPM's posterior variance.
            use_clipped_model_output: recompute eps from the clipped x0 (diffusers' option).
            generator: torch.Generator (or list), or None for torch's global RNG; used only when eta > 0.
            variance_noise: like sample, or broadcasting to it (a float dtype, promoted as in diffusers): the
                noise itself instead of drawing it (eta > 0).
        Returns:
            FastSchedulerOutput(prev_sample, pred_original_sample), or the tuple when return_dict=False.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps(num_inference_steps) before step")
        self._check_step_tensors(model_output, sample)
        eta = _check_float("eta", eta)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        # DDIMPipeline passes None (its default); diffusers treats it as False.
        use_clipped = False if use_clipped_model_output is None else _check_bool(
            "use_clipped_model_output", use_clipped_model_output)
        t = self._batch_timesteps(timestep, sample.shape[0], sample.device, "timestep")
        table = self.step_table(eta, use_clipped)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("give at most one of generator and variance_noise, got both")
            if variance_noise is None:
                noise = _randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            else:
                if not isinstance(variance_noise, torch.Tensor):
                    raise TypeError(f"variance_noise must be a tensor of sample's shape {tuple(sample.shape)}, "
                                    f"got {type(variance_noise).__name__}")
                if _broadcast_shape("sample", sample, "variance_noise", variance_noise) != tuple(sample.shape):
                    raise ValueError(f"variance_noise must have sample's shape {tuple(sample.shape)} or broadcast "
                                     f"to it, got {tuple(variance_noise.shape)}")
                noise = variance_noise.expand(sample.shape)
        return self._fused(table, model_output, t, sample, noise, return_dict)
