"""FastDDPMScheduler / FastDDIMScheduler against diffusers' DDPMScheduler / DDIMScheduler and pipelines.

How the tolerances are derived (STYLE.md principle 4, tests/_tolerance.py):

* truth = diffusers' own step code run in float64 on our float64 alphas_cumprod, fed the *same* noise
  (its `randn_tensor` is patched to draw in float32 from the same generator and cast, because a float64
  draw from a generator gives different numbers);
* theirs = stock diffusers in float32, ours = the drop-in scheduler in float32, both drawing the noise
  themselves from identically seeded generators.

`assert_matches_reference` then requires  max|ours - truth| <= 2 * max|theirs - truth| + floor, where the
floor is 2 eps32 times `magnitude`; we pass 4x the sum of |terms| of each formula (x0 = ax x + am m;
prev = p0 x0c + p1 x + p2 m + std sigma z, read from our coefficient table), i.e. 8 eps32 per unit of
cancelling terms: a coefficient rounding, a product and a sum per term, doubled for headroom. That the
noise itself is identical is asserted separately: both generators end in the same state.
"""

import copy
import json
import pickle
import random
import signal
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.pipelines.ddim import pipeline_ddim
from diffusers.pipelines.ddpm import pipeline_ddpm
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

from _fuzz import random_steps_offset, run_cases
from _tolerance import assert_matches_reference
from ddpm_fast.diffusers_compat import FastDDIMScheduler, FastDDPMScheduler, FastSchedulerOutput, SchedulerConfig

SHAPE = (3, 5, 7, 9)  # odd H, W and C not a multiple of 8, on purpose
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
RATIO, MAX_VALUE = 0.95, 4.0  # thresholding that lands strictly inside (1, sample_max_value)
CLIPS = [None, 1.0, "threshold"]
SPACINGS = ["leading", "linspace", "trailing"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _clip_config(clip):
    return dict(clip_sample=isinstance(clip, float), clip_sample_range=clip if isinstance(clip, float) else 1.0,
                thresholding=clip == "threshold", dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE)


def _fields(config, cls):
    """The constructor fields of a config (diffusers adds `_class_name`, `_use_default_values`, ...)."""
    return {k: config[k] for k in cls._DEFAULTS}


def _draws_in(draw_dtype):
    """randn_tensor for the float64 twin: the numbers the generator gives in `draw_dtype`, cast."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        return torch.randn(tuple(shape), generator=generator, dtype=draw_dtype).to(dtype)
    return randn_tensor


_float32_draws = _draws_in(torch.float32)


def _twin(theirs, ours):
    """diffusers' scheduler evaluating its own formulas in float64 on our float64 alphas_cumprod."""
    twin = copy.deepcopy(theirs)
    twin.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(twin, "final_alpha_cumprod"):
        twin.final_alpha_cumprod = twin.one if ours.config.set_alpha_to_one else twin.alphas_cumprod[0]
    return twin


def _magnitudes(table, t, x, m, v, z, x0c):
    """4 x (sum of |terms|) of x0 and of prev_sample (see the module docstring). Float64 inputs, scalar t."""
    ax, am, p0, p1, p2, std, lo, hi = table.coef[t].tolist()
    x0_terms = ((ax * x).abs() + (am * m).abs()).max().item()
    noise = (std * z).abs()
    if v is not None:  # sigma = exp(y), y = 0.5 (f hi + (1 - f) lo): relative error ~ eps (1 + |terms of y|)
        f = (v + 1) / 2
        y = 0.5 * (f * hi + (1 - f) * lo)
        noise = noise * y.exp() * (1 + 0.5 * ((f * hi).abs() + ((1 - f) * lo).abs()))
    prev_terms = ((p0 * x0c).abs() + (p1 * x).abs() + (p2 * m).abs() + noise).max().item()
    # Thresholding divides by s >= 1 computed from x0 itself: at most twice x0's error, carried by p0.
    return 4 * prev_terms + abs(p0) * 8 * x0_terms, 8 * x0_terms


def _inputs(prediction_type, variance_type, seed):
    x = torch.randn(SHAPE, generator=_gen(seed))
    m = torch.randn(SHAPE, generator=_gen(seed + 1)) * (1.6 if prediction_type == "sample" else 1.0)
    if variance_type == "learned_range":
        m = torch.cat([m, torch.rand(SHAPE, generator=_gen(seed + 2)) * 2 - 1], dim=1)
    return x, m


def _compare_step(ours, theirs, twin, patch_module, t, x, m, what, **kwargs):
    """One step of ours / stock diffusers / the float64 twin at timestep t, each with generator seed 1234.

    x, m: in the storage dtype under test; the twin gets them (and the noise, drawn in m's dtype, as diffusers
    draws it) cast to float64.
    """
    g_ours, g_theirs = _gen(1234), _gen(1234)
    out = ours.step(m, torch.tensor(t), x, generator=g_ours, **kwargs)
    assert isinstance(out, FastSchedulerOutput)
    ref = theirs.step(m, torch.tensor(t), x, generator=g_theirs, **kwargs)
    # Same draws under the same conditions: the generators end in the same state.
    assert torch.equal(g_ours.get_state(), g_theirs.get_state()), f"{what}: noise drawn differently"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patch_module, "randn_tensor", _draws_in(m.dtype))
        truth = twin.step(m.double(), torch.tensor(t), x.double(), generator=_gen(1234), **kwargs)
    C = x.shape[1]
    v = m[:, C:].double() if m.shape[1] == 2 * C else None
    z = torch.randn(SHAPE, generator=_gen(1234), dtype=m.dtype).double()
    ddim_args = {k: kwargs[k] for k in ("eta", "use_clipped_model_output") if k in kwargs}
    table = ours.step_table(**ddim_args)
    mag_prev, mag_x0 = _magnitudes(table, t, x.double(), m[:, :C].double(), v, z, truth.pred_original_sample)
    # Ours computes half-precision storage in float32: its terms round at float32's floor, the result once at
    # the storage dtype's (at half's floor the terms of x0 at t=950 would bound any x0 in [-1, 1]).
    half = x.dtype in (torch.float16, torch.bfloat16)
    size = (lambda mag: {"float32_terms": torch.tensor(mag)}) if half else (lambda mag: {"magnitude": mag})
    assert_matches_reference(out.pred_original_sample, ref.pred_original_sample, truth.pred_original_sample,
                             what=f"{what} x0 t={t}", **size(mag_x0))
    assert_matches_reference(out.prev_sample, ref.prev_sample, truth.prev_sample, what=f"{what} prev t={t}",
                             **size(mag_prev))
    tup = ours.step(m, t, x, generator=_gen(1234), return_dict=False, **kwargs)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.prev_sample) and torch.equal(tup[1], out[1])


# ------------------------------------------------------------------------------------------------
# step against diffusers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chain", ["full"] + SPACINGS)
@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip1", "threshold"])
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_step_matches_diffusers(prediction_type, variance_type, clip, chain):
    config = dict(prediction_type=prediction_type, variance_type=variance_type,
                  timestep_spacing="leading" if chain == "full" else chain, **_clip_config(clip))
    ours, theirs = FastDDPMScheduler(**config), DDPMScheduler(**config)
    if chain != "full":
        ours.set_timesteps(50)
        theirs.set_timesteps(50)
        assert torch.equal(ours.timesteps, theirs.timesteps)
    twin = _twin(theirs, ours)
    ts = ours.timesteps.tolist()
    # First, middle, the last two (trailing ends at t=19 > 0 with prev -1: noise, var clamped at 1e-20).
    for i, t in enumerate(dict.fromkeys([ts[0], ts[len(ts) // 2], ts[-2], ts[-1]])):
        x, m = _inputs(prediction_type, variance_type, seed=100 * i)
        _compare_step(ours, theirs, twin, scheduling_ddpm, t, x, m, f"ddpm {config}")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("clip", [None, "threshold"], ids=["noclip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_step_matches_diffusers(prediction_type, eta, clip, spacing):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing, beta_schedule="scaled_linear",
                  beta_start=0.00085, beta_end=0.012, set_alpha_to_one=spacing != "trailing", **_clip_config(clip))
    ours, theirs = FastDDIMScheduler(**config), DDIMScheduler(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    twin = _twin(theirs, ours)
    use_clipped = clip is not None  # the clipped-eps variant only differs when x0 was clipped
    for i, t in enumerate(ours.timesteps[[0, 25, -1]].tolist()):
        x, m = _inputs(prediction_type, "fixed_small", seed=10 + 100 * i)
        _compare_step(ours, theirs, twin, scheduling_ddim, t, x, m, f"ddim {config}", eta=eta,
                      use_clipped_model_output=use_clipped)


def _random_scheduler_case(rng) -> dict:
    """A diffusers scheduler config drawn at random: every field that changes the numbers."""
    kind = rng.choice(["ddpm", "ddim"])
    T = rng.choice([1000, 1000, 100, 37])
    prediction = rng.choice(PREDICTIONS)
    post = rng.choice([None, "clip", "threshold"])
    config = dict(num_train_timesteps=T, prediction_type=prediction, timestep_spacing=rng.choice(SPACINGS),
                  beta_schedule=rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]
                                           + (["sigmoid", "laplace"] if kind == "ddpm" else [])),
                  beta_start=rng.choice([1e-4, 0.00085]), beta_end=rng.choice([0.02, 0.012]),
                  # zero terminal SNR leaves x0 undefined for epsilon models at t = T - 1 (refused, tested above)
                  rescale_betas_zero_snr=prediction != "epsilon" and rng.random() < 0.3,
                  clip_sample=post == "clip", clip_sample_range=rng.choice([0.5, 1.0, 2.0]),
                  thresholding=post == "threshold", dynamic_thresholding_ratio=rng.choice([0.9, 0.995]),
                  sample_max_value=rng.choice([1.5, 4.0]))
    if rng.random() < 0.15:
        config["trained_betas"] = [rng.uniform(1e-4, 0.03) for _ in range(T)]
    if kind == "ddpm":
        config["variance_type"] = rng.choice(VARIANCES)
    else:
        config["set_alpha_to_one"] = rng.random() < 0.5
    steps = None if kind == "ddpm" and rng.random() < 0.2 else rng.randint(1, T)
    config["steps_offset"] = random_steps_offset(rng, T, steps, config["timestep_spacing"])
    # eta = 1 at zero terminal SNR: the DDIM direction is sqrt(1 - ap - sigma^2) of an exact 0 at t = T - 1,
    # which the float64 twin rounds below 0 (NaN) about half the time (ours clamps it, as float32 diffusers
    # happens to): no truth to compare with there.
    etas = [0.0, 0.5] if config["rescale_betas_zero_snr"] else [0.0, 0.5, 1.0]
    return dict(kind=kind, config=config, steps=steps, eta=rng.choice(etas),
                use_clipped=rng.random() < 0.5, picks=[rng.random(), rng.random()], seed=rng.randrange(10**6))


def _check_random_scheduler_case(case):
    config, steps = case["config"], case["steps"]
    ours_cls, theirs_cls, module = ((FastDDPMScheduler, DDPMScheduler, scheduling_ddpm) if case["kind"] == "ddpm"
                                    else (FastDDIMScheduler, DDIMScheduler, scheduling_ddim))
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    if steps is not None:
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        ts = theirs.timesteps
        if len(ts) == steps + 1 and ts[-1] == -1:  # diffusers' trailing quirk (module docstring of ours)
            ts = ts[:-1]
        assert torch.equal(ours.timesteps, ts)
    twin = _twin(theirs, ours)
    ts = ours.timesteps.tolist()
    kwargs = dict(eta=case["eta"], use_clipped_model_output=case["use_clipped"]) if case["kind"] == "ddim" else {}
    for i, t in enumerate(dict.fromkeys([ts[int(p * len(ts))] for p in case["picks"]] + [ts[-1]])):
        x, m = _inputs(config["prediction_type"], config.get("variance_type"), seed=case["seed"] + 10 * i)
        _compare_step(ours, theirs, twin, module, t, x, m, f"{case['kind']}", **kwargs)


def test_random_configs_match_diffusers():
    """Fresh random scheduler configs each run (tests/_fuzz.py): schedule, spacing, offset, prediction,
    variance, clipping, thresholding, eta, and the number of steps, against stock diffusers."""
    run_cases(_random_scheduler_case, _check_random_scheduler_case, cases=30)


def test_ddim_eta_one_where_diffusers_float32_gives_nan():
    """A fuzz case, replayed: DDIM at eta = 1, one step from t = 36 of a 37-step cosine schedule. The direction
    sqrt(1 - ap - sigma^2) of a true ~0 rounds below 0 in diffusers' float32 and gives NaN; ours clamps it and
    is judged against the float64 twin (diffusers' NaN is not taken for its error, which made the bound NaN)."""
    case = _random_scheduler_case(random.Random(1067420186))
    assert (case["kind"], case["config"]["num_train_timesteps"], case["steps"], case["eta"]) == ("ddim", 37, 1, 1.0)
    torch.manual_seed(1067420186)
    _check_random_scheduler_case(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_half_and_double_precision_step_matches_diffusers(kind, dtype):
    """Half-precision and float64 storage: same noise (drawn in that dtype, as diffusers), same tolerance rule.

    float64 (the reference's path): PyTorch in float64 is diffusers' code on the float64 alphas_cumprod, the
    twin (stock diffusers rounds its schedule to float32), so ours must be within the float64 floor of it."""
    if kind == "ddpm":
        config = dict(prediction_type="v_prediction", variance_type="fixed_large", **_clip_config("threshold"))
        ours, theirs, module, kwargs = FastDDPMScheduler(**config), DDPMScheduler(**config), scheduling_ddpm, {}
    else:
        config = dict(prediction_type="epsilon", **_clip_config(1.0))
        ours, theirs, module = FastDDIMScheduler(**config), DDIMScheduler(**config), scheduling_ddim
        kwargs = dict(eta=1.0)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    twin = _twin(theirs, ours)
    for i, t in enumerate([950, 500, 0]):
        x, m = (a.to(dtype) for a in _inputs(config["prediction_type"], "fixed_small", seed=50 + i))
        _compare_step(ours, twin if dtype == torch.float64 else theirs, twin, module, t, x, m, f"{kind} {dtype}",
                      **kwargs)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_an_autocast_model_s_output_steps_a_float32_sample_as_diffusers(kind):
    """Under autocast a model returns bfloat16 for a float32 sample: diffusers' arithmetic promotes them, and so
    do we (a DDPMPipeline run under autocast used to fail on our scheduler): float32 out, the noise drawn in the
    output's dtype, as diffusers draws it, and the derived tolerance of the float32 steps against the float64
    twin (diffusers rounds some of its products to bfloat16 there; we compute in float32)."""
    config = dict(prediction_type="epsilon", **_clip_config(1.0))
    ours, theirs = (FastDDPMScheduler(**config), DDPMScheduler(**config)) if kind == "ddpm" else (
        FastDDIMScheduler(**config), DDIMScheduler(**config))
    module, kwargs = (scheduling_ddpm, {}) if kind == "ddpm" else (scheduling_ddim, dict(eta=1.0))
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x, m = _inputs("epsilon", "fixed_small", seed=int(torch.randint(0, 2**31, ())))
    m = m.to(torch.bfloat16)
    assert ours.step(m, 500, x, generator=_gen(3), **kwargs).prev_sample.dtype == torch.float32
    for t in (950, 500, 0):
        _compare_step(ours, theirs, _twin(theirs, ours), module, t, x, m, f"{kind} bf16 output", **kwargs)


def test_zero_terminal_snr_with_epsilon_explains_instead_of_nan():
    """diffusers returns inf/NaN stepping from t = 999 when alphas_cumprod[999] == 0; we say why, and the
    timesteps that skip 999 (leading spacing) still work."""
    sched = FastDDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="leading")
    x, m = _inputs("epsilon", "fixed_small", seed=2)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sched.step(m, 999, x, generator=_gen(0))
    sched.set_timesteps(50)
    assert torch.isfinite(sched.step(m, 980, x, generator=_gen(0)).prev_sample).all()


def test_global_rng_without_generator_matches_diffusers():
    """No generator: both draw from torch's global RNG the same way, so seeding torch gives the same."""
    ours, theirs = FastDDPMScheduler(variance_type="fixed_large"), DDPMScheduler(variance_type="fixed_large")
    x, m = _inputs("epsilon", "fixed_large", seed=3)
    torch.manual_seed(7)
    a = ours.step(m, 500, x).prev_sample
    after_ours = torch.get_rng_state()
    torch.manual_seed(7)
    b = theirs.step(m, 500, x).prev_sample
    assert torch.equal(after_ours, torch.get_rng_state())
    # Same noise; the difference is only diffusers' float32 coefficient drift (max |p1| ~ 1e-6 relative).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A list of one generator serves the whole batch, as in diffusers' randn_tensor.
    seed = int(torch.randint(0, 2**62, ()))
    a = ours.step(m, 500, x, generator=[_gen(seed)]).prev_sample
    torch.testing.assert_close(a, theirs.step(m, 500, x, generator=[_gen(seed)]).prev_sample, rtol=0, atol=1e-5)
    assert torch.equal(a, ours.step(m, 500, x, generator=_gen(seed)).prev_sample)


def test_noise_for_another_device_is_drawn_on_the_cpu_generator_as_diffusers():
    """A CPU generator serving a sample on another device (a CUDA pipeline seeded on the CPU, diffusers' advice
    for reproducible images) draws on the CPU, as diffusers' randn_tensor does: the same numbers, the same
    generator state after. "meta" stands for the other device (every torch build has it: no CUDA needed)."""
    from diffusers.utils.torch_utils import randn_tensor
    from ddpm_fast.diffusers_compat import _randn_like_diffusers
    seed = int(torch.randint(0, 2**62, ()))
    for generator in (lambda: _gen(seed), lambda: [_gen(seed + b) for b in range(SHAPE[0])]):
        for device in ("cpu", "meta"):
            ours, theirs = generator(), generator()
            a = _randn_like_diffusers(SHAPE, ours, torch.device(device), torch.float32)
            b = randn_tensor(SHAPE, generator=theirs, device=torch.device(device), dtype=torch.float32)
            assert a.device == b.device and a.shape == b.shape and (device == "meta" or torch.equal(a, b))
            for g_ours, g_theirs in zip(*(g if isinstance(g, list) else [g] for g in (ours, theirs))):
                assert torch.equal(g_ours.get_state(), g_theirs.get_state()), device


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_per_sample_timesteps_equal_single_sample_steps(kind):
    """A (B,) timestep tensor with a list of generators equals B single-sample steps, bit for bit."""
    if kind == "ddpm":
        sched = FastDDPMScheduler(prediction_type="v_prediction", variance_type="learned_range",
                                  **_clip_config("threshold"))
        sched.set_timesteps(50)
        x, m = _inputs("v_prediction", "learned_range", seed=1)
        kwargs = {}
    else:
        sched = FastDDIMScheduler(**_clip_config(1.0))
        sched.set_timesteps(50)
        x, m = _inputs("epsilon", "fixed_small", seed=1)
        kwargs = dict(eta=1.0)
    t = sched.timesteps[[0, 20, -1]]  # includes t = 0
    out = sched.step(m, t, x, generator=[_gen(s) for s in (5, 6, 7)], **kwargs)
    for b in range(3):
        one = sched.step(m[b:b + 1], int(t[b]), x[b:b + 1], generator=_gen(5 + b), **kwargs)
        assert torch.equal(out.prev_sample[b:b + 1], one.prev_sample), f"sample {b}"
        assert torch.equal(out.pred_original_sample[b:b + 1], one.pred_original_sample), f"sample {b}"
    # A (1,) timestep is every sample's, as diffusers broadcasts it: the same as the int.
    shared = sched.step(m, t[1:2], x, generator=_gen(8), **kwargs)
    assert torch.equal(shared.to_tuple()[0], sched.step(m, int(t[1]), x, generator=_gen(8), **kwargs).prev_sample)


def test_ddim_variance_noise_is_used_as_given():
    ours, theirs = FastDDIMScheduler(), DDIMScheduler()
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x, m = _inputs("epsilon", "fixed_small", seed=4)
    z = torch.randn(SHAPE, generator=_gen(9))
    a = ours.step(m, 500, x, eta=0.7, variance_noise=z).prev_sample
    b = theirs.step(m, 500, x, eta=0.7, variance_noise=z).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # Noise in another float dtype promotes as diffusers' arithmetic does (it was refused, naming `noise`): half
    # noise steps a float32 sample in float32, float64 noise makes the step float64 (the reference's path).
    for noise_dtype, out_dtype in ((torch.float16, torch.float32), (torch.float64, torch.float64)):
        zd = z.to(noise_dtype)
        a = ours.step(m, 500, x, eta=0.7, variance_noise=zd).prev_sample
        assert a.dtype == theirs.step(m, 500, x, eta=0.7, variance_noise=zd).prev_sample.dtype == out_dtype
        as_promoted = ours.step(m.to(out_dtype), 500, x.to(out_dtype), eta=0.7, variance_noise=zd.to(out_dtype))
        assert torch.equal(a, as_promoted.prev_sample)


def test_step_tables_are_cached_least_recently_used_first_out():
    """The table of a loop's own eta stays cached while other etas come and go (it was evicted first in, first out,
    so a loop that also stepped with 8 other etas rebuilt its table every step)."""
    sched = FastDDIMScheduler()
    sched.set_timesteps(int(torch.randint(10, 50, ())))
    hot = sched.step_table(eta=0.0)
    for eta in torch.rand(12).tolist():
        assert sched.step_table(eta=eta) is sched.step_table(eta=eta), "a table is cached"
        assert sched.step_table(eta=0.0) is hot


# ------------------------------------------------------------------------------------------------
# add_noise, timesteps, config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["tensor", "int", "0-d", "(1,)", "(B, 1)"])
def test_add_noise_matches_diffusers(form, dtype):
    """Every timestep form diffusers takes; float64 (the reference's path) against diffusers' code in float64 on
    the float64 alphas_cumprod (the twin: stock diffusers rounds its schedule to float32)."""
    ours = FastDDPMScheduler(beta_schedule="squaredcos_cap_v2")
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    if dtype == torch.float64:
        theirs = _twin(theirs, ours)
    x0 = torch.randn(SHAPE, generator=_gen(1), dtype=dtype)
    noise = torch.randn(SHAPE, generator=_gen(2), dtype=dtype)
    t = {"tensor": torch.tensor([0, 517, 999]), "int": 517, "0-d": torch.tensor(517), "(1,)": torch.tensor([517]),
         "(B, 1)": torch.tensor([[0], [517], [999]])}[form]
    t_theirs = torch.as_tensor(t).flatten().expand(SHAPE[0])
    a = ours.add_noise(x0, noise, t)
    b = theirs.add_noise(x0, noise, t_theirs)
    assert a.dtype == dtype
    ac = ours.schedule.alphas_cumprod[t_theirs].reshape(-1, 1, 1, 1)
    truth = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
    assert_matches_reference(a, b, truth, what="add_noise", magnitude=2 * (x0.abs().max() + noise.abs().max()).item())
    v = ours.get_velocity(x0, noise, t)
    truth_v = ac.sqrt() * noise.double() - (1 - ac).sqrt() * x0.double()
    assert_matches_reference(v, theirs.get_velocity(x0, noise, t_theirs), truth_v, what="get_velocity",
                             magnitude=2 * (x0.abs().max() + noise.abs().max()).item())


@pytest.mark.parametrize("x_shape, noise_shape, n_t", [
    ((4,), (4,), 4),                       # 1-D samples: one value per sample
    ((4,), (1,), 4),
    ((3, 5, 7, 9), (1, 5, 7, 9), 3),       # one noise for the batch
    ((1, 5, 7, 9), (3, 5, 7, 9), 3),       # one sample at three timesteps, three noises
    ((1, 5, 7, 9), (1, 5, 7, 9), 3),       # one sample, one noise, three timesteps
    ((3, 2, 11), (1, 2, 1), 1),            # audio-like (B, C, L)
], ids=["1-D", "1-D one noise", "one noise", "one sample", "one sample one noise", "(B,C,L) one t"])
def test_add_noise_broadcasts_as_diffusers(x_shape, noise_shape, n_t):
    """diffusers' add_noise / get_velocity are arithmetic, so shapes broadcast: the result is theirs."""
    ours, theirs = FastDDPMScheduler(), DDPMScheduler()
    x0, noise = torch.randn(x_shape), torch.randn(noise_shape)
    t = torch.randint(0, 1000, (n_t,))
    a, v = ours.add_noise(x0, noise, t), ours.get_velocity(x0, noise, t)
    b, v_theirs = theirs.add_noise(x0, noise, t), theirs.get_velocity(x0, noise, t)
    assert a.shape == b.shape and v.shape == v_theirs.shape
    ac = ours.schedule.alphas_cumprod[t].reshape(-1, *[1] * (len(x_shape) - 1))
    magnitude = 2 * (x0.abs().max() + noise.abs().max()).item()
    assert_matches_reference(a, b, ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double(), what="add_noise",
                             magnitude=magnitude)
    assert_matches_reference(v, v_theirs, ac.sqrt() * noise.double() - (1 - ac).sqrt() * x0.double(),
                             what="get_velocity", magnitude=magnitude)
    with pytest.raises(ValueError, match=r"noise must have original_samples's shape \(4, 5\) or broadcast with it"):
        ours.add_noise(torch.randn(4, 5), torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match=r"noise must have sample's shape \(4, 5\) or broadcast.*got \(5,\)"):
        ours.get_velocity(torch.randn(4, 5), torch.randn(5), 3)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_1d_samples_and_broadcast_variance_noise_step_as_diffusers(kind):
    """A 1-D sample (one value per sample) steps as the (B, 1) batch it is, drawing diffusers' noise (diffusers'
    DDIM takes it; its DDPM fails on the missing channel axis); DDIM's variance_noise broadcasts as there."""
    ours = FastDDPMScheduler() if kind == "ddpm" else FastDDIMScheduler()
    ours.set_timesteps(20)
    t = int(ours.timesteps[torch.randint(0, 19, ()).item()])  # t > 0: noise is drawn
    seed = torch.randint(0, 2**62, ()).item()
    x, m = torch.randn(5), torch.randn(5)
    kwargs = {} if kind == "ddpm" else {"eta": 0.8}
    out = ours.step(m, t, x, generator=_gen(seed), **kwargs)
    as_2d = ours.step(m[:, None], t, x[:, None], generator=_gen(seed), **kwargs)
    assert out.prev_sample.shape == (5,) and torch.equal(out.prev_sample, as_2d.prev_sample[:, 0])
    assert torch.equal(out.pred_original_sample, as_2d.pred_original_sample[:, 0])
    with pytest.raises(ValueError, match=r"model_output must have sample's shape \(5,\), got \(10,\)"):
        ours.step(torch.randn(10), t, x, **kwargs)
    if kind == "ddim":
        theirs = DDIMScheduler()
        theirs.set_timesteps(20)
        torch.testing.assert_close(out.prev_sample, theirs.step(m, t, x, generator=_gen(seed), **kwargs).prev_sample)
        x, m, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(1, *SHAPE[1:])
        a = ours.step(m, t, x, eta=0.8, variance_noise=z).prev_sample
        assert torch.equal(a, ours.step(m, t, x, eta=0.8, variance_noise=z.expand(SHAPE).clone()).prev_sample)
        torch.testing.assert_close(a, theirs.step(m, t, x, eta=0.8, variance_noise=z).prev_sample)
        with pytest.raises(ValueError, match=r"variance_noise must have sample's shape \(3, 5, 7, 9\) or broadcast"):
            ours.step(m, t, x, eta=0.8, variance_noise=torch.randn(6, *SHAPE[1:]))


@pytest.mark.parametrize("cls", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_set_timesteps_matches_diffusers(cls, spacing, offset):
    Ours, Theirs = (FastDDPMScheduler, DDPMScheduler) if cls == "ddpm" else (FastDDIMScheduler, DDIMScheduler)
    ours = Ours(timestep_spacing=spacing, steps_offset=offset)
    theirs = Theirs(timestep_spacing=spacing, steps_offset=offset)
    assert torch.equal(ours.timesteps, theirs.timesteps)  # before set_timesteps: T-1 .. 0
    for n in (1, 7, 50, 333, 999, 1000):
        if spacing == "leading" and offset and n == 1000:
            continue  # diffusers would schedule t = 1000 (out of range); ours refuses, see below
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, theirs.timesteps), (n, spacing, offset)
        assert len(ours) == len(theirs) == 1000
    if spacing == "trailing":
        # A deliberate difference: diffusers' trailing gives N + 1 timesteps ending in -1 for (1000, 61).
        ours.set_timesteps(61)
        theirs.set_timesteps(61)
        assert torch.equal(ours.timesteps, theirs.timesteps[:61]) and theirs.timesteps[61:].tolist() == [-1]


def test_ddpm_custom_timesteps_and_previous_timestep():
    ours, theirs = FastDDPMScheduler(), DDPMScheduler()
    ours.set_timesteps(timesteps=[900, 500, 37, 3])
    theirs.set_timesteps(timesteps=[900, 500, 37, 3])
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for t in [900, 500, 37, 3]:
        a, b = ours.previous_timestep(t), theirs.previous_timestep(t)  # a 0-d tensor for an int, as diffusers'
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype and int(a) == int(b)
    assert torch.equal(ours.previous_timestep(torch.tensor([900, 3])), torch.tensor([500, -1]))
    fresh, fresh_theirs = FastDDPMScheduler(), DDPMScheduler()  # before set_timesteps: t - 1, an int for an int
    assert fresh.previous_timestep(500) == fresh_theirs.previous_timestep(500) == 499
    assert type(fresh.previous_timestep(500)) is type(fresh_theirs.previous_timestep(500))
    ddim = FastDDIMScheduler()
    ddim.set_timesteps(50)
    assert ddim.previous_timestep(980) == 960
    # set_timesteps(device=...) puts timesteps there, and previous_timestep's 0-d tensor with them ("meta": a
    # device every torch build has); the steps still follow them
    for sched in (ours, ddim):
        sched.set_timesteps(10, device="meta")
        assert sched.timesteps.device.type == "meta" and sched.timesteps.shape == (10,)
        assert sched.step_table().timesteps.tolist() == list(range(900, -1, -100))
    assert ours.previous_timestep(900).device.type == "meta" and ddim.previous_timestep(900) == 800


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_assigned_timesteps_are_stepped_as_diffusers_steps_them(kind):
    """`scheduler.timesteps = ...` after set_timesteps: DDPM steps along the assigned sequence (diffusers'
    previous_timestep walks it); DDIM keeps stepping T // num_inference_steps, which may be assigned too. A
    suffix slice included."""
    Ours, Theirs, module = ((FastDDPMScheduler, DDPMScheduler, scheduling_ddpm) if kind == "ddpm" else
                            (FastDDIMScheduler, DDIMScheduler, scheduling_ddim))
    kwargs = dict(eta=0.5) if kind == "ddim" else {}
    config = dict(variance_type="fixed_large") if kind == "ddpm" else {}
    ours, theirs = Ours(**config), Theirs(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    for assigned in (torch.tensor([900, 500, 100]), ours.timesteps[4:], ours.timesteps[10:]):  # [10:]: empty
        ours.timesteps, theirs.timesteps = assigned, assigned.clone()
        assert ours.timesteps is assigned
        twin = _twin(theirs, ours)
        for i, t in enumerate(assigned[:2].tolist()):
            if kind == "ddpm":
                assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
            x, m = _inputs("epsilon", "fixed_small", seed=20 + i)
            _compare_step(ours, theirs, twin, module, t, x, m, f"{kind} assigned {assigned.tolist()}", **kwargs)
    if kind == "ddim":
        # An assigned num_inference_steps sets the step size T // N, as in diffusers (img2img code assigns it).
        N = int(torch.randint(2, 40, ()))
        ours.num_inference_steps = theirs.num_inference_steps = N
        twin = _twin(theirs, ours)
        assert ours.previous_timestep(500) == 500 - 1000 // N  # (diffusers' DDIM has no previous_timestep)
        x, m = _inputs("epsilon", "fixed_small", seed=30)
        _compare_step(ours, theirs, twin, module, 500, x, m, f"ddim num_inference_steps={N}", **kwargs)
    if kind == "ddpm":
        # Assigned before set_timesteps: diffusers steps t -> t - 1; then set to the same sequence: walks it.
        fresh, fresh_theirs = Ours(), Theirs()
        fresh.timesteps = fresh_theirs.timesteps = torch.tensor([900, 500, 100])
        assert fresh.previous_timestep(900) == fresh_theirs.previous_timestep(900) == 899
        fresh.set_timesteps(timesteps=[900, 500, 100])
        fresh_theirs.set_timesteps(timesteps=[900, 500, 100])
        assert int(fresh.previous_timestep(900)) == int(fresh_theirs.previous_timestep(900)) == 500


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_schedule_tensors_take_only_their_own_values(kind):
    """`sched.alphas_cumprod = sched.alphas_cumprod.to(...)` (diffusers' own add_noise does it) is taken; other
    values, which our float64 schedule would silently ignore, are refused with the way to get them."""
    sched = FastDDPMScheduler(beta_schedule="squaredcos_cap_v2") if kind == "ddpm" else FastDDIMScheduler(
        set_alpha_to_one=False)
    names = ["betas", "alphas", "alphas_cumprod"] + (["final_alpha_cumprod"] if kind == "ddim" else [])
    for name in names:
        value = getattr(sched, name)
        assert value.dtype == getattr(DDPMScheduler() if kind == "ddpm" else DDIMScheduler(), name).dtype
        as_float64 = value.double()
        setattr(sched, name, as_float64)
        assert getattr(sched, name) is as_float64
        setattr(sched, name, value)
        changed = value * (1 - 1e-3 * (1 + torch.rand(value.shape)))  # off by 0.1% to 0.2%
        with pytest.raises(ValueError, match=f"{name} can only be re-assigned its own values.*"
                                             f"(trained_betas|set_alpha_to_one)"):
            setattr(sched, name, changed)
        with pytest.raises(ValueError, match=f"{name} can only be re-assigned its own values"):
            setattr(sched, name, value.half())  # float16 does not hold the float32 values
        assert getattr(sched, name) is value
    with pytest.raises(ValueError, match="alphas_cumprod must keep shape"):
        sched.alphas_cumprod = sched.alphas_cumprod[1:]


def test_step_output_is_an_ordered_dict_like_diffusers():
    ours, theirs = FastDDPMScheduler(), DDPMScheduler()
    x, m = _inputs("epsilon", "fixed_small", seed=6)
    out, ref = ours.step(m, 500, x, generator=_gen(1)), theirs.step(m, 500, x, generator=_gen(1))
    assert isinstance(out, OrderedDict) and isinstance(ref, OrderedDict)
    assert list(out) == list(out.keys()) == list(ref) == ["prev_sample", "pred_original_sample"]
    assert len(out) == len(ref) == 2
    assert list(out.values()) == [v for _, v in out.items()] == list(out.to_tuple())
    assert out[0] is out["prev_sample"] is out.prev_sample and out[-1] is out.pred_original_sample
    assert out[:1] == (out.prev_sample,)
    prev, x0 = out.to_tuple()
    replaced = out.prev_sample + 1
    out.prev_sample = replaced  # attribute and item stay one, as diffusers'
    assert out["prev_sample"] is replaced
    for copied in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert type(copied) is FastSchedulerOutput and list(copied) == list(out)
        assert torch.equal(copied.prev_sample, replaced) and torch.equal(copied.pred_original_sample, x0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_unused_kwargs_and_hub_keywords_as_diffusers(kind, tmp_path):
    """from_config / from_pretrained(return_unused_kwargs=True) return what diffusers returns unused: extra
    keywords, other schedulers' fields, `_class_name` naming the class; the Hub keywords are taken locally."""
    Ours, Theirs = (FastDDPMScheduler, DDPMScheduler) if kind == "ddpm" else (FastDDIMScheduler, DDIMScheduler)
    other = DDIMScheduler if kind == "ddpm" else DDPMScheduler

    def as_ours(unused):  # diffusers names the class it built in `_class_name`
        return {k: Ours.__name__ if k == "_class_name" else v for k, v in unused.items()}

    other(prediction_type="v_prediction", **({"variance_type": "fixed_large"} if kind == "ddim" else
                                             {"set_alpha_to_one": False})).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    for config in (saved, other(steps_offset=1).config, Theirs().config):
        ours, unused = Ours.from_config(config, return_unused_kwargs=True, clip_sample=False, foo=1)
        theirs, unused_theirs = Theirs.from_config(config, return_unused_kwargs=True, clip_sample=False, foo=1)
        assert unused == as_ours(unused_theirs) and "foo" in unused
        assert dict(ours.config) == _fields(theirs.config, Ours) and not ours.config.clip_sample
    hub = dict(cache_dir=tmp_path / "cache", force_download=False, proxies=None, token=None, revision="main",
               local_files_only=True)
    ours, unused = Ours.from_pretrained(tmp_path, return_unused_kwargs=True, **hub)
    theirs, unused_theirs = Theirs.from_pretrained(tmp_path, return_unused_kwargs=True, **hub)
    assert unused == as_ours(unused_theirs) and unused["_class_name"] == Ours.__name__
    assert dict(ours.config) == _fields(theirs.config, Ours)
    assert dict(Ours.from_pretrained(tmp_path, local_files_only=True).config) == dict(ours.config)
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        Ours.from_pretrained(tmp_path / "missing", local_files_only=True)


def test_config_fields_as_attributes_warn_and_answer_as_diffusers():
    """diffusers' deprecated `scheduler.num_train_timesteps`: a FutureWarning, then the config's value."""
    ours, theirs = FastDDPMScheduler(num_train_timesteps=500), DDPMScheduler(num_train_timesteps=500)
    for name in ("num_train_timesteps", "prediction_type", "timestep_spacing"):
        with pytest.warns(FutureWarning) as ours_warned:
            a = getattr(ours, name)
        with pytest.warns(FutureWarning) as theirs_warned:
            b = getattr(theirs, name)
        assert a == b == theirs.config[name]
        assert [str(w.message) for w in ours_warned] == [
            str(w.message).replace(type(theirs).__name__, type(ours).__name__) for w in theirs_warned]
        assert [w.filename for w in ours_warned] == [__file__]  # the line that read it, not ours
    assert ours.variance_type == theirs.variance_type  # an attribute of both: no warning (warnings are errors)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ours.nope
    assert not hasattr(ours, "nope")


OVERRIDES = dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)


@pytest.mark.parametrize("cls", ["ddpm", "ddim"])
def test_from_config_round_trip(cls):
    Ours, Theirs = (FastDDPMScheduler, DDPMScheduler) if cls == "ddpm" else (FastDDIMScheduler, DDIMScheduler)
    extra = dict(variance_type="fixed_large") if cls == "ddpm" else dict(set_alpha_to_one=False)
    theirs = Theirs(**OVERRIDES, **extra)
    ours = Ours.from_config(theirs.config)  # _class_name, _use_default_values ... are ignored
    assert isinstance(ours.config, SchedulerConfig)
    assert dict(ours.config) == _fields(theirs.config, Ours)
    assert ours.config.num_train_timesteps == 1000 and ours.config.prediction_type == "v_prediction"
    back = Theirs.from_config(ours.config)  # diffusers accepts ours too
    assert _fields(back.config, Ours) == dict(ours.config)
    # Same float32 tensors a user would read, up to diffusers' float32 cumprod drift.
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # overrides, from a scheduler object, and across scheduler kinds (DDPM's variance_type is ignored)
    assert Ours.from_config(theirs, steps_offset=1).config.steps_offset == 1
    other = FastDDIMScheduler if cls == "ddpm" else FastDDPMScheduler
    assert other.from_config(ours.config).config.prediction_type == "v_prediction"
    # A field the loaded file lacked holds the loading class's default: this class's default comes instead.
    loaded = {**theirs.config, "clip_sample": False, "steps_offset": 1, "_use_default_values": ["clip_sample"]}
    assert Ours.from_config(loaded).config.clip_sample is Theirs.from_config(loaded).config.clip_sample is True
    assert Ours.from_config(loaded).config.steps_offset == Theirs.from_config(loaded).config.steps_offset == 1
    with pytest.raises(TypeError, match="unknown field.*'clip_smaple'"):
        Ours.from_config(theirs.config, clip_smaple=False)
    with pytest.raises(TypeError, match="config must be a mapping"):
        Ours.from_config(42)


def test_config_is_read_only_and_copyable():
    sched = FastDDPMScheduler(trained_betas=np.linspace(1e-4, 0.02, 1000))
    assert isinstance(sched.config.trained_betas, list)
    betas = torch.rand(1000, dtype=torch.float64) * 0.02 + 1e-4  # a tensor is stored as diffusers' JSON list too
    assert FastDDPMScheduler(trained_betas=betas).config.trained_betas == betas.tolist()
    before = dict(sched.config)
    for change in (lambda c: c.update(clip_sample=False), lambda c: c.setdefault("x", 1), lambda c: c.pop("beta_end"),
                   lambda c: c.popitem(), lambda c: c.clear(), lambda c: c.__delitem__("beta_end"),
                   lambda c: delattr(c, "beta_end"), lambda c: c.__ior__({"clip_sample": False})):  # c |= ...
        with pytest.raises(TypeError, match="read-only"):
            change(sched.config)
    assert dict(sched.config) == before
    with pytest.raises(TypeError, match="read-only"):
        sched.config.num_train_timesteps = 10
    with pytest.raises(TypeError, match="read-only"):
        sched.config["prediction_type"] = "sample"
    with pytest.raises(AttributeError, match="no field 'nope'"):
        sched.config.nope
    assert copy.deepcopy(sched.config) == sched.config
    assert copy.deepcopy(sched).config == sched.config


@pytest.mark.parametrize("cls", ["ddpm", "ddim"])
def test_save_pretrained_from_pretrained_round_trip(cls, tmp_path):
    Ours, Theirs = (FastDDPMScheduler, DDPMScheduler) if cls == "ddpm" else (FastDDIMScheduler, DDIMScheduler)
    # numpy integers (e.g. read from an .npz) are written as JSON numbers
    ours = Ours(**OVERRIDES, trained_betas=[0.01] * 1000, num_train_timesteps=np.int64(1000), steps_offset=np.int32(1))
    file = ours.save_pretrained(tmp_path / "scheduler", push_to_hub=False)  # diffusers' signature
    assert file == tmp_path / "scheduler" / "scheduler_config.json"
    assert json.loads(file.read_text())["_class_name"] == Ours.__name__  # what Sampler.from_scheduler reads
    assert dict(Ours.from_pretrained(ours.save_pretrained(tmp_path / "a" / "b").parent).config) == dict(ours.config)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        ours.save_pretrained(file)
    with pytest.raises(NotImplementedError, match="push_to_hub is not supported"):
        ours.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert dict(Ours.from_pretrained(tmp_path, subfolder="scheduler").config) == dict(ours.config)
    by_name = Ours.from_pretrained(pretrained_model_name_or_path=tmp_path, subfolder="scheduler")  # diffusers' name
    assert dict(by_name.config) == dict(ours.config)
    # diffusers reads what we write, and we read what diffusers writes
    theirs = Theirs.from_pretrained(tmp_path / "scheduler")
    assert _fields(theirs.config, Ours) == dict(ours.config)
    theirs.save_pretrained(tmp_path / "theirs")
    assert dict(Ours.from_pretrained(tmp_path / "theirs").config) == dict(ours.config)
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        Ours.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        Ours.from_pretrained("google/ddpm-cifar10-32")  # a Hub id is not downloaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        Ours.from_pretrained(tmp_path / "empty")
    for text, match in (("{", "scheduler_config.json' is not valid JSON"), ("[1]", "must hold a JSON object")):
        (tmp_path / "empty" / "scheduler_config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            Ours.from_pretrained(tmp_path / "empty")


def test_a_failed_save_pretrained_keeps_the_previous_config(tmp_path):
    """save_pretrained replaces scheduler_config.json atomically: a write that fails part way (here at the file
    size limit, as on a full disk) leaves the config saved before whole, and no temporary file."""
    resource = pytest.importorskip("resource")
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ")
    FastDDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path)
    before = (tmp_path / "scheduler_config.json").read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        with pytest.raises(OSError):
            FastDDIMScheduler().save_pretrained(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / "scheduler_config.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scheduler_config.json"]


def test_pipeline_facing_attributes():
    sched = FastDDPMScheduler()
    x = torch.randn(SHAPE)
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == 1000
    assert sched.scale_model_input(x, 5) is x
    sched.set_timesteps(10)
    assert sched.num_inference_steps == 10 and sched.timesteps.tolist() == list(range(900, -1, -100))
    # One table per timestep sequence, reused across steps and across pipeline calls (set_timesteps again).
    table = sched.step_table()
    sched.step(torch.randn(SHAPE), 900, x, generator=_gen(0))
    sched.set_timesteps(10)
    assert sched.step_table() is table and table.timesteps.tolist() == sched.timesteps.tolist()
    ddim = FastDDIMScheduler()
    ddim.set_timesteps(10)
    assert ddim.step_table(eta=0.5) is ddim.step_table(eta=0.5) is not ddim.step_table(eta=0.0)
    clipped, fresh = ddim.step_table(eta=0.5, use_clipped_model_output=True), FastDDIMScheduler()
    fresh.set_timesteps(10)
    assert clipped is not ddim.step_table(eta=0.5)
    assert torch.equal(clipped.coef, fresh.step_table(eta=0.5, use_clipped_model_output=True).coef)
    # What a UI offers to swap in: diffusers' list, and ours, each buildable from this config.
    for ours in (sched, ddim):
        assert set(ours.compatibles) == set(DDPMScheduler().compatibles) | {FastDDPMScheduler,
                                                                              FastDDIMScheduler}
    FastDDIMScheduler.from_config(sched.config)


# ------------------------------------------------------------------------------------------------
# pipelines: swap the scheduler, get the same images
# ------------------------------------------------------------------------------------------------


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_swap_gives_diffusers_images(kind):
    """Same images as the same pipeline with diffusers' scheduler, within the derived tolerance.

    truth: the same pipeline in float64 (UNet and diffusers' scheduler twin) fed the same float32 noise.
    The float32 UNet's rounding is in both ours and theirs, so 2x theirs covers it.
    """
    unet = _tiny_unet()
    if kind == "ddpm":
        Pipe, Theirs, Ours, modules = DDPMPipeline, DDPMScheduler, FastDDPMScheduler, (pipeline_ddpm, scheduling_ddpm)
    else:
        Pipe, Theirs, Ours, modules = DDIMPipeline, DDIMScheduler, FastDDIMScheduler, (pipeline_ddim, scheduling_ddim)
    theirs = Theirs()
    run = dict(batch_size=2, num_inference_steps=5, output_type="np")

    pipe_theirs = Pipe(unet=unet, scheduler=theirs)
    pipe_theirs.set_progress_bar_config(disable=True)
    images_theirs = pipe_theirs(generator=_gen(0), **run).images

    pipe_ours = Pipe(unet=unet, scheduler=Ours.from_config(theirs.config))
    pipe_ours.scheduler = Ours.from_config(theirs.config)  # DDIMPipeline re-creates a DDIMScheduler in __init__
    assert isinstance(pipe_ours.scheduler, Ours)
    pipe_ours.set_progress_bar_config(disable=True)
    images_ours = pipe_ours(generator=_gen(0), **run).images

    pipe_truth = Pipe(unet=copy.deepcopy(unet).double(), scheduler=theirs)
    pipe_truth.scheduler = _twin(theirs, pipe_ours.scheduler)
    pipe_truth.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as mp:
        for module in modules:
            mp.setattr(module, "randn_tensor", _float32_draws)
        images_truth = pipe_truth(generator=_gen(0), **run).images

    assert images_ours.shape == images_theirs.shape == (2, 8, 8, 3)
    assert images_truth.dtype == np.float64
    assert_matches_reference(torch.from_numpy(images_ours), torch.from_numpy(images_theirs),
                             torch.from_numpy(images_truth), dtype=torch.float32, what=f"{kind} pipeline images")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_loads_saves_and_reloads_our_scheduler(kind, tmp_path):
    """The diffusers ways to put a scheduler into a saved pipeline and keep it there: `from_pretrained(path,
    scheduler=ours)` (diffusers checks that it is a SchedulerMixin) and `save_pretrained`, whose directory
    names our class and loads back with our scheduler and its config, giving the same images for the same
    generator. (DDIMPipeline turns any scheduler into a DDIMScheduler of its config when it is built.)"""
    Pipe, Theirs, Ours = ((DDPMPipeline, DDPMScheduler, FastDDPMScheduler) if kind == "ddpm" else
                          (DDIMPipeline, DDIMScheduler, FastDDIMScheduler))
    Pipe(unet=_tiny_unet(), scheduler=Theirs()).save_pretrained(tmp_path / "theirs")
    ours = Ours(clip_sample=False, beta_schedule="squaredcos_cap_v2")
    pipe = Pipe.from_pretrained(tmp_path / "theirs", scheduler=ours)
    pipe.scheduler = ours
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["scheduler"] == ["ddpm_fast.diffusers_compat", Ours.__name__]
    again = Pipe.from_pretrained(tmp_path / "ours")
    assert type(again.scheduler) is (Ours if kind == "ddpm" else Theirs)
    assert _fields(again.scheduler.config, Ours) == dict(ours.config)
    again.scheduler = Ours.from_config(again.scheduler.config)
    run = dict(batch_size=2, num_inference_steps=4, output_type="np")
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(again(generator=_gen(5), **run).images, pipe(generator=_gen(5), **run).images)


def test_schedulers_import_diffusers_only_when_used_and_stand_alone_without_it():
    """`import ddpm_fast` does not import diffusers (~3 s); the schedulers do, for its SchedulerMixin; where
    diffusers cannot be imported they work without that base."""
    script = """
import sys
import torch
import ddpm_fast
assert "diffusers" not in sys.modules
if sys.argv[1] == "blocked":
    sys.modules["diffusers"] = None  # what an absent package gives: ImportError
from ddpm_fast import FastDDPMScheduler
bases = [c.__name__ for c in FastDDPMScheduler.__mro__]
assert ("SchedulerMixin" in bases) == (sys.argv[1] == "installed"), bases
sched = FastDDPMScheduler()
sched.set_timesteps(3)
x = torch.randn(1, 3, 4, 4)
assert sched.step(torch.randn_like(x), 666, x, generator=torch.Generator().manual_seed(0)).prev_sample.isfinite().all()
theirs = 0 if sys.argv[1] == "blocked" else len(__import__("diffusers").DDPMScheduler._get_compatibles())
assert len(sched.compatibles) == 2 + theirs and FastDDPMScheduler in sched.compatibles, sched.compatibles
"""
    for case in ("installed", "blocked"):
        result = subprocess.run([sys.executable, "-c", script, case], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{case}: {result.stderr[-2000:]}"


# ------------------------------------------------------------------------------------------------
# bad input: errors name the argument
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(variance_type="learned"), ValueError, "variance_type='learned' is not supported"),
    (dict(variance_type="fixed_large_log"), ValueError, "variance_type='fixed_large_log' is not supported"),
    (dict(variance_type="nope"), ValueError, "variance_type must be one of"),
    (dict(timestep_spacing="even"), ValueError, "timestep_spacing must be one of"),
    (dict(beta_schedule="laplacian"), ValueError, "beta_schedule must be one of"),
    (dict(num_train_timesteps=0), ValueError, r"num_train_timesteps must be in \[1, inf\]"),
    (dict(clip_sample="yes"), TypeError, "clip_sample must be a bool"),
    (dict(clip_sample_range=0.0), ValueError, "clip_sample_range must be > 0 when clip_sample=True"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), ValueError,
     r"dynamic_thresholding_ratio must be in \(0, 1\]"),
    (dict(thresholding=True, sample_max_value=0.5), ValueError, "sample_max_value must be >= 1"),
    (dict(trained_betas=[0.1] * 10), ValueError, "trained_betas must have num_train_timesteps=1000 values"),
    (dict(steps_offset=-1), ValueError, "steps_offset must be in"),
    (dict(clip_sample_range=1e-40), ValueError, "clip_sample_range must be at least"),  # float32 reads it as 0
    (dict(thresholding=True, dynamic_thresholding_ratio=1e-40), ValueError, "dynamic_thresholding_ratio must be at"),
    # diffusers takes any truthy value for a bool field and any number-like for a float one; we name the field
    (dict(clip_sample=1), TypeError, "clip_sample must be a bool, got int 1"),
    (dict(rescale_betas_zero_snr="yes"), TypeError, "rescale_betas_zero_snr must be a bool"),
    (dict(set_alpha_to_one=0), TypeError, "set_alpha_to_one must be a bool, got int 0"),  # DDIM's
    (dict(beta_start=True), TypeError, "beta_start must be a number, got bool"),
    (dict(sample_max_value="4"), TypeError, "sample_max_value must be a number, got str"),
    (dict(dynamic_thresholding_ratio=float("nan")), ValueError, "dynamic_thresholding_ratio must be finite"),
])
def test_bad_config_names_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        (FastDDIMScheduler if "set_alpha_to_one" in kwargs else FastDDPMScheduler)(**kwargs)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_config_edges_that_diffusers_takes_step_as_there(kind):
    """Values at the edges of what the checks allow, which diffusers takes: a clip range of 0 (or one float32
    reads as 0) while clip_sample is off, thresholding with ratio 1 and sample_max_value 1 (x0 clamped to
    [-1, 1]), a thresholding ratio float32 cannot hold while thresholding is off. Each steps as diffusers'."""
    Ours, Theirs, module = ((FastDDPMScheduler, DDPMScheduler, scheduling_ddpm) if kind == "ddpm" else
                            (FastDDIMScheduler, DDIMScheduler, scheduling_ddim))
    kwargs = dict(eta=1.0) if kind == "ddim" else {}
    for config in (dict(clip_sample=False, clip_sample_range=0.0), dict(clip_sample=False, clip_sample_range=1e-40),
                   dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=1.0),
                   dict(dynamic_thresholding_ratio=1e-40)):
        ours, theirs = Ours(**config), Theirs(**config)
        ours.set_timesteps(20)
        theirs.set_timesteps(20)
        t = int(ours.timesteps[torch.randint(0, 19, ()).item()])
        x, m = _inputs("epsilon", "fixed_small", seed=int(torch.randint(0, 2**31, ())))
        # x * 3: the x0 of most samples leaves [-1, 1], so a clamp that should not act (or should) shows
        _compare_step(ours, theirs, _twin(theirs, ours), module, t, x * 3, m, f"{kind} {config}", **kwargs)


def test_bad_step_input_names_the_argument():
    ddpm, ddim = FastDDPMScheduler(), FastDDIMScheduler()
    x, m = _inputs("epsilon", "fixed_small", seed=0)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 999\], got 1000"):
        ddpm.step(m, 1000, x)
    with pytest.raises(TypeError, match="timestep must hold integers"):
        ddpm.step(m, torch.tensor(5.0), x)
    with pytest.raises(ValueError, match=r"timestep must be an int or have shape \(\), \(1,\) or \(3,\)"):
        ddpm.step(m, torch.tensor([1, 2]), x)
    with pytest.raises(ValueError, match=r"timestep must be .* got shape \(3, 1\)"):
        ddpm.step(m, torch.tensor([[1], [2], [3]]), x)  # diffusers' step does not take (B, 1) either
    with pytest.raises(ValueError, match="timestep must lie in"):
        ddpm.step(m, torch.tensor([1, 2, -1]), x)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 999\] .*got min 1, max 1000"):
        ddpm.step(m, torch.tensor([1, 2, 1000]), x)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 999\], got 1000"):
        ddpm.step(m, torch.tensor(1000), x)  # a 0-d tensor is checked as the int
    with pytest.raises(TypeError, match="timestep must hold integers, got dtype torch.bool"):
        ddpm.step(m, torch.tensor([True, False, True]), x)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got ndarray"):
        ddpm.step(m, 5, x.numpy())
    with pytest.raises(ValueError, match=r"sample must have shape \(B, ...\), got \(\)"):
        ddpm.step(m[0, 0, 0, 0], 5, x[0, 0, 0, 0])
    with pytest.raises(TypeError, match="original_samples must be a tensor of shape \\(B, ...\\), got \\(\\)"):
        ddpm.add_noise(x[0, 0, 0, 0], m[0, 0, 0, 0], 5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or a list of them, got int"):
        ddpm.step(m, 5, x, generator=5)
    with pytest.raises(ValueError, match=r"a list of generators needs one per sample \(3\), got 2"):
        ddpm.step(m, 5, x, generator=[_gen(0), _gen(1)])
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        ddpm.step(m.numpy(), 5, x)
    with pytest.raises(ValueError, match="model_output must have shape"):
        ddpm.step(m[:, :2], 5, x)
    with pytest.raises(ValueError, match="call set_timesteps"):
        ddim.step(m, 5, x)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="at most one of generator and variance_noise"):
        ddim.step(m, 500, x, eta=1.0, generator=_gen(0), variance_noise=torch.randn(SHAPE))
    with pytest.raises(ValueError,
                       match=r"variance_noise must have sample.s shape \(3, 5, 7, 9\) or broadcast.*got \(3, 5\)"):
        ddim.step(m, 500, x, eta=1.0, variance_noise=torch.randn(3, 5))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim.step(m, 500, x, eta=-0.1)
    with pytest.raises(TypeError, match="model_output must have sample's dtype torch.float64, got torch.int64"):
        ddim.step(m.long(), 500, x.double())  # the kernels' rule for float32, kept by the float64 reference
    with pytest.raises(TypeError, match="use_clipped_model_output must be a bool, got int 1"):
        ddim.step(m, 500, x, use_clipped_model_output=1)  # None (DDIMPipeline's default) is False, as in diffusers
    with pytest.raises(TypeError, match=r"variance_noise must be a tensor of sample's shape \(3, 5, 7, 9\), got nd"):
        ddim.step(m, 500, x, eta=1.0, variance_noise=torch.randn(SHAPE).numpy())
    with pytest.raises(ValueError, match=r"variance_noise must have sample's shape \(1, 5, 7, 9\) or broadcast to"
                                         r" it, got \(3, 5, 7, 9\)"):  # it broadcasts with it, to a larger batch
        ddim.step(m[:1], 500, x[:1], eta=1.0, variance_noise=torch.randn(SHAPE))
    with pytest.raises(ValueError, match="eta must be finite, got inf"):
        ddim.step(m, 500, x, eta=float("inf"))
    with pytest.raises(TypeError, match="eta must be a number, got str"):
        ddim.step(m, 500, x, eta="0.5")
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], got 1001"):
        ddim.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly descending"):
        ddpm.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="timesteps must be strictly descending"):
        ddpm.timesteps = torch.tensor([100, 500])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        ddim.timesteps = torch.tensor([1000, 500])
    with pytest.raises(TypeError, match="timesteps must hold integers"):
        ddpm.timesteps = torch.tensor([900.0, 500.0])
    with pytest.raises(ValueError, match="one of num_inference_steps and timesteps"):
        ddpm.set_timesteps(10, timesteps=[10, 5])
    with pytest.raises(ValueError, match="timesteps must have shape|timesteps must be an int"):
        ddpm.add_noise(x, torch.randn(SHAPE), torch.tensor([1, 2]))
