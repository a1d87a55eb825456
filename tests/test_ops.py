"""The op layer: custom-op registration (opcheck), torch.compile, backend choice, build_info, randn."""

import re

import pytest
import torch
from _tolerance import NOISE_ROUNDING

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.schedule import NoiseSchedule, ddpm_table

CPU_BUILT = ddpm_fast.build_info()["backends"]["cpu"] == "available"
needs_cpu_kernels = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_build_info_reports_every_backend():
    info = ddpm_fast.build_info()
    assert info["version"] == ddpm_fast.__version__
    assert set(info["backends"]) == {"cuda", "triton", "cpu", "torch"}
    assert info["backends"]["torch"] == "available"
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"] != "available" and info["backends"]["cuda"]  # a reason, not a blank
    if info.get("cuda_compiled"):
        assert info["cuda_archs"] and info["cuda_version"]
    else:
        assert info["cuda_missing_reason"]


@pytest.mark.parametrize("driver, expected", [
    (12080, r"the NVIDIA driver supports CUDA up to 12\.8, and this extension was built with CUDA 13\.0: update "
            r".* \(cudaErrorInsufficientDriver: .*\)"),
    (0, r"no CUDA device \(cudaErrorInsufficientDriver: .*\)"),  # no driver at all (this machine)
    (13000, r"no CUDA device \(cudaErrorInsufficientDriver: .*\)"),  # a driver of the same major version: not it
])
def test_cuda_reason_names_a_driver_older_than_the_build(monkeypatch, driver, expected):
    """A wheel's statically linked CUDA runtime needs a driver of its major version; with an older one the
    runtime reports no device, and the reason says which versions meet, not just the runtime's error."""
    from ddpm_fast import _native
    monkeypatch.setattr(_native, "_C", _native._C or object())
    monkeypatch.setattr(_native, "cuda_kernels", lambda: object())
    monkeypatch.setattr(_native, "_cuda_runtime", lambda: {
        "device_count": 0, "driver_version": driver, "runtime_version": 13000,
        "error": "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"})
    assert re.fullmatch(expected, _native.backend_missing_reason("cuda"))


def _opcheck_cases(schedule, backend):
    """(op, args) pairs on ``backend``'s device; the randn case only where the backend has a randn kernel."""
    device, name = backend.device, backend.name
    x0, noise = backend.to(_rand(2, 3, 5, 7, seed=1), _rand(2, 3, 5, 7, seed=2))
    t, seeds = backend.to(torch.tensor([10, 900]), torch.tensor([3, -7]))
    table = ddpm_table(schedule, variance_type="learned_range")
    mo, var = backend.to(_rand(2, 3, 5, 7, seed=3), torch.rand(2, 3, 5, 7) * 2 - 1)
    x, w, b = backend.to(_rand(2, 8, 4, 4, seed=4), _rand(8, seed=5), _rand(8, seed=6))
    sc, sh = backend.to(_rand(2, 8, seed=7), _rand(2, 8, seed=8))
    for leaf in (x, w, sc):
        leaf.requires_grad_()
    cl = x0.contiguous(memory_format=torch.channels_last)
    cases = [
        (torch.ops.ddpm_fast.q_sample.default, (x0, t, schedule.q_table(device), None, seeds, 3, 1, name)),
        (torch.ops.ddpm_fast.q_sample.default, (cl, t, schedule.q_table(device), noise, None, 0, 0, name)),
        (torch.ops.ddpm_fast.step.default,
         (x0, mo, var, t, table.table(device), None, seeds, 1.0, 0.0, 1.0, True, name)),
        (torch.ops.ddpm_fast.step.default,
         (cl, mo, var, t, table.table(device), noise, None, 0.0, 0.995, 2.0, False, name)),
        (torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, None, sc, sh, 4, 1e-5, 1, name)),
        (torch.ops.ddpm_fast.group_norm_silu.default, (x, None, None, sc, None, None, 2, 1e-6, 0, name)),
        (torch.ops.ddpm_fast.group_norm_silu_backward.default, _backward_args(x, w, b, sc, sh, name)),
    ]
    if name != "triton":  # randn has cpu and cuda kernels only
        cases.append((torch.ops.ddpm_fast.randn.default, (seeds, 37, 5, torch.float32, name)))
    return cases


def _backward_args(x, w, b, scale, shift, name):
    """The backward op's inputs as the forward leaves them (saved mean and rstd included)."""
    x, w, scale = (v.detach() for v in (x, w, scale))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, None, scale, shift, 4, 1e-5, 1, name)
    dy = _rand(*x.shape, seed=9).to(x.device).contiguous(memory_format=torch.channels_last)  # a layout unlike x's
    return (dy, x, w, b, None, scale, shift, mean, rstd, 4, 1, name)


# torch 2.14's opcheck reads .grad of its own fake copies of autograd inputs (meta_utils.safe_grad) and
# warns for any custom op with autograd; not ours to fix, and harmless.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_every_op(schedule, backend):
    for op, args in _opcheck_cases(schedule, backend):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(schedule, backend):
    table = ddpm_table(schedule)
    name = backend.name
    randn_backend = name if name != "triton" else None  # randn has no triton kernel: the automatic choice

    def train_and_sample(x0, t, seeds, x, w, b, scale, shift):
        x0 = x0 + ddpm_fast.randn(seeds, x0.shape[1:], backend=randn_backend)
        x_t, eps = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, backend=name)
        prev, _ = ddpm_fast.step(eps, t, x_t, table, seeds=seeds, clip_range=1.0, backend=name)
        h = ddpm_fast.group_norm_silu(x, w, b, 4, scale=scale, shift=shift, backend=name)
        return prev, h

    args = backend.to(_rand(2, 3, 8, 8, seed=1), torch.tensor([5, 700]), torch.tensor([1, 2]),
                      _rand(2, 8, 4, 4, seed=2), _rand(8, seed=3), _rand(8, seed=4), _rand(2, 8, seed=5),
                      _rand(2, 8, seed=6))
    for i in (3, 4, 6):
        args[i].requires_grad_()
    compiled = torch.compile(train_and_sample, fullgraph=True)
    prev, h = compiled(*args)
    prev_eager, h_eager = train_and_sample(*args)
    assert torch.equal(prev, prev_eager)
    torch.testing.assert_close(h, h_eager)
    grads = torch.autograd.grad(h.sum(), (args[3], args[4], args[6]))
    grads_eager = torch.autograd.grad(h_eager.sum(), (args[3], args[4], args[6]))
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


@needs_cpu_kernels
def test_automatic_choice_is_cpu_kernel_for_cpu_tensors(schedule, monkeypatch):
    from ddpm_fast.ops import backend
    assert backend.resolve("q_sample", ("cpu",), torch.device("cpu"), None) == "cpu"
    with ddpm_fast.use_backend("torch"):
        assert backend.resolve("q_sample", ("cpu",), torch.device("cpu"), None) == "torch"
        assert ddpm_fast.get_backend() == "torch"
    assert ddpm_fast.get_backend() is None
    # The per-call choice wins over the global one.
    with ddpm_fast.use_backend("torch"):
        assert backend.resolve("q_sample", ("cpu",), torch.device("cpu"), "cpu") == "cpu"


def test_unavailable_backends_explain_why(schedule, monkeypatch):
    monkeypatch.delenv("DDPM_FAST_EMULATE_CUDA", raising=False)  # the CUDA kernels' emulator: CPU tensors
    x0 = _rand(1, 3, 4, 4)
    with pytest.raises((RuntimeError, NotImplementedError), match="q_sample: .*(cuda|CUDA)"):
        ddpm_fast.q_sample(x0, 3, schedule, seeds=torch.tensor([1]), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ddpm_fast.q_sample(x0, 3, schedule, seeds=torch.tensor([1]), backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ddpm_fast.set_backend("fast")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_randn_matches_reference(dtype):
    seeds = torch.tensor([0, 1, -1, 2**62], dtype=torch.int64)
    ours = ddpm_fast.randn(seeds, (3, 5, 7), stream=9, dtype=dtype, backend="cpu")
    ref = reference.philox_normal(seeds, 9, 105).reshape(4, 3, 5, 7)
    assert ours.shape == (4, 3, 5, 7) and ours.dtype == dtype
    # The log / sin / cos rounding, then the storage rounding.
    atol = NOISE_ROUNDING + {torch.float32: 0, torch.float16: 6 * 2**-10, torch.bfloat16: 6 * 2**-7}[dtype]
    torch.testing.assert_close(ours.float(), ref.to(dtype).float(), rtol=0, atol=atol)
    torch.testing.assert_close(ddpm_fast.randn(seeds, (3, 5, 7), stream=9, backend="torch"), ref.reshape(4, 3, 5, 7))
