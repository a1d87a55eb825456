"""ddpm_fast.reference against diffusers' schedulers, float64 evaluations and hand-computed values.

How the step tolerances are derived (flash-attention's rule, STYLE.md principle 4):

* truth = diffusers' own step code run in float64 on our float64 alphas_cumprod (same formulas,
  negligible rounding);
* theirs = stock diffusers in float32 (its float32 alphas_cumprod included: that is what users get);
* ours = reference.step in float32 from the float64 table.

We require  max|ours - truth| <= 2 * max|theirs - truth| + floor  and, because our coefficients carry a
single rounding each, also  max|ours - truth| <= floor,  where floor is the rounding budget of our own
float32 evaluation: 8 eps32 per unit of the sum of |terms| of each formula (a coefficient rounding,
a product and a sum per term, doubled for headroom), see `_floors`.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from _fuzz import run_cases, storage_variant
import ddpm_fast
from ddpm_fast.reference import (
    INITIAL_NOISE_STREAM,
    STEP_STREAM_BASE,
    _row_quantile,
    group_norm_silu,
    l_simple_loss,
    philox_normal,
    q_sample,
    step,
    training_target,
)
from ddpm_fast.schedule import NoiseSchedule, ddim_table, ddpm_table, sampling_timesteps

EPS32 = torch.finfo(torch.float32).eps
SHAPE = (3, 5, 7, 9)  # odd H, W and C not a multiple of 8, on purpose
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
# Thresholding settings that make s land strictly inside (1, sample_max_value) for most samples,
# so the quantile really matters (with diffusers' defaults 0.995 / 1.0 it degenerates to clip at 1).
RATIO, MAX_VALUE = 0.95, 4.0
CLIPS = [None, 1.0, 1.5, "threshold"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype) * scale


def _uniform(shape, seed, lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=_gen(seed)) * (hi - lo) + lo


def _clip_kwargs(clip):
    """Our step's keyword arguments for one clipping mode."""
    if clip == "threshold":
        return dict(thresholding=True, dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE)
    return dict(clip_range=clip)


def _diffusers_clip_config(clip):
    return dict(clip_sample=isinstance(clip, float), clip_sample_range=clip if isinstance(clip, float) else 1.0,
                thresholding=clip == "threshold", dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE)


def _float64_twin(theirs, schedule, set_alpha_to_one=True):
    """diffusers' scheduler evaluating its own formulas in float64 on our float64 alphas_cumprod."""
    twin = copy.deepcopy(theirs)
    twin.alphas_cumprod = schedule.alphas_cumprod.clone()
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(twin, "final_alpha_cumprod"):
        twin.final_alpha_cumprod = twin.one if set_alpha_to_one else twin.alphas_cumprod[0]
    return twin


def _floors(table, t, x, m, v, z, x0c):
    """Rounding budgets of our float32 step: (floor for prev_sample, floor for pred_original_sample).

    t: (B,) int64; x, m, z, x0c: (B, C, ...) float64; v: the variance channels or None.
    """
    cols = table.coef[t].reshape(t.numel(), 8, *([1] * (x.dim() - 1)))
    ax, am, p0, p1, p2, std, lo, hi = cols.unbind(1)
    floor_x0 = 8 * EPS32 * ((ax * x).abs() + (am * m).abs()).max()
    # Thresholding divides by s >= 1 that was computed from x0 itself: <= 2x x0's error (|x0c| <= 1).
    floor_x0c = 2 * floor_x0
    noise = (std * z).abs()
    if v is not None:
        f = (v + 1) / 2
        y = 0.5 * (f * hi + (1 - f) * lo)
        # exp(y) in float32: relative error ~ eps32 * (1 + |terms of y|) from rounding y's terms.
        noise = noise * y.exp() * (1 + 0.5 * ((f * hi).abs() + ((1 - f) * lo).abs()))
    terms = (p0 * x0c).abs() + (p1 * x).abs() + (p2 * m).abs() + noise
    return 8 * EPS32 * terms.max() + p0.abs().max() * floor_x0c, floor_x0c


def _assert_accuracy(ours, theirs, truth, floor, what, theirs_may_be_nan=False):
    err_ours = (ours.double() - truth).abs().max().item()
    err_theirs = (theirs.double() - truth).abs().max().item()
    floor = float(floor)
    if theirs_may_be_nan and math.isnan(err_theirs):
        err_theirs = math.inf  # only the rounding budget below is meaningful then
    assert err_ours <= 2 * err_theirs + floor, (
        f"{what}: ours {err_ours:.3e}, diffusers {err_theirs:.3e}, floor {floor:.3e}")
    assert err_ours <= floor, f"{what}: ours {err_ours:.3e} exceeds its float32 rounding budget {floor:.3e}"


def _step_inputs(table, shape, seed):
    """x, m (2C channels for learned_range), z: fresh float32 draws; sample predictions overshoot 1."""
    m_scale = 1.6 if table.prediction_type == "sample" else 1.0  # so that clipping bites
    x = _randn(shape, seed)
    m = _randn(shape, seed + 1, scale=m_scale)
    if table.variance_type == "learned_range":
        m = torch.cat([m, _uniform(shape, seed + 2)], dim=1)
    z = _randn(shape, seed + 3)
    return x, m, z


def _check_against_diffusers(table, theirs, twin, t, x, m, z, clip, diffusers_step, what, theirs_may_be_nan=False):
    """Ours vs stock diffusers vs the float64 twin for one sample batch at scalar t."""
    C = x.shape[1]
    tt = torch.full((x.shape[0],), t, dtype=torch.int64)
    prev, x0c = step(m, t, x, table, noise=z, **_clip_kwargs(clip))
    assert prev.dtype == x0c.dtype == torch.float32 and prev.shape == x0c.shape == x.shape
    theirs_prev, theirs_x0 = diffusers_step(theirs, m, t, x, z, torch.float32)
    truth_prev, truth_x0 = diffusers_step(twin, m.double(), t, x.double(), z.double(), torch.float64)
    v = m[:, C:].double() if table.variance_type == "learned_range" else None
    floor_prev, floor_x0 = _floors(table, tt, x.double(), m[:, :C].double(), v, z.double(), truth_x0)
    _assert_accuracy(x0c, theirs_x0, truth_x0, floor_x0, f"{what} x0 t={t}")
    _assert_accuracy(prev, theirs_prev, truth_prev, floor_prev, f"{what} prev t={t}", theirs_may_be_nan)


def _ddpm_step(scheduler, m, t, x, z, dtype):
    """diffusers' DDPMScheduler.step with our noise z.

    DDPMScheduler.step draws its noise itself with randn_tensor(shape, generator, dtype=model dtype).
    In float32 we hand it a generator seeded so that randn reproduces z (asserted); the float64 twin
    would draw different numbers from the same seed, so there we monkeypatch randn_tensor to return z.
    """
    if dtype == torch.float32:
        seed = 1234
        assert torch.equal(z, torch.randn(z.shape, generator=_gen(seed))), "z must be drawn with the seed"
        out = scheduler.step(m, t, x, generator=_gen(seed))
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scheduling_ddpm, "randn_tensor",
                       lambda shape, generator=None, device=None, dtype=None, **kw: z.to(dtype))
            out = scheduler.step(m, t, x)
    return out.prev_sample, out.pred_original_sample


def _ddim_step_fn(eta, use_clipped):
    def run(scheduler, m, t, x, z, dtype):
        noise = z if eta > 0 else None  # DDIMScheduler.step takes the noise directly
        out = scheduler.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise)
        return out.prev_sample, out.pred_original_sample
    return run


# ------------------------------------------------------------------------------------------------
# DDPM step
# ------------------------------------------------------------------------------------------------

# (num_inference_steps, timesteps to test): the full chain, and 50 leading steps (prev = t - 20, -1 at 0).
DDPM_CHAINS = [(None, [999, 500, 1, 0]), (50, [980, 500, 20, 0])]


@pytest.mark.parametrize("clip", CLIPS, ids=["noclip", "clip1", "clip1.5", "threshold"])
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("chain", DDPM_CHAINS, ids=["full", "n50"])
def test_ddpm_step_matches_diffusers(chain, prediction_type, variance_type, clip):
    num_steps, ts = chain
    schedule = NoiseSchedule()
    theirs = DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type, **_diffusers_clip_config(clip))
    if num_steps is not None:
        theirs.set_timesteps(num_steps)
    twin = _float64_twin(theirs, schedule)
    table = ddpm_table(schedule, None if num_steps is None else theirs.timesteps, prediction_type, variance_type)
    for i, t in enumerate(ts):
        x, m, _ = _step_inputs(table, SHAPE, seed=100 * i)
        z = torch.randn(SHAPE, generator=_gen(1234))
        _check_against_diffusers(table, theirs, twin, t, x, m, z, clip, _ddpm_step,
                                 f"ddpm {prediction_type}/{variance_type}")


def test_ddpm_last_step_adds_no_noise_and_needs_none():
    table = ddpm_table(NoiseSchedule(), prediction_type="epsilon", variance_type="fixed_large")
    x, m, z = _step_inputs(table, SHAPE, seed=5)
    with_noise, _ = step(m, 0, x, table, noise=z)
    without, _ = step(m, 0, x, table)  # std == 0 at t == 0: neither noise nor seeds is required
    assert torch.equal(with_noise, without)
    nan_noise, _ = step(m, 0, x, table, noise=torch.full_like(z, float("nan")))  # no noise term at all, as diffusers
    assert torch.equal(nan_noise, without)
    with pytest.raises(ValueError, match="exactly one of noise and seeds must be given, got neither"):
        step(m, 1, x, table)


# ------------------------------------------------------------------------------------------------
# DDIM step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_clipped", [False, True], ids=["eps_unclipped", "eps_clipped"])
@pytest.mark.parametrize("clip", [None, 1.0, "threshold"], ids=["noclip", "clip1", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_step_matches_diffusers(prediction_type, eta, clip, use_clipped):
    schedule = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           prediction_type=prediction_type, **_diffusers_clip_config(clip))
    theirs.set_timesteps(50)
    twin = _float64_twin(theirs, schedule)
    table = ddim_table(schedule, theirs.timesteps, prediction_type, eta, use_clipped_model_output=use_clipped)
    for i, t in enumerate([980, 500, 0]):
        x, m, z = _step_inputs(table, SHAPE, seed=10 + 100 * i)
        _check_against_diffusers(table, theirs, twin, t, x, m, z, clip, _ddim_step_fn(eta, use_clipped),
                                 f"ddim {prediction_type}")


@pytest.mark.parametrize(
    "spacing, set_alpha_to_one, prediction_type, eta, rescale",
    [
        ("trailing", False, "v_prediction", 1.0, True),  # zero terminal SNR: t = 999 has alphas_cumprod == 0
        ("linspace", False, "sample", 0.5, False),  # T // N steps that miss the schedule (diffusers' rule)
        ("trailing", True, "epsilon", 0.3, False),
    ],
)
def test_ddim_spacings_and_final_alpha(spacing, set_alpha_to_one, prediction_type, eta, rescale):
    schedule = NoiseSchedule(rescale_betas_zero_snr=rescale)
    theirs = DDIMScheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                           rescale_betas_zero_snr=rescale, **_diffusers_clip_config(1.0))
    theirs.set_timesteps(33)
    twin = _float64_twin(theirs, schedule, set_alpha_to_one)
    table = ddim_table(schedule, theirs.timesteps, prediction_type, eta, set_alpha_to_one)
    for i, t in enumerate([theirs.timesteps[0].item(), theirs.timesteps[16].item(), theirs.timesteps[-1].item()]):
        x, m, z = _step_inputs(table, SHAPE, seed=7 + 100 * i)
        # diffusers' float32 DDIM returns NaN at t = 999 with zero terminal SNR and eta = 1: there
        # 1 - alpha_prev - sigma^2 is exactly 0 and rounds negative before its sqrt. Ours clamps it.
        nan_ok = rescale and t == 999
        _check_against_diffusers(table, theirs, twin, t, x, m, z, 1.0, _ddim_step_fn(eta, False), f"ddim {spacing}",
                                 nan_ok)


def test_thresholding_is_diffusers_threshold_sample():
    """pred_original_sample under thresholding is diffusers' _threshold_sample (float64 both): with quantiles
    below 1 (s is raised to 1), between 1 and sample_max_value and above it (s is capped), at ratio 1 (allowed: the
    maximum), and with a clip_range given too (ignored, as diffusers ignores clip_sample when thresholding). The
    backends' tests compare against the reference only; this pins the reference itself. Prediction "sample" at
    t = 0 makes x0 the model output exactly (ax = 0, am = 1), so only the thresholding is compared."""
    table = ddpm_table(NoiseSchedule(), prediction_type="sample")
    # quantiles s from ~0.3 to ~15
    scales = torch.tensor([0.3, 0.8, 1.2, 1.6, 2.5, 6.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    m = torch.randn((6,) + SHAPE[1:], dtype=torch.float64) * scales
    x = torch.randn(m.shape, dtype=torch.float64)
    for ratio, max_value in ((float(torch.empty(()).uniform_(0.6, 0.99)), 1.5), (1.0, 2.5)):
        theirs = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
        _, x0c = step(m, 0, x, table, clip_range=0.5, thresholding=True, dynamic_thresholding_ratio=ratio,
                      sample_max_value=max_value)
        # The same float64 ops in the same order (quantile, clamp, divide): a few ulp at most, |x0c| <= 1.
        torch.testing.assert_close(x0c, theirs._threshold_sample(m), rtol=0, atol=4 * torch.finfo(torch.float64).eps)


def test_learned_range_extrapolates_past_the_unit_interval():
    """The model's variance channels v are not bounded: diffusers' learned_range interpolates the log-variances
    with f = (v + 1) / 2 whatever v is, so v outside [-1, 1] extrapolates, and sigma may exceed 1: at zero terminal
    SNR, t = T - 1, beta = 1 (max_log = 0) while var = 1 - ap < 1 for a long step (two trailing steps: 999 -> 499).
    Nothing may clamp v, f or sigma."""
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    theirs = DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range", rescale_betas_zero_snr=True,
                           clip_sample=False, timestep_spacing="trailing")
    theirs.set_timesteps(2)
    twin = _float64_twin(theirs, schedule)
    table = ddpm_table(schedule, theirs.timesteps, "v_prediction", "learned_range")
    for i, t in enumerate(theirs.timesteps.tolist()):
        x, m, _ = _step_inputs(table, SHAPE, seed=200 + 10 * i)
        m[:, SHAPE[1]:] *= 3  # v in [-3, 3]
        z = torch.randn(SHAPE, generator=_gen(1234))
        # stock float32 diffusers may be NaN at t = 999 (its alphas_cumprod rounds): the float64 twin decides there
        _check_against_diffusers(table, theirs, twin, t, x, m, z, None, _ddpm_step, f"learned_range v*3 t={t}",
                                 theirs_may_be_nan=True)


# ------------------------------------------------------------------------------------------------
# per-sample timesteps, seeds, layouts, dtypes, the float32 table contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm_full", "ddpm_n50", "ddim"])
def test_per_sample_timesteps_equal_per_sample_diffusers(kind):
    schedule = NoiseSchedule()
    if kind == "ddim":
        theirs = DDIMScheduler(prediction_type="v_prediction", **_diffusers_clip_config("threshold"))
        theirs.set_timesteps(50)
        table = ddim_table(schedule, theirs.timesteps, "v_prediction", eta=1.0)
        diffusers_step, ts = _ddim_step_fn(1.0, False), [980, 0, 500, 20]
    else:
        theirs = DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range",
                               **_diffusers_clip_config("threshold"))
        if kind == "ddpm_n50":
            theirs.set_timesteps(50)
        table = ddpm_table(schedule, None if kind == "ddpm_full" else theirs.timesteps, "v_prediction", "learned_range")
        diffusers_step, ts = _ddpm_step, ([999, 0, 500, 1] if kind == "ddpm_full" else [980, 0, 500, 20])
    twin = _float64_twin(theirs, schedule)
    B = len(ts)
    x, m, _ = _step_inputs(table, (B,) + SHAPE[1:], seed=77)
    z = torch.randn((1,) + SHAPE[1:], generator=_gen(1234)).expand(B, *SHAPE[1:]).contiguous()
    prev, x0c = step(m, torch.tensor(ts), x, table, noise=z, **_clip_kwargs("threshold"))
    for b, t in enumerate(ts):
        one = slice(b, b + 1)
        mine = step(m[one], t, x[one], table, noise=z[one], **_clip_kwargs("threshold"))
        assert torch.equal(prev[one], mine[0]) and torch.equal(x0c[one], mine[1])  # batch-independent
        _check_against_diffusers(table, theirs, twin, t, x[one], m[one], z[one], "threshold", diffusers_step,
                                 f"{kind} b={b}")


def test_seeds_path_equals_noise_path():
    table = ddpm_table(NoiseSchedule(), prediction_type="epsilon", variance_type="learned_range")
    t = torch.tensor([999, 3, 0, 640])
    shape = (4,) + SHAPE[1:]
    x, m, _ = _step_inputs(table, shape, seed=3)
    seeds = torch.tensor([1, -2, 2**40, 7], dtype=torch.int64)
    numel = math.prod(shape[1:])
    z = philox_normal(seeds, STEP_STREAM_BASE + t, numel).reshape(shape)
    by_seed = step(m, t, x, table, seeds=seeds, clip_range=1.0)
    by_noise = step(m, t, x, table, noise=z, clip_range=1.0)
    assert torch.equal(by_seed[0], by_noise[0]) and torch.equal(by_seed[1], by_noise[1])


def test_empty_inputs_give_empty_outputs():
    """Batch 0, and samples of no elements, give empty results of the right shape, as the kernels do (the reference
    indexed sample 0, left reshape(-1) ambiguous, took the quantile of nothing, and drew 2**36 counters for none)."""
    schedule = NoiseSchedule()
    table = ddpm_table(schedule)
    for shape in [(0, 6, 4, 4), (2, 6, 0, 4)]:
        x, seeds = _randn(shape, 1), torch.arange(shape[0])
        for out in (*q_sample(x, 5, schedule, seeds=seeds), *step(x, 5, x, table, seeds=seeds, thresholding=True)):
            assert out.shape == shape
        weight = torch.ones(6, requires_grad=True)
        y = group_norm_silu(x, weight, None, 3)
        y.sum().backward()
        assert y.shape == shape and torch.equal(weight.grad, torch.zeros(6))
    none = torch.empty(0, dtype=torch.int64)
    assert philox_normal(none, 0, 2**62).shape == (0, 2**62)
    assert ddpm_fast.randn(none, (2**31, 2**31), backend="torch").shape == (0, 2**31, 2**31)


def test_randn_is_contiguous():
    """Each sample's draws come in groups of four: where a sample is not a multiple of 4 values, the slice of the
    last group must not leave the samples 4 * J apart (a view of it, .view(B, -1), then failed)."""
    seeds = torch.randint(-2**62, 2**62, (3,))
    z = ddpm_fast.randn(seeds, (3, 5, 7), backend="torch")  # 105 values a sample
    assert z.is_contiguous() and philox_normal(seeds, INITIAL_NOISE_STREAM, 105).is_contiguous()
    assert torch.equal(z.view(3, -1), philox_normal(seeds, INITIAL_NOISE_STREAM, 105))


def test_stream_numbers_are_the_contracts():
    """contracts.md fixes the streams: the initial noise x_T draws from stream 2**33 (randn's default), a reverse step
    at t from 2**32 + t. Written out here, not imported: the kernels take the stream from the same Python constants,
    so the backends would agree with a changed one, and a seed would silently give other images."""
    seeds = torch.randint(-(2**63), 2**63 - 1, (2,))
    assert torch.equal(ddpm_fast.randn(seeds, (3, 5), backend="torch").view(2, -1), philox_normal(seeds, 2**33, 15))
    table = ddpm_table(NoiseSchedule(), prediction_type="epsilon", variance_type="fixed_large")
    x, m, _ = _step_inputs(table, (2,) + SHAPE[1:], seed=47)
    t = torch.randint(1, 1000, (2,))
    z = philox_normal(seeds, 2**32 + t, math.prod(SHAPE[1:])).reshape(x.shape)
    assert torch.equal(step(m, t, x, table, seeds=seeds)[0], step(m, t, x, table, noise=z)[0])


def test_randn_shape_past_int64_is_named():
    seeds = torch.tensor([1, 2])
    for backend in ("torch", "cpu"):  # checked before the backend is chosen
        with pytest.raises(ValueError, match=r"randn: shape must hold fewer than 2\*\*63 values per sample, got "
                                             r"\(4294967296, 2147483648\)"):
            ddpm_fast.randn(seeds, (2**32, 2**31), backend=backend)


def test_float32_step_is_the_contract_formula_on_the_float32_table():
    """reference.step in float32 == contracts.md's formula evaluated on StepTable.table() (bit-exact)."""
    table = ddpm_table(NoiseSchedule(beta_schedule="squaredcos_cap_v2"), prediction_type="epsilon",
                       variance_type="learned_range")
    t = torch.tensor([999, 400, 2])
    shape = (3,) + SHAPE[1:]
    x, mv, z = _step_inputs(table, shape, seed=11)
    m, v = mv[:, :5], mv[:, 5:]
    ax, am, p0, p1, p2, std, lo, hi = table.table("cpu")[t].reshape(3, 8, 1, 1, 1).unbind(1)
    x0 = ax * x + am * m
    x0c = x0.clamp(-1.5, 1.5)
    f = (v + 1.0) * 0.5
    expected = p0 * x0c + p1 * x + p2 * m + std * torch.exp(0.5 * (f * hi + (1.0 - f) * lo)) * z
    prev, got_x0c = step(mv, t, x, table, noise=z, clip_range=1.5)
    assert torch.equal(got_x0c, x0c) and torch.equal(prev, expected)


def test_channels_last_equals_nchw():
    table = ddpm_table(NoiseSchedule(), prediction_type="v_prediction", variance_type="learned_range")
    x, m, z = _step_inputs(table, SHAPE, seed=21)
    t = torch.tensor([10, 999, 0])
    ref = step(m, t, x, table, noise=z, **_clip_kwargs("threshold"))
    seeds = torch.tensor([4, 5, 6])
    ref_s = step(m, t, x, table, seeds=seeds)
    # channels_last, and channels_last samples at a batch stride of their own (every other one of a larger batch)
    for kind in ("contiguous_channels_last", "batch_strided_channels_last"):
        cl = {k: storage_variant(v, kind, "cpu") for k, v in dict(x=x, m=m, z=z).items()}
        got = step(cl["m"], t, cl["x"], table, noise=cl["z"], **_clip_kwargs("threshold"))
        got_s = step(cl["m"], t, cl["x"], table, seeds=seeds)
        for r, g in zip(ref + ref_s, got + got_s):
            assert g.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(r, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    """16-bit inputs are upcast, computed in float32 and rounded once: exactly the float32 path."""
    schedule = NoiseSchedule()
    table = ddim_table(schedule, sampling_timesteps(1000, 20), "sample", eta=1.0, use_clipped_model_output=True)
    x, m, z = (a.to(dtype) for a in _step_inputs(table, SHAPE, seed=31))
    t = torch.tensor([950, 500, 0])
    got = step(m, t, x, table, noise=z, **_clip_kwargs("threshold"))
    ref = step(m.float(), t, x.float(), table, noise=z.float(), **_clip_kwargs("threshold"))
    for g, r in zip(got, ref):
        assert g.dtype == dtype and torch.equal(g, r.to(dtype))
    xt, eps = q_sample(x, t, schedule, seeds=torch.tensor([1, 2, 3]), stream=9)
    xt_ref, eps_ref = q_sample(x.float(), t, schedule, seeds=torch.tensor([1, 2, 3]), stream=9)
    assert xt.dtype == eps.dtype == dtype
    assert torch.equal(xt, xt_ref.to(dtype)) and torch.equal(eps, eps_ref.to(dtype))


def test_step_and_q_sample_are_differentiable():
    schedule = NoiseSchedule(num_train_timesteps=50)
    table = ddpm_table(schedule, prediction_type="v_prediction", variance_type="learned_range")
    shape = (2, 2, 3, 3)
    x = _randn(shape, 1, torch.float64).requires_grad_()
    m = torch.cat([_randn(shape, 2, torch.float64), _uniform(shape, 3).double()], 1).requires_grad_()
    z = _randn(shape, 4, torch.float64)
    t = torch.tensor([49, 7])
    assert torch.autograd.gradcheck(lambda x, m: step(m, t, x, table, noise=z), (x, m))
    assert torch.autograd.gradcheck(lambda x: q_sample(x, t, schedule, noise=z)[0], (x,))


# ------------------------------------------------------------------------------------------------
# q_sample and training targets
# ------------------------------------------------------------------------------------------------


def _q_truth_and_floor(schedule, x0, noise, t):
    """float64 x_t and v, and the float32 rounding budget: 8 eps32 * max(|a x0| + |b eps|)."""
    a = schedule.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
    b = (1 - schedule.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    floor = 8 * EPS32 * ((a * x0).abs() + (b * noise).abs()).max()
    return a * x0 + b * noise, a * noise - b * x0, floor


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_q_sample_and_v_target_match_diffusers(beta_schedule):
    schedule = NoiseSchedule(beta_schedule=beta_schedule)
    theirs = DDPMScheduler(beta_schedule=beta_schedule)
    t = torch.tensor([0, 1, 500, 998, 999, 250])
    shape = (6,) + SHAPE[1:]
    x0, noise = _randn(shape, 41), _randn(shape, 42)
    x_t, eps = q_sample(x0, t, schedule, noise=noise)
    assert torch.equal(eps, noise)
    truth_xt, truth_v, floor = _q_truth_and_floor(schedule, x0, noise, t)
    _assert_accuracy(x_t, theirs.add_noise(x0, noise, t), truth_xt, floor, "q_sample")
    v = training_target(x0, noise, t, schedule, "v_prediction")
    _assert_accuracy(v, theirs.get_velocity(x0, noise, t), truth_v, floor, "v target")
    assert torch.equal(training_target(x0, noise, t, schedule, "epsilon"), noise)
    assert torch.equal(training_target(x0, noise, t, schedule, "sample"), x0)


def test_a_zero_dim_tensor_t_is_every_sample_s_t():
    """t may be a 0-d integer tensor (a sampler's loop variable): it means that t for every sample, as an int does."""
    schedule = NoiseSchedule()
    table = ddpm_table(schedule, prediction_type="v_prediction", variance_type="learned_range")
    x, m, z = _step_inputs(table, SHAPE, seed=43)
    t = int(torch.randint(1, 1000, ()))
    assert torch.equal(q_sample(x, torch.tensor(t), schedule, noise=z)[0], q_sample(x, t, schedule, noise=z)[0])
    for got, expected in zip(step(m, torch.tensor(t), x, table, noise=z), step(m, t, x, table, noise=z)):
        assert torch.equal(got, expected)


def test_training_targets_come_back_in_x0_dtype_and_layout():
    """Every target is in x0's dtype and memory format (the docstring's promise, as q_sample's results), whatever
    the noise's: epsilon's target is the noise, converted."""
    schedule = NoiseSchedule()
    x0 = _randn(SHAPE, 44).contiguous(memory_format=torch.channels_last)
    noise = _randn(SHAPE, 45, torch.float64)
    for prediction_type in PREDICTIONS:
        target = training_target(x0, noise, torch.tensor([3, 500, 999]), schedule, prediction_type)
        assert target.dtype == torch.float32, prediction_type
        assert target.is_contiguous(memory_format=torch.channels_last), prediction_type
    assert torch.equal(training_target(x0, noise, 7, schedule, "epsilon"), noise.float())


def test_q_sample_is_the_contract_formula_on_q_table():
    schedule = NoiseSchedule(beta_schedule="scaled_linear")
    t = torch.tensor([3, 999, 512])
    x0, noise = _randn((3, 4, 6, 5), 51), _randn((3, 4, 6, 5), 52)
    a, b = schedule.q_table("cpu")[t].reshape(3, 2, 1, 1, 1).unbind(1)
    assert torch.equal(q_sample(x0, t, schedule, noise=noise)[0], a * x0 + b * noise)
    assert torch.equal(training_target(x0, noise, t, schedule, "v_prediction"), a * noise - b * x0)


def test_a_size_one_dim_does_not_decide_the_layout():
    """A size-1 dim is only ever read at index 0, so its stride says nothing about the layout (PyTorch's
    is_contiguous ignores it too): batch-strided NHWC samples of height 1 come back channels_last whatever that
    stride, here one that no dense layout would give."""
    schedule = NoiseSchedule()
    x0 = _randn((2 * 42,), 48).as_strided((2, 3, 1, 7), (42, 1, 5, 3))  # NHWC samples 42 apart; H's stride is 5
    noise = _randn(x0.shape, 49)
    x_t, eps = q_sample(x0, 5, schedule, noise=noise)
    assert x_t.is_contiguous(memory_format=torch.channels_last) and not x_t.is_contiguous()
    assert eps.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_t, q_sample(x0.contiguous(), 5, schedule, noise=noise)[0])


def test_q_sample_seeds_and_layouts():
    schedule = NoiseSchedule()
    x0 = _randn(SHAPE, 61)
    seeds = torch.tensor([9, 8, 7])
    x_t, eps = q_sample(x0, 123, schedule, seeds=seeds, stream=17)
    expected_eps = philox_normal(seeds, 17, math.prod(SHAPE[1:])).reshape(SHAPE)  # logical NCHW order
    assert torch.equal(eps, expected_eps)
    assert torch.equal(x_t, q_sample(x0, 123, schedule, noise=expected_eps)[0])
    cl = x0.contiguous(memory_format=torch.channels_last)
    x_t_cl, eps_cl = q_sample(cl, 123, schedule, seeds=seeds, stream=17)
    assert x_t_cl.is_contiguous(memory_format=torch.channels_last)
    assert eps_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_t_cl, x_t) and torch.equal(eps_cl, eps)
    # float64 stays float64 (no float32 detour for the coefficients)
    x64, _ = q_sample(x0.double(), 123, schedule, noise=expected_eps.double())
    truth, _, _ = _q_truth_and_floor(schedule, x0, expected_eps, torch.full((3,), 123))
    assert x64.dtype == torch.float64 and torch.allclose(x64, truth, rtol=4 * torch.finfo(torch.float64).eps, atol=0)


# ------------------------------------------------------------------------------------------------
# l_simple_loss
# ------------------------------------------------------------------------------------------------


def test_l_simple_loss_hand_computed():
    # T = 2 with betas 0.5, 0.5: alphas_cumprod = (0.5, 0.25), snr = (1, 1/3).
    schedule = NoiseSchedule(num_train_timesteps=2, trained_betas=[0.5, 0.5])
    target = _randn((2, 1, 2, 2), 71)
    # Per-sample squared errors: sample 0 is off by 1 everywhere (mse 1), sample 1 by 2 (mse 4).
    prediction = target + torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    t = torch.tensor([0, 1])
    assert l_simple_loss(prediction, target, t, schedule).item() == pytest.approx(2.5, rel=1e-6)
    gamma = 0.5  # min(snr, gamma) = (0.5, 1/3)
    expected = {
        "epsilon": (1 * 0.5 / 1 + 4 * (1 / 3) / (1 / 3)) / 2,  # min(snr, g) / snr = (0.5, 1)
        "sample": (1 * 0.5 + 4 * (1 / 3)) / 2,  # min(snr, g)
        "v_prediction": (1 * 0.5 / 2 + 4 * (1 / 3) / (4 / 3)) / 2,  # min(snr, g) / (snr + 1)
    }
    for prediction_type, value in expected.items():
        got = l_simple_loss(prediction, target, t, schedule, prediction_type, min_snr_gamma=gamma)
        assert got.dtype == torch.float32 and got.shape == ()
        assert got.item() == pytest.approx(value, rel=1e-6), prediction_type
        assert l_simple_loss(prediction, target, t, schedule, prediction_type).item() == pytest.approx(2.5, rel=1e-6)


def test_l_simple_loss_of_half_inputs_is_float32():
    """16-bit predictions and targets are upcast: the loss is float32 (the docstring's promise) and equals the
    float32 inputs' loss, unweighted and min-SNR weighted; a float16 mean of squares would keep ~3 digits."""
    schedule = NoiseSchedule()
    t = torch.tensor([10, 900])
    prediction, target = _randn((2, 3, 8, 8), 83), _randn((2, 3, 8, 8), 84)
    for dtype in (torch.float16, torch.bfloat16):
        p, q = prediction.to(dtype), target.to(dtype)
        for gamma in (None, 5.0):
            got = l_simple_loss(p, q, t, schedule, "v_prediction", min_snr_gamma=gamma)
            assert got.dtype == torch.float32
            upcast = l_simple_loss(p.float(), q.float(), t, schedule, "v_prediction", min_snr_gamma=gamma)
            assert torch.equal(got, upcast)


def test_l_simple_loss_random_and_zero_snr():
    schedule = NoiseSchedule(rescale_betas_zero_snr=True)
    t = torch.tensor([0, 400, 999])
    prediction, target = _randn((3, 4, 5, 5), 81, torch.float64), _randn((3, 4, 5, 5), 82, torch.float64)
    mse = [((prediction[b] - target[b]) ** 2).mean().item() for b in range(3)]
    ac = [schedule.alphas_cumprod[i].item() for i in t.tolist()]
    snr = [a / (1 - a) for a in ac]  # snr[2] == 0: zero terminal SNR
    gamma = 5.0
    weights = {
        "epsilon": [min(s, gamma) / s if s > 0 else 1.0 for s in snr],  # the limit as snr -> 0
        "sample": [min(s, gamma) for s in snr],
        "v_prediction": [min(s, gamma) / (s + 1) for s in snr],
    }
    for prediction_type, w in weights.items():
        got = l_simple_loss(prediction, target, t, schedule, prediction_type, min_snr_gamma=gamma)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(sum(wi * e for wi, e in zip(w, mse)) / 3, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# group_norm_silu
# ------------------------------------------------------------------------------------------------


def _gn_params(B, C, seed, dtype=torch.float32):
    return dict(
        weight=1 + 0.3 * _randn((C,), seed, dtype), bias=_randn((C,), seed + 1, dtype, 0.2),
        bias_in=_randn((B, C), seed + 2, dtype), scale=_randn((B, C), seed + 3, dtype, 0.3),
        shift=_randn((B, C), seed + 4, dtype, 0.3),
    )


def _gn_composed(x, num_groups, p, act, eps=1e-5):
    """torch's own GroupNorm composed with the embedding terms, in x's dtype."""
    per_sample = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    h = x + p["bias_in"].to(x.dtype).reshape(per_sample)
    y = F.group_norm(h, num_groups, p["weight"].to(x.dtype), p["bias"].to(x.dtype), eps)
    y = y * (1 + p["scale"].to(x.dtype).reshape(per_sample)) + p["shift"].to(x.dtype).reshape(per_sample)
    return F.silu(y) if act == "silu" else y


GN_CASES = [
    ((2, 6, 5, 7), 3),  # odd H x W
    ((1, 4, 11), 4),  # batch 1, one spatial dim, one channel per group
    ((3, 8, 2, 3, 5), 2),  # 3-D spatial
    ((2, 32, 4, 4), 1),  # one group: LayerNorm over C, H, W
]


@pytest.mark.parametrize("act", ["silu", "none"])
@pytest.mark.parametrize("shape, groups", GN_CASES)
def test_group_norm_silu_matches_composed_float64(shape, groups, act):
    # A large common offset stresses the variance computation (two-pass vs E[x^2] - E[x]^2).
    x = _randn(shape, 91) * 2 + 30
    p = _gn_params(shape[0], shape[1], 92)
    truth = _gn_composed(x.double(), groups, {k: v.double() for k, v in p.items()}, act)
    ours = group_norm_silu(x, num_groups=groups, act=act, **p)
    torch32 = _gn_composed(x, groups, p, act)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    # Tolerance: ours must be at most 2x as far from float64 as torch's float32 GroupNorm, plus a floor
    # of 8 eps32 * max|y| (rounding of normalisation, affine, modulation and SiLU).
    err_ours = (ours.double() - truth).abs().max().item()
    err_torch = (torch32.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_torch + 8 * EPS32 * truth.abs().max().item()
    # Each optional term absent == that term neutral.
    none = group_norm_silu(x, None, None, groups, act=act)
    neutral = dict(weight=torch.ones(shape[1]), bias=torch.zeros(shape[1]))
    assert torch.equal(none, group_norm_silu(x, num_groups=groups, act=act, **neutral))


def test_group_norm_silu_honours_eps():
    """eps where it matters (a group's variance of its order), against torch's GroupNorm at the same eps; fresh
    draws each run (a reference that ignored eps survived every other test of this file)."""
    eps = float(10 ** torch.empty(()).uniform_(-4, -1))
    x = (torch.randn(2, 6, 5, 7) + torch.randn(())) * eps**0.5  # a mean of the spread's order (large means: above)
    p = _gn_params(2, 6, int(torch.randint(0, 2**31, ())))
    truth = _gn_composed(x.double(), 3, {k: v.double() for k, v in p.items()}, "silu", eps)
    ours = group_norm_silu(x, num_groups=3, eps=eps, **p)
    err_torch = (_gn_composed(x, 3, p, "silu", eps).double() - truth).abs().max().item()
    bound = 2 * err_torch + 8 * EPS32 * truth.abs().max().item()
    assert (ours.double() - truth).abs().max().item() <= bound
    # and it is eps that the match turns on: the default eps is far off here
    assert (group_norm_silu(x, num_groups=3, **p).double() - truth).abs().max().item() > 100 * bound


def test_group_norm_silu_channels_last_and_half():
    x = _randn((2, 12, 5, 3), 101)
    p = _gn_params(2, 12, 102)
    ref = group_norm_silu(x, num_groups=4, **p)
    cl = group_norm_silu(x.contiguous(memory_format=torch.channels_last), num_groups=4, **p)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    # The reference reduces in logical (NCHW) order whatever the layout, so the two agree bit for bit.
    assert torch.equal(cl, ref)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        got = group_norm_silu(xh, num_groups=4, **p)
        assert got.dtype == dtype and torch.equal(got, group_norm_silu(xh.float(), num_groups=4, **p).to(dtype))


@pytest.mark.parametrize("act", ["silu", "none"])
def test_group_norm_silu_gradcheck(act):
    B, C = 2, 4
    x = _randn((B, C, 3, 2), 111, torch.float64).requires_grad_()
    p = {k: v.requires_grad_() for k, v in _gn_params(B, C, 112, torch.float64).items()}
    names = list(p)

    def fn(x, *params):
        return group_norm_silu(x, num_groups=2, act=act, **dict(zip(names, params)))

    assert torch.autograd.gradcheck(fn, (x, *p.values()))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xc, *p.values()))


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    schedule = NoiseSchedule(num_train_timesteps=100)
    table = ddpm_table(schedule)
    x = _randn((2, 3, 4, 4), 1)
    noise = _randn((2, 3, 4, 4), 2)
    with pytest.raises(ValueError, match=r"noise must have the shape of the sample \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        q_sample(x, 5, schedule, noise=_randn((2, 3, 4, 5), 3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\].*max 100"):
        q_sample(x, torch.tensor([1, 100]), schedule, noise=noise)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\].*min -1"):
        step(noise, -1, x, table, noise=noise)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\] \(num_train_timesteps\), got min 100, max 100"):
        step(noise, 100, x, table, noise=noise)  # an int t == T: named, not an IndexError from the table
    with pytest.raises(TypeError, match=r"t must be an int64 tensor of shape \(2,\), got torch.bool"):
        step(noise, torch.tensor([True, False]), x, table, noise=noise)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\).*got \(3,\)"):
        step(noise, torch.tensor([1, 2, 3]), x, table, noise=noise)
    with pytest.raises(ValueError, match=r"seeds must have shape \(2,\).*got \(1,\)"):
        q_sample(x, 5, schedule, seeds=torch.tensor([1]))
    with pytest.raises(TypeError, match=r"seeds must be an int64 tensor"):
        step(noise, 5, x, table, seeds=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"exactly one of noise and seeds must be given, got both"):
        q_sample(x, 5, schedule, noise=noise, seeds=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"exactly one of noise and seeds must be given, got neither"):
        q_sample(x, 5, schedule)
    with pytest.raises(ValueError, match=r"stream must be an int in \[0, 2\*\*32\), got 4294967296"):
        q_sample(x, 5, schedule, seeds=torch.tensor([1, 2]), stream=2**32)
    with pytest.raises(ValueError,
                       match=r"model_output must have the shape of sample \(2, 3, 4, 4\), got \(2, 6, 4, 4\)"):
        step(torch.cat([noise, noise], 1), 5, x, table, noise=noise)
    learned = ddpm_table(schedule, variance_type="learned_range")
    with pytest.raises(ValueError,
                       match=r"model_output must have shape \(2, 6, 4, 4\).*learned_range.*got \(2, 3, 4, 4\)"):
        step(noise, 5, x, learned, noise=noise)
    with pytest.raises(ValueError, match=r"clip_range must be > 0 or None, got -1"):
        step(noise, 5, x, table, noise=noise, clip_range=-1)
    with pytest.raises(ValueError, match=r"dynamic_thresholding_ratio must be in \(0, 1\], got 1.5"):
        step(noise, 5, x, table, noise=noise, thresholding=True, dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match=r"sample_max_value must be >= 1, got 0.5"):
        step(noise, 5, x, table, noise=noise, thresholding=True, sample_max_value=0.5)
    with pytest.raises(TypeError, match=r"table must be a StepTable"):
        step(noise, 5, x, schedule, noise=noise)
    with pytest.raises(ValueError, match=rf"t must lie in \[0, 99\] \(num_train_timesteps\), got min {2**70}"):
        q_sample(x, 2**70, schedule, noise=noise)  # an int past int64: named, not a bare OverflowError
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match=r"clip_range must be at least 1.17549\d*e-38 \(float32's smallest normal"):
        step(noise, 5, x, table, noise=noise, clip_range=tiny / 2)
    with pytest.raises(ValueError, match=r"dynamic_thresholding_ratio must be at least 1.17549\d*e-38"):
        step(noise, 5, x, table, noise=noise, thresholding=True, dynamic_thresholding_ratio=1e-46)
    with pytest.raises(ValueError, match=r"sample_max_value must be at most 3.40282\d*e\+38 \(float32's largest"):
        step(noise, 5, x, table, noise=noise, thresholding=True, sample_max_value=2 * huge)
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*got 'x0'"):
        training_target(x, noise, 5, schedule, "x0")
    with pytest.raises(ValueError, match=r"min_snr_gamma must be > 0 or None, got 0"):
        l_simple_loss(x, noise, 5, schedule, min_snr_gamma=0)
    with pytest.raises(ValueError, match=r"target must have the shape of prediction"):
        l_simple_loss(x, noise[:1], 5, schedule)


def test_group_norm_bad_inputs():
    x = _randn((2, 6, 4, 4), 1)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int dividing C=6, got 4"):
        group_norm_silu(x, None, None, 4)
    with pytest.raises(ValueError, match=r"x must have at least 3 dims, got shape \(2, 6\)"):
        group_norm_silu(x[:, :, 0, 0], None, None, 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\) or be None, got \(5,\)"):
        group_norm_silu(x, torch.ones(5), None, 2)
    with pytest.raises(ValueError, match=r"bias_in must have shape \(2, 6\) or be None, got \(6,\)"):
        group_norm_silu(x, None, None, 2, bias_in=torch.ones(6))
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 6\) or be None, got \(1, 6\)"):
        group_norm_silu(x, None, None, 2, scale=torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 6\) or be None, got \(6, 2\)"):
        group_norm_silu(x, None, None, 2, shift=torch.ones(6, 2))  # the right count of values, transposed
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0"):
        group_norm_silu(x, None, None, 2, eps=0)
    with pytest.raises(ValueError, match=r"act must be 'silu' or 'none', got 'relu'"):
        group_norm_silu(x, None, None, 2, act="relu")
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        group_norm_silu(x.long(), None, None, 2)


def test_row_quantile_is_torch_quantile_bit_for_bit():
    """Thresholding's per-sample quantile is torch.quantile (diffusers' choice) rebuilt from ops every torch's
    dynamo traces: equal to it to the bit on fresh draws, ties, infinities and rows holding NaN."""
    def draw(rng):
        return dict(rows=rng.randint(1, 5), n=rng.choice([1, 2, 3, 7, 64, 1000]), q=rng.choice(
            [rng.random(), 0.995, 0.5, 1.0, 1e-7]), dtype=rng.choice(["float32", "float64"]),
            kind=rng.choice(["normal", "ties", "inf", "nan"]))

    def check(case):
        dtype = getattr(torch, case["dtype"])
        x = torch.randn(case["rows"], case["n"], dtype=dtype)
        if case["kind"] == "ties":
            x = x.mul(2).round()
        elif case["kind"] != "normal":
            x[0, torch.randint(0, case["n"], ())] = float(case["kind"])
        ours, theirs = _row_quantile(x, case["q"]), torch.quantile(x, case["q"], dim=1)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    run_cases(draw, check, cases=60)
