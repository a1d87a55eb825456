"""ddpm_fast.schedule against diffusers' DDPMScheduler / DDIMScheduler and against the formulas."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm_fast.schedule import (
    BETA_SCHEDULES,
    COEF_COLUMNS,
    NoiseSchedule,
    StepTable,
    ddim_table,
    ddpm_table,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_timesteps,
)

EPS32 = torch.finfo(torch.float32).eps
COL = {name: k for k, name in enumerate(COEF_COLUMNS)}

DIFFUSERS_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "trained"]


def _trained_betas(T=1000):
    """Positive betas in (1e-4, 0.03): fresh random values, not a formula."""
    g = torch.Generator().manual_seed(7)
    return (torch.rand(T, generator=g, dtype=torch.float64) * 0.03 + 1e-4).numpy()


def _pair(name, rescale, T=1000):
    """(ours, diffusers) for the same config."""
    kwargs = dict(num_train_timesteps=T, rescale_betas_zero_snr=rescale)
    if name == "trained":
        kwargs["trained_betas"] = _trained_betas(T)
    else:
        kwargs["beta_schedule"] = name
    return NoiseSchedule(**kwargs), DDPMScheduler(**kwargs)


# ------------------------------------------------------------------------------------------------
# betas and alphas_cumprod
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(name, rescale):
    ours, theirs = _pair(name, rescale)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    T = ours.num_train_timesteps
    t = torch.arange(T, dtype=torch.float64)
    d_betas = theirs.betas.double()
    d_ac = theirs.alphas_cumprod.double()

    # alphas_cumprod: diffusers' float32 cumprod rounds 1 - beta and each product once (<= eps32
    # relative per step), so after t + 1 steps its relative error is <= 2 (t + 1) eps32; the
    # zero-SNR rescale's sqrt / shift / scale / square round trip at most doubles that.
    ac_bound = 4 * (t + 1) * EPS32 * ours.alphas_cumprod + 1e-30
    assert ((d_ac - ours.alphas_cumprod).abs() <= ac_bound).all()

    if rescale:
        # beta_t = 1 - ac[t] / ac[t-1] in float32: the quotient inherits both cumprods' relative errors
        # (4 (t+1) eps and 4 t eps, see above), plus one rounding for the division and one for 1 - x.
        alphas = 1.0 - ours.betas
        beta_bound = alphas * (4 * (t + 1) + 4 * t + 1) * EPS32 + EPS32
    else:
        # Each beta passes through at most four float32 operations (linspace, sqrt/square or sigmoid,
        # scale, shift), each <= 1 ulp relative, and squaring doubles linspace's error: <= 8 eps32 * beta.
        beta_bound = 8 * EPS32 * ours.betas
    assert ((d_betas - ours.betas).abs() <= beta_bound).all()


def test_alphas_cumprod_is_the_float64_product():
    """alphas_cumprod carries float64's accuracy (the module's promise: one rounding per float32 table entry, not
    diffusers' float32 error, which the diffusers comparison above must allow for): against a running product of
    1 - beta in Python floats, on fresh betas. Both round once per factor: <= 2 (t + 1) eps64 relative apart."""
    betas = torch.rand(1000, dtype=torch.float64) * 0.03 + 1e-4
    ours = NoiseSchedule(trained_betas=betas)
    expected, product = [], 1.0
    for b in betas.tolist():
        product *= 1.0 - b
        expected.append(product)
    expected = torch.tensor(expected, dtype=torch.float64)
    bound = 2 * torch.arange(1, 1001, dtype=torch.float64) * torch.finfo(torch.float64).eps
    assert ((ours.alphas_cumprod - expected).abs() <= bound * expected).all()


def test_trained_betas_may_end_at_one():
    """A beta of exactly 1 is valid (zero terminal SNR): diffusers' rescaled betas given back as trained_betas make
    the same schedule, alphas_cumprod ending at 0."""
    rescaled = rescale_zero_terminal_snr(torch.rand(50, dtype=torch.float64) * 0.03 + 1e-4)
    assert rescaled[-1].item() == 1.0
    ours = NoiseSchedule(num_train_timesteps=50, trained_betas=rescaled)
    assert torch.equal(ours.betas, rescaled) and ours.alphas_cumprod[-1].item() == 0.0


def test_aliases_are_the_same_curve():
    assert BETA_SCHEDULES["quadratic"] is BETA_SCHEDULES["scaled_linear"]
    assert BETA_SCHEDULES["cosine"] is BETA_SCHEDULES["squaredcos_cap_v2"]
    assert torch.equal(make_betas(1000, "quadratic"), make_betas(1000, "scaled_linear"))
    assert torch.equal(NoiseSchedule(beta_schedule="cosine").betas, NoiseSchedule(beta_schedule="squaredcos_cap_v2").betas)


def test_quadratic_is_ho_et_al_quad():
    # Ho et al.'s get_beta_schedule("quad"): np.linspace(sqrt(bs), sqrt(be), T, dtype=np.float64) ** 2
    expected = np.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(make_betas(1000, "quadratic").numpy(), expected, rtol=4 * np.finfo(np.float64).eps)


def test_cosine_formula_and_cap():
    T = 1000
    betas = make_betas(T, "cosine")

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 500, T - 2):
        assert betas[i].item() == pytest.approx(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), rel=1e-12)
    assert betas[-1].item() == 0.999  # alpha_bar(1) ~ 1e-33: capped at max_beta


def test_sigmoid_endpoints():
    betas = make_betas(1000, "sigmoid", 1e-4, 0.02)
    s = 1 / (1 + math.exp(6))
    assert betas[0].item() == pytest.approx(s * (0.02 - 1e-4) + 1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx((1 - s) * (0.02 - 1e-4) + 1e-4, rel=1e-12)


def test_rescale_zero_terminal_snr_properties():
    betas = make_betas(1000, "scaled_linear", 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    ac, ac_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert rescaled.dtype == torch.float64
    assert rescaled[-1].item() == 1.0 and ac_new[-1].item() == 0.0
    assert ac_new[0].item() == pytest.approx(ac[0].item(), rel=1e-14)
    # sqrt(ac_new) is an affine function of sqrt(ac): its second differences against sqrt(ac) vanish.
    slope = (ac_new.sqrt()[1:] - ac_new.sqrt()[:-1]) / (ac.sqrt()[1:] - ac.sqrt()[:-1])
    assert torch.allclose(slope, slope[0].expand_as(slope), rtol=1e-9)


def test_rescale_zero_terminal_snr_needs_two_betas():
    """One beta has no last step distinct from its first: refused by name, not NaN from 0 / 0."""
    with pytest.raises(ValueError, match=r"rescale_zero_terminal_snr needs at least 2 betas, got 1"):
        rescale_zero_terminal_snr(torch.rand(1, dtype=torch.float64) * 0.03 + 1e-4)


def test_schedule_from_config_ignores_sampler_keys():
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config = dict(theirs.config)
    config["_class_name"] = "DDPMScheduler"
    ours = NoiseSchedule.from_config(config)
    assert torch.equal(ours.betas, NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, rescale_betas_zero_snr=True).betas)
    assert not hasattr(ours, "clip_sample") and not hasattr(ours, "prediction_type")


def test_q_table_rows_and_cache():
    sched = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    q = sched.q_table("cpu")
    assert q.dtype == torch.float32 and q.shape == (1000, 2) and q.is_contiguous()
    assert torch.equal(q, torch.stack([sched.alphas_cumprod.sqrt(), (1 - sched.alphas_cumprod).sqrt()], 1).float())
    assert sched.q_table(torch.device("cpu")) is q  # one copy per device


# ------------------------------------------------------------------------------------------------
# sampling timesteps
# ------------------------------------------------------------------------------------------------

# (T, N): divisible and non-divisible, N = 1 and N = T, tiny T, and (1000, 61) where diffusers' trailing
# np.arange overshoots by one value.
TN = [(1000, 50), (1000, 3), (1000, 7), (1000, 61), (1000, 999), (1000, 1000), (1000, 1), (10, 4), (15, 13), (7, 7), (1, 1)]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T,N", TN)
def test_sampling_timesteps_match_diffusers(T, N, spacing, offset):
    ref = {}
    for cls in (DDPMScheduler, DDIMScheduler):
        s = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(N)
        ref[cls] = s.timesteps
    assert torch.equal(ref[DDPMScheduler], ref[DDIMScheduler])
    expected = ref[DDPMScheduler]
    if spacing == "leading" and expected[0] >= T:  # diffusers would index past the table
        with pytest.raises(ValueError, match="steps_offset"):
            sampling_timesteps(T, N, spacing, offset)
        return
    ours = sampling_timesteps(T, N, spacing, offset)
    assert ours.dtype == torch.int64
    if len(expected) == N + 1:  # diffusers' trailing overshoot: a spurious final -1
        assert expected[-1] == -1
        expected = expected[:N]
    assert torch.equal(ours, expected)
    assert (ours[1:] < ours[:-1]).all() and ours.min() >= 0 and ours.max() < T


# ------------------------------------------------------------------------------------------------
# step tables
# ------------------------------------------------------------------------------------------------


def _ddpm_row(ac, t, prev, variance_type, prediction_type):
    """One DDPM row written out from the paper's formulas, in Python floats."""
    a = ac[t]
    ap = ac[prev] if prev >= 0 else 1.0
    beta = 1 - a / ap
    ax, am = {"epsilon": (1 / math.sqrt(a), -math.sqrt(1 - a) / math.sqrt(a)), "sample": (0.0, 1.0),
              "v_prediction": (math.sqrt(a), -math.sqrt(1 - a))}[prediction_type]
    var = max((1 - ap) / (1 - a) * beta, 1e-20)
    std = {"fixed_small": math.sqrt(var), "fixed_small_log": math.sqrt(var), "fixed_large": math.sqrt(beta),
           "learned_range": 1.0}[variance_type]
    logs = (math.log(var), math.log(beta)) if variance_type == "learned_range" else (0.0, 0.0)
    return [ax, am, math.sqrt(ap) * beta / (1 - a), math.sqrt(a / ap) * (1 - ap) / (1 - a), 0.0,
            std if t > 0 else 0.0, *logs]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
def test_ddpm_table_rows(variance_type, prediction_type):
    sched = NoiseSchedule(beta_schedule="sigmoid")
    ts = sampling_timesteps(1000, 50, "trailing")
    table = ddpm_table(sched, ts, prediction_type, variance_type)
    assert table.coef.shape == (1000, 8) and table.coef.dtype == torch.float64
    ac = sched.alphas_cumprod.tolist()
    for t in (999, 979, 500, 19, 18, 5, 0):  # scheduled, unscheduled, the last and t = 0
        prev = max([s for s in ts.tolist() if s < t], default=-1)
        assert table.prev_timestep(t) == prev
        assert table.coef[t].tolist() == pytest.approx(_ddpm_row(ac, t, prev, variance_type, prediction_type), rel=1e-12, abs=1e-300)


def test_ddpm_prev_timestep_matches_diffusers():
    sched = NoiseSchedule()
    theirs = DDPMScheduler(timestep_spacing="leading", steps_offset=1)
    theirs.set_timesteps(50)
    table = ddpm_table(sched, theirs.timesteps)
    for t in theirs.timesteps.tolist():
        assert table.prev_timestep(t) == int(theirs.previous_timestep(t))
    full = ddpm_table(sched)
    assert torch.equal(full.timesteps, torch.arange(999, -1, -1))
    assert torch.equal(full.prev_timestep(torch.tensor([999, 1, 0])), torch.tensor([998, 0, -1]))


def test_ddpm_variance_matches_diffusers_get_variance():
    sched = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    theirs.alphas_cumprod = sched.alphas_cumprod.clone()  # float64: compare formulas, not roundings
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    theirs.set_timesteps(40)
    small = ddpm_table(sched, theirs.timesteps, variance_type="fixed_small")
    large = ddpm_table(sched, theirs.timesteps, variance_type="fixed_large")
    for t in theirs.timesteps.tolist()[:-1]:  # the last, t = 0, adds no noise: std is 0 there by design
        assert small.coef[t, COL["std"]].item() ** 2 == pytest.approx(theirs._get_variance(t, variance_type="fixed_small").item(), rel=1e-12)
        assert large.coef[t, COL["std"]].item() ** 2 == pytest.approx(theirs._get_variance(t, variance_type="fixed_large").item(), rel=1e-12)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_table_rows(eta, set_alpha_to_one, use_clipped):
    sched = NoiseSchedule()
    ts = sampling_timesteps(1000, 30, "linspace")  # non-divisible and off the t - T//N grid on purpose
    table = ddim_table(sched, ts, "v_prediction", eta, set_alpha_to_one, use_clipped)
    ac = sched.alphas_cumprod.tolist()
    final = 1.0 if set_alpha_to_one else ac[0]
    for t in (999, 965, 500, 33, 20, 0):
        prev = t - 1000 // 30
        assert table.prev_timestep(t) == prev
        a, ap = ac[t], (ac[prev] if prev >= 0 else final)
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        d = math.sqrt(max(1 - ap - sigma**2, 0.0))
        sa, sb = math.sqrt(a), math.sqrt(1 - a)
        # v-prediction: x0 = sa x - sb v; eps = sa v + sb x (unclipped) or (x - sa x0c) / sb (clipped)
        p = [math.sqrt(ap) - d * sa / sb, d / sb, 0.0] if use_clipped else [math.sqrt(ap), d * sb, d * sa]
        expected = [sa, -sb, *p, sigma, 0.0, 0.0]
        assert table.coef[t].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ddim_eta_one_at_zero_terminal_snr_clamps_the_rounding_below_zero():
    """At eta = 1, d^2 = 1 - ap - sigma^2 is exactly (1 - ap) (1 - (1 - a/ap) / (1 - a)) = 0 where a = 0 (zero
    terminal SNR, t = T - 1); float64 leaves a hair below zero at some (T, N), e.g. (1000, 12) trailing: that
    is clamped to d = 0 (no direction term), not refused as an eta that is too large."""
    sched = NoiseSchedule(rescale_betas_zero_snr=True)
    ap_col, d_col = COEF_COLUMNS.index("p0"), COEF_COLUMNS.index("p1")
    table = ddim_table(sched, sampling_timesteps(1000, 12, "trailing"), "v_prediction", eta=1.0)
    row = table.coef[999]
    assert torch.isfinite(row).all() and row[d_col].item() == 0.0  # p1 = d * sb, and sb = 1 at a = 0
    assert row[ap_col].item() == pytest.approx(math.sqrt(sched.alphas_cumprod[999 - 1000 // 12].item()), rel=1e-12)


def test_step_table_device_table_and_fields():
    sched = NoiseSchedule()
    table = ddim_table(sched, sampling_timesteps(1000, 10), "sample", eta=1.0)
    assert isinstance(table, StepTable) and table.kind == "ddim" and table.variance_type is None
    assert table.eta == 1.0 and table.num_train_timesteps == 1000
    dev = table.table("cpu")
    assert dev.dtype == torch.float32 and dev.shape == (1000, 8) and dev.is_contiguous()
    assert torch.equal(dev, table.coef.float())
    assert table.table(None) is dev
    ddpm = ddpm_table(sched, prediction_type="v_prediction", variance_type="fixed_large")
    assert (ddpm.kind, ddpm.prediction_type, ddpm.variance_type) == ("ddpm", "v_prediction", "fixed_large")


# ------------------------------------------------------------------------------------------------
# zero terminal SNR and non-finite rows
# ------------------------------------------------------------------------------------------------


def test_epsilon_at_zero_snr_scheduled_raises():
    sched = NoiseSchedule(rescale_betas_zero_snr=True)
    ts = sampling_timesteps(1000, 25, "trailing")  # starts at t = 999 where alphas_cumprod == 0
    for build in (lambda: ddpm_table(sched, ts, "epsilon"), lambda: ddim_table(sched, ts, "epsilon")):
        with pytest.raises(ValueError, match=r"prediction_type='epsilon'.*t=999.*zero terminal SNR"):
            build()
    for prediction_type in ("v_prediction", "sample"):
        for table in (ddpm_table(sched, ts, prediction_type), ddim_table(sched, ts, prediction_type, eta=1.0)):
            assert torch.isfinite(table.coef).all()


def test_epsilon_at_zero_snr_unscheduled_row_is_the_only_non_finite_one():
    sched = NoiseSchedule(rescale_betas_zero_snr=True)
    table = ddpm_table(sched, sampling_timesteps(1000, 25, "leading"), "epsilon")  # 999 is not scheduled
    finite = torch.isfinite(table.coef).all(dim=1)
    assert not finite[999] and finite[:999].all()


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train_timesteps=0), r"num_train_timesteps must be in \[1, inf\], got 0"),
        (dict(beta_schedule="laplacian"), r"beta_schedule must be one of .*'linear'.*'sigmoid'.*got 'laplacian'"),
        (dict(beta_start=0.0), r"beta_start must be in \(0, 1\], got 0.0"),
        (dict(beta_end=1.5), r"beta_end must be in \(0, 1\], got 1.5"),
        (dict(num_train_timesteps=3, trained_betas=[0.1, 0.0, 0.2]), r"trained_betas must all be in \(0, 1\], got trained_betas\[1\] = 0.0"),
        (dict(num_train_timesteps=3, trained_betas=[0.1, 1.2, 0.2]), r"trained_betas\[1\] = 1.2"),
        (dict(num_train_timesteps=4, trained_betas=[0.1, 0.2]), r"trained_betas must have num_train_timesteps=4 values, got 2"),
        (dict(num_train_timesteps=2, trained_betas=[0.1, 0.2, 0.3]), r"num_train_timesteps=2 values, got 3"),
        (dict(beta_schedule="sigmoid", beta_start=0.0), r"beta_start must be in \(0, 1\], got 0.0"),  # sigmoid's too
    ],
)
def test_noise_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_refused_variance_types_explain_why():
    sched = NoiseSchedule()
    with pytest.raises(ValueError, match=r"variance_type='learned' is not supported.*square root"):
        ddpm_table(sched, variance_type="learned")
    with pytest.raises(ValueError, match=r"variance_type='fixed_large_log' is not supported.*NaN"):
        ddpm_table(sched, variance_type="fixed_large_log")
    with pytest.raises(ValueError, match=r"variance_type must be one of .*got 'bogus'"):
        ddpm_table(sched, variance_type="bogus")


def test_table_and_timestep_errors():
    sched = NoiseSchedule(num_train_timesteps=100)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 100\], got 101"):
        sampling_timesteps(100, 101)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 100\], got 0"):
        sampling_timesteps(100, 0)
    with pytest.raises(ValueError, match=r"spacing must be one of .*got 'even'"):
        sampling_timesteps(100, 10, "even")
    with pytest.raises(ValueError, match=r"timesteps must be strictly descending"):
        ddpm_table(sched, [10, 20])
    with pytest.raises(ValueError, match=r"timesteps must be strictly descending, got \[20, 10, 10\]"):
        ddim_table(sched, [20, 10, 10])  # a repeated step
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 99\].*max 100"):
        ddim_table(sched, [100, 50])
    with pytest.raises(TypeError, match=r"timesteps must hold integers"):
        ddim_table(sched, torch.tensor([50.0, 10.0]))
    with pytest.raises(TypeError, match=r"timesteps must hold integers, got dtype torch.bool"):
        ddpm_table(sched, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*got 'x0'"):
        ddim_table(sched, [50, 10], prediction_type="x0")
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0, got -0.5"):
        ddim_table(sched, [50, 10], eta=-0.5)
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0, got inf"):
        ddim_table(sched, [50, 10], eta=float("inf"))
    with pytest.raises(ValueError, match=r"eta=3.0 is too large"):
        ddim_table(sched, [50, 0], eta=3.0)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 100\], got 0"):
        ddim_table(sched, [50, 10], num_inference_steps=0)
    assert ddim_table(sched, [50, 10], num_inference_steps=4).prev_timestep(50) == 25  # T // N, not T // 2
    with pytest.raises(ValueError, match=r"t must be in \[0, 99\], got 100"):
        ddpm_table(sched).prev_timestep(100)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\], got min -1, max 5"):
        ddpm_table(sched).prev_timestep(torch.tensor([5, -1]))  # -1 must not index the last row
    with pytest.raises(TypeError, match=r"schedule must be a NoiseSchedule"):
        ddpm_table("linear")
