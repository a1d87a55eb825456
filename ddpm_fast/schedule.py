"""Beta schedules, sampling timesteps and reverse-step coefficient tables.

All the math here is float64 on the CPU: a schedule is computed once, and the float32 tables that the
kernels read (`NoiseSchedule.q_table`, `StepTable.table`) are rounded from float64 values, so they carry
one rounding each instead of the error that diffusers' float32 cumulative products accumulate over
1000 steps. The layouts of those tables are defined in docs/contracts.md.

Pure PyTorch (plus numpy for diffusers-exact timestep rounding); nothing here needs the compiled
extension.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "BETA_SCHEDULES",
    "COEF_COLUMNS",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "NoiseSchedule",
    "StepTable",
    "ddim_table",
    "ddpm_table",
    "make_betas",
    "rescale_zero_terminal_snr",
    "sampling_timesteps",
]

_F64 = torch.float64

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")

# diffusers accepts these variance types, but what it computes for them is not a meaningful variance,
# so we refuse them instead of reproducing the result.
_REFUSED_VARIANCE_TYPES = {
    "learned": (
        "diffusers returns the model's extra channels unchanged as the *variance* and takes their square "
        "root, while models trained with a learned variance (Nichol & Dhariwal 2021) predict an "
        "interpolation of log-variances; any negative channel value becomes NaN. Use 'learned_range'."
    ),
    "fixed_large_log": (
        "diffusers returns log(beta_t) (a negative number) and then takes its square root as the noise "
        "scale, which is NaN for every t. Use 'fixed_large'."
    ),
}

# Column names of StepTable.coef, in order (docs/contracts.md, "Reverse-step coefficient table").
COEF_COLUMNS = ("ax", "am", "p0", "p1", "p2", "std", "min_log", "max_log")


# --------------------------------------------------------------------------------------------------
# argument checks (messages name the argument, the expected and the actual value)
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """Return `value` as an int, or raise naming `name` and the allowed range [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {value}")
    return value


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_probability(name: str, value) -> float:
    """A beta endpoint: a real number in (0, 1]."""
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def _check_schedule(schedule) -> "NoiseSchedule":
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _check_betas(betas: torch.Tensor, name: str = "betas") -> torch.Tensor:
    """betas: (T,) float64, every value in (0, 1] (1 is allowed: zero terminal SNR)."""
    if betas.dim() != 1 or betas.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
    bad = ~((betas > 0) & (betas <= 1))  # also catches NaN
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must all be in (0, 1], got {name}[{i}] = {betas[i].item()!r}")
    return betas


def _check_timesteps(timesteps, num_train_timesteps: int, name: str = "timesteps") -> torch.Tensor:
    """timesteps: sequence or tensor of ints, (N,) strictly descending in [0, T). Returns int64 CPU."""
    ts = torch.as_tensor(timesteps)
    if ts.dtype.is_floating_point or ts.dtype.is_complex or ts.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {ts.dtype}")
    ts = ts.to(device="cpu", dtype=torch.int64)
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if ts.min() < 0 or ts.max() >= num_train_timesteps:
        raise ValueError(
            f"{name} must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got min {int(ts.min())}, max {int(ts.max())}"
        )
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{name} must be strictly descending, got {ts.tolist()}")
    return ts


# --------------------------------------------------------------------------------------------------
# beta schedules
# --------------------------------------------------------------------------------------------------


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=_F64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Linear in sqrt(beta): Stable Diffusion's "scaled_linear" and Ho et al.'s "quad" are this curve.
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=_F64) ** 2


def _cosine_alpha_bar(s: float) -> float:
    """Nichol & Dhariwal (2021) eq. 17 with offset 0.008, normalised so that alpha_bar(0) == 1."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s: float) -> float:
    """diffusers' "laplace" schedule: log-SNR l = -0.5 sign(0.5 - s) log(1 - 2 |0.5 - s| + 1e-6), and
    alpha_bar = sqrt(sigmoid(l)), with the square root, exactly as diffusers defines it."""
    log_snr = -0.5 * math.copysign(1.0, 0.5 - s) * math.log(1.0 - 2.0 * abs(0.5 - s) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1.0 + snr))


def _alpha_bar_betas(alpha_bar: Callable[[float], float], T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretize a continuous alpha_bar(s), s in [0, 1]. Clipping at 0.999 keeps the cosine
    schedule's last steps from having beta == 1 (alpha_bar(1) ~ 1e-33)."""
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=_F64)


def _cosine_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    del beta_start, beta_end  # the cosine schedule has no endpoints
    return _alpha_bar_betas(_cosine_alpha_bar, T)


def _laplace_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    del beta_start, beta_end  # no endpoints either
    return _alpha_bar_betas(_laplace_alpha_bar, T)


def _sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=_F64)) * (beta_end - beta_start) + beta_start


# name -> betas(T, beta_start, beta_end): (T,) float64. The aliases are listed here and nowhere else:
# "quadratic" is Ho et al.'s "quad" (= scaled_linear), "squaredcos_cap_v2" is diffusers' name for cosine.
BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "quadratic": _scaled_linear_betas,
    "cosine": _cosine_betas,
    "squaredcos_cap_v2": _cosine_betas,
    "sigmoid": _sigmoid_betas,
    "laplace": _laplace_betas,
}

# Schedules whose shape ignores beta_start / beta_end (those are then not validated).
_ENDPOINT_FREE = ("cosine", "squaredcos_cap_v2", "laplace")


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Betas of a named schedule.

    Returns:
        betas: (T,) float64, every value in (0, 1].
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, lo=1)
    _check_choice("beta_schedule", beta_schedule, tuple(BETA_SCHEDULES))
    if beta_schedule not in _ENDPOINT_FREE:
        beta_start = _check_probability("beta_start", beta_start)
        beta_end = _check_probability("beta_end", beta_end)
    return _check_betas(BETA_SCHEDULES[beta_schedule](T, beta_start, beta_end))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is unchanged.

    Args:
        betas: (T,) with T >= 2, values in (0, 1].
    Returns:
        (T,) float64; the last beta is exactly 1.
    """
    betas = _check_betas(torch.as_tensor(betas).to(device="cpu", dtype=_F64))
    if betas.numel() < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs at least 2 betas, got {betas.numel()}")
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].item(), sqrt_ac[-1].item()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


# --------------------------------------------------------------------------------------------------
# the noise schedule
# --------------------------------------------------------------------------------------------------


def _device_key(device) -> torch.device:
    """Normalise "cuda" to "cuda:<current>" so a cache holds one entry per physical device."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cached_on(cache: dict, source: torch.Tensor, device) -> torch.Tensor:
    """source: float64 CPU table -> a contiguous float32 copy on `device`, made once per device."""
    key = _device_key(device)
    if key not in cache:
        # Made outside any torch.func transform the call may be in: inside one, the copy would be the
        # transform's wrapper, and every later call would read it after the transform has ended. (Checked
        # after is_compiling: dynamo traces neither call.)
        in_transform = not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
        with torch._C._DisableFuncTorch() if in_transform else contextlib.nullcontext():
            cache[key] = source.to(device=key, dtype=torch.float32).contiguous()
    return cache[key]


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a discrete diffusion model with T train timesteps.

    Attributes (float64, CPU):
        betas: (T,)
        alphas: (T,) = 1 - betas
        alphas_cumprod: (T,) = cumprod(alphas)
        q_coef: (T, 2) rows (sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]))
    """

    # Keys of a diffusers scheduler config that define the noise schedule; every other key
    # (`_class_name`, `clip_sample`, `prediction_type`, `timestep_spacing`, ...) belongs to the
    # sampler or the step table and is ignored here.
    CONFIG_KEYS = (
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "trained_betas",
        "rescale_betas_zero_snr",
    )

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        T = _check_int("num_train_timesteps", num_train_timesteps, lo=1)
        if trained_betas is not None:
            betas = _check_betas(torch.as_tensor(trained_betas).to(device="cpu", dtype=_F64).clone(), "trained_betas")
            if betas.numel() != T:
                raise ValueError(
                    f"trained_betas must have num_train_timesteps={T} values, got {betas.numel()}"
                )
            beta_schedule = "trained"
        else:
            betas = make_betas(T, beta_schedule, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.q_coef = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()], dim=1)
        self._q_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: Mapping) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (a dict, or a FrozenDict from `scheduler.config`).

        Only `CONFIG_KEYS` are read; missing ones take this class's defaults.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        return cls(**{k: config[k] for k in cls.CONFIG_KEYS if k in config})

    def q_table(self, device=None) -> torch.Tensor:
        """(T, 2) float32 contiguous on `device`: rows (sqrt(ac[t]), sqrt(1 - ac[t])). Cached per device."""
        return _cached_on(self._q_tables, self.q_coef, device)

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"rescale_betas_zero_snr={self.rescale_betas_zero_snr})"
        )


# --------------------------------------------------------------------------------------------------
# sampling timesteps
# --------------------------------------------------------------------------------------------------


def sampling_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """The timesteps of an N-step sampler, exactly as diffusers' DDPM/DDIM `set_timesteps`.

    numpy does the arithmetic because diffusers does: np.linspace, np.arange with a float step and
    np.round (half to even) decide the rounding, and torch's equivalents differ in the last bit.

    As in diffusers, `steps_offset` only shifts "leading" timesteps. One deliberate difference: for some
    (T, N), e.g. (1000, 61), diffusers' "trailing" np.arange yields N + 1 values, the last being -1; we
    return the first N (the -1 is not a valid timestep).

    Returns:
        timesteps: (N,) int64, strictly descending, in [0, T).
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, lo=1)
    N = _check_int("num_inference_steps", num_inference_steps, lo=1, hi=T)
    _check_choice("spacing", spacing, TIMESTEP_SPACINGS)
    steps_offset = _check_int("steps_offset", steps_offset, lo=0)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N))[::-1].astype(np.int64) + steps_offset
        if ts[0] >= T:
            raise ValueError(
                f"steps_offset={steps_offset} pushes the first leading timestep to {int(ts[0])}, "
                f"outside [0, {T - 1}] (num_train_timesteps={T}, num_inference_steps={N})"
            )
    else:
        ts = (np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1)[:N]
    return torch.from_numpy(np.ascontiguousarray(ts))


# --------------------------------------------------------------------------------------------------
# reverse-step coefficient tables
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class StepTable:
    """Per-train-timestep coefficients of one reverse step (docs/contracts.md).

    Attributes:
        kind: "ddpm" or "ddim".
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: DDPM's variance type; None for DDIM.
        eta: DDIM's eta; 1.0 for DDPM (full ancestral noise).
        timesteps: (N,) int64 CPU, the scheduled timesteps, descending.
        coef: (T, 8) float64 CPU, columns `COEF_COLUMNS`, one row for every t in [0, T), scheduled or not.
        num_train_timesteps: T.
        prev_timesteps: (T,) int64 CPU, prev(t) for every t (-1 or below: "before the start").
    """

    kind: str
    prediction_type: str
    variance_type: str | None
    eta: float
    timesteps: torch.Tensor = field(repr=False)
    coef: torch.Tensor = field(repr=False)
    num_train_timesteps: int
    prev_timesteps: torch.Tensor = field(repr=False)
    _tables: dict = field(default_factory=dict, init=False, repr=False)
    # Whether any row draws noise; a plain bool so op-level checks need no tensor read (torch.compile).
    adds_noise: bool = field(init=False)

    def __post_init__(self):
        self.adds_noise = bool(self.coef[:, COEF_COLUMNS.index("std")].ne(0).any())

    def table(self, device=None) -> torch.Tensor:
        """(T, 8) float32 contiguous on `device`, rounded from `coef`. Cached per device."""
        return _cached_on(self._tables, self.coef, device)

    def prev_timestep(self, t: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep that a step from t lands on. t: int, or int64 tensor of any shape (same shape out)."""
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"t must hold integers, got dtype {t.dtype}")
            if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
                raise ValueError(
                    f"t must lie in [0, {self.num_train_timesteps - 1}], got min {int(t.min())}, max {int(t.max())}"
                )
            return self.prev_timesteps.to(t.device)[t.long()]
        t = _check_int("t", t, lo=0, hi=self.num_train_timesteps - 1)
        return int(self.prev_timesteps[t])


def _x0_coefficients(a: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = ax * x + am * m for a model output m. a: (T,) alphas_cumprod. Returns (ax, am), each (T,)."""
    sa, sb = a.sqrt(), (1.0 - a).sqrt()
    if prediction_type == "epsilon":  # x = sa * x0 + sb * eps
        return 1.0 / sa, -sb / sa
    if prediction_type == "sample":
        return torch.zeros_like(a), torch.ones_like(a)
    return sa, -sb  # v = sa * eps - sb * x0  =>  x0 = sa * x - sb * v


def _eps_coefficients(a: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eps = ex * x + em * m, from the *unclipped* model output. a: (T,). Returns (ex, em), each (T,)."""
    sa, sb = a.sqrt(), (1.0 - a).sqrt()
    if prediction_type == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "sample":
        return 1.0 / sb, -sa / sb
    return sb, sa  # eps = sa * v + sb * x


def _alphas_prev(schedule: NoiseSchedule, prev: torch.Tensor, before_start: float) -> torch.Tensor:
    """alphas_cumprod[prev] where prev >= 0, else `before_start`. prev: (T,) int64. Returns (T,)."""
    ac = schedule.alphas_cumprod
    return torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(ac, before_start))


def _raise_if_scheduled_rows_not_finite(
    coef: torch.Tensor, timesteps: torch.Tensor, prev: torch.Tensor, schedule: NoiseSchedule, table: str,
    prediction_type: str,
) -> None:
    """A scheduled row with inf/NaN would silently poison a sampler: fail now and say why."""
    bad = ~torch.isfinite(coef[timesteps]).all(dim=1)
    if not bad.any():
        return
    t = int(timesteps[bad][0])
    cols = [COEF_COLUMNS[k] for k in (~torch.isfinite(coef[t])).nonzero().flatten().tolist()]
    a = schedule.alphas_cumprod[t].item()
    if a == 0.0 and prediction_type == "epsilon":
        cause = (
            "alphas_cumprod[t] == 0 (zero terminal SNR), so x0 = (x - sqrt(1 - a) * eps) / sqrt(a) divides by "
            "zero; use prediction_type='v_prediction' or 'sample', or timesteps that skip t"
        )
    else:
        p = int(prev[t])
        ap = schedule.alphas_cumprod[p].item() if p >= 0 else None
        cause = f"alphas_cumprod[t] = {a!r}, prev(t) = {p}, alphas_cumprod[prev] = {ap!r}"
    raise ValueError(
        f"{table}: prediction_type={prediction_type!r} gives non-finite coefficients {cols} at scheduled "
        f"timestep t={t}: {cause}"
    )


def _ddpm_prev(timesteps: torch.Tensor, T: int) -> torch.Tensor:
    """prev(t) = the largest scheduled timestep below t, or -1. Returns (T,) int64 for t = 0..T-1."""
    ascending = timesteps.flip(0).contiguous()
    idx = torch.searchsorted(ascending, torch.arange(T, dtype=torch.int64)) - 1
    return torch.where(idx >= 0, ascending[idx.clamp(min=0)], torch.full_like(idx, -1))


def ddpm_table(
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
) -> StepTable:
    """The ancestral DDPM step (Ho et al. 2020) as diffusers' DDPMScheduler.step computes it.

    prev(t) is the largest scheduled timestep below t, or -1 (then alphas_cumprod_prev = 1); on
    scheduled t this is diffusers' `previous_timestep`, and it defines rows for t off the schedule.

    Per row, with a = ac[t], ap = ac[prev], beta = 1 - a / ap:
        p0 = sqrt(ap) * beta / (1 - a), p1 = sqrt(a / ap) * (1 - ap) / (1 - a), p2 = 0;
        var = max((1 - ap) / (1 - a) * beta, 1e-20);
        std = sqrt(var) (fixed_small, fixed_small_log), sqrt(beta) (fixed_large), 1 (learned_range,
        with min_log = log(var), max_log = log(beta)); std = 0 at t == 0 (no noise on the last step).

    Args:
        timesteps: (N,) descending ints in [0, T), or None for all of T-1..0.
    """
    _check_schedule(schedule)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if variance_type in _REFUSED_VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance_type!r} is not supported: {_REFUSED_VARIANCE_TYPES[variance_type]}")
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    T = schedule.num_train_timesteps
    ts = torch.arange(T - 1, -1, -1) if timesteps is None else _check_timesteps(timesteps, T)

    prev = _ddpm_prev(ts, T)
    a = schedule.alphas_cumprod
    ap = _alphas_prev(schedule, prev, before_start=1.0)
    step_alpha = a / ap
    beta = 1.0 - step_alpha
    ax, am = _x0_coefficients(a, prediction_type)
    p0 = ap.sqrt() * beta / (1.0 - a)
    p1 = step_alpha.sqrt() * (1.0 - ap) / (1.0 - a)
    p2 = torch.zeros_like(a)
    var = ((1.0 - ap) / (1.0 - a) * beta).clamp(min=1e-20)
    zeros = torch.zeros_like(a)
    min_log, max_log = zeros, zeros
    if variance_type in ("fixed_small", "fixed_small_log"):
        # diffusers' fixed_small_log is exp(0.5 * log(var)) = sqrt(var): the same numbers as fixed_small.
        std = var.sqrt()
    elif variance_type == "fixed_large":
        std = beta.sqrt()
    else:  # learned_range: the model's v in [-1, 1] interpolates between the two log-variances
        std = torch.ones_like(a)
        min_log, max_log = var.log(), beta.log()
    std = torch.where(torch.arange(T) > 0, std, zeros)

    coef = torch.stack([ax, am, p0, p1, p2, std, min_log, max_log], dim=1)
    _raise_if_scheduled_rows_not_finite(coef, ts, prev, schedule, "ddpm_table", prediction_type)
    return StepTable("ddpm", prediction_type, variance_type, 1.0, ts, coef, T, prev)


def ddim_table(
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
    num_inference_steps: int | None = None,
) -> StepTable:
    """The DDIM step (Song et al. 2021) as diffusers' DDIMScheduler.step computes it.

    prev(t) = t - T // N (diffusers' rule, whatever the spacing; N = num_inference_steps, by default
    len(timesteps)); where prev < 0, alphas_cumprod_prev is 1 (set_alpha_to_one) or alphas_cumprod[0].

    With a = ac[t], ap = ac[prev], sigma = eta * sqrt((1 - ap) / (1 - a) * (1 - a / ap)) and
    d = sqrt(1 - ap - sigma^2): prev_x = sqrt(ap) * x0c + d * eps + sigma * z, where eps comes from the
    unclipped model output, eps = ex * x + em * m (diffusers' default), or, with use_clipped_model_output,
    from the clipped x0: eps = (x - sqrt(a) * x0c) / sqrt(1 - a). Both fold into p0, p1, p2; std = sigma.

    Args:
        timesteps: (N,) descending ints in [0, T).
        eta: >= 0; 0 is deterministic DDIM, 1 has DDPM's posterior variance.
    """
    _check_schedule(schedule)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    eta = float(eta)
    if not eta >= 0.0 or math.isinf(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    T = schedule.num_train_timesteps
    ts = _check_timesteps(timesteps, T)
    N = ts.numel() if num_inference_steps is None else _check_int("num_inference_steps", num_inference_steps, 1, T)

    prev = torch.arange(T, dtype=torch.int64) - T // N
    a = schedule.alphas_cumprod
    ap = _alphas_prev(schedule, prev, before_start=1.0 if set_alpha_to_one else a[0].item())
    sigma = eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt()
    d2 = 1.0 - ap - sigma**2
    if eta <= 1.0:
        # Exactly, d2 = (1 - ap) * (1 - eta^2 * (1 - a/ap) / (1 - a)) >= 0 because a <= ap; a negative
        # value here is float64 cancellation in a number that is ~0, not a meaningful negative.
        d2 = d2.clamp(min=0.0)
    elif (d2[ts] < 0).any():
        t = int(ts[d2[ts] < 0][0])
        raise ValueError(
            f"eta={eta} is too large: at scheduled timestep t={t}, sigma^2 = {sigma[t].item() ** 2!r} exceeds "
            f"1 - alphas_cumprod_prev = {1.0 - ap[t].item()!r}, so the DDIM direction term is imaginary"
        )
    d = d2.sqrt()  # unscheduled rows with eta > 1 may be NaN: they follow the same rule
    ax, am = _x0_coefficients(a, prediction_type)
    if use_clipped_model_output:
        sa, sb = a.sqrt(), (1.0 - a).sqrt()
        p0, p1, p2 = ap.sqrt() - d * sa / sb, d / sb, torch.zeros_like(a)
    else:
        ex, em = _eps_coefficients(a, prediction_type)
        p0, p1, p2 = ap.sqrt(), d * ex, d * em
    zeros = torch.zeros_like(a)

    coef = torch.stack([ax, am, p0, p1, p2, sigma, zeros, zeros], dim=1)
    _raise_if_scheduled_rows_not_finite(coef, ts, prev, schedule, "ddim_table", prediction_type)
    return StepTable("ddim", prediction_type, None, eta, ts, coef, T, prev)
