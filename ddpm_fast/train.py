"""L_simple training of the DDPM U-Net on the fused ops, with exact resume and crash-safe checkpoints.

One training step (Ho et al. 2020, Algorithm 1): a batch x0, timesteps t ~ U[0, T), one fused
``q_sample`` that draws the noise inside the kernel from per-sample seeds and returns (x_t, target)
(epsilon, x0 or v), the model's prediction, the mean squared error (optionally min-SNR-gamma
weighted, Hang et al. 2023: :func:`ddpm_fast.reference.l_simple_loss`), Adam with a linear learning-rate
warm-up and gradient-norm clipping, then an EMA of the weights. On a GPU a step never waits for the device:
what it drew reaches the GPU in one copy from pinned memory, and ``train()`` copies each step's loss to pinned
memory without waiting and reads it once the next step is queued, waiting for that copy only: the GPU still
has the next step's work while the host reads.

Randomness is a pure function of (seed, step): the batch's images (an epoch-wise permutation), its
timesteps, flips and noise seeds and the dropout generator are all derived from them. Resuming from a
checkpoint at step s therefore replays exactly the steps an uninterrupted run would take, and the loss
after resuming equals the uninterrupted run's on the CPU, bit for bit (tests/test_train.py). On a GPU the
draws are the same, but a backward may round differently from run to run (cuDNN's weight gradients,
attention's backward, the cuda GroupNorm's float atomics), so the losses agree to rounding. Under
torch.distributed each rank takes its slice of the same global batch, so the DDP-averaged gradient is the
global batch's gradient.

The EMA decay is ``min(ema_decay, (1 + n) / (10 + n))`` after n updates when ``ema_warmup`` (default), so
short runs get a useful average: 0.9999 alone would leave the EMA at ~95% of the initial random weights
after 500 steps. ``ema_warmup=False`` uses ``ema_decay`` from the first step.

Checkpoints: ``<out>/checkpoints/step_<8 digits>/`` holding ``config.json`` (U-Net, schedule and training
configuration, step), ``ema.safetensors`` (the weights to sample with), ``model.safetensors`` and
``optimizer.safetensors``. A checkpoint is written into a hidden temporary folder, every file fsynced,
then renamed into place with one ``os.replace``, so a crash while saving leaves the previous
checkpoint as the latest one; :func:`latest_checkpoint` only ever sees complete folders.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from . import reference
from .data import ImageDataset, is_cifar10_dir, load_dataset, to_unit_range
from .ops import q_sample
from .sampler import Sampler, save_image_grid, write_atomically
from .schedule import PREDICTION_TYPES, NoiseSchedule
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["CHECKPOINT_FORMAT", "TrainConfig", "Trainer", "latest_checkpoint", "load_checkpoint",
           "load_model", "save_checkpoint", "write_sample_grid"]

CHECKPOINT_FORMAT = "ddpm_fast-checkpoint-1"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_ASIDE_DIR = re.compile(r"^\.old-step_(\d{8})-\d+$")  # a step a re-save moved aside (save_checkpoint)
# What loading a model (and resuming, also ema_updates) reads from a checkpoint's config.json.
_MODEL_KEYS = ("step", "unet", "schedule", "prediction_type")
_MASK63 = (1 << 63) - 1


def write_sample_grid(images: torch.Tensor, path) -> None:
    """Samples as a PNG grid a person can read: small images enlarged to ~48 px, grey lines between them
    (digits touch their borders, so black padding would merge neighbours)."""
    save_image_grid(images, path, padding=2, scale=max(1, 48 // images.shape[-1]), pad_value=-0.5)


@dataclass
class TrainConfig:
    """A training run. ``batch_size`` is the global batch (split evenly across torch.distributed ranks)."""

    data: str = "digits"                # "digits", an image folder or a CIFAR-10 python directory
    image_size: int | None = None       # None: the dataset's own (digits 16, CIFAR-10 32; a folder: the preset's)
    preset: str = "tiny"                # a UNet preset; in/out channels and sample_size follow the data
    prediction_type: str = "epsilon"    # "epsilon", "sample" (x0) or "v_prediction"
    min_snr_gamma: float | None = None  # e.g. 5.0 for min-SNR weighting
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    batch_size: int = 64
    steps: int = 10_000
    lr: float = 2e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    flip: bool | None = None            # None: the dataset's default (False for digits, True for photos)
    amp: str = "auto"                   # "auto" (bf16 autocast on CUDA), "bf16" or "none"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 0               # 0: no periodic grids
    num_samples: int = 64
    sample_steps: int = 50              # DDIM steps of the periodic grids

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"TrainConfig: preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"TrainConfig: prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"TrainConfig: amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        for name in ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "num_samples", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "sample_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig: {name} must be an int >= 0, got {value!r}")
        # Seeds past int64 would be folded onto others (derive_seed reads 64 bits): refused, not aliased.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"TrainConfig: seed must be an int in [0, 2**63), got {self.seed!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: grad_clip must be > 0, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig: ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"TrainConfig: min_snr_gamma must be > 0 or None, got {self.min_snr_gamma!r}")
        if self.sample_every and self.sample_steps > self.num_train_timesteps:  # found now, not at the first grid
            raise ValueError(f"TrainConfig: sample_steps={self.sample_steps} must be at most num_train_timesteps="
                             f"{self.num_train_timesteps} when sample_every > 0")


# ------------------------------------------------------------------------------------------- randomness

def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (splitmix64 over them)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


# Purposes, so that two uses of (seed, step) never share a stream.
_PERMUTATION, _BATCH, _NOISE, _DROPOUT, _SAMPLES = range(5)


@dataclass
class StepDraw:
    """What step ``step`` of a run draws, for the whole global batch (G = batch_size)."""

    indices: Tensor   # (G,) int64 image indices
    t: Tensor         # (G,) int64 timesteps
    flip: Tensor      # (G,) bool
    seeds: Tensor     # (G,) int64 q_sample noise seeds


def draw_step(seed: int, step: int, batch: int, num_images: int, num_train_timesteps: int) -> StepDraw:
    """The batch of step ``step``: positions step*G .. step*G+G-1 of the epoch-wise permuted dataset."""
    positions = torch.arange(step * batch, (step + 1) * batch, dtype=torch.int64)
    epochs, offsets = positions // num_images, positions % num_images
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, _PERMUTATION, epoch))
        perm = torch.randperm(num_images, generator=g)
        mask = epochs == epoch
        indices[mask] = perm[offsets[mask]]
    g = torch.Generator().manual_seed(derive_seed(seed, _BATCH, step))
    t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    base = derive_seed(seed, _NOISE, step) >> 1  # room for + G without passing 2**63
    return StepDraw(indices, t, flip, base + torch.arange(batch, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------- EMA

class EMA:
    """An exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.params = [p.detach().clone().float() for p in model.parameters()]
        self.updates = 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], weight)
        self.updates += 1

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """model's state dict with the averaged parameters in place of its own."""
        names = [n for n, _ in model.named_parameters()]
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, p in zip(names, self.params):
            state[name] = p.to(state[name].dtype).clone()
        return state

    def load(self, model: nn.Module, state: dict[str, Tensor], updates: int) -> None:
        names = [n for n, _ in model.named_parameters()]
        self.params = [state[n].to(device=p.device, dtype=torch.float32).clone()
                       for n, p in zip(names, model.parameters())]
        self.updates = updates


# ------------------------------------------------------------------------------------------ checkpoints

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:  # a full disk says "[Errno 28] No space left on device", naming no file
        raise OSError(error.errno, f"{error.strerror or error} (writing {str(path)!r})") from error


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save
    _write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except SafetensorError as error:  # a truncated or foreign file (a failed read is an OSError, left as it is)
        raise ValueError(f"damaged checkpoint file {str(path)!r} ({' '.join(str(error).split())}); "
                         "delete its step folder to use the one before") from None


def _read_weights(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """A state dict of ``model``'s keys and shapes from ``path``; ValueError (one line) if it is not one."""
    state, expected = _read_safetensors(path), model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"{str(path)!r} does not hold the weights of the U-Net its config.json describes: "
                         f"{len(missing)} missing {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
                         f"{len(reshaped)} of another shape {reshaped[:2]}")
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Adam's per-parameter state as flat tensors: '<param index>.<field>'."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for field, value in state.items():
            tensors[f"{index}.{field}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state = optimizer.state_dict()
    restored: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, field = key.split(".", 1)
        restored.setdefault(int(index), {})[field] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


def save_checkpoint(folder, step: int, config: dict, tensors: dict[str, dict[str, Tensor]], keep: int = 2) -> Path:
    """Write ``folder/step_<step>/`` atomically and keep the ``keep`` newest checkpoints.

    Args:
        config: JSON-serialisable; written as config.json with ``format`` and ``step`` added.
        tensors: file stem -> state dict, e.g. {"ema": ..., "model": ..., "optimizer": ...}.
    Returns:
        The checkpoint folder. A failure at any point leaves no new step folder (only a hidden temporary
        one, removed by the next save) and every earlier checkpoint intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_up_after_crashes(folder)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        for stem, state in tensors.items():
            _write_safetensors(tmp / f"{stem}.safetensors", state)
        _write_bytes(tmp / "config.json",
                     json.dumps({"format": CHECKPOINT_FORMAT, "step": step, **config}, indent=2).encode())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming at it): a directory cannot be replaced
            old = folder / f".old-step_{step:08d}-{os.getpid()}"
            os.replace(final, old)  # so the old one steps aside, and leaves only once the new one is in
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_up_after_crashes(folder: Path) -> None:
    """Remove what a save killed midway left: a half-written ``.tmp-step_*``; a ``.old-step_*`` (a step a
    re-save had moved aside) goes back into place if its new copy never arrived."""
    for stale in folder.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in folder.glob(".old-step_*"):
        home = folder / f"step_{_step_of(aside):08d}"
        if home.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, home)


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoint folders under ``folder``, oldest first. A step that a re-save moved aside and a
    kill kept from coming back counts as that step (the next save puts it back in place)."""
    if not folder.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.is_dir() and (_STEP_DIR.match(p.name) or _ASIDE_DIR.match(p.name)) and (p / "config.json").is_file():
            if _step_of(p) not in by_step or _STEP_DIR.match(p.name):  # the one in place wins
                by_step[_step_of(p)] = p
    return [by_step[step] for step in sorted(by_step)]


def _step_of(checkpoint: Path) -> int:
    return int((_STEP_DIR.match(checkpoint.name) or _ASIDE_DIR.match(checkpoint.name)).group(1))


def latest_checkpoint(path) -> Path | None:
    """The newest complete checkpoint under ``path`` (a run folder or its checkpoints/ folder), or None."""
    path = Path(path)
    dirs = _checkpoint_dirs(path / "checkpoints") or _checkpoint_dirs(path)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from itself, a run folder or a checkpoints/ folder; FileNotFoundError otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / "config.json").is_file() and (path / "ema.safetensors").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint and holds no complete checkpoint "
                                "(checkpoints/step_*/ with config.json)")
    return found


def load_checkpoint(path, needs: tuple[str, ...] = ()) -> tuple[dict, Path]:
    """(config.json's content, the checkpoint folder); ValueError for a folder that is not ours or whose
    config lacks a key of ``needs``."""
    folder = resolve_checkpoint(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable checkpoint config {str(folder / 'config.json')!r}: {error}") from None
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(folder)!r} is not a ddpm_fast checkpoint (format {found!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    missing = [key for key in needs if key not in config]
    if missing:
        raise ValueError(f"checkpoint config {str(folder / 'config.json')!r} lacks {missing}")
    return config, folder


def _unet_config_of(config: dict, folder: Path) -> UNetConfig:
    """The U-Net a checkpoint's config.json describes; fields this version lacks are named, not a TypeError."""
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(config["unet"]) - known)
    if unknown:
        raise ValueError(f"{str(folder / 'config.json')!r} describes its U-Net with fields this ddpm_fast does not "
                         f"know: {', '.join(unknown)} (written by another version?)")
    return UNetConfig(**config["unet"])


def load_model(path, weights: str = "ema") -> tuple[UNet, NoiseSchedule, dict]:
    """A trained U-Net (eval mode, float32, CPU) with its schedule and config from a checkpoint."""
    if weights not in ("ema", "model"):
        raise ValueError(f"load_model: weights must be 'ema' or 'model', got {weights!r}")
    config, folder = load_checkpoint(path, _MODEL_KEYS)
    model = UNet(_unet_config_of(config, folder))
    model.load_state_dict(_read_weights(folder / f"{weights}.safetensors", model), strict=True)
    return model.eval(), NoiseSchedule(**config["schedule"]), config


# ------------------------------------------------------------------------------------------------ trainer

def dataset_of(config: TrainConfig) -> ImageDataset:
    """The run's data: the digits at 16x16 and CIFAR-10 at 32x32 unless ``image_size``; an image folder at
    ``image_size``, else at the size its preset was made for (so the defaults always fit together)."""
    size = config.image_size
    if size is None and config.data != "digits" and not is_cifar10_dir(config.data):
        size = PRESETS[config.preset].sample_size
    return load_dataset(config.data, size)


def unet_config_for(preset: str, channels: int, size: int) -> UNetConfig:
    """``preset``'s U-Net for ``channels`` x ``size`` x ``size`` images, or a ValueError naming the image size."""
    made_for = PRESETS[preset]
    halvings = len(made_for.channel_mult) - 1
    why = (f"each of its levels below the first halves the images, so their size must be a multiple of "
           f"{2**halvings}" if size % 2**halvings else None)
    if why is None:
        try:
            return dataclasses.replace(made_for, sample_size=size, in_channels=channels, out_channels=channels)
        except ValueError as error:
            why = str(error).removeprefix("UNetConfig: ")
    raise ValueError(f"TrainConfig: {size}x{size} images (image_size) do not fit preset {preset!r}, made for "
                     f"{made_for.sample_size}x{made_for.sample_size}: {why}")


def _autocast(amp: str, device: torch.device):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _HostCopy:
    """A small device tensor's values on their way to the host, copied without waiting. ``values()`` waits for that
    copy only: ``.tolist()`` on the device tensor would wait for all the work queued after it too."""

    def __init__(self, tensor: Tensor):
        self.host, self.copied = tensor, None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(tensor.device))

    def done(self) -> bool:
        """Whether the copy has finished (never waits)."""
        return self.copied is None or self.copied.query()

    def values(self) -> list:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def _holds_data(device: torch.device, data: Tensor) -> bool:
    """Whether the Trainer keeps ``data`` on ``device``: always on the CPU, and data already on a GPU; host data on
    a GPU when it takes at most a quarter of the memory free there (the rest is the model's, its activations'
    and the optimizer's)."""
    if device.type != "cuda" or data.device.type != "cpu":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return data.nbytes <= free // 4


def _gathered_to(data: Tensor, indices: Tensor, device: torch.device) -> Tensor:
    """``data[indices]`` (host tensors) on ``device``. On the way to a GPU, gathered straight into pinned memory
    and copied without waiting (gathering first and pinning after would copy the batch twice on the host)."""
    if device.type != "cuda":
        return data[indices].to(device)
    batch = torch.empty((indices.numel(), *data.shape[1:]), dtype=data.dtype, pin_memory=True)
    return torch.index_select(data, 0, indices, out=batch).to(device, non_blocking=True)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Inside, the global generators of the CPU and of ``device`` start from ``seed``; after, they are as they
    were (the caller's random stream does not depend on whether it trained in between)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class Trainer:
    """Trains a U-Net on a dataset; ``train()`` runs to ``config.steps`` (or ``steps``), resumable.

    Args:
        config: the run.
        out_dir: where checkpoints/, samples/ and log.jsonl go; None: nothing is written.
        dataset: the data (else ``config.data`` at ``config.image_size``: see :func:`dataset_of`).
        device: None: the rank's device under torch.distributed, else CUDA when available, else CPU.
        progress: a tqdm bar (rank 0 only).
    """

    def __init__(self, config: TrainConfig, out_dir=None, *, dataset: ImageDataset | None = None,
                 device=None, progress: bool = False):
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.dataset = dataset if dataset is not None else dataset_of(config)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        if config.batch_size % self.world:
            raise ValueError(f"TrainConfig: batch_size={config.batch_size} must be divisible by the "
                             f"{self.world} torch.distributed ranks")
        self.device = torch.device(device) if device is not None else dist_utils.default_device()
        self.progress = progress and self.rank == 0
        C, H, W = self.dataset.shape
        if H != W:
            raise ValueError(f"Trainer: images must be square, got {H}x{W}")
        self.flip = self.dataset.flip if config.flip is None else config.flip
        self.schedule = NoiseSchedule(config.num_train_timesteps, config.beta_schedule)
        self.unet_config = unet_config_for(config.preset, C, H)
        # Same initial weights on every rank: the init draws from a generator seeded by the run's seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, _DROPOUT, -1))
            self.model = UNet(self.unet_config).to(self.device)
        if self.device.type == "cpu":
            # oneDNN's convolutions run NHWC faster: a training step of the demo's tiny U-Net takes 10-20% less
            # time (2 cores, batch 32 to 128, interleaved medians; batch 64: 166 ms instead of 205). On CUDA the
            # layout waits for a GPU record to choose (benchmarks/bench_sampling.py measures both).
            self.model.to(memory_format=torch.channels_last)
        # On CUDA, Adam's fused kernel (PyTorch's fastest form; on the CPU the default, which tests/test_train.py
        # writes out step by step).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=self.device.type == "cuda")
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        self.step = 0
        self.changed_on_resume: dict[str, tuple] = {}  # setting -> (the checkpoint's, this run's), by resume()
        self.stop_requested = False  # set by request_stop(): train() ends after the step it is in, and saves
        # 8-bit data stays uint8 (a quarter of float32's memory). On a GPU it fits when each step gathers its batch
        # there; a dataset too large stays in host memory, and each step copies only its batch.
        self.data_on_device = all(dist_utils.gather(_holds_data(self.device, self.dataset.data)))  # every rank's
        self.images = self.dataset.data.to(self.device) if self.data_on_device else self.dataset.data
        self._forward = dist_utils.wrap_ddp(self.model, self.device)

    # ------------------------------------------------------------------------------------------ one step

    def lr_at(self, step: int) -> float:
        c = self.config
        return c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr

    def train_step(self) -> float:
        """One optimisation step; returns the global batch's loss (averaged over ranks). Reading it waits for the
        step to finish on the device; ``train()`` reads each step's loss a step later, and so never waits."""
        return dist_utils.mean_over_ranks(self._queue_step()).item()

    def _queue_step(self) -> Tensor:
        """One optimisation step, queued on the device without waiting for it; returns this rank's loss there."""
        c = self.config
        draw = draw_step(c.seed, self.step, c.batch_size, len(self.dataset), c.num_train_timesteps)
        per_rank = c.batch_size // self.world
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        # One copy of what the step drew, from pinned memory: a copy per tensor from pageable memory would make
        # the host wait four times for the steps queued before.
        indices, t, flip, seeds = reference._copy_to(
            torch.stack([draw.indices[part], draw.t[part], draw.flip[part].long(), draw.seeds[part]]),
            self.device).unbind()
        if self.data_on_device:
            x0 = to_unit_range(self.images[indices])
        else:
            x0 = to_unit_range(_gathered_to(self.images, draw.indices[part], self.device))
        if self.flip:
            x0 = torch.where(flip.bool()[:, None, None, None], x0.flip(-1), x0)
        x_t, target = q_sample(x0, t, self.schedule, seeds=seeds, target=c.prediction_type)
        self.model.train()
        # Dropout (where the preset has it) draws from the device's global generator: seeded from (seed, step,
        # rank) for the forward, and the caller's generator state put back after it.
        with _seeded_global_rng(derive_seed(c.seed, _DROPOUT, self.step, self.rank), self.device), \
                _autocast(c.amp, self.device):
            prediction = self._forward(x_t, t)
        # The CPU copy of t: the loss's weights index the schedule on the host (no device-to-host read).
        loss = reference.l_simple_loss(prediction.float(), target, draw.t[part], self.schedule, c.prediction_type,
                                       c.min_snr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.detach()

    # ------------------------------------------------------------------------------------------- the loop

    def request_stop(self) -> None:
        """End ``train()`` after the step it is in, with a checkpoint of that step (safe from a signal handler:
        it only sets a flag, which the loop reads between steps, so no step is cut in half). Under
        torch.distributed every rank ends after the step after it, together."""
        self.stop_requested = True

    def train(self, steps: int | None = None, time_limit: float | None = None) -> list[float]:
        """Train until ``steps`` (default ``config.steps``), ``time_limit`` seconds or ``request_stop()``;
        returns the losses.

        Checkpoints every ``checkpoint_every`` steps and at the end; grids every ``sample_every`` steps.
        """
        self.stop_requested = False
        steps = self.config.steps if steps is None else steps
        newest = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        if newest is not None and _step_of(newest) > self.step:
            # keeping the newest checkpoints would delete each of this run's as soon as it is written
            raise ValueError(f"{str(newest.parent)!r} holds a checkpoint of step {_step_of(newest)}, past this "
                             f"run's step {self.step}: resume it (the CLI does, unless --no-resume), or train into "
                             "another folder")
        # Ranks that start at different steps would train different models and stop at different steps (a hang):
        # each resumes from its own view of out_dir, so a node that cannot see rank 0's checkpoints starts afresh.
        steps_of_ranks = dist_utils.gather(self.step)
        if len(set(steps_of_ranks)) > 1:
            starts = ", ".join(f"rank {r}: {step}" for r, step in enumerate(steps_of_ranks))
            raise ValueError(f"the torch.distributed ranks start at different steps ({starts}): each resumed from the "
                             f"checkpoints it sees in {str(self.out_dir)!r}; every rank must see the same folder (a "
                             "filesystem shared by the nodes)")
        self._forget_log_after(self.step)
        losses, start = [], time.perf_counter()
        out_of_time = lambda: time_limit is not None and time.perf_counter() - start > time_limit  # noqa: E731
        # A time budget shows seconds (the step count it allows is unknown), else steps.
        bar = (_bar(math.ceil(time_limit), 0, self.progress, "s") if time_limit is not None
               else _bar(steps, self.step, self.progress, "step"))
        # (step, [loss, share of ranks voting to stop], both averaged over ranks) of the steps queued and not yet
        # read. A step's are read once the next step is queued: the device still has work while the host waits.
        unread: list[tuple[int, _HostCopy]] = []

        def read(keep: int) -> bool:
            """Log all but the ``keep`` newest unread steps; whether a rank asked to stop in one of them."""
            stop = False
            while len(unread) > keep:
                step, status = unread.pop(0)
                loss, votes = status.values()
                losses.append(loss)
                bar.set_postfix(step=step, loss=f"{loss:.4f}", refresh=False)
                self._log({"step": step, "loss": loss, "lr": self.lr_at(step - 1)})
                stop = stop or votes > 0
            return stop

        try:
            while self.step < steps:
                loss = self._queue_step()
                if time_limit is None:
                    bar.update(1)
                else:
                    bar.update(min(math.ceil(time_limit), int(time.perf_counter() - start)) - bar.n)
                # One all-reduce carries the loss and the vote to stop (none at all without a process group).
                status = torch.stack([loss, loss.new_full((), out_of_time() or self.stop_requested)])
                unread.append((self.step, _HostCopy(dist_utils.mean_over_ranks(status))))
                saves = self.step % self.config.checkpoint_every == 0
                samples = self.config.sample_every and self.step % self.config.sample_every == 0
                # Every step up to a checkpoint is logged before it (a resume keeps the records up to its step).
                stop_voted = read(keep=0 if saves or samples else 1)
                if saves:
                    self.save()
                if samples:
                    self.sample_grid()
                # Alone, the process stops at once (also for a request during a save); ranks stop together, at the
                # step in which the vote is read.
                if stop_voted or (self.world == 1 and (out_of_time() or self.stop_requested)):
                    break
            read(keep=0)
        except BaseException:
            # The steps that finished before the failure keep their records, those whose copy is done: a wait could
            # hang on a collective that a failed rank never joined (a device error raises instead: the failure
            # itself is what propagates).
            with contextlib.suppress(Exception):
                while unread and unread[0][1].done():
                    read(keep=len(unread) - 1)
            raise
        finally:
            bar.close()
        if self.out_dir is not None and losses and self.step % self.config.checkpoint_every:
            self.save()
        return losses

    def _log(self, record: dict) -> None:
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------------------- state I/O

    def checkpoint_config(self) -> dict:
        s = self.schedule
        return {"unet": dataclasses.asdict(self.unet_config),
                "schedule": {"num_train_timesteps": s.num_train_timesteps, "beta_schedule": s.beta_schedule,
                             "beta_start": s.beta_start, "beta_end": s.beta_end},
                "prediction_type": self.config.prediction_type, "train": dataclasses.asdict(self.config),
                "dataset": {"name": self.dataset.name, "size": len(self.dataset), "shape": list(self.dataset.shape)},
                "ema_updates": self.ema.updates}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank waits for it)."""
        path = None
        if self.out_dir is not None and self.rank == 0:
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.checkpoint_config(),
                                   {"ema": self.ema.state_dict(self.model), "model": self.model.state_dict(),
                                    "optimizer": _optimizer_tensors(self.optimizer)},
                                   keep=self.config.keep_checkpoints)
        dist_utils.barrier()
        return path

    def resume(self, path=None) -> bool:
        """Load the latest checkpoint of ``path`` (default: out_dir); False when there is none."""
        source = path if path is not None else self.out_dir
        if source is None or (path is None and latest_checkpoint(source) is None):
            return False
        config, folder = load_checkpoint(source, _MODEL_KEYS + ("ema_updates",))
        theirs = dataclasses.asdict(_unet_config_of(config, folder))
        ours = dataclasses.asdict(self.unet_config)
        differs = [f"{k} {theirs[k]} -> {ours[k]}" for k in ours if theirs[k] != ours[k]]
        if differs:  # the U-Net follows the preset and the data (its channels and size): they must be the run's
            raise ValueError(f"cannot resume from {str(folder)!r}: its U-Net differs from this run's "
                             f"({', '.join(differs)}); give the run's --preset, --data and --image-size")
        # What the weights mean: a different schedule or target would train them towards another model.
        ours = self.checkpoint_config()
        differs = [f"{key} {config[key]} -> {ours[key]}" for key in ("schedule", "prediction_type")
                   if config[key] != ours[key]]
        if differs:
            raise ValueError(f"cannot resume from {str(folder)!r}: it was trained with another {'; '.join(differs)}")
        # every file read and checked before any state changes
        model_state, ema_state = (_read_weights(folder / f"{n}.safetensors", self.model) for n in ("model", "ema"))
        optimizer_state = _read_safetensors(folder / "optimizer.safetensors")
        self.model.load_state_dict(model_state, strict=True)
        self.ema.load(self.model, ema_state, config["ema_updates"])
        _load_optimizer(self.optimizer, optimizer_state)
        self.step = int(config["step"])
        trained_with, now = config.get("train", {}), dataclasses.asdict(self.config)
        self.changed_on_resume = {k: (trained_with[k], v) for k, v in now.items()
                                  if k in trained_with and trained_with[k] != v}
        if config.get("dataset", ours["dataset"]) != ours["dataset"]:  # the same path may hold other images now
            self.changed_on_resume["dataset"] = (config["dataset"], ours["dataset"])
        return True

    def _forget_log_after(self, step: int) -> None:
        """Drop log.jsonl's records of the steps after ``step``, which this run takes (again: after a kill past
        its last checkpoint, or a fresh run's), so that each step has one record, and a line a kill cut short;
        the file is replaced atomically."""
        log = None if self.out_dir is None else self.out_dir / "log.jsonl"
        if self.rank != 0 or log is None or not log.is_file():
            return

        def keep(line: str) -> bool:
            try:
                return line.endswith("\n") and json.loads(line)["step"] <= step
            except (ValueError, TypeError, KeyError):
                return False

        lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
        end = len(lines)  # records are appended in step order: only the last ones can be past `step`
        while end and not keep(lines[end - 1]):
            end -= 1
        if end < len(lines):
            write_atomically(log, "".join(lines[:end]).encode())

    # ------------------------------------------------------------------------------------------- samples

    def ema_model(self) -> UNet:
        """A copy of the model holding the EMA weights, in eval mode."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict(self.model))
        return model.eval()

    def sample_grid(self, path=None, num_samples: int | None = None) -> Path | None:
        """DDIM samples of the EMA model (sharded over ranks) as a PNG grid; returns its path on rank 0."""
        n = num_samples or self.config.num_samples
        sampler = Sampler(self.ema_model(), self.schedule, method="ddim", num_steps=self.config.sample_steps,
                          prediction_type=self.config.prediction_type)
        seeds = torch.arange(n, dtype=torch.int64) + derive_seed(self.config.seed, _SAMPLES) % (1 << 40)
        images = dist_utils.sample_sharded(sampler, seeds, self.dataset.shape, self.device)
        if self.rank != 0:
            return None
        if path is None:
            if self.out_dir is None:
                return None
            path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_sample_grid(images, path)
        return Path(path)


def _bar(total: int, initial: int, enabled: bool, unit: str):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, initial=initial, desc="training", unit=unit, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    n = 0

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass
