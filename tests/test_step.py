"""The fused reverse step (each kernel backend) against the reference: DDPM and DDIM, every prediction type,
variance type, clipping and thresholding, per-sample timesteps, dtypes, layouts and awkward shapes."""

import itertools
import zlib

import pytest
import torch
from _fuzz import poison, random_shape, run_backend_cases, storage_kinds, storage_variant
from _tolerance import NOISE_ROUNDING, assert_matches_reference

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.schedule import (BETA_SCHEDULES, TIMESTEP_SPACINGS, NoiseSchedule, ddim_table, ddpm_table,
                                sampling_timesteps)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
# (clip_range, thresholding, sample_max_value): none, clip at 1 and 1.5, dynamic thresholding up to 3
POST = [(None, False, 1.0), (1.0, False, 1.0), (1.5, False, 1.0), (None, True, 3.0)]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


def _inputs(table, shape, dtype, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    sample = torch.randn(shape, generator=g).to(dtype)
    out_channels = 2 * C if table.variance_type == "learned_range" else C
    model_output = torch.randn((B, out_channels, *shape[2:]), generator=g)
    if table.variance_type == "learned_range":  # the variance half is a fraction in [-1, 1]
        model_output[:, C:] = torch.rand((B, C, *shape[2:]), generator=g) * 2 - 1
    model_output = model_output.to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    t = table.timesteps[torch.randint(0, len(table.timesteps), (B,), generator=g)]
    t[0] = table.timesteps[-1]  # always include the last step (t = 0 for DDPM: no noise there)
    seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
    if channels_last:
        sample, model_output, noise = (v.contiguous(memory_format=torch.channels_last)
                                       for v in (sample, model_output, noise))
    return sample, model_output, noise, t, seeds


def _magnitudes(table, t, sample, model_output, noise):
    """Per element, the size of the terms each output is a rounded sum of: float32 rounding scales with
    them, not with the result (x0 = ax * x + am * m cancels terms ~1 / sqrt(ac) larger than x0 at large t,
    and clipping keeps such near-cancelled elements). Returns (for x0, for prev), sample's shape."""
    C = sample.shape[1]
    rows = table.coef[t].reshape(t.shape[0], 8, *[1] * (sample.dim() - 1))
    ax, am, p0, p1, p2, std, min_log, max_log = rows.unbind(1)
    x, m = sample.double(), model_output[:, :C].double()
    x0_terms = (ax * x).abs() + (am * m).abs()
    sigma = 1.0
    if table.variance_type == "learned_range":
        f = (model_output[:, C:].double() + 1) / 2
        sigma = torch.exp(0.5 * (f * max_log + (1 - f) * min_log))
    z = 0.0 if noise is None else noise.double().abs()
    noise_terms = torch.where(std != 0, (std * sigma * z).abs(), 0.0)  # none at all where std == 0
    prev_terms = p0.abs() * x0_terms + (p1 * x).abs() + (p2 * m).abs() + noise_terms
    return x0_terms, prev_terms


def _step(backend, model_output, t, sample, table, noise=None, seeds=None, **kwargs):
    """ddpm_fast.step on ``backend`` (inputs moved to its device), outputs back on the CPU."""
    model_output, sample, noise, seeds = backend.to(model_output, sample, noise, seeds)
    t = backend.to(t) if isinstance(t, torch.Tensor) else t
    prev, x0 = ddpm_fast.step(model_output, t, sample, table, noise, seeds=seeds, backend=backend.name, **kwargs)
    return prev.cpu(), (None if x0 is None else x0.cpu())


def _check(backend, table, sample, model_output, noise, t, seeds=None, return_pred_original=True, **post):
    prev, x0 = _step(backend, model_output, t, sample, table, noise, seeds=seeds,
                     return_pred_original=return_pred_original, **post)
    assert (x0 is not None) == return_pred_original
    assert_step_matches(prev, x0, table, sample, model_output, noise, t, seeds, **post)
    return prev, x0


def assert_step_matches(prev, x0, table, sample, model_output, noise, t, seeds=None, **post):
    """``prev`` (and ``x0`` unless None), a step of ``sample`` by ``model_output`` at ``t`` with the given noise or
    the noise drawn from ``seeds``, against the reference step in the same dtype and in float64."""
    sample, model_output, noise, seeds = (None if v is None else v.cpu() for v in (sample, model_output, noise, seeds))
    t = t.cpu() if isinstance(t, torch.Tensor) else torch.full((sample.shape[0],), t)
    if seeds is not None:  # the kernel drew the contract's noise: give the reference the same values
        noise = _drawn(t, seeds, sample)
    ref_prev, ref_x0 = reference.step(model_output, t, sample, table, noise=noise, **post)
    noise64 = None if noise is None else noise.double()
    ref64_prev, ref64_x0 = reference.step(model_output.double(), t, sample.double(), table, noise=noise64, **post)
    assert prev.dtype == sample.dtype and prev.shape == sample.shape
    x0_terms, prev_terms = _magnitudes(table, t, sample, model_output, noise)
    if x0 is not None:
        assert_matches_reference(x0, ref_x0, ref64_x0, what="pred_original_sample", magnitude=x0_terms)
    # drawn noise may differ from the reference's by NOISE_ROUNDING, weighted by std
    drawn_error = NOISE_ROUNDING * table.coef[t, 5].abs().max().item() if seeds is not None else 0.0
    assert_matches_reference(prev, ref_prev, ref64_prev, what="prev_sample", magnitude=prev_terms,
                             known_input_error=drawn_error)


def _drawn(t, seeds, sample):
    return reference.philox_normal(seeds, reference.STEP_STREAM_BASE + t, sample[0].numel()).reshape(
        sample.shape).to(sample.dtype)


@pytest.mark.parametrize("prediction, variance, post", list(itertools.product(PREDICTIONS, VARIANCES, POST)))
def test_ddpm_every_configuration(backend, schedule, prediction, variance, post):
    clip_range, thresholding, sample_max_value = post
    table = ddpm_table(schedule, prediction_type=prediction, variance_type=variance)
    sample, model_output, noise, t, _ = _inputs(table, (4, 3, 8, 8), torch.float32, seed=zlib.crc32(f"{prediction}{variance}".encode()) % 1000)
    _check(backend, table, sample, model_output, noise, t, clip_range=clip_range, thresholding=thresholding,
           sample_max_value=sample_max_value)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("post", [POST[0], POST[1], POST[3]])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_every_configuration(backend, schedule, eta, prediction, post, use_clipped):
    clip_range, thresholding, sample_max_value = post
    table = ddim_table(schedule, sampling_timesteps(1000, 50, "leading", steps_offset=1), prediction_type=prediction,
                       eta=eta, use_clipped_model_output=use_clipped)
    sample, model_output, noise, t, _ = _inputs(table, (4, 3, 8, 8), torch.float32, seed=int(eta * 10) + 3)
    _check(backend, table, sample, model_output, noise if eta else None, t, clip_range=clip_range,
           thresholding=thresholding, sample_max_value=sample_max_value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, channels_last", [
    ((2, 3, 16, 16), False),
    ((2, 3, 16, 16), True),
    ((1, 3, 5, 7), False),   # batch 1, odd H x W: a partial Philox group at the end of each sample
    ((3, 5, 3, 3), True),    # C = 5 channels_last: channel runs not a multiple of any vector width
    ((2, 4, 10), False),     # 3-D
    ((1, 3, 37, 29), False),  # 3219 elements a sample: a 2048-element chunk, then a partial one
])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_dtypes_layouts_shapes_with_seeds(backend, schedule, dtype, shape, channels_last, variance):
    table = ddpm_table(schedule, prediction_type="epsilon", variance_type=variance)
    sample, model_output, noise, t, seeds = _inputs(table, shape, dtype, seed=sum(shape), channels_last=channels_last)
    prev, _ = _check(backend, table, sample, model_output, None, t, seeds=seeds, clip_range=1.0)
    assert prev.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("shape", [
    (6, 3, 5, 7), (3, 5, 4, 6),  # H x W odd, and a multiple of 4
    (3, 72, 3, 5),  # C > 64: channels-last tiles of 64 channels and of the 8 left
])
def test_noise_is_independent_of_layout_and_batch(backend, schedule, shape):
    table = ddpm_table(schedule)
    sample, model_output, _, t, seeds = _inputs(table, shape, torch.float32, seed=1)
    t[:] = 500
    prev, _ = _step(backend, model_output, t, sample, table, seeds=seeds)
    # channels_last, and channels_last samples at a batch stride of their own (read in place)
    for kind in ("contiguous_channels_last", "batch_strided_channels_last"):
        cl = [storage_variant(v, kind, backend.device) for v in (model_output, sample)]
        prev_cl, _ = _step(backend, cl[0], t, cl[1], table, seeds=seeds)
        assert prev_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(prev, prev_cl)
    alone, _ = _step(backend, model_output[2:3], t[2:3], sample[2:3], table, seeds=seeds[2:3])
    assert torch.equal(alone, prev[2:3])


def test_per_sample_timesteps_equal_separate_steps(backend, schedule):
    """Samples at different t in one call equal one call per sample at its own t."""
    table = ddpm_table(schedule, variance_type="fixed_large")
    sample, model_output, noise, _, _ = _inputs(table, (4, 3, 6, 6), torch.float32, seed=2)
    t = torch.tensor([999, 500, 1, 0])
    prev, x0 = _step(backend, model_output, t, sample, table, noise, clip_range=1.0)
    for b in range(4):
        p, x = _step(backend, model_output[b:b + 1], int(t[b]), sample[b:b + 1], table, noise[b:b + 1],
                     clip_range=1.0)
        assert torch.equal(p, prev[b:b + 1]) and torch.equal(x, x0[b:b + 1])



def test_every_form_of_t_gives_the_same_timesteps(backend, schedule):
    """t as an int64 (B,) tensor, an int32 one (widened), a strided view (read at its stride, not as the first B
    values of its storage), and one timestep for all as an int or a 0-d int64 / int32 tensor: the same step."""
    table = ddpm_table(schedule)
    sample, model_output, noise, _, _ = _inputs(table, (3, 2, 4, 4), torch.float32,
                                                seed=int(torch.randint(0, 2**31, ())))
    wide = torch.randperm(1000)[:6]  # distinct: wide[::2] differs from wide[:3]
    t = wide[::2]
    expected = _step(backend, model_output, t.contiguous(), sample, table, noise)
    for form in (t, t.int()):
        assert all(torch.equal(a, b) for a, b in zip(_step(backend, model_output, form, sample, table, noise),
                                                     expected))
    one = int(wide[1])
    expected = _step(backend, model_output, torch.full((3,), one), sample, table, noise)
    for form in (one, torch.tensor(one), torch.tensor(one, dtype=torch.int32)):
        assert all(torch.equal(a, b) for a, b in zip(_step(backend, model_output, form, sample, table, noise),
                                                     expected))

@pytest.mark.parametrize("dtype", DTYPES)
def test_each_input_at_its_own_batch_stride_and_alignment(backend, schedule, dtype):
    """x, the model output and the noise each every other sample of a twice larger batch (each sample on 16
    bytes: the vector paths), learned_range reading the variance half at the model output's stride; through the
    op itself, a variance of its own at twice the model output's batch stride; the noise alone one element past
    16 bytes (the scalar paths). Last, the variance half alone off 16 bytes: one sample of C x H x W = 18."""
    table = ddpm_table(schedule, variance_type="learned_range")
    x, mo, noise, _, _ = _inputs(table, (3, 4, 8, 8), dtype, seed=50)
    t = torch.tensor([999, 500, 3])
    on = lambda v, kind: storage_variant(v, kind, backend.device)  # noqa: E731
    x_in, mo_in, noise_in = (on(v, "batch_strided") for v in (x, mo, noise))
    public = ddpm_fast.step(mo_in, backend.to(t), x_in, table, noise=noise_in, backend=backend.name)
    own_variance = torch.ops.ddpm_fast.step(x_in, backend.to(mo[:, :4].contiguous()), on(mo[:, 4:], "batch_strided"),
                                            backend.to(t), table.table(backend.device), noise_in, None, 0.0, 0.0, 1.0,
                                            True, backend.name)
    noise_moved = ddpm_fast.step(backend.to(mo), backend.to(t), backend.to(x), table, noise=on(noise, "misaligned"),
                                 backend=backend.name)
    for prev, x0 in (public, own_variance, noise_moved):
        assert_step_matches(prev.cpu(), x0.cpu(), table, x, mo, noise, t)
    x, noise = x[1:2, :2, :3, :3].contiguous(), noise[1:2, :2, :3, :3].contiguous()
    mo = torch.cat([mo[1:2, :2, :3, :3], mo[1:2, 4:6, :3, :3]], dim=1)
    assert mo[:, 2:].data_ptr() % 16 != 0
    _check(backend, table, x, mo, noise, t[1:2])



def test_torch_backend_is_the_reference(schedule):
    """backend="torch" is reference.step with every option passed on: the noise or seeds, clip_range,
    thresholding at the ratio and bound given (each of which binds here), and x0 only when asked for."""
    table = ddpm_table(schedule)
    sample, model_output, noise, _, seeds = _inputs(table, (2, 3, 8, 8), torch.float32,
                                                    seed=int(torch.randint(0, 2**31, ())))
    sample, t = sample * 2, torch.randint(1, 50, (2,))  # x0 ~ x: quantile 0.6 of |x0| ~1.7, 0.995 ~5.6
    for options in ({"seeds": seeds, "clip_range": 0.5},
                    {"noise": noise, "thresholding": True, "dynamic_thresholding_ratio": 0.6, "sample_max_value": 4.0}):
        prev, x0 = ddpm_fast.step(model_output, t, sample, table, backend="torch", **options)
        ref_prev, ref_x0 = reference.step(model_output, t, sample, table, **options)
        assert torch.equal(prev, ref_prev) and torch.equal(x0, ref_x0)
        prev, x0 = ddpm_fast.step(model_output, t, sample, table, backend="torch", return_pred_original=False,
                                  **options)
        assert torch.equal(prev, ref_prev) and x0 is None

def test_ddpm_adds_no_noise_at_t0(backend, schedule):
    table = ddpm_table(schedule)
    sample, model_output, noise, _, _ = _inputs(table, (2, 3, 4, 4), torch.float32, seed=3)
    a, _ = _step(backend, model_output, 0, sample, table, noise)
    b, _ = _step(backend, model_output, 0, sample, table, noise * 3)
    assert torch.equal(a, b)


def test_skip_pred_original(backend, schedule):
    table = ddpm_table(schedule)
    sample, model_output, noise, t, _ = _inputs(table, (2, 3, 4, 4), torch.float32, seed=4)
    prev, x0 = _step(backend, model_output, t, sample, table, noise, return_pred_original=False)
    assert x0 is None
    assert torch.equal(prev, _step(backend, model_output, t, sample, table, noise)[0])


def test_no_noise_term_where_std_is_zero(backend, schedule):
    """DDPM at t = 0 adds no noise term at all, as diffusers: a NaN in the predicted variance or in the noise
    does not reach prev_sample there (0 * sigma * z would carry it)."""
    table = ddpm_table(schedule, variance_type="learned_range")
    sample, model_output, noise, _, _ = _inputs(table, (2, 3, 4, 4), torch.float32, seed=6)
    clean, _ = _step(backend, model_output, 0, sample, table, noise)
    model_output[:, 3:], noise[:] = float("nan"), float("nan")
    prev, _ = _step(backend, model_output, 0, sample, table, noise)
    ref, _ = reference.step(model_output, torch.zeros(2, dtype=torch.int64), sample, table, noise=noise)
    assert torch.equal(prev, clean) and torch.isfinite(ref).all()


def test_thresholding_interpolates_as_torch_lerp(backend, schedule):
    """s is torch.quantile's value bit for bit, and its interpolation is torch.lerp: one fma, w d + below (w < 0.5)
    or (w - 1) d + above, d = above - below. Where the two neighbours lie far apart (magnitudes 0.1 to 1000 here),
    rounding w d first gives another last bit in several % of the rows, and then every |x0| < s differs from the
    reference (x0 = the model output exactly: prediction "sample")."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("PyTorch's CPU lerp rounds w d first without AVX2 (ATEN_CPU_CAPABILITY=default): the reference's "
                    "quantile is then one rounding off its vectorized fma, which the kernels follow")
    table = ddim_table(schedule, sampling_timesteps(1000, 50, "leading", steps_offset=1), prediction_type="sample")
    g = torch.Generator().manual_seed(41)
    B = 64
    scales = torch.tensor([0.1, 0.5, 0.9, 2.0, 50.0, 300.0, 1000.0])
    values = torch.rand(B, 7, generator=g) * scales[torch.argsort(torch.rand(B, 7, generator=g), dim=1)]
    model_output = (values * (torch.randint(0, 2, (B, 7), generator=g) * 2 - 1)).view(B, 7, 1, 1)
    sample = torch.randn(model_output.shape, generator=g)
    t = table.timesteps[torch.randint(0, len(table.timesteps), (B,), generator=g)]
    for ratio in (0.51, 0.61, 0.3):  # w = pos - floor(pos): 0.06, 0.66, 0.8
        kwargs = dict(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=1e4)
        _, x0 = _step(backend, model_output, t, sample, table, **kwargs)
        _, ref_x0 = reference.step(model_output, t, sample, table, **kwargs)
        assert torch.equal(x0, ref_x0), f"ratio {ratio}"


@pytest.mark.parametrize("post", [POST[0], POST[1], POST[3]])
def test_nan_propagates_like_the_reference(backend, schedule, post):
    """A NaN from a diverged model must surface, not be clamped into a plausible pixel."""
    clip_range, thresholding, sample_max_value = post
    table = ddpm_table(schedule)
    sample, model_output, noise, t, _ = _inputs(table, (2, 3, 4, 4), torch.float32, seed=5)
    model_output[1, 2, 3, 1] = float("nan")
    kwargs = dict(clip_range=clip_range, thresholding=thresholding, sample_max_value=sample_max_value)
    prev, x0 = _step(backend, model_output, t, sample, table, noise, **kwargs)
    ref_prev, ref_x0 = reference.step(model_output, t, sample, table, noise=noise, **kwargs)
    assert torch.equal(prev.isnan(), ref_prev.isnan()) and prev.isnan().any()
    assert torch.equal(x0.isnan(), ref_x0.isnan())


def test_options_that_float32_would_change_are_refused(backend, schedule):
    """The kernels take clip_range, the thresholding ratio and sample_max_value as float32, where a positive value
    below its smallest normal number reads as 0 ("off": clipping silently skipped) and a finite one above its
    largest overflows: every backend refuses them alike. The bounds themselves still act, and inf is no bound."""
    table = ddpm_table(schedule)
    sample, model_output, noise, t, _ = _inputs(table, (2, 3, 2, 3), torch.float32, seed=7)
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    on_device = backend.to(model_output, t, sample, noise)
    for name, kwargs in [("clip_range", dict(clip_range=tiny / 2**30)), ("clip_range", dict(clip_range=2 * huge)),
                         ("dynamic_thresholding_ratio", dict(thresholding=True, dynamic_thresholding_ratio=tiny / 2)),
                         ("sample_max_value", dict(thresholding=True, sample_max_value=2 * huge))]:
        for name_of_backend in (backend.name, "torch"):
            with pytest.raises(ValueError, match=rf"step: {name} must be at (least|most) .*float32"):
                ddpm_fast.step(*on_device[:2], on_device[2], table, on_device[3], backend=name_of_backend, **kwargs)
    _, x0 = _step(backend, model_output, t, sample, table, noise, clip_range=tiny)
    assert torch.equal(x0.abs(), torch.full_like(x0, tiny))  # |x0| >> tiny before the clip: all clipped to it
    unclipped = _step(backend, model_output, t, sample, table, noise)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, _step(backend, model_output, t, sample, table, noise,
                                                                  clip_range=float("inf"))))
    assert all(torch.equal(a, b) for a, b in zip(
        _step(backend, model_output, t, sample, table, noise, thresholding=True, sample_max_value=huge),
        _step(backend, model_output, t, sample, table, noise, thresholding=True, sample_max_value=float("inf"))))


def test_bad_table_and_timestep_are_named(backend, schedule):
    """Checked before a backend runs, so each says the same: the kernels' path read attributes of the wrong
    object, and torch.full overflowed on a timestep past int64."""
    table = ddpm_table(schedule)
    sample, model_output, noise = backend.to(*_inputs(table, (2, 3, 2, 2), torch.float32, seed=8)[:3])
    for name in (backend.name, "torch"):
        with pytest.raises(TypeError, match=r"step: table must be a StepTable, got NoiseSchedule"):
            ddpm_fast.step(model_output, 5, sample, schedule, noise, backend=name)
        for t in (2**70, -2**70):
            with pytest.raises(ValueError, match=rf"step: t must be a timestep in \[0, num_train_timesteps\), got {t}"):
                ddpm_fast.step(model_output, t, sample, table, noise, backend=name)


def test_channels_last_3d_gives_contiguous_outputs(backend, schedule):
    """contracts.md's layouts are NCHW and (4-D) channels_last: a channels_last_3d sample is read like any
    strided one, and every backend, the reference included, returns contiguous outputs."""
    table = ddpm_table(schedule)
    sample, model_output, noise, t, _ = _inputs(table, (2, 3, 2, 3, 4), torch.float32, seed=9)
    sample, model_output, noise = (v.contiguous(memory_format=torch.channels_last_3d)
                                   for v in (sample, model_output, noise))
    prev, x0 = _step(backend, model_output, t, sample, table, noise, clip_range=1.0)
    ref_prev, ref_x0 = reference.step(model_output, t, sample, table, noise=noise, clip_range=1.0)
    assert prev.is_contiguous() and x0.is_contiguous() and ref_prev.is_contiguous() and ref_x0.is_contiguous()
    assert_step_matches(prev, x0, table, sample, model_output, noise, t, clip_range=1.0)


def test_threshold_quantile_reads_each_input_at_its_own_batch_stride(backend, schedule):
    """Dynamic thresholding's quantile pass reads x0 = ax * x + am * m of each sample before the step does: with
    the sample (then the model output) every other sample of a twice larger batch beside a dense other, each is
    read at its own stride there too. No quantile here reaches sample_max_value, so each sample's threshold is
    its own quantile (a bound reached would hide a quantile taken from another sample's values)."""
    table = ddpm_table(schedule, variance_type="learned_range")
    sample, model_output, noise, t, _ = _inputs(table, (3, 4, 6, 5), torch.float32, seed=10)
    post = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1e4}
    for kinds in (("batch_strided", "contiguous"), ("contiguous", "batch_strided")):
        x_in, mo_in = (storage_variant(v, kind, backend.device) for v, kind in zip((sample, model_output), kinds))
        prev, x0 = _step(backend, mo_in, t, x_in, table, noise, **post)
        assert_step_matches(prev, x0, table, sample, model_output, noise, t, **post)


def test_threshold_quantile_with_ties_and_nan(backend, schedule):
    """x0 on a coarse grid makes many |x0| equal, so the quantile's two neighbours are often the same value (a
    tie) and sometimes not (the next value up); a NaN in one sample makes that sample NaN whatever the ratio (its
    rank need not reach the NaN), as torch.quantile does, and leaves the others alone."""
    table = ddim_table(schedule, sampling_timesteps(1000, 50, "leading", steps_offset=1), prediction_type="sample")
    g = torch.Generator().manual_seed(19)
    shape = (4, 3, 16, 16)
    sample = torch.randn(shape, generator=g)
    model_output = torch.randint(-40, 41, shape, generator=g) / 10.0  # x0 = the model output (prediction "sample")
    model_output[3, 1, 2, 3] = float("nan")
    t = torch.tensor([981, 501, 21, 1])
    for ratio in (0.5, 0.9, 0.995, 1.0):
        kwargs = dict(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=3.5)
        prev, x0 = _step(backend, model_output, t, sample, table, **kwargs)
        ref_prev, ref_x0 = reference.step(model_output, t, sample, table, **kwargs)
        assert torch.equal(x0[:3], ref_x0[:3]), f"ratio {ratio}"  # x0 = mo / s exactly: s must be torch's
        assert_step_matches(prev[:3], None, table, sample[:3], model_output[:3], None, t[:3], **kwargs)
        assert torch.isnan(x0[3]).all() and torch.isnan(prev[3]).all() and torch.isnan(ref_x0[3]).all()


def test_threshold_next_value_within_and_beyond_the_last_digit(backend, schedule):
    """Linear interpolation needs the value just above the quantile's rank. Where it shares all but the last
    10-bit digit of its float32 bits with the one at that rank (1.5 and 1.5 + 5 ulps), the last pass's counts
    give it; where it differs earlier (1.5 and 2.0), the smallest key above the candidates; a tie of exactly
    two (1.5 and 1.5, then 3.0) is the value itself. Each gives torch.quantile's value (60% of the way: 3 ulps
    up in the first case, so a neighbour off by one ulp shows)."""
    table = ddim_table(schedule, sampling_timesteps(1000, 50, "leading", steps_offset=1), prediction_type="sample")
    g = torch.Generator().manual_seed(23)
    v0 = torch.tensor(1.5)
    nexts = ((v0.view(torch.int32) + 5).view(torch.float32), torch.tensor(2.0), v0)
    rows = []
    for v1 in nexts:
        values = torch.cat([torch.full((50,), 0.25), v0[None], v1[None], torch.full((48,), 3.0)])
        signs = torch.randint(0, 2, (100,), generator=g) * 2 - 1.0
        rows.append(values[torch.randperm(100, generator=g)] * signs)
    model_output = torch.stack(rows).view(3, 1, 10, 10)  # x0 = the model output; rank 50 of 100 holds 1.5
    sample, t = torch.randn(model_output.shape, generator=g), torch.tensor([981, 501, 21])
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=50.6 / 99, sample_max_value=8.0)
    _, x0 = _step(backend, model_output, t, sample, table, **kwargs)
    _, ref_x0 = reference.step(model_output, t, sample, table, **kwargs)
    s = 0.25 / ref_x0.abs().amin(dim=(1, 2, 3))  # the 0.25s, below the bound, end at 0.25 / s
    assert (s[:2] > v0).all() and (s[:2] < torch.stack(nexts[:2])).all() and s[2] == v0
    assert torch.equal(x0, ref_x0)  # x0 = the model output exactly (no product to round): s must be torch's


def test_op_with_a_noisy_row_without_noise_or_seeds(backend, schedule):
    """Below the public function (which refuses a table that adds noise without noise or seeds), the step op takes
    neither where no sample draws (std == 0: DDPM at t = 0), so it must not draw from absent seeds for a row that
    adds noise: with t on the CPU the cpu and triton backends refuse the call by name; the CUDA kernels (their
    emulator too), which do not read t on the host, make that sample NaN and step the others."""
    table = ddpm_table(schedule)
    sample, model_output, _, _, _ = _inputs(table, (3, 3, 4, 5), torch.float32, seed=11)
    t = torch.tensor([0, 500, 0])
    for layout in (torch.contiguous_format, torch.channels_last):
        x, mo = (backend.to(v).contiguous(memory_format=layout) for v in (sample, model_output))
        run = lambda: torch.ops.ddpm_fast.step(x, mo, None, backend.to(t), table.table(backend.device),  # noqa: E731
                                               None, None, 0.0, 0.0, 1.0, True, backend.name)
        if backend.name != "cuda" and backend.device.type == "cpu":
            with pytest.raises(ValueError, match=r"step: timestep t\[1\] = 500 adds noise .* but neither noise "
                                                 r"nor seeds was given"):
                run()
        else:
            prev, x0 = (v.cpu() for v in run())
            assert torch.isnan(prev[1]).all() and torch.isnan(x0[1]).all()
            assert_step_matches(prev[0::2], x0[0::2], table, sample[0::2], model_output[0::2], None, t[0::2])


def test_nan_in_the_predicted_variance_propagates(backend, schedule):
    """learned_range: a NaN in the variance half of the model output makes sigma = exp(NaN) NaN at that
    element of prev_sample, as in the reference, where a step adds noise (an exp that maps NaN to a finite
    value would hide a diverged model behind a huge but plausible-looking pixel); nowhere else."""
    table = ddpm_table(schedule, variance_type="learned_range")
    sample, model_output, noise, _, seeds = _inputs(table, (2, 3, 4, 4), torch.float32, seed=12)
    t = torch.tensor([500, 37])
    model_output[1, 3 + 2, 3, 1] = float("nan")
    ref_prev, _ = reference.step(model_output, t, sample, table, noise=noise)
    assert ref_prev.isnan().sum() == 1 and ref_prev[1, 2, 3, 1].isnan()
    for kwargs in (dict(noise=noise), dict(seeds=seeds)):
        prev, x0 = _step(backend, model_output, t, sample, table, **kwargs)
        assert torch.equal(prev.isnan(), ref_prev.isnan()) and torch.isfinite(x0).all()


def _random_table(rng):
    T = rng.choice([1000, 1000, 50, 10])
    prediction = rng.choice(PREDICTIONS)
    # zero terminal SNR makes x0 from epsilon infinite at t = T - 1 (the tables refuse it)
    zero_snr = prediction != "epsilon" and rng.random() < 0.2
    schedule = NoiseSchedule(T, rng.choice(list(BETA_SCHEDULES)), rescale_betas_zero_snr=zero_snr)
    steps = sampling_timesteps(T, rng.randint(1, T), rng.choice(TIMESTEP_SPACINGS))
    if rng.random() < 0.5:
        return ddpm_table(schedule, None if rng.random() < 0.3 else steps, prediction, rng.choice(VARIANCES))
    return ddim_table(schedule, steps, prediction, eta=rng.choice([0.0, 0.3, 1.0]),
                      set_alpha_to_one=rng.random() < 0.5, use_clipped_model_output=rng.random() < 0.5)


def _random_case(rng, small: bool) -> dict:
    """A configuration drawn at random; ``small`` keeps it to a few programs for Triton's interpreter."""
    shape = random_shape(rng, small)
    return dict(table=_random_table(rng), shape=shape, dtype=rng.choice(DTYPES),
                storage=storage_kinds(rng, 3), noise=rng.choice(["given", "seeds", "seeds"]),
                scalar_t=rng.random() < 0.2, post=rng.choice([None, "clip", "clip", "threshold"]),
                clip_range=rng.choice([0.5, 1.0, 1.5, 3.0]), ratio=rng.choice([0.9, 0.995, 1.0]),
                sample_max_value=rng.choice([1.0, 1.5, 3.0]), return_pred_original=rng.random() < 0.8,
                nan=rng.choice([None] * 8 + ["sample", "model_output"]))


def _check_random_case(backend, case):
    table, shape, dtype = case["table"], case["shape"], case["dtype"]
    B, C = shape[:2]
    sample = torch.randn(shape)
    model_output = torch.randn((B, 2 * C if table.variance_type == "learned_range" else C, *shape[2:]))
    if table.variance_type == "learned_range":  # the variance half is a fraction in [-1, 1]
        model_output[:, C:] = torch.rand((B, C, *shape[2:])) * 2 - 1
    noise = torch.randn(shape)
    if case["nan"]:  # a diverged model: NaN must surface (over the whole sample when thresholding), not be clamped
        poison(sample if case["nan"] == "sample" else model_output)
    sample, model_output, noise = (storage_variant(v.to(dtype), kind, backend.device)
                                   for v, kind in zip((sample, model_output, noise), case["storage"]))
    t = table.timesteps[torch.randint(0, len(table.timesteps), (B,))].to(backend.device)
    t = int(t[0]) if case["scalar_t"] else t
    seeds = torch.randint(-2**62, 2**62, (B,)).to(backend.device) if case["noise"] == "seeds" else None
    noise = noise if case["noise"] == "given" else None
    post = {"clip": dict(clip_range=case["clip_range"]), None: {},
            "threshold": dict(thresholding=True, dynamic_thresholding_ratio=case["ratio"],
                              sample_max_value=case["sample_max_value"])}[case["post"]]
    _check(backend, table, sample, model_output, noise, t, seeds, case["return_pred_original"], **post)


def test_random_cases(backend):
    """Fresh random configurations each run (tests/_fuzz.py): schedule, table, shape, dtype, storage of each
    input, timesteps, noise and post-processing, against the reference."""
    run_backend_cases(backend, _random_case, _check_random_case)
