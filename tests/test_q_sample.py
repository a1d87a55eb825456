"""The fused q_sample (each kernel backend) against the reference, for every dtype, layout and awkward shape."""

import pytest
import torch
from _fuzz import poison, random_shape, run_backend_cases, storage_kinds, storage_variant
from _tolerance import FLOOR, NOISE_ROUNDING, assert_matches_reference

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.schedule import BETA_SCHEDULES, NoiseSchedule, ddpm_table

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (4, 3, 16, 16),  # the common image case
    (1, 3, 5, 7),    # batch 1, odd H x W: numel per sample not a multiple of 4 (a partial Philox group)
    (3, 5, 3, 3),    # C not a multiple of 4 or 8
    (2, 6, 9),       # 3-D (B, C, L)
    (5, 7),          # 2-D (B, D): S = 1
    (2, 3, 37, 29),  # 3219 elements a sample: a 2048-element chunk, then a partial one
]


def _inputs(shape, dtype, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    seeds = torch.randint(-2**62, 2**62, (shape[0],), generator=g)
    if channels_last:
        x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
    return x0, noise, t, seeds


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


def _q_sample(backend, x0, t, schedule, noise=None, seeds=None, **kwargs):
    """ddpm_fast.q_sample on ``backend`` (inputs moved to its device), outputs back on the CPU."""
    x0, noise, seeds = backend.to(x0, noise, seeds)
    t = backend.to(t) if isinstance(t, torch.Tensor) else t
    x_t, target = ddpm_fast.q_sample(x0, t, schedule, noise, seeds=seeds, backend=backend.name, **kwargs)
    return x_t.cpu(), target.cpu()


def _assert_x_t_and_v_match(x_t, v, x0, noise, t, schedule, known_input_error=0.0):
    """x_t and the v target of (x0, noise, t) against the reference in x0's dtype and in float64."""
    x0_64, noise_64 = x0.double(), noise.double()
    assert_matches_reference(x_t.cpu(), reference.q_sample(x0, t, schedule, noise=noise)[0],
                             reference.q_sample(x0_64, t, schedule, noise=noise_64)[0], what="x_t",
                             known_input_error=known_input_error)
    assert_matches_reference(v.cpu(), reference.training_target(x0, noise, t, schedule, "v_prediction"),
                             reference.training_target(x0_64, noise_64, t, schedule, "v_prediction"), what="v",
                             known_input_error=known_input_error)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
def test_given_noise_matches_reference(backend, schedule, shape, dtype, target):
    x0, noise, t, _ = _inputs(shape, dtype, seed=len(shape) * 7 + DTYPES.index(dtype))
    x_t, out = _q_sample(backend, x0, t, schedule, noise, target=target)
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=noise)
    ref64_x_t, _ = reference.q_sample(x0.double(), t, schedule, noise=noise.double())
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    assert_matches_reference(x_t, ref_x_t, ref64_x_t, what="x_t")
    if target == "epsilon":
        assert torch.equal(out, noise)
    else:
        ref_v = reference.training_target(x0, noise, t, schedule, target)
        ref64_v = reference.training_target(x0.double(), noise.double(), t, schedule, target)
        assert_matches_reference(out, ref_v, ref64_v, what="v")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_noise_matches_reference_generator(backend, schedule, shape, dtype):
    x0, _, t, seeds = _inputs(shape, dtype, seed=11 + len(shape))
    x_t, eps = _q_sample(backend, x0, t, schedule, seeds=seeds, stream=5)
    ref_eps = reference.philox_normal(seeds, 5, x0[0].numel()).reshape(shape)
    torch.testing.assert_close(eps.float(), ref_eps.to(dtype).float(), rtol=0, atol=NOISE_ROUNDING + FLOOR[dtype] * 6)
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=eps)
    ref64_x_t, _ = reference.q_sample(x0.double(), t, schedule, noise=eps.double())
    assert_matches_reference(x_t, ref_x_t, ref64_x_t, what="x_t")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    (3, 6, 5, 7), (2, 5, 4, 6),  # H x W odd, and a multiple of 4
    (2, 5, 3, 6),    # H x W even, not a multiple of 4: a Philox group spans two channels' pixels
    (2, 72, 3, 5),   # C > 64: tiles of 64 channels and of the 8 left, each pixel's channels in two runs
    (1, 3, 3, 227),  # 681 pixels: a tile of 680, then one of a single pixel whose runs start mid-group
])
def test_channels_last_equals_contiguous(backend, schedule, dtype, shape):
    """The noise is a function of the logical index, so the memory layout must not change a single value:
    channels_last, and channels_last samples at a batch stride of their own (every other one of a larger batch,
    read in place: the outputs are channels_last)."""
    x0, noise, t, seeds = _inputs(shape, dtype, seed=3)
    x0, noise, t, seeds = backend.to(x0, noise, t, seeds)
    for kwargs in ({"seeds": seeds}, {"noise": noise}):
        dense = ddpm_fast.q_sample(x0, t, schedule, target="v_prediction", backend=backend.name, **kwargs)
        for kind in ("contiguous_channels_last", "batch_strided_channels_last"):
            cl_kwargs = {k: (storage_variant(v, kind, backend.device) if k == "noise" else v)
                         for k, v in kwargs.items()}
            cl = ddpm_fast.q_sample(storage_variant(x0, kind, backend.device), t, schedule,
                                    target="v_prediction", backend=backend.name, **cl_kwargs)
            for a, b in zip(dense, cl):
                assert b.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(a, b)


def test_noise_independent_of_batch_composition(backend, schedule):
    """Sample b's noise depends on its seed only: alone, or inside a shuffled batch of 8."""
    x0, _, t, seeds = _inputs((8, 3, 8, 8), torch.float32, seed=4)
    _, batch_eps = _q_sample(backend, x0, t, schedule, seeds=seeds)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    _, shuffled = _q_sample(backend, x0[perm], t[perm], schedule, seeds=seeds[perm])
    assert torch.equal(shuffled, batch_eps[perm])
    _, alone = _q_sample(backend, x0[5:6], t[5:6], schedule, seeds=seeds[5:6])
    assert torch.equal(alone, batch_eps[5:6])


def test_streams_and_seeds_change_the_noise(backend, schedule):
    x0, _, t, seeds = _inputs((2, 3, 8, 8), torch.float32, seed=5)
    _, a = _q_sample(backend, x0, t, schedule, seeds=seeds, stream=0)
    _, b = _q_sample(backend, x0, t, schedule, seeds=seeds, stream=1)
    _, c = _q_sample(backend, x0, t, schedule, seeds=seeds + 1, stream=0)
    assert not torch.isclose(a, b).any() and not torch.isclose(a, c).any()


def test_non_contiguous_inputs(backend, schedule):
    """A strided view (every other channel) is handled, not misread."""
    x0, noise, t, _ = _inputs((2, 8, 6, 6), torch.float32, seed=6)
    view, noise_view = x0[:, ::2], noise[:, 1::2]
    on_device = backend.to(x0, noise, t)  # sliced on the device, so the kernel sees the strided view
    x_t, _ = ddpm_fast.q_sample(on_device[0][:, ::2], on_device[2], schedule, on_device[1][:, 1::2],
                                backend=backend.name)
    x_t = x_t.cpu()
    ref, _ = reference.q_sample(view.contiguous(), t, schedule, noise=noise_view.contiguous())
    ref64, _ = reference.q_sample(view.double(), t, schedule, noise=noise_view.double())
    assert_matches_reference(x_t, ref, ref64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_input_at_its_own_batch_stride_and_alignment(backend, schedule, dtype):
    """x0 every 2nd and the noise every 3rd sample of larger batches (each sample dense and on 16 bytes: read in
    place, each at its own batch stride, on the vector paths); then the noise alone one element past 16 bytes
    beside an aligned x0 (the scalar paths)."""
    x0, noise, t, _ = _inputs((3, 4, 8, 8), dtype, seed=47)
    every_2nd = storage_variant(x0, "batch_strided", backend.device)
    every_3rd = torch.empty((9, 4, 8, 8), dtype=dtype, device=backend.device)[::3].copy_(noise)
    misaligned = storage_variant(noise, "misaligned", backend.device)
    for x0_in, noise_in in ((every_2nd, every_3rd), (backend.to(x0), misaligned)):
        x_t, v = ddpm_fast.q_sample(x0_in, backend.to(t), schedule, noise_in, target="v_prediction",
                                    backend=backend.name)
        _assert_x_t_and_v_match(x_t, v, x0, noise, t, schedule)


def test_scalar_timestep_and_empty_batch(backend, schedule):
    x0, noise, _, _ = _inputs((2, 3, 4, 4), torch.float32, seed=7)
    x_t, _ = _q_sample(backend, x0, 999, schedule, noise)
    ref, _ = reference.q_sample(x0, torch.tensor([999, 999]), schedule, noise=noise)
    assert_matches_reference(x_t, ref, reference.q_sample(x0.double(), torch.tensor([999, 999]), schedule,
                                                          noise=noise.double())[0])
    empty = torch.empty(0, 3, 4, 4)
    x_t, eps = _q_sample(backend, empty, torch.empty(0, dtype=torch.int64), schedule,
                         seeds=torch.empty(0, dtype=torch.int64))
    assert x_t.shape == empty.shape and eps.shape == empty.shape



def test_every_form_of_t_gives_the_same_timesteps(backend, schedule):
    """t as an int64 (B,) tensor, an int32 one (widened), a strided view (read at its stride, not as the first B
    values of its storage), and one timestep for all as an int or a 0-d int64 / int32 tensor: the same x_t."""
    x0, noise, _, _ = _inputs((3, 2, 4, 4), torch.float32, seed=int(torch.randint(0, 2**31, ())))
    wide = torch.randperm(1000)[:6]  # distinct: wide[::2] differs from wide[:3]
    t = wide[::2]
    expected, _ = _q_sample(backend, x0, t.contiguous(), schedule, noise)
    for form in (t, t.int()):
        assert torch.equal(_q_sample(backend, x0, form, schedule, noise)[0], expected)
    one = int(wide[1])
    expected, _ = _q_sample(backend, x0, torch.full((3,), one), schedule, noise)
    for form in (one, torch.tensor(one), torch.tensor(one, dtype=torch.int32)):
        assert torch.equal(_q_sample(backend, x0, form, schedule, noise)[0], expected)


def test_strided_seeds_are_read_at_their_stride(backend, schedule):
    x0, _, t, _ = _inputs((3, 2, 4, 4), torch.float32, seed=int(torch.randint(0, 2**31, ())))
    wide = torch.randint(-2**62, 2**62, (6,))
    expected = _q_sample(backend, x0, t, schedule, seeds=wide[::2].contiguous())
    assert all(torch.equal(a, b) for a, b in zip(_q_sample(backend, x0, t, schedule, seeds=wide[::2]), expected))

def test_sample_target_returns_x0(backend, schedule):
    x0, noise, t = backend.to(*_inputs((2, 3, 4, 4), torch.float32, seed=8)[:3])
    _, target = ddpm_fast.q_sample(x0, t, schedule, noise, target="sample", backend=backend.name)
    assert target is x0


def test_bad_schedule_and_timestep_are_named(backend, schedule):
    """Checked before a backend runs, so each says the same: the kernels' path read schedule.q_table of a
    StepTable, and torch.full overflowed on a timestep past int64."""
    x0, noise = backend.to(*_inputs((2, 3, 2, 2), torch.float32, seed=12)[:2])
    for name in (backend.name, "torch"):
        with pytest.raises(TypeError, match=r"q_sample: schedule must be a NoiseSchedule, got StepTable"):
            ddpm_fast.q_sample(x0, 3, ddpm_table(schedule), noise, backend=name)
        for t in (2**70, -2**70):
            with pytest.raises(ValueError, match=rf"q_sample: t must be a timestep in \[0, num_train_timesteps\), "
                                                 rf"got {t}"):
                ddpm_fast.q_sample(x0, t, schedule, noise, backend=name)


def test_channels_last_3d_gives_contiguous_outputs(backend, schedule):
    """contracts.md's layouts are NCHW and (4-D) channels_last: a channels_last_3d input is read like any strided
    one, and every backend, the reference included, returns contiguous outputs."""
    x0, noise, t, _ = _inputs((2, 3, 2, 3, 4), torch.float32, seed=13)
    x0, noise = (v.contiguous(memory_format=torch.channels_last_3d) for v in (x0, noise))
    x_t, v = _q_sample(backend, x0, t, schedule, noise, target="v_prediction")
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=noise)
    ref_v = reference.training_target(x0, noise, t, schedule, "v_prediction")
    assert x_t.is_contiguous() and v.is_contiguous() and ref_x_t.is_contiguous() and ref_v.is_contiguous()
    assert_matches_reference(x_t, ref_x_t, reference.q_sample(x0.double(), t, schedule, noise=noise.double())[0])
    assert_matches_reference(v, ref_v, reference.training_target(x0.double(), noise.double(), t, schedule,
                                                                 "v_prediction"), what="v")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_infinite_half_inputs_stay_infinite(backend, schedule, dtype):
    """An overflowed activation: +-inf in a float16 / bfloat16 x0 (and a NaN) read as such, so x_t is +-inf (NaN)
    there as in the reference, not the largest finite value's multiple; every other element as usual."""
    x0, noise, t, _ = _inputs((2, 3, 4, 5), dtype, seed=17)
    x0[0, 1, 2, 3], x0[1, 0, 0, 0], x0[1, 2, 3, 4] = float("inf"), float("-inf"), float("nan")
    x_t, v = _q_sample(backend, x0, t, schedule, noise, target="v_prediction")
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=noise)
    assert torch.equal(x_t.isinf(), ref_x_t.isinf()) and x_t.isinf().sum() == 2
    _assert_x_t_and_v_match(x_t, v, x0, noise, t, schedule)


def test_two_threads_write_every_chunk(backend, schedule, two_threads):
    """2 x 65536 elements of drawn noise: enough work for the cpu kernels to run two threads, which claim chunks
    of 2048-element items from a shared counter until none is left. Every element, the last item's included,
    against the reference generator."""
    backend.subset(keep=False)  # the interpreter's cost; the claiming is the cpu kernels' own
    x0, _, t, seeds = _inputs((2, 4, 128, 128), torch.float32, seed=16)
    x_t, v = _q_sample(backend, x0, t, schedule, seeds=seeds, stream=3, target="v_prediction")
    noise = reference.philox_normal(seeds, 3, x0[0].numel()).reshape(x0.shape)
    _assert_x_t_and_v_match(x_t, v, x0, noise, t, schedule, known_input_error=NOISE_ROUNDING)


def test_torch_backend_is_the_reference(schedule):
    x0, noise, t, seeds = _inputs((2, 3, 4, 4), torch.float32, seed=9)
    x_t, v = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, target="v_prediction", backend="torch")
    ref_x_t, eps = reference.q_sample(x0, t, schedule, seeds=seeds)
    assert torch.equal(x_t, ref_x_t)
    assert torch.equal(v, reference.training_target(x0, eps, t, schedule, "v_prediction"))


def _random_case(rng, small: bool) -> dict:
    """A configuration drawn at random; ``small`` keeps it to a few programs for Triton's interpreter."""
    shape = random_shape(rng, small)
    return dict(T=rng.choice([1000, 1000, 50, 10]), beta_schedule=rng.choice(list(BETA_SCHEDULES)),
                shape=shape, dtype=rng.choice(DTYPES), storage=storage_kinds(rng, 2),
                noise=rng.choice(["given", "seeds", "seeds"]),
                stream=rng.choice([0, 7, 2**32 - 1, rng.randrange(2**32)]),
                target=rng.choice(["epsilon", "v_prediction", "sample"]), scalar_t=rng.random() < 0.2,
                nan=rng.random() < 0.1)


def _check_random_case(backend, case):
    schedule = NoiseSchedule(case["T"], case["beta_schedule"])
    shape, dtype = case["shape"], case["dtype"]
    x0 = torch.rand(shape) * 2 - 1
    if case["nan"]:  # NaN in, NaN out at that element, nowhere else
        poison(x0)
    x0, noise = (storage_variant(v.to(dtype), kind, backend.device)
                 for v, kind in zip((x0, torch.randn(shape)), case["storage"]))
    t = torch.randint(0, case["T"], (shape[0],))
    seeds = torch.randint(-2**62, 2**62, (shape[0],))
    drawn = case["noise"] == "seeds"
    x_t, out = ddpm_fast.q_sample(x0, int(t[0]) if case["scalar_t"] else t.to(backend.device), schedule,
                                  None if drawn else noise, seeds=seeds.to(backend.device) if drawn else None,
                                  stream=case["stream"], target=case["target"], backend=backend.name)
    x0, noise, out = x0.cpu(), noise.cpu(), out.cpu()
    t = t[:1].expand(shape[0]) if case["scalar_t"] else t
    assert x_t.dtype == dtype and x_t.shape == shape and out.shape == shape
    # drawn noise may differ from the reference's by NOISE_ROUNDING; x_t and v weigh it by at most 1
    drawn_error = NOISE_ROUNDING if drawn else 0.0
    eps = reference.philox_normal(seeds, case["stream"], x0[0].numel()).reshape(shape) if drawn else noise
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=eps.to(dtype))
    ref64_x_t, _ = reference.q_sample(x0.double(), t, schedule, noise=eps.double())
    assert_matches_reference(x_t.cpu(), ref_x_t, ref64_x_t, what="x_t", known_input_error=drawn_error)
    if case["target"] == "epsilon":
        torch.testing.assert_close(out, eps.to(dtype), rtol=0, atol=drawn_error + (FLOOR[dtype] * 6 if drawn else 0))
    elif case["target"] == "sample":
        torch.testing.assert_close(out, x0, rtol=0, atol=0, equal_nan=True)
    else:
        ref_v = reference.training_target(x0, eps.to(dtype), t, schedule, "v_prediction")
        ref64_v = reference.training_target(x0.double(), eps.double(), t, schedule, "v_prediction")
        assert_matches_reference(out, ref_v, ref64_v, what="v", known_input_error=drawn_error)


def test_random_cases(backend):
    """Fresh random configurations each run (tests/_fuzz.py): schedule, shape, dtype, storage of each input,
    timesteps, given or drawn noise, stream and target, against the reference."""
    run_backend_cases(backend, _random_case, _check_random_case)
