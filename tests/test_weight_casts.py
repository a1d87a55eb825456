"""ddpm_fast.weight_casts: the Sampler's parameter casts, made once per call, change no bit of the images.

The truth is the same model behind a plain function (the Sampler hoists casts only for an nn.Module), so
every step casts its weights as autocast (or a bf16 model's norm) does. CPU autocast in bfloat16; the last
test is the GPU twin (a captured graph reading the hoisted casts).
"""

import contextlib
import copy

import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast.sampler import Sampler
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.weight_casts import WeightCasts, _CastRecorder, _only_dtype, parameter_slots, storage_key

pytestmark = [pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                 reason="the C++ extension is not built"),
              pytest.mark.usefixtures("one_thread")]

SEEDS = [3, 1, 4]


class InnerAutocast(nn.Module):
    """A wrapper that enters autocast on every forward (the benchmarks' form): autocast's cache dies each step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.model(x, t)
        return (out.sample if hasattr(out, "sample") else out).float()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000)


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return ddpm_fast.UNet.preset("tiny").eval()


def _per_step_casts(model):
    """The same model as a plain function: no hoisting, autocast casts every weight at every step."""
    return lambda x, t: model(x, t)


def _shape(net):
    return (net.config.in_channels, net.config.sample_size, net.config.sample_size)


def _diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8).eval()


FORMS = {  # how the model runs in low precision: (wrap the network, the autocast region, the sampling dtype)
    "autocast-around-sample": (lambda net: net, lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.float32),
    "autocast-inside-model": (InnerAutocast, contextlib.nullcontext, torch.float32),
    "bf16-model": (lambda net: net.to(torch.bfloat16), contextlib.nullcontext, torch.bfloat16),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_images_equal_per_step_casts_bitwise(schedule, unet, form, which):
    wrap, region, dtype = FORMS[form]
    net = unet if which == "ours" else _diffusers_unet()
    model = wrap(net)
    params = dict(model.named_parameters())
    dtypes = {name: p.dtype for name, p in params.items()}
    sampler = Sampler(model, schedule, num_steps=4)
    with region():
        hoisted = sampler.sample(SEEDS, _shape(net), dtype=dtype)
        truth = Sampler(_per_step_casts(model), schedule, num_steps=4).sample(SEEDS, _shape(net), dtype=dtype)
    if which == "ours" or form != "bf16-model":  # diffusers' bf16 model casts nothing: its norms run in bf16
        assert sampler._casts[1] is not None and sampler._casts[1].plan  # something was hoisted
    assert torch.equal(hoisted, truth)
    # The model has its own parameters back, the same objects in their own dtypes.
    assert all(p is params[name] and p.dtype == dtypes[name] for name, p in model.named_parameters())


def _record(model, x, t):
    with torch.no_grad():
        return WeightCasts.record(model, lambda: model(x, t))


def _param_casts_in(model, run) -> dict:
    """{parameter name: dtypes} of the parameter casts ``run()`` makes."""
    recorder = _CastRecorder({id(p): name for name, p in model.named_parameters()})
    with torch.no_grad(), recorder:
        run()
    return recorder.casts


def test_every_weight_cast_is_hoisted_and_none_remains(unet):
    model = InnerAutocast(unet)
    x, t = torch.randn(2, *_shape(unet)), torch.tensor([10, 900])
    casts = _record(model, x, t)
    per_step = _param_casts_in(model, lambda: model(x, t))  # what each step casts without hoisting
    convs = {f"model.{name}.weight" for name, module in unet.named_modules() if isinstance(module, nn.Conv2d)}
    assert convs <= set(per_step) and per_step == {name: {torch.bfloat16} for name in casts.plan}
    with casts.swapped(parameter_slots(model)):
        assert _param_casts_in(model, lambda: model(x, t)) == {}
    # Each cast carries its parameter's requires_grad: matmul chooses its kernels (fold a 3-d input into one
    # mm, or not) by that flag, so a different one could change bits where a model feeds a strided 3-d input.
    for frozen in (False, True):
        unet.requires_grad_(not frozen)
        with casts.swapped(parameter_slots(model)):
            hoisted = [p for name, p in model.named_parameters() if name in casts.plan]
            assert hoisted and all(p.dtype == torch.bfloat16 and p.requires_grad != frozen for p in hoisted)
    frozen_casts = _record(model, x, t)  # frozen from the start: the casts are made frozen
    with frozen_casts.swapped(parameter_slots(model)):
        assert not any(p.requires_grad for name, p in model.named_parameters() if name in frozen_casts.plan)


class _ReadsWeightRaw(nn.Module):
    """A Linear whose weight also enters a float32 op outside autocast: that weight must stay float32. And a
    bare parameter under autocast: cast, but not a Linear's or a convolution's (its readers are unknown)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bare = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(self.lin(x.movedim(1, -1)), self.bare).movedim(-1, 1).float()
        return y * self.lin.weight.norm()


def test_a_weight_read_outside_its_cast_is_not_hoisted(schedule):
    model = _ReadsWeightRaw()
    casts = _record(model, torch.randn(2, 4, 3, 3), torch.tensor([5, 5]))
    assert casts.plan == {"lin.bias": torch.bfloat16}
    images = Sampler(model, schedule, num_steps=3).sample(SEEDS, (4, 3, 3))
    assert torch.equal(images, Sampler(_per_step_casts(model), schedule, num_steps=3).sample(SEEDS, (4, 3, 3)))


def test_only_a_change_of_floating_dtype_alone_is_a_cast():
    weight = torch.randn(4, 3, 2, 2)
    bf16 = {"dtype": torch.bfloat16}
    assert _only_dtype(weight, bf16)
    assert _only_dtype(weight, {**bf16, "device": "cpu", "layout": torch.strided,
                                "memory_format": torch.preserve_format})  # the defaults, spelled out
    for kwargs in ({}, {"memory_format": torch.channels_last},  # no dtype
                   {"dtype": torch.float32},  # a copy in its own dtype
                   {"dtype": torch.int32},  # not a floating dtype
                   {**bf16, "device": "meta"}, {**bf16, "layout": torch.sparse_coo},
                   {**bf16, "memory_format": torch.channels_last}):
        assert not _only_dtype(weight, kwargs), kwargs
    assert not _only_dtype(torch.randint(0, 9, (4,)), bf16)  # an integer tensor is not a weight to cast


class _ConvCast(nn.Conv2d):
    """A user's subclass (its module is not torch's or ours): known by what it derives from. Casts its weight
    to bfloat16, and ``extra`` makes one more copy of it."""

    def __init__(self, extra=None):
        super().__init__(3, 4, 3, padding=1)
        self.extra = extra

    def forward(self, x):
        if self.extra is not None:
            self.extra(self.weight)
        return nn.functional.conv2d(x.bfloat16(), self.weight.to(torch.bfloat16), self.bias.to(torch.bfloat16),
                                    padding=1).float()


class _LinearCast(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x.bfloat16(), self.weight.to(torch.bfloat16), self.bias.to(torch.bfloat16))


@pytest.mark.parametrize("extra", [None, "float16", "meta", "channels_last", "layout-only"])
def test_a_weight_copied_any_other_way_is_not_hoisted(extra):
    copies = {None: None, "float16": lambda w: w.to(torch.float16),  # cast to two dtypes: neither is hoisted
              "meta": lambda w: w.to("meta", torch.bfloat16),
              "layout-only": lambda w: w.to(memory_format=torch.channels_last),
              "channels_last": lambda w: w.to(torch.bfloat16, memory_format=torch.channels_last)}
    model = _ConvCast(copies[extra])
    x = torch.randn(2, 3, 5, 5)
    plan = WeightCasts.record(model, lambda: model(x)).plan
    assert plan == ({"weight": torch.bfloat16, "bias": torch.bfloat16} if extra is None else {"bias": torch.bfloat16})
    linear = _LinearCast(3, 2)
    assert WeightCasts.record(linear, lambda: linear(torch.randn(4, 3))).plan == {
        "weight": torch.bfloat16, "bias": torch.bfloat16}


def test_torch_layers_other_than_linear_and_conv_are_known():
    attn = nn.MultiheadAttention(8, 2, batch_first=True)  # its in_proj_weight is no Linear's
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plan = WeightCasts.record(attn, lambda: attn(x, x, x)).plan
    assert plan.get("in_proj_weight") == torch.bfloat16


def test_bf16_models_norms_are_hoisted_too(unet):
    """A bfloat16 model's fused GroupNorms (ours, not torch's) take their weight and bias in float32."""
    model = unet.to(torch.bfloat16)
    x, t = torch.randn(2, *_shape(unet), dtype=torch.bfloat16), torch.tensor([10, 900])
    plan = _record(model, x, t).plan
    norms = {f"{name}.{p}" for name, module in unet.named_modules() if "norm" in type(module).__name__.lower()
             and type(module).__module__.startswith("ddpm_fast.") for p in ("weight", "bias")}
    assert norms and all(plan.get(name) == torch.float32 for name in norms)


def test_parameter_slots_hold_every_parameter_and_buffer_and_the_key_their_storage():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model.register_module("gone", None)  # an optional submodule left unset
    slots = parameter_slots(model)
    assert all(table[name] is tensor for table, name, tensor in slots)
    assert sorted(id(t) for _, _, t in slots) == sorted(map(id, [*model.parameters(), *model.buffers()]))
    key = storage_key(slots)
    assert key == storage_key(parameter_slots(model))
    weight = model[2].weight
    weight.data = weight.data.clone()  # the same Parameter on new storage (as model.to(...) does)
    assert model[2].weight is weight and storage_key(parameter_slots(model)) != key
    key = storage_key(parameter_slots(model))
    model[1].running_var = model[1].running_var.view(torch.int32)  # the same address read as another dtype
    assert storage_key(parameter_slots(model)) != key


def test_weights_changed_in_place_are_recast(schedule, unet):
    model = InnerAutocast(unet)
    sampler = Sampler(model, schedule, num_steps=3)
    first = sampler.sample(SEEDS)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)  # as an optimizer step would: same storage, new version
    second = sampler.sample(SEEDS)
    assert not torch.equal(first, second)
    assert torch.equal(second, Sampler(_per_step_casts(model), schedule, num_steps=3).sample(SEEDS, _shape(unet)))
    # Frozen (requires_grad off, which steers matmul's kernel choice) and changed again: both follow.
    unet.requires_grad_(False)
    with torch.no_grad():
        unet.mid.attn.to_v.weight.mul_(0.5)
    third = sampler.sample(SEEDS)
    assert torch.equal(third, Sampler(_per_step_casts(model), schedule, num_steps=3).sample(SEEDS, _shape(unet)))
    assert not torch.equal(second, third)
    # Written through .data (diffusers' EMAModel.copy_to does): the version counter does not move.
    new_weights = [torch.randn_like(p) * p.std() for p in unet.parameters()]
    for p, w in zip(unet.parameters(), new_weights):
        p.data.copy_(w)
    fourth = sampler.sample(SEEDS)
    assert torch.equal(fourth, Sampler(_per_step_casts(model), schedule, num_steps=3).sample(SEEDS, _shape(unet)))
    assert not torch.equal(third, fourth)


def test_parameters_restored_when_the_model_fails(schedule, unet):
    model = InnerAutocast(unet)
    params = dict(model.named_parameters())
    calls = []

    def fail_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("model failed")

    handle = unet.register_forward_pre_hook(fail_on_third_call)
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            Sampler(model, schedule, num_steps=5).sample(SEEDS)
    finally:
        handle.remove()
    assert all(p is params[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_recording_leaves_the_global_random_state_alone(schedule, unet):
    """The recording forward of a model in train mode (dropout on) must not shift what the loop draws."""
    model = InnerAutocast(ddpm_fast.UNet.preset("tiny", dropout=0.3)).train()
    torch.manual_seed(7)
    hoisted = Sampler(model, schedule, num_steps=3).sample(SEEDS)
    torch.manual_seed(7)
    truth = Sampler(_per_step_casts(model), schedule, num_steps=3).sample(SEEDS, _shape(model))
    assert torch.equal(hoisted, truth)


@pytest.mark.parametrize("how", ["wrapper", "Module.compile"])
def test_a_compiled_model_is_left_to_its_compiler(schedule, unet, how):
    """A model holding a compiled module casts inside its graph: no recording (under a dispatch mode dynamo
    compiled the ops' Python frames one by one, with graph breaks), no swap (its guards would fail)."""
    torch._dynamo.reset()
    truth = Sampler(InnerAutocast(unet), schedule, num_steps=3).sample(SEEDS)
    if how == "wrapper":
        compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    else:
        compiled = copy.deepcopy(unet)
        compiled.compile(backend="aot_eager", fullgraph=True)
    sampler = Sampler(InnerAutocast(compiled), schedule, num_steps=3)
    torch._dynamo.utils.counters.clear()
    images = sampler.sample(SEEDS)
    assert sampler._casts is not None and sampler._casts[1] is None  # looked at, nothing hoisted
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph of the U-Net, reused per step
    torch.testing.assert_close(images, truth)  # aot_eager runs the same ops; bf16 autocast in both


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ambient", [True, False], ids=["autocast-around-sample", "autocast-inside-model"])
def test_graph_with_hoisted_casts_equals_per_step_casts_on_gpu(schedule, ambient):
    """The captured graph reads the casts made once; the eager loop of a plain function casts every step."""
    torch.manual_seed(0)
    unet = ddpm_fast.UNet.preset("tiny").cuda().eval()
    model = unet if ambient else InnerAutocast(unet)
    sampler = Sampler(model, schedule, num_steps=5)
    region = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ambient else contextlib.nullcontext
    for seeds in ([1, 2, 3], [9, 8, 7]):
        with region():
            graphed = sampler.sample(seeds, cuda_graph=True)
            truth = Sampler(_per_step_casts(model), schedule, num_steps=5).sample(seeds, _shape(unet), device="cuda")
        assert torch.equal(graphed, truth)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)  # the graph's casts are refreshed in place, no recapture
    graph = sampler._graph
    with region():
        graphed = sampler.sample([1, 2, 3], cuda_graph=True)
        truth = Sampler(_per_step_casts(model), schedule, num_steps=5).sample([1, 2, 3], _shape(unet), device="cuda")
    assert sampler._graph is graph and torch.equal(graphed, truth)
