"""The DDPM U-Net (Ho et al. 2020), with the improved-DDPM scale/shift option, on our fused GroupNorm op.

Every GroupNorm (+ time embedding) (+ SiLU) goes through :func:`ddpm_fast.group_norm_silu`, so one kernel
reads and writes each activation once where eager PyTorch needs three to five passes:

* ResBlock, first norm:  ``silu(GN(x))``
* ResBlock, second norm: ``silu(GN(h + temb))`` ("add", DDPM) or ``silu(GN(h) * (1 + scale) + shift)``
  ("scale_shift", improved DDPM / diffusers ``resnet_time_scale_shift="scale_shift"``)
* attention norm: ``GN(x)`` (act="none"); output head: ``silu(GN(x))``.

Attention is :func:`torch.nn.functional.scaled_dot_product_attention`.

:meth:`UNet.from_diffusers` loads a diffusers ``UNet2DModel`` (an instance, or a ``save_pretrained``
directory read without importing diffusers) and refuses, with a ValueError naming the field, any
configuration this module cannot reproduce exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .ops import group_norm_silu
from .schedule import _check_int

TIME_EMBEDDINGS = ("add", "scale_shift")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes a U-Net's architecture.

    Level ``i`` of the U-Net has ``base_channels * channel_mult[i]`` channels and works at
    ``sample_size / 2**i``; ``attention_resolutions`` lists the feature-map sizes (for a
    ``sample_size`` input) whose levels get self-attention after every ResBlock, as in Ho et al.
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    layers_per_block: int = 2           # ResBlocks per level on the way down (the way up has one more)
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    time_embedding: str = "add"         # "add" (DDPM) or "scale_shift" (improved DDPM)
    time_embed_dim: int | None = None   # None: 4 * base_channels, as in the paper
    flip_sin_to_cos: bool = False       # the DDPM checkpoints: [sin, cos] order, freq_shift 1
    freq_shift: float = 1.0
    attention_head_dim: int | None = None  # None: one head over all channels (DDPM); else C // it heads
    mid_attention: bool = True
    mid_attention_norm: bool = True     # diffusers drops this norm for scale_shift models (see from_diffusers)
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 0         # 0: pad right/bottom by one then a stride-2 conv (the TF original)
    center_input_sample: bool = False   # x -> 2x - 1 first (inputs in [0, 1])

    def __post_init__(self):
        # Tuples, so that a config built from JSON lists still hashes and compares.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        # Sizes first: a zero or negative one fails later as a ZeroDivisionError, an assert or a torch error.
        for name, least in (("sample_size", 1), ("in_channels", 1), ("out_channels", 1), ("base_channels", 1),
                            ("layers_per_block", 0), ("norm_groups", 1)):
            _check_int(f"UNetConfig: {name}", getattr(self, name), least)
        for i, m in enumerate(self.channel_mult):
            _check_int(f"UNetConfig: channel_mult[{i}]", m, 1)
        if self.time_embed_dim is not None:  # 0 would read as None (4 * base_channels)
            _check_int("UNetConfig: time_embed_dim", self.time_embed_dim, 1)
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1], got {self.dropout}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"UNetConfig: time_embedding must be one of {TIME_EMBEDDINGS}, "
                             f"got {self.time_embedding!r}")
        if not self.channel_mult:
            raise ValueError("UNetConfig: channel_mult must name at least one level")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"UNetConfig: norm_groups={self.norm_groups} must divide every level's "
                                 f"channels, got {self.channels}")
        sizes = [self.sample_size // 2**i for i in range(len(self.channel_mult))]
        stray = [r for r in self.attention_resolutions if r not in sizes]
        if stray:  # a resolution no level works at would silently drop attention
            raise ValueError(f"UNetConfig: attention_resolutions {stray} match no level's size {sizes}")
        for i in self.attention_levels + ((len(self.channels) - 1,) if self.mid_attention else ()):
            if self.attention_head_dim is not None and not 1 <= self.attention_head_dim <= self.channels[i]:
                raise ValueError(f"UNetConfig: attention_head_dim={self.attention_head_dim} must be in [1, the "
                                 f"channels of every attention level], got a level of {self.channels[i]}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each level, top (full resolution) first."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Indices of the levels with attention."""
        return tuple(i for i in range(len(self.channel_mult))
                     if self.sample_size // 2**i in self.attention_resolutions)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels


PRESETS = {
    # google/ddpm-cifar10-32: 35.7M parameters. Dropout 0.1 is the paper's CIFAR10 training setting
    # (inactive in eval mode, so the hub weights give the hub outputs).
    "cifar10": UNetConfig(sample_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), layers_per_block=2,
                          attention_resolutions=(16,), dropout=0.1),
    # google/ddpm-celebahq-256 and google/ddpm-church-256 / bedroom-256 / cat-256: 113.7M parameters.
    "celebahq256": UNetConfig(sample_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                              layers_per_block=2, attention_resolutions=(16,)),
    "lsun256": UNetConfig(sample_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                          layers_per_block=2, attention_resolutions=(16,)),
    # For tests and a CPU demo: 16x16, two levels (24, 48 channels), attention at 8x8, 0.4M parameters.
    "tiny": UNetConfig(sample_size=16, base_channels=24, channel_mult=(1, 2), layers_per_block=1,
                       attention_resolutions=(8,), norm_groups=8, attention_head_dim=16),
}


# ----------------------------------------------------------------------------------------------- layers

def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the timesteps, computed in float32.

    Args:
        t: (B,) timesteps (integer or floating).
        dim: embedding width; an odd width gets a zero last column.
    Returns:
        (B, dim) float32: ``[sin(t f), cos(t f)]`` (``[cos, sin]`` when flip_sin_to_cos) with
        ``f_k = max_period ** (-k / (dim/2 - freq_shift))``.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNormAct(nn.Module):
    """GroupNorm with its affine parameters, optional per-(B, C) time terms and an optional SiLU, fused."""

    def __init__(self, channels: int, groups: int, eps: float, act: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.groups, self.eps, self.act = groups, eps, act

    def forward(self, x: Tensor, bias_in: Tensor | None = None, scale: Tensor | None = None,
                shift: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); bias_in, scale, shift: (B, C) or None -> (B, C, H, W), x's memory format."""
        # The op's kernels take float32/16/bf16 storage; a float64 model (a reference run for tests) takes
        # the op's pure-PyTorch twin, which has the same signature and math.
        fn = reference.group_norm_silu if x.dtype == torch.float64 else group_norm_silu
        return fn(x, self.weight, self.bias, self.groups, self.eps, bias_in=bias_in, scale=scale,
                               shift=shift, act=self.act)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.groups}, eps={self.eps}, act={self.act!r}"


class ResBlock(nn.Module):
    """``(skip(x) + conv2(dropout(norm2(conv1(norm1(x)), temb)))) / output_scale``.

    The time embedding enters the second norm: as ``bias_in`` ("add": DDPM adds it between the convs,
    i.e. right before the norm) or as ``scale``/``shift`` after it ("scale_shift").
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, cfg: UNetConfig, output_scale: float = 1.0):
        super().__init__()
        self.time_embedding = cfg.time_embedding
        self.output_scale = output_scale
        self.norm1 = GroupNormAct(cin, cfg.norm_groups, cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, cout * (2 if cfg.time_embedding == "scale_shift" else 1))
        self.norm2 = GroupNormAct(cout, cfg.norm_groups, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # A 1x1 conv only where the channel count changes (diffusers' conv_shortcut, the paper's NIN).
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, time_terms: tuple[Tensor, ...]) -> Tensor:
        """x: (B, cin, H, W); time_terms: this block's (B, cout) terms from :func:`resblock_time_terms`, i.e.
        (bias_in,) for "add" (the time projection plus conv1's bias) or (scale, shift) -> (B, cout, H, W)."""
        # conv1's bias is a per-channel constant before norm2: it joins norm2's per-(B, C) input term, read
        # by the norm kernel, instead of costing its own pass over h (PyTorch adds a cuDNN conv's bias in a
        # second kernel).
        h = F.conv2d(self.norm1(x), self.conv1.weight, None, padding=1)
        if self.time_embedding == "add":
            h = self.norm2(h, bias_in=time_terms[0])
        else:
            bias_in = wide(self.conv1.bias).expand(h.shape[0], -1)  # cast before expanding: hoistable
            h = self.norm2(h, bias_in=bias_in, scale=time_terms[0], shift=time_terms[1])
        h = self.conv2(self.dropout(h))
        skip = x if self.skip is None else self.skip(x)
        out = skip + h
        return out if self.output_scale == 1.0 else out / self.output_scale


def time_linear(temb: Tensor, weights: list[Tensor], *bias_lists: list[Tensor]) -> Tensor:
    """``temb @ cat(weights).T + cat(biases) + ...`` (one list of biases per bias term) in float32 (float64
    for a float64 model), outside autocast: several Linear layers on the same input as one GEMM.

    The time path's GEMMs have B rows, so their precision costs nothing, and group_norm_silu takes its
    per-(B, C) terms in float32: a bf16 result would only be cast back (an extra kernel per ResBlock).
    The parameters are cast whole before they are joined, so that the Sampler can hoist a bf16 model's
    casts out of its loop (weight_casts).
    """
    def join(tensors: list[Tensor]) -> Tensor:
        tensors = [wide(p) for p in tensors]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    with torch.autocast(temb.device.type, enabled=False):
        weight, bias = join(weights), join(bias_lists[0])
        for more in bias_lists[1:]:
            bias = bias + join(more)
        return F.linear(temb.to(weight.dtype), weight, bias)


def resblock_time_terms(blocks: list[ResBlock], temb_act: Tensor) -> list[tuple[Tensor, ...]]:
    """Each ResBlock's per-(B, C) time terms ((bias_in,) or (scale, shift)) from one GEMM over all blocks.

    One projection per block would cost each block its own GEMM (at batch 1 also a copy of the bias into
    the output) and, for "add", a bias sum: ~3 small kernels per block and step where the batch-1 sampling
    step is bound by kernel count. The columns come back as views (``split``, whose backward is one cat):
    contiguous at batch 1, as the norm kernel reads them; at larger batches the op copies each view (one
    small copy where a GEMM was).
    """
    add = blocks[0].time_embedding == "add"
    weights = [b.time_proj.weight for b in blocks]
    biases = [[b.time_proj.bias for b in blocks]] + ([[b.conv1.bias for b in blocks]] if add else [])
    terms = time_linear(temb_act, weights, *biases).split([b.time_proj.out_features for b in blocks], dim=1)
    return [(term,) if add else term.chunk(2, dim=1) for term in terms]


def wide(p: Tensor) -> Tensor:
    """``p`` in float32, or as it is when it is float32 or float64 already."""
    return p if p.dtype in (torch.float32, torch.float64) else p.float()


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, with a residual: ``(x + out(attn(norm(x)))) / output_scale``.

    ``C // attention_head_dim`` heads of ``attention_head_dim``: as in diffusers, a head size that does not
    divide C makes the attention narrower than C (q, k, v project to ``heads * head_dim``)."""

    def __init__(self, channels: int, cfg: UNetConfig, norm: bool = True, output_scale: float = 1.0):
        super().__init__()
        head_dim = cfg.attention_head_dim or channels
        self.heads = channels // head_dim
        inner = self.heads * head_dim
        self.output_scale = output_scale
        self.norm = GroupNormAct(channels, cfg.norm_groups, cfg.norm_eps, act="none") if norm else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x) if self.norm is not None else x
        # (B, C, H, W) -> (B·HW, C) rows: a free view for channels_last activations, one copy for NCHW. As
        # 2-d rows each projection is one GEMM with its bias fused; a strided 3-d view would be copied by
        # every projection and get its bias in a separate kernel.
        tokens = h.permute(0, 2, 3, 1).reshape(B * H * W, C)

        def heads(p: Tensor) -> Tensor:  # (B·HW, inner) -> (B, heads, HW, head_dim)
            return p.view(B, H * W, self.heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.to_q(tokens)), heads(self.to_k(tokens)),
                                           heads(self.to_v(tokens)))
        o = self.to_out(o.transpose(1, 2).reshape(B * H * W, -1))
        # Back to (B, C, H, W) with channels_last strides; the residual add follows x's format.
        out = x + o.view(B, H, W, C).permute(0, 3, 1, 2)
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)) for even H, W."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            # TF "SAME" for stride 2 on even sizes pads only right and bottom (the original DDPM code).
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks, each followed by attention where enabled."""

    def __init__(self, res: list[ResBlock], attn: list[AttentionBlock], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample


class MidBlock(nn.Module):
    """ResBlock, attention (optional), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.res1 = ResBlock(channels, channels, cfg.temb_dim, cfg, output_scale=s)
        self.attn = (AttentionBlock(channels, cfg, norm=cfg.mid_attention_norm, output_scale=s)
                     if cfg.mid_attention else None)
        self.res2 = ResBlock(channels, channels, cfg.temb_dim, cfg, output_scale=s)

    def forward(self, x: Tensor, terms1: tuple[Tensor, ...], terms2: tuple[Tensor, ...]) -> Tensor:
        x = self.res1(x, terms1)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x, terms2)


class TimeEmbedding(nn.Module):
    """sinusoidal(t) -> Linear -> SiLU -> Linear: (B,) -> (B, temb_dim)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.base_channels, cfg.temb_dim)
        self.fc2 = nn.Linear(cfg.temb_dim, cfg.temb_dim)

    def forward(self, t: Tensor) -> Tensor:
        """In float32 (float64 for a float64 model), outside autocast, as every time-path GEMM (see time_linear)."""
        emb = timestep_embedding(t, self.cfg.base_channels, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        h = F.silu(time_linear(emb, [self.fc1.weight], [self.fc1.bias]))
        return time_linear(h, [self.fc2.weight], [self.fc2.bias])


# ------------------------------------------------------------------------------------------------ U-Net

class UNet(nn.Module):
    """The DDPM U-Net: ``forward(x, t)`` maps (B, in_channels, H, W) and timesteps to (B, out_channels, H, W).

    H and W must be divisible by ``2**(levels - 1)``. Works in NCHW and channels_last (the output follows
    the input's format through the convs) and under ``torch.compile``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, temb = cfg.channels, cfg.temb_dim
        n, attn_levels = len(ch), set(cfg.attention_levels)

        self.time_embed = TimeEmbedding(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        # Down path; `skips` records the channels of every tensor the up path will concatenate.
        skips, cin = [ch[0]], ch[0]
        self.down = nn.ModuleList()
        for i, cout in enumerate(ch):
            res, attn = [], []
            for _ in range(cfg.layers_per_block):
                res.append(ResBlock(cin, cout, temb, cfg))
                if i in attn_levels:
                    attn.append(AttentionBlock(cout, cfg))
                skips.append(cout)
                cin = cout
            down = Downsample(cout, cfg.downsample_padding) if i < n - 1 else None
            if down is not None:
                skips.append(cout)
            self.down.append(Level(res, attn, down))

        self.mid = MidBlock(cin, cfg)

        # Up path: one more ResBlock per level than on the way down, each eating one skip.
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            cout, res, attn = ch[i], [], []
            for _ in range(cfg.layers_per_block + 1):
                res.append(ResBlock(cin + skips.pop(), cout, temb, cfg))
                if i in attn_levels:
                    attn.append(AttentionBlock(cout, cfg))
                cin = cout
            self.up.append(Level(res, attn, Upsample(cout) if i > 0 else None))
        assert not skips, "every skip connection is consumed"

        self.norm_out = GroupNormAct(ch[0], cfg.norm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "UNet":
        """``UNet.preset("cifar10")``; also "celebahq256", "lsun256", "tiny". Overrides replace config fields."""
        if name not in PRESETS:
            raise ValueError(f"UNet.preset: unknown preset {name!r}; presets: {tuple(PRESETS)}")
        return cls(dataclasses.replace(PRESETS[name], **overrides))

    @classmethod
    def from_diffusers(cls, source, *, variant: str | None = None) -> "UNet":
        """Load a diffusers ``UNet2DModel``: an instance, or a directory written by ``save_pretrained`` (the
        model's, or a pipeline's holding it in unet/).

        The directory path reads config.json and diffusion_pytorch_model.safetensors (or .bin; with
        ``variant="fp16"``, diffusion_pytorch_model.fp16.safetensors, ...) without importing diffusers.
        Parameters come back in float32, the model in eval mode. Raises ValueError naming the field for any
        configuration this U-Net cannot reproduce.
        """
        if isinstance(source, (str, os.PathLike)):
            folder = diffusers_unet_folder(source)
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:  # JSON: UTF-8, not the locale's
                model = cls(config_from_diffusers(json.load(f)))  # refuse before reading any weights
            state = read_diffusers_weights(folder, variant)
        elif variant is not None:
            raise ValueError("UNet.from_diffusers: variant names a directory's weight files; "
                             f"got it with a {type(source).__name__}")
        elif hasattr(source, "config") and hasattr(source, "state_dict"):
            # The class name joins the config so that, say, a UNet2DConditionModel is refused by name.
            model = cls(config_from_diffusers({**dict(source.config), "_class_name": type(source).__name__}))
            state = source.state_dict()
        else:
            raise TypeError(f"UNet.from_diffusers: expected a UNet2DModel or a directory, got {type(source).__name__}")
        model.load_state_dict(state_dict_from_diffusers(state, model), strict=True)
        return model.eval()

    def resblocks(self) -> list[ResBlock]:
        """The ResBlocks in the order forward runs them (looked up each call, not cached, so that copies and
        DataParallel replicas use their own)."""
        return ([res for level in self.down for res in level.res] + [self.mid.res1, self.mid.res2] +
                [res for level in self.up for res in level.res])

    def forward(self, x: Tensor, t: int | Tensor) -> Tensor:
        """x: (B, in_channels, H, W); t: a number, a 0-d, a (1,) or a (B,) tensor -> (B, out_channels, H, W).

        As diffusers' UNet2DModel: a Python number is taken as an integer step (500.7 is step 500), a tensor
        keeps its dtype (a float tensor embeds fractional times), and one timestep serves the whole batch."""
        multiple = 2 ** (len(self.config.channel_mult) - 1)
        if x.dim() != 4 or x.shape[2] % multiple or x.shape[3] % multiple:  # else a cat on the way up would fail
            raise ValueError(f"UNet: x must be (B, C, H, W) with H and W multiples of {multiple} (each level below "
                             f"the first halves them), got {tuple(x.shape)}")
        B = x.shape[0]
        if isinstance(t, Tensor):
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, B)):
                raise ValueError(f"UNet: t must be a number, a 0-d, a (1,) or a ({B},) tensor, "
                                 f"got shape {tuple(t.shape)}")
            t = t.to(x.device).expand(B)
        else:
            t = torch.full((B,), t, dtype=torch.long, device=x.device)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        # Every ResBlock applies SiLU to the embedding before its projection: once here, and all the
        # projections in one GEMM; the blocks take their terms in the order they run.
        terms = iter(resblock_time_terms(self.resblocks(), F.silu(self.time_embed(t))))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(h, next(terms))
                if len(level.attn):
                    h = level.attn[j](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid(h, next(terms), next(terms))

        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(torch.cat([h, skips.pop()], dim=1), next(terms))
                if len(level.attn):
                    h = level.attn[j](h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(self.norm_out(h))


# --------------------------------------------------------------------------------- diffusers interop

# UNet2DModel.__init__'s defaults (diffusers 0.42), for fields a saved config.json leaves out.
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}


def _refuse(field: str, value, why: str):
    raise ValueError(f"UNet.from_diffusers: unsupported {field}={value!r}: {why}")


def config_from_diffusers(config: dict) -> UNetConfig:
    """A diffusers UNet2DModel config (dict) -> UNetConfig; ValueError naming any field we cannot represent."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        _refuse("_class_name", name, "only UNet2DModel is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        _refuse(unknown[0], config[unknown[0]], "a field this loader does not know")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["act_fn"] == "swish":  # diffusers' get_activation makes the same SiLU of either name
        c["act_fn"] = "silu"

    fixed = {"time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D", "downsample_type": "conv",
             "upsample_type": "conv", "act_fn": "silu", "class_embed_type": None, "num_class_embeds": None}
    for field, supported in fixed.items():
        if c[field] != supported:
            _refuse(field, c[field], f"only {supported!r} is supported")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        _refuse("resnet_time_scale_shift", c["resnet_time_scale_shift"], "only 'default' and 'scale_shift'")
    if c["norm_num_groups"] is None or c["norm_num_groups"] < 1:
        _refuse("norm_num_groups", c["norm_num_groups"], "an explicit group count of at least 1 is required")

    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _refuse("sample_size", size, "only square samples")
        size = size[0]
    if not isinstance(size, int):
        _refuse("sample_size", size, "an int is needed to place the attention levels")

    chans = tuple(c["block_out_channels"])
    if not chans or min(chans) < 1:  # else an IndexError or a ZeroDivisionError below
        _refuse("block_out_channels", chans, "one positive channel count per level is needed")
    if size < 2 ** (len(chans) - 1):  # two levels of one size: attention (placed by size) could not tell them apart
        _refuse("sample_size", size, f"at least {2 ** (len(chans) - 1)} is needed to tell the {len(chans)} levels "
                                     "apart")
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    if len(down) != len(chans):
        _refuse("down_block_types", down, f"needs one entry per block_out_channels {chans}")
    if len(up) != len(chans):
        _refuse("up_block_types", up, f"needs one entry per block_out_channels {chans}")
    if any(ci % chans[0] for ci in chans):
        _refuse("block_out_channels", chans, "every level must be a multiple of the first")
    for field, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        bad = [b for b in types if b not in kinds]
        if bad:
            _refuse(field, types, f"{bad[0]} is not one of {kinds}")
    attn_down = [b == "AttnDownBlock2D" for b in down]
    attn_up = [b == "AttnUpBlock2D" for b in reversed(up)]
    if attn_down != attn_up:
        _refuse("up_block_types", up, f"attention must mirror down_block_types {down}")

    # The mid attention has a GroupNorm of attn_norm_num_groups, which diffusers leaves out (None) for
    # scale_shift models unless it is given; a different group count than the ResBlocks' we do not model.
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is not None and attn_groups != c["norm_num_groups"]:
        _refuse("attn_norm_num_groups", attn_groups, f"only None or norm_num_groups ({c['norm_num_groups']})")
    mid_norm = attn_groups is not None or c["resnet_time_scale_shift"] == "default"

    try:
        return UNetConfig(
            sample_size=size, in_channels=c["in_channels"], out_channels=c["out_channels"], base_channels=chans[0],
            channel_mult=tuple(ci // chans[0] for ci in chans), layers_per_block=c["layers_per_block"],
            attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn_down) if a),
            dropout=float(c["dropout"]), norm_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
            time_embedding="add" if c["resnet_time_scale_shift"] == "default" else "scale_shift",
            time_embed_dim=c["time_embedding_dim"], flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=c["freq_shift"], attention_head_dim=c["attention_head_dim"],
            mid_attention=bool(c["add_attention"]), mid_attention_norm=mid_norm,
            mid_block_scale_factor=float(c["mid_block_scale_factor"]), downsample_padding=c["downsample_padding"],
            center_input_sample=bool(c["center_input_sample"]))
    except ValueError as e:  # e.g. attention_head_dim wider than an attention level
        raise ValueError(f"UNet.from_diffusers: unsupported configuration: {e}") from e


def diffusers_config(config: UNetConfig) -> dict:
    """The diffusers ``UNet2DModel(**kwargs)`` of the same architecture: the inverse of
    :func:`config_from_diffusers` (``UNet.from_diffusers(UNet2DModel(**diffusers_config(cfg)))`` has ``cfg``).

    Raises ValueError for the one form diffusers cannot build: a DDPM ("add") mid attention without its norm.
    """
    if not config.mid_attention_norm and config.time_embedding == "add":
        raise ValueError("diffusers_config: mid_attention_norm=False exists in diffusers only with "
                         "time_embedding='scale_shift'")
    attention = [i in config.attention_levels for i in range(len(config.channel_mult))]
    scale_shift = config.time_embedding == "scale_shift"
    return dict(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        center_input_sample=config.center_input_sample, time_embedding_type="positional",
        time_embedding_dim=config.time_embed_dim, freq_shift=config.freq_shift,
        flip_sin_to_cos=config.flip_sin_to_cos,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=config.channels, layers_per_block=config.layers_per_block,
        mid_block_scale_factor=config.mid_block_scale_factor, downsample_padding=config.downsample_padding,
        dropout=config.dropout, attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_groups,
        attn_norm_num_groups=config.norm_groups if scale_shift and config.mid_attention_norm else None,
        norm_eps=config.norm_eps, resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=config.mid_attention)


def diffusers_unet_folder(path) -> str:
    """The folder holding a UNet2DModel's config.json: ``path`` itself, or a pipeline folder's unet/."""
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return os.fspath(folder)
    raise FileNotFoundError(f"UNet.from_diffusers: {os.fspath(path)!r} has neither config.json nor unet/config.json "
                            "(expected a folder written by UNet2DModel.save_pretrained, or a pipeline's)")


def read_diffusers_weights(path, variant: str | None = None) -> dict[str, Tensor]:
    """The state dict of a ``save_pretrained`` directory (safetensors preferred, else .bin), without diffusers."""
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant):
        raise ValueError(f"UNet.from_diffusers: variant must be a name such as 'fp16', got {variant!r}")
    stem = os.path.join(path, "diffusion_pytorch_model" + (f".{variant}" if variant else ""))
    for file in (stem + ".safetensors", stem + ".bin"):
        if not os.path.exists(file):
            continue
        try:
            if file.endswith(".bin"):  # weights_only: a .bin is a pickle, and loading one must not run code
                return torch.load(file, map_location="cpu", weights_only=True)
            from safetensors.torch import load_file
            return load_file(file)
        except Exception as error:  # truncated, foreign, or a pickle that would run code: one line naming it
            raise ValueError(f"UNet.from_diffusers: cannot read {file!r} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]})") from None
    there = sorted(f for f in os.listdir(path) if f.startswith("diffusion_pytorch_model."))
    raise FileNotFoundError(f"UNet.from_diffusers: {os.fspath(path)!r} has no {os.path.basename(stem)}.safetensors "
                            f"or .bin; it holds {there or 'no weights'} (a variant such as "
                            "diffusion_pytorch_model.fp16.safetensors loads with variant='fp16'; sharded weights "
                            "are not read)")


# Our submodule -> diffusers' submodule, for the leaf modules of each block. Attention layers have a
# second, pre-0.15 spelling (AttentionBlock: query/key/value/proj_attn) that old hub checkpoints still use.
_RES_NAMES = {"norm1": ("norm1",), "conv1": ("conv1",), "time_proj": ("time_emb_proj",), "norm2": ("norm2",),
              "conv2": ("conv2",), "skip": ("conv_shortcut",)}
_ATTN_NAMES = {"norm": ("group_norm",), "to_q": ("to_q", "query"), "to_k": ("to_k", "key"),
               "to_v": ("to_v", "value"), "to_out": ("to_out.0", "proj_attn")}


def _module_pairs(model: UNet) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(our module prefix, diffusers' candidate prefixes) for every block of ``model``."""
    yield "time_embed.fc1", ("time_embedding.linear_1",)
    yield "time_embed.fc2", ("time_embedding.linear_2",)
    yield "conv_in", ("conv_in",)
    for ours_path, theirs_path in (("down", "down_blocks"), ("up", "up_blocks")):
        sampler = "downsamplers.0.conv" if ours_path == "down" else "upsamplers.0.conv"
        for i, level in enumerate(getattr(model, ours_path)):
            for j in range(len(level.res)):
                yield from _leaf_pairs(f"{ours_path}.{i}.res.{j}", f"{theirs_path}.{i}.resnets.{j}", _RES_NAMES)
            for j in range(len(level.attn)):
                yield from _leaf_pairs(f"{ours_path}.{i}.attn.{j}", f"{theirs_path}.{i}.attentions.{j}", _ATTN_NAMES)
            if level.resample is not None:
                yield f"{ours_path}.{i}.resample.conv", (f"{theirs_path}.{i}.{sampler}",)
    yield from _leaf_pairs("mid.res1", "mid_block.resnets.0", _RES_NAMES)
    yield from _leaf_pairs("mid.attn", "mid_block.attentions.0", _ATTN_NAMES)
    yield from _leaf_pairs("mid.res2", "mid_block.resnets.1", _RES_NAMES)
    yield "norm_out", ("conv_norm_out",)
    yield "conv_out", ("conv_out",)


def _leaf_pairs(ours: str, theirs: str, names: dict) -> Iterator[tuple[str, tuple[str, ...]]]:
    for our_leaf, their_leaves in names.items():
        yield f"{ours}.{our_leaf}", tuple(f"{theirs}.{leaf}" for leaf in their_leaves)


def state_dict_from_diffusers(state: dict[str, Tensor], model: UNet) -> dict[str, Tensor]:
    """diffusers' state dict -> ``model``'s names. Every one of ``model``'s tensors must be filled and every
    diffusers tensor consumed, or ValueError lists what is left."""
    prefixes = dict(_module_pairs(model))
    out, used = {}, set()
    for name in model.state_dict():
        module, _, leaf = name.rpartition(".")
        for theirs in prefixes.get(module, ()):
            key = f"{theirs}.{leaf}"
            if key in state:
                out[name] = state[key]
                used.add(key)
                break
    missing = [n for n in model.state_dict() if n not in out]
    unused = [k for k in state if k not in used]
    if missing or unused:
        raise ValueError(f"UNet.from_diffusers: weights do not match the configuration: "
                         f"{len(missing)} of ours unfilled {missing[:5]}, {len(unused)} of theirs unused {unused[:5]}")
    return out
