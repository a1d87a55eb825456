"""Bad input gets an error that names the op, the argument, what was expected and what arrived,
on every backend (the checks run before the backend is chosen)."""

import re

import pytest
import torch

import ddpm_fast
from ddpm_fast.schedule import NoiseSchedule, ddim_table, ddpm_table, sampling_timesteps

BACKENDS = ["torch"] + (["cpu"] if ddpm_fast.build_info()["backends"]["cpu"] == "available" else [])


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


def _rand(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample(schedule, backend):
    x0, seeds = _rand(2, 3, 4, 4), torch.tensor([1, 2])
    q = lambda *a, **k: ddpm_fast.q_sample(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"q_sample: noise must have shape \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        q(x0, 3, schedule, _rand(2, 3, 4, 5))
    with pytest.raises(TypeError, match=r"q_sample: noise must have dtype float32; got float16"):
        q(x0, 3, schedule, _rand(2, 3, 4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"q_sample: x0 must have dtype .*; got int64"):
        q(torch.ones(2, 3, 4, 4, dtype=torch.int64), 3, schedule, seeds=seeds)
    with pytest.raises(ValueError, match=r"q_sample: noise must be on cpu .*got meta"):
        q(x0, 3, schedule, torch.empty(2, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"q_sample: seeds must have shape \(2,\) .*got \(3,\)"):
        q(x0, 3, schedule, seeds=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"q_sample: seeds must have dtype int64; got int32"):
        q(x0, 3, schedule, seeds=seeds.int())
    with pytest.raises(ValueError, match=r"q_sample: seeds must be on cpu like the sample, got meta"):
        q(x0, 3, schedule, seeds=torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match=r"q_sample: give exactly one of noise and seeds, got neither"):
        q(x0, 3, schedule)
    with pytest.raises(ValueError, match=r"q_sample: give exactly one of noise and seeds, got both"):
        q(x0, 3, schedule, _rand(2, 3, 4, 4), seeds=seeds)
    with pytest.raises(ValueError, match=r"q_sample: t must be an int or have shape \(2,\) .*got \(3,\)"):
        q(x0, torch.tensor([1, 2, 3]), schedule, seeds=seeds)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\] \(num_train_timesteps\), got min 5, max 1000"):
        q(x0, torch.tensor([5, 1000]), schedule, seeds=seeds)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\] \(num_train_timesteps\), got min -1, max -1"):
        q(x0, -1, schedule, seeds=seeds)
    with pytest.raises(ValueError, match=r"q_sample: target must be one of"):
        q(x0, 3, schedule, seeds=seeds, target="velocity")
    with pytest.raises(ValueError, match=r"q_sample: stream must be an int in \[0, 2\*\*32\)"):
        q(x0, 3, schedule, seeds=seeds, stream=2**32)
    for stream in (-1, True):
        with pytest.raises(ValueError, match=rf"q_sample: stream must be an int in \[0, 2\*\*32\), got {stream}$"):
            q(x0, 3, schedule, seeds=seeds, stream=stream)
    with pytest.raises(TypeError, match=r"q_sample: t must be an int or an int64 tensor of shape \(2,\), got bool$"):
        q(x0, True, schedule, seeds=seeds)
    with pytest.raises(ValueError, match=r"q_sample: x0 must have at least 2 dimensions, got shape \(4,\)"):
        q(_rand(4), 3, schedule, seeds=torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step(schedule, backend):
    table = ddpm_table(schedule)
    sample, mo, seeds = _rand(2, 3, 4, 4), _rand(2, 3, 4, 4), torch.tensor([1, 2])
    s = lambda *a, **k: ddpm_fast.step(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"step: model_output must have shape \(2, 3, 4, 4\), got \(2, 6, 4, 4\)"):
        s(_rand(2, 6, 4, 4), 5, sample, table, seeds=seeds)
    learned = ddpm_table(schedule, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"step: model_output must have shape \(2, 6, 4, 4\) \(learned_range"):
        s(mo, 5, sample, learned, seeds=seeds)
    with pytest.raises(TypeError, match=r"step: model_output must have dtype float32; got bfloat16"):
        s(mo.bfloat16(), 5, sample, table, seeds=seeds)
    with pytest.raises(ValueError, match=r"step: this ddpm table adds noise"):
        s(mo, 5, sample, table)
    with pytest.raises(ValueError, match=r"step: seeds must have shape \(2,\)"):
        s(mo, 5, sample, table, seeds=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"step: give at most one of noise and seeds, got both"):
        s(mo, 5, sample, table, _rand(2, 3, 4, 4), seeds=seeds)
    with pytest.raises(TypeError, match=r"step: noise must have dtype float32; got float16"):
        s(mo, 5, sample, table, _rand(2, 3, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"step: noise must have shape \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        s(mo, 5, sample, table, _rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"step: noise must be on cpu like the other inputs, got meta"):
        s(mo, 5, sample, table, torch.empty(2, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"step: model_output must be on cpu like the other inputs, got meta"):
        s(torch.empty(2, 3, 4, 4, device="meta"), 5, sample, table, seeds=seeds)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\] \(num_train_timesteps\), got min 1000, max 1000"):
        s(mo, 1000, sample, table, seeds=seeds)
    with pytest.raises(ValueError, match=r"step: clip_range must be > 0 or None, got 0.0"):
        s(mo, 5, sample, table, seeds=seeds, clip_range=0.0)
    with pytest.raises(ValueError, match=r"step: dynamic_thresholding_ratio must be in \(0, 1\], got 1.5"):
        s(mo, 5, sample, table, seeds=seeds, thresholding=True, dynamic_thresholding_ratio=1.5)
    deterministic = ddim_table(schedule, sampling_timesteps(1000, 10), eta=0.0)
    prev, _ = s(mo, int(deterministic.timesteps[0]), sample, deterministic)  # DDIM eta=0 needs no noise
    assert prev.shape == sample.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu(backend):
    x = _rand(2, 12, 4, 4)
    gn = lambda *a, **k: ddpm_fast.group_norm_silu(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"group_norm_silu: num_groups must be a positive int dividing the "
                                         r"channels of x \(C=12\), got 5"):
        gn(x, None, None, 5)
    with pytest.raises(ValueError, match=r"group_norm_silu: weight must have shape \(12,\), got \(8,\)"):
        gn(x, _rand(8), None, 4)
    with pytest.raises(ValueError, match=r"group_norm_silu: scale must have shape \(2, 12\) or \(2, 12, 1, 1\), "
                                         r"got \(2, 12, 4, 4\)"):
        gn(x, None, None, 4, scale=_rand(2, 12, 4, 4))
    with pytest.raises(ValueError, match=r"group_norm_silu: scale must have shape \(2, 12\) or \(2, 12, 1, 1\), "
                                         r"got \(2, 8\)"):
        gn(x, None, None, 4, scale=_rand(2, 8))
    with pytest.raises(ValueError, match=r"group_norm_silu: shift must be on cpu .*got meta"):
        gn(x, None, None, 4, shift=torch.empty(2, 12, device="meta"))
    with pytest.raises(ValueError, match=r"group_norm_silu: weight must be on cpu like the other inputs, got meta"):
        gn(x, torch.empty(12, device="meta"), None, 4)
    for groups in (0, -3, True):
        with pytest.raises(ValueError, match=rf"group_norm_silu: num_groups must be a positive int dividing the "
                                             rf"channels of x \(C=12\), got {groups}$"):
            gn(x, None, None, groups)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match=rf"group_norm_silu: eps must be positive, got {eps}$"):
            gn(x, None, None, 4, eps)
    with pytest.raises(ValueError, match=r"group_norm_silu: act must be one of \('none', 'silu'\), got 'relu'"):
        gn(x, None, None, 4, act="relu")
    with pytest.raises(TypeError, match=r"group_norm_silu: x must have dtype .*; got float64"):
        gn(x.double(), None, None, 4)


def test_randn():
    with pytest.raises(ValueError, match=r"randn: seeds must have shape \(B,\)"):
        ddpm_fast.randn(torch.ones(2, 2, dtype=torch.int64), (3,))
    with pytest.raises(TypeError, match=r"randn: seeds must have dtype int64; got float32"):
        ddpm_fast.randn(torch.ones(2), (3,))
    with pytest.raises(TypeError, match=r"randn: dtype must be float32, float16 or bfloat16"):
        ddpm_fast.randn(torch.ones(2, dtype=torch.int64), (3,), dtype=torch.float64)
    seeds = torch.tensor([1, 2])
    for shape in ((3, 2.0), (3, -1), (3, True), -2, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"randn: shape must be a non-negative int or a tuple of them, "
                                             rf"got {re.escape(repr(shape))}$"):
            ddpm_fast.randn(seeds, shape)
    for stream in (-1, 2**63, True):
        with pytest.raises(ValueError, match=rf"randn: stream must be an int in \[0, 2\*\*63\), got {stream}$"):
            ddpm_fast.randn(seeds, (3,), stream)
    with pytest.raises(ValueError, match=r"randn: shape must hold fewer than 2\*\*63 values per sample, got "
                                         r"\(4611686018427387904, 2\) \(9223372036854775808\)"):
        ddpm_fast.randn(seeds, (2**62, 2))
    with pytest.raises(NotImplementedError, match=r"randn: no triton kernel yet "
                                                  r"\(kernels: \('cpu', 'cuda', 'torch'\)\)"):
        ddpm_fast.randn(seeds, (3,), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu_needs_a_spatial_dim(backend):
    with pytest.raises(ValueError, match=r"x must have at least 3 dimensions, got shape \(2, 12\)"):
        ddpm_fast.group_norm_silu(_rand(2, 12), None, None, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_nested_tensors_are_named(schedule, backend):
    """The kernels read dense memory: a sparse or nested tensor is refused naming the argument (it failed deep
    inside a copy: "unsupported memory format option Contiguous", "NestedTensorImpl doesn't support sizes")."""
    x, seeds, t = torch.randn(2, 4, 3, 3), torch.tensor([1, 2]), torch.tensor([3, 700])
    table = ddpm_table(schedule)
    nested = torch.nested.nested_tensor([x[0], x[1]], layout=torch.jagged)
    calls = {
        r"group_norm_silu: x .* got a sparse_coo one": lambda: ddpm_fast.group_norm_silu(
            x.to_sparse(), None, None, 2, backend=backend),
        r"group_norm_silu: weight .* got a sparse_coo one": lambda: ddpm_fast.group_norm_silu(
            x, torch.randn(4).to_sparse(), None, 2, backend=backend),
        r"q_sample: x0 .* got a nested one": lambda: ddpm_fast.q_sample(nested, t, schedule, seeds=seeds,
                                                                        backend=backend),
        r"q_sample: t .* got a sparse_coo one": lambda: ddpm_fast.q_sample(x, t.to_sparse(), schedule, seeds=seeds,
                                                                          backend=backend),
        r"step: model_output .* got a sparse_coo one": lambda: ddpm_fast.step(x.to_sparse(), t, x, table, seeds=seeds,
                                                                             backend=backend),
        r"^noise must be a dense \(strided\) tensor, got a sparse_coo one": lambda: ddpm_fast.reference.q_sample(
            x, t, schedule, noise=x.to_sparse()),
    }
    for match, call in calls.items():
        with pytest.raises(TypeError, match=match):
            call()
