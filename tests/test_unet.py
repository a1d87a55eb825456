"""ddpm_fast.unet.UNet: preset sizes, shapes, diffusers UNet2DModel parity, config refusals, gradients, layouts.

Tolerances follow STYLE.md (tests/_tolerance.py): a float32 result passes when its error against a float64
evaluation of the same network is at most twice the error of plain PyTorch in float32, plus one float32
rounding of the output's magnitude. Sizes are small (16x16, tens of channels) so the file runs in seconds.
"""

import json
import os
import re

import pytest
import torch
from _fuzz import run_cases
from _tolerance import FLOOR, assert_matches_reference
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_fast
from ddpm_fast.unet import (PRESETS, AttentionBlock, ResBlock, UNet, UNetConfig, config_from_diffusers,
                            diffusers_config, state_dict_from_diffusers, timestep_embedding)

diffusers = pytest.importorskip("diffusers")
UNet2DModel = diffusers.UNet2DModel


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    """The UNet2DModel arguments of the same architecture as ``cfg`` (written independently of unet.py)."""
    n = len(cfg.channel_mult)
    attn = [cfg.sample_size // 2**i in cfg.attention_resolutions for i in range(n)]
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        resnet_time_scale_shift="default" if cfg.time_embedding == "add" else "scale_shift",
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift, add_attention=cfg.mid_attention,
        downsample_padding=cfg.downsample_padding, dropout=cfg.dropout)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# Small UNet2DModel configurations covering both time-embedding forms, attention on and off, one head and
# several, both downsample paddings, both sinusoid orders, input centering, a mid-block scale factor.
SMALL = {
    "ddpm": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
    "scale_shift": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
                        resnet_time_scale_shift="scale_shift", center_input_sample=True, mid_block_scale_factor=1.4,
                        time_embedding_dim=48),
    "no_attention": dict(sample_size=16, in_channels=1, out_channels=2, block_out_channels=(16, 16, 32),
                         layers_per_block=2, norm_num_groups=4, down_block_types=("DownBlock2D",) * 3,
                         up_block_types=("UpBlock2D",) * 3, add_attention=False),
    # attn_norm_num_groups given: the scale_shift mid attention keeps its GroupNorm.
    "scale_shift_attn_norm": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                                  norm_num_groups=8, attn_norm_num_groups=8, resnet_time_scale_shift="scale_shift",
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16),
    # A head size that divides no level: 1 head of 12 at 16 channels, 2 at 32, attention narrower than C.
    "narrow_heads": dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=12),
}


def perturbed_diffusers(config: dict):
    """A UNet2DModel with every parameter perturbed: GroupNorm weights 1 and biases 0 at init would hide a
    mapping that swaps two norms."""
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_diffusers(name: str, seed: int = 0):
    """A small perturbed UNet2DModel of SMALL[name]."""
    torch.manual_seed(seed)
    return perturbed_diffusers(SMALL[name])


def inputs(cfg_in: int, batch: int = 2, size: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg_in, size, size, generator=g, dtype=dtype)
    t = torch.tensor([7, 951][:batch])
    return x, t


# --------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_diffusers(name):
    # Meta tensors: the 256x256 models (114M parameters) cost nothing to build.
    with torch.device("meta"):
        ours = UNet.preset(name)
        theirs = UNet2DModel(**diffusers_kwargs(ours.config))
    assert n_params(ours) == n_params(theirs)


def test_cifar10_preset_is_ddpm_cifar10_32():
    with torch.device("meta"):
        model = UNet.preset("cifar10")
    assert n_params(model) == 35_746_307
    assert 100_000 < sum(p.numel() for p in UNet.preset("tiny").parameters()) < 1_000_000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_diffusers_config_round_trip(name):
    cfg = PRESETS[name]
    back = config_from_diffusers(diffusers_kwargs(cfg))
    assert back == cfg


@pytest.mark.parametrize("name", sorted(PRESETS) + sorted(SMALL))
def test_diffusers_config_is_the_inverse(name):
    """diffusers_config(cfg) builds a UNet2DModel whose saved config reads back as cfg (both time-embedding
    forms, with and without the scale_shift mid-attention norm), with our parameter count."""
    cfg = PRESETS[name] if name in PRESETS else config_from_diffusers(SMALL[name])
    with torch.device("meta"):
        theirs = UNet2DModel(**diffusers_config(cfg))
        ours = UNet(cfg)
    assert config_from_diffusers({**dict(theirs.config), "_class_name": "UNet2DModel"}) == cfg
    assert n_params(theirs) == n_params(ours)


def test_diffusers_config_refuses_add_without_mid_attention_norm():
    with pytest.raises(ValueError, match="mid_attention_norm=False exists in diffusers only with"):
        diffusers_config(UNetConfig(mid_attention_norm=False))


# ------------------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("batch, h, w", [(1, 16, 16), (3, 8, 24)])  # batch 1; non-square, smaller than trained
def test_output_shape_and_timestep_forms(batch, h, w):
    torch.manual_seed(0)
    model = UNet.preset("tiny", out_channels=6).eval()  # 6: a learned-variance model's output
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        out = model(x, torch.full((batch,), 10))
        assert out.shape == (batch, 6, h, w)
        # An int, a 0-d tensor and a (B,) tensor of the same timestep are the same computation.
        assert torch.equal(model(x, 10), out)
        assert torch.equal(model(x, torch.tensor(10)), out)
        assert torch.equal(model(x, torch.tensor([10])), out)
        assert torch.equal(model(x, 10.7), out)  # a Python number is an integer step, as in diffusers


def test_config_refuses_attention_resolution_of_no_level():
    with pytest.raises(ValueError, match=r"attention_resolutions \[5\] match no level"):
        UNetConfig(sample_size=16, attention_resolutions=(5,))


def test_bad_timestep_shape_raises():
    model = UNet.preset("tiny")
    with pytest.raises(ValueError, match=r"t must be"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


def test_sizes_the_levels_cannot_halve_are_named():
    model = UNet.preset("cifar10")  # 4 levels: H and W must be multiples of 8
    for shape in ((1, 3, 36, 32), (1, 3, 32, 12), (3, 32, 32), ()):
        with pytest.raises(ValueError, match=rf"x must be \(B, C, H, W\) with H and W multiples of 8 .*"
                                             rf"got {re.escape(str(shape))}"):
            model(torch.randn(shape), 5)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 500, 999])
    for dim, flip, shift in ((32, False, 1), (33, True, 0)):  # 33: an odd width gets a zero column
        ours = timestep_embedding(t, dim, flip, shift)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- diffusers

def check_against_diffusers(ours: UNet, theirs, cfg: dict):
    """Ours in float32 vs diffusers in float32, both judged against diffusers in float64."""
    x, t = inputs(cfg.get("in_channels", 3))
    with torch.no_grad():
        got = ours(x, t)
        ref32 = theirs(x, t).sample
        ref64 = theirs.double()(x.double(), t).sample
    theirs.float()
    assert_matches_reference(got, ref32, ref64, what="UNet vs UNet2DModel")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_from_diffusers_instance_matches_forward(name):
    theirs = random_diffusers(name)
    ours = UNet.from_diffusers(theirs)
    assert not ours.training
    check_against_diffusers(ours, theirs, SMALL[name])


@pytest.mark.parametrize("name, safe", [("ddpm", True), ("scale_shift", False)])
def test_from_diffusers_directory_matches_forward(name, safe, tmp_path):
    theirs = random_diffusers(name)
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    weights = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    assert (tmp_path / weights).exists()
    ours = UNet.from_diffusers(tmp_path)
    check_against_diffusers(ours, theirs, SMALL[name])
    assert UNet.from_diffusers(str(tmp_path)).config == ours.config


def test_from_diffusers_pipeline_folder_and_variant(tmp_path):
    """A pipeline's folder (the model in unet/), weights saved as a variant; what is missing is named."""
    theirs = random_diffusers("ddpm")
    theirs.save_pretrained(tmp_path / "unet", variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"has no diffusion_pytorch_model\.safetensors or \.bin; it holds "
                                                r"\['diffusion_pytorch_model\.fp16\.safetensors'\].*variant='fp16'"):
        UNet.from_diffusers(tmp_path)
    check_against_diffusers(UNet.from_diffusers(tmp_path, variant="fp16"), theirs, SMALL["ddpm"])
    with pytest.raises(FileNotFoundError, match=r"has neither config\.json nor unet/config\.json"):
        UNet.from_diffusers(tmp_path / "unet" / "missing")
    with pytest.raises(ValueError, match="variant names a directory's weight files; got it with a UNet2DModel"):
        UNet.from_diffusers(theirs, variant="fp16")
    # Damaged weights: one line naming the file (a truncated file, a pickle that would run code).
    weights = tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read .*diffusion_pytorch_model\.fp16\.safetensors' \("):
        UNet.from_diffusers(tmp_path, variant="fp16")
    weights.unlink()

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"w": Exploit()}, tmp_path / "unet" / "diffusion_pytorch_model.fp16.bin")
    with pytest.raises(ValueError, match=r"cannot read .*diffusion_pytorch_model\.fp16\.bin' \(UnpicklingError"):
        UNet.from_diffusers(tmp_path, variant="fp16")


def test_timestep_forms_as_diffusers():
    """Every timestep form diffusers' UNet2DModel takes gives its output: numbers (a float is truncated to its
    step), 0-d and (1,) tensors broadcast over the batch, a float tensor of fractional times."""
    theirs = random_diffusers("ddpm")
    ours = UNet.from_diffusers(theirs)
    x, _ = inputs(SMALL["ddpm"].get("in_channels", 3), batch=3)
    frac = torch.rand((), dtype=torch.float64).item() * 999
    for t in (int(frac), frac, torch.tensor(int(frac)), torch.tensor([int(frac)]), torch.rand(3) * 999):
        with torch.no_grad():
            ref32, ref64 = theirs(x, t).sample, theirs.double()(x.double(), t).sample
            theirs.float()
            assert_matches_reference(ours(x, t), ref32, ref64, what=f"UNet vs UNet2DModel at t={t}")


def test_every_weight_consumed_and_every_parameter_filled():
    theirs = random_diffusers("ddpm")
    ours = UNet.from_diffusers(theirs)
    state = theirs.state_dict()
    mapped = state_dict_from_diffusers(state, ours)
    assert sorted(mapped) == sorted(ours.state_dict())
    # Each diffusers tensor is used once: the mapped tensors are exactly theirs, none twice.
    assert sorted(id(v) for v in mapped.values()) == sorted(id(v) for v in state.values())
    with pytest.raises(ValueError, match=r"1 of theirs unused \['extra.weight'\]"):
        state_dict_from_diffusers({**state, "extra.weight": torch.zeros(1)}, ours)
    dropped = dict(state)
    del dropped["mid_block.attentions.0.to_q.bias"]
    with pytest.raises(ValueError, match=r"1 of ours unfilled \['mid.attn.to_q.bias'\]"):
        state_dict_from_diffusers(dropped, ours)


def test_pre_0_15_attention_names_load():
    # Old hub checkpoints (google/ddpm-*) spell the attention layers query/key/value/proj_attn.
    theirs = random_diffusers("ddpm")
    ours = UNet.from_diffusers(theirs)
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn."): v for k, v in theirs.state_dict().items()}
    assert old.keys() != theirs.state_dict().keys()
    mapped = state_dict_from_diffusers(old, ours)
    for k, v in ours.state_dict().items():
        assert torch.equal(mapped[k], v), k


@pytest.mark.parametrize("field, value", [
    ("resnet_time_scale_shift", "spatial"), ("act_fn", "gelu"), ("time_embedding_type", "fourier"),
    ("down_block_types", ("DownBlock2D", "SkipDownBlock2D")), ("class_embed_type", "timestep"),
    ("upsample_type", "resnet"), ("attention_head_dim", 48), ("attn_norm_num_groups", 4),
    ("sample_size", (16, 32)), ("sample_size", 1), ("mid_block_type", None), ("block_out_channels", (16, 24)),
    ("up_block_types", ("UpBlock2D", "UpBlock2D")),  # attention that does not mirror the down path
    ("some_future_field", 1),
])
def test_unsupported_config_field_raises_naming_it(field, value):
    config = {**SMALL["ddpm"], "_class_name": "UNet2DModel", field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        config_from_diffusers(config)


def test_unsupported_directory_refused_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL["ddpm"], "act_fn": "mish"}))
    with pytest.raises(ValueError, match="act_fn='mish'"):
        UNet.from_diffusers(tmp_path)


# ----------------------------------------------------------------------------------- gradients, layouts

def perturbed(model: UNet, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def param_grads(model, x, t, w, backend):
    model.zero_grad()
    with ddpm_fast.use_backend(backend):
        (model(x, t) * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("time_embedding", ["add", "scale_shift"])
@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_gradients_of_the_kernel_backends_match_torch_backend(kernels, time_embedding, backend_on_cpu):
    """The whole tiny U-Net's parameter gradients through the C++ CPU kernels, and through the CUDA kernels
    (on the CPU, the emulator runs them where there is no GPU)."""
    backend_on_cpu(kernels)
    model = perturbed(UNet.preset("tiny", time_embedding=time_embedding))
    x, t = inputs(3)
    w = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = param_grads(model, x, t, w, kernels)
    torch32 = param_grads(model, x, t, w, "torch")
    # float64 truth: the same weights; GroupNormAct sends float64 to the reference op.
    truth = param_grads(model.double(), x.double(), t, w.double(), "torch")
    assert ours.keys() == truth.keys()
    # Each gradient against PyTorch's error on the worst-off gradient of the network, relative to size.
    # PyTorch's error on the same gradient would be a bound that compares two noisy maxima ~100 times:
    # their ratio reached 1.8-3.0 across 12 seeds (the error norms over all gradients: 0.95-1.06), so a
    # per-parameter bound of 2x passed by the luck of its seed. This one measured 0.75-1.5 over 32 runs.
    def relative_error(grads, name):
        return (grads[name].double() - truth[name]).abs().max().item() / max(1.0, truth[name].abs().max().item())

    worst_torch = max(relative_error(torch32, name) for name in truth)
    for name in ours:
        bound = 2 * worst_torch + FLOOR[torch.float32]
        assert relative_error(ours, name) <= bound, (f"grad of {name}: relative error {relative_error(ours, name):.3g}"
                                                     f" > {bound:.3g} (2 x PyTorch's worst + the float32 floor)")


def test_channels_last_matches_contiguous():
    model = perturbed(UNet.preset("tiny")).eval()
    x, t = inputs(3)
    with torch.no_grad():
        ref = model(x, t)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        truth = model.double()(x.double(), t)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(got, ref, truth, what="channels_last output")


@pytest.mark.parametrize("time_embedding", ["add", "scale_shift"])
def test_every_resblock_time_projection_in_one_gemm(time_embedding):
    """The time path is three GEMMs (the embedding's two, one for every ResBlock's projection), whatever
    the number of ResBlocks, and each block gets its own terms: resblocks() lists them in the order forward
    runs them (the joint projection's columns are handed out in that order)."""
    model = perturbed(UNet.preset("tiny", time_embedding=time_embedding)).eval()
    called = []
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.register_forward_pre_hook(lambda module, args: called.append(module))

    class CountGemms(TorchDispatchMode):
        gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountGemms.gemms += func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
            return func(*args, **(kwargs or {}))

    x, t = inputs(3)
    with torch.no_grad(), CountGemms():
        model(x, t)
    attention = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert CountGemms.gemms == 3 + 4 * attention  # + q, k, v, out per attention block
    assert called == model.resblocks() and len(called) == len(set(called)) == 8  # 2 down, 2 mid, 4 up


@pytest.mark.parametrize("time_embedding", ["add", "scale_shift"])
def test_torch_compile_fullgraph_under_bf16_autocast(time_embedding):
    """One graph (no break: the time path's autocast-free region, the fused ops) for forward and backward
    under bf16 autocast; aot_eager runs the traced ops, so it agrees with eager to bf16 rounding. (aot_eager:
    Inductor's CPU code generation would cost minutes here; the graph capture is what is under test.)"""
    model = perturbed(UNet.preset("tiny", time_embedding=time_embedding))
    x, t = inputs(3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for run in (compiled, model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(x, t)
        out.float().square().mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1])
    # The gradients pass through bf16 activations, and AOT autograd may order a backward's sums otherwise:
    # one bf16 rounding at the gradients' scale (measured: 3e-4 and 1.3e-3 of it).
    assert (grads[0] - grads[1]).abs().max() <= FLOOR[torch.bfloat16] * grads[1].abs().max()


# Fields of UNet2DModel this U-Net does not model, with a value of each that diffusers builds.
_UNSUPPORTED = {"act_fn": "mish", "downsample_type": "resnet", "upsample_type": "resnet",
                "time_embedding_type": "fourier", "num_class_embeds": 10, "class_embed_type": "timestep"}


def _random_unet2d_case(rng) -> dict:
    """A small random UNet2DModel configuration; sometimes with one field this U-Net does not model."""
    levels = rng.choice([1, 2, 3])
    base = rng.choice([8, 16, 24])
    chans = [base] + [base * rng.choice([1, 2, 3]) for _ in range(levels - 1)]
    groups = rng.choice([g for g in (1, 2, 4, 8) if base % g == 0])
    attn = [rng.random() < 0.4 for _ in range(levels)]
    scale_shift = rng.random() < 0.5
    config = dict(
        sample_size=16, in_channels=rng.choice([1, 3, 4]), out_channels=rng.choice([1, 3, 6]),
        block_out_channels=tuple(chans), layers_per_block=rng.choice([1, 2]),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=rng.choice([None, 4, 6, 8]),  # 6 divides no level: heads narrower than C
        norm_num_groups=groups, norm_eps=rng.choice([1e-5, 1e-6]),
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        attn_norm_num_groups=groups if scale_shift and rng.random() < 0.5 else None,
        flip_sin_to_cos=rng.random() < 0.5, freq_shift=rng.choice([0, 1]), add_attention=rng.random() < 0.7,
        downsample_padding=rng.choice([0, 1]), center_input_sample=rng.random() < 0.3,
        mid_block_scale_factor=rng.choice([1, 1.4]), time_embedding_dim=rng.choice([None, 40]),
        dropout=rng.choice([0.0, 0.1]), act_fn=rng.choice(["silu", "swish"]))  # diffusers' two names of SiLU
    unsupported = rng.choice(sorted(_UNSUPPORTED)) if rng.random() < 0.2 else None
    if unsupported:
        config[unsupported] = _UNSUPPORTED[unsupported]
    # Sizes divisible by every level's stride, non-square, and >= 64 outputs per channel: PyTorch's own
    # error, the yardstick, is a max over the outputs, and a handful of them gives a noisy one.
    return dict(config=config, unsupported=unsupported, batch=rng.choice([1, 2]),
                size=(rng.choice([8, 12, 16]), rng.choice([8, 12, 16])))


def _check_random_unet2d_case(case):
    config, unsupported = case["config"], case["unsupported"]
    theirs = perturbed_diffusers(config)
    if unsupported:
        with pytest.raises(ValueError, match=f"UNet.from_diffusers: unsupported {unsupported}="):
            UNet.from_diffusers(theirs)
        return
    ours = UNet.from_diffusers(theirs)
    B = case["batch"]
    x, t = torch.randn(B, config["in_channels"], *case["size"]), torch.randint(0, 1000, (B,))
    with torch.no_grad():
        got = ours(x, t)
        # The yardstick, PyTorch's own float32 error, as the worst of three evaluations that round differently
        # (contiguous, channels_last, a doubled batch): over a whole network one of them alone is a noisy
        # sample of it (2x one sample failed 1 in 1500 random networks; ours and theirs are equally accurate).
        refs = [theirs(x, t).sample]
        theirs.to(memory_format=torch.channels_last)
        refs.append(theirs(x.contiguous(memory_format=torch.channels_last), t).sample)
        refs.append(theirs(torch.cat([x, x]), torch.cat([t, t])).sample[:B])
        ref64 = theirs.double()(x.double(), t).sample
    ref32 = max(refs, key=lambda ref: (ref.double() - ref64).abs().max().item())
    assert_matches_reference(got, ref32, ref64, what="UNet vs UNet2DModel")


def test_random_diffusers_configs_load_and_match(one_thread):
    """Fresh random UNet2DModel configurations each run (tests/_fuzz.py): ours loads every one it models and
    matches diffusers' forward on random non-square inputs; one it does not model is refused by name."""
    run_cases(_random_unet2d_case, _check_random_unet2d_case, cases=12)
