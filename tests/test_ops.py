"""The op layer: custom-op registration (opcheck), torch.compile, backend choice, build_info, randn."""

import contextlib
import os
import re

import pytest
import torch
from _fuzz import run_cases
from _tolerance import NOISE_ROUNDING, assert_matches_reference

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.schedule import NoiseSchedule, ddim_table, ddpm_table, sampling_timesteps

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
    (0, r"no NVIDIA driver is installed \(cudaErrorInsufficientDriver: .*\)"),  # no driver at all (this machine)
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


def test_each_backend_says_why_it_is_missing(monkeypatch):
    from ddpm_fast import _native
    assert _native.backend_missing_reason("torch") is None
    with pytest.raises(ValueError, match="unknown backend 'cpp'"):
        _native.backend_missing_reason("cpp")
    if _native._C is not None and _native.cuda_kernels() is None:  # this build: CPU only
        assert _native.backend_missing_reason("cuda") == (
            f"the extension was built without CUDA ({_native._C.build_info()['cuda_missing_reason']})")
    # The kernels each backend and device take, and the last argument of their launchers.
    assert _native.native_kernels("cpu", torch.device("cpu")) is _native.cpu_kernels()
    assert _native.native_kernels("cuda", torch.device("cpu")) is _native._cuda_emulator
    assert _native.native_kernels("cuda", torch.device("cuda")) is _native.cuda_kernels()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert _native.launch_context("cpu", torch.device("cpu")) == 3
    finally:
        torch.set_num_threads(threads)
    assert _native.launch_context("cuda", torch.device("cpu")) == 0  # the emulator takes no stream
    # The emulator is loaded when it was built (a file next to the extension), and runs when asked to.
    if _native._C is not None:
        built = any(n.startswith("_cuda_emulator.") for n in os.listdir(os.path.dirname(_native._C.__file__)))
        assert (_native._load_cuda_emulator() is not None) == built
    for value, runs in ((None, False), ("0", False), ("yes", False), ("1", True)):
        if value is None:
            monkeypatch.delenv(_native.EMULATE_CUDA_ENV, raising=False)
        else:
            monkeypatch.setenv(_native.EMULATE_CUDA_ENV, value)
        monkeypatch.setattr(_native, "_cuda_emulator", object())
        reason = _native.cuda_emulator_missing_reason()
        asked = "set DDPM_FAST_EMULATE_CUDA=1 to run the CUDA kernels on the CPU emulator"
        assert reason is None if runs else reason == asked
        assert ddpm_fast.build_info()["cuda_emulator"] == (reason or "available")
        monkeypatch.setattr(_native, "_cuda_emulator", None)
        assert _native.cuda_emulator_missing_reason().startswith("the CUDA kernels' emulator is not built")
    # A runtime that sees a GPU under a CPU build of PyTorch; one that sees none; then Triton.
    monkeypatch.setattr(_native, "_C", _native._C or object())
    monkeypatch.setattr(_native, "cuda_kernels", lambda: object())
    runtime = {"device_count": 1, "driver_version": 13000, "runtime_version": 13020, "error": "none"}
    monkeypatch.setattr(_native, "_cuda_runtime", lambda: runtime)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _native.backend_missing_reason("cuda") == "torch.cuda.is_available() is False (a CPU build of PyTorch?)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _native.backend_missing_reason("cuda") is None
    runtime.update(device_count=0, error="cudaErrorNoDevice: no CUDA-capable device is detected")
    assert _native.backend_missing_reason("cuda") == f"no CUDA device ({runtime['error']})"  # 13.0 runs 13.2
    monkeypatch.setattr(_native, "_triton_missing_reason", lambda: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _native.backend_missing_reason("triton") is None  # a GPU: no interpreter needed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _native.backend_missing_reason("triton") is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _native.backend_missing_reason("triton") == (
        "no CUDA device for Triton (set TRITON_INTERPRET=1 to run it on the CPU interpreter)")
    monkeypatch.setattr(_native, "_triton_missing_reason", lambda: "no triton")
    assert _native.backend_missing_reason("triton") == "no triton"
    # An extension that failed to import: every backend but torch says why.
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", "ddpm_fast._C could not be imported (boom)")
    assert _native.cpu_kernels() is None and _native.backend_missing_reason("torch") is None
    assert _native.backend_missing_reason("cpu") == _native.backend_missing_reason("cuda") == _native._IMPORT_ERROR
    info = _native.build_info()
    assert info["backends"]["cpu"] == _native._IMPORT_ERROR and info["backends"]["torch"] == "available"
    assert info["cuda_missing_reason"] == _native._IMPORT_ERROR and info["compiler"] is None


def test_triton_missing_says_why(monkeypatch):
    import importlib.util
    import sys

    from ddpm_fast import _native
    spec = importlib.util.spec_from_file_location("ddpm_fast._native_fresh", _native.__file__)
    fresh = importlib.util.module_from_spec(spec)  # conftest may stand in for this function in _native itself
    spec.loader.exec_module(fresh)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError, naming it
    assert fresh._triton_missing_reason() == "triton is not installed (import of triton halted; None in sys.modules)"


def test_build_info_carries_the_extensions_and_the_runtimes_facts(monkeypatch):
    from ddpm_fast import _native
    if _native._C is None:
        pytest.skip("the C++ extension is not built")
    runtime = {"device_count": 0, "driver_version": 0, "runtime_version": 12040, "error": "no driver"}
    monkeypatch.setattr(_native, "_cuda_runtime", lambda: runtime)
    info = _native.build_info()
    assert info["torch"] == torch.__version__ and info["cuda_runtime"] is runtime
    assert {k: info[k] for k in _native._C.build_info()} == _native._C.build_info()
    assert info["backends"]["cpu"] == "available"


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



def test_fake_outputs_are_laid_out_as_the_real_ones(schedule, backend):
    """Each op's register_fake gives its outputs the real ones' shape, dtype and strides (channels_last inputs
    give channels_last outputs): a compiled graph indexes an op's outputs by the fake strides (opcheck compares
    shapes and dtypes only); a channels_last_3d input gives contiguous outputs (contracts.md's layouts are NCHW
    and 4-D channels_last), not outputs laid out as the input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device, name = backend.device, backend.name
    x5 = backend.to(_rand(2, 3, 2, 3, 4, seed=10)).contiguous(memory_format=torch.channels_last_3d)
    t, seeds = backend.to(torch.tensor([10, 900]), torch.tensor([3, -7]))
    table = ddpm_table(schedule).table(device)
    cases = _opcheck_cases(schedule, backend) + [
        (torch.ops.ddpm_fast.q_sample.default, (x5, t, schedule.q_table(device), None, seeds, 3, 1, name)),
        (torch.ops.ddpm_fast.step.default, (x5, x5, None, t, table, None, seeds, 0.0, 0.0, 1.0, True, name)),
        (torch.ops.ddpm_fast.group_norm_silu.default, (x5, None, None, None, None, None, 3, 1e-5, 1, name)),
    ]
    for op, args in cases:
        with torch.no_grad():
            real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real, fake = (out if isinstance(out, tuple) else (out,) for out in (real, fake))
        for r, f in zip(real, fake, strict=True):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), op

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


@pytest.mark.parametrize("grad", [False, True], ids=["direct", "through_the_dispatcher"])
def test_zero_tensors_are_zeros(schedule, backend, grad):
    """autograd's efficient zeros (torch._efficientzerotensor) have no storage: a call without autograd took
    them for absent inputs (a zero weight read as ones), one through the dispatcher read past the stride-0
    zeros it materialises them as. Both must compute what real zeros give."""
    def zeros(*shape, efficient):
        make = torch._efficientzerotensor if efficient else torch.zeros
        return make(shape, device=backend.device)

    B, C = 2, 4
    x, t = backend.to(torch.randn(B, C, 5, 3, requires_grad=grad), torch.randint(0, 1000, (B,)))
    table = ddpm_table(schedule)
    outs = []
    for efficient in (False, True):
        z = lambda *shape: zeros(*shape, efficient=efficient)  # noqa: E731
        with ddpm_fast.use_backend(backend.name):
            outs.append((
                ddpm_fast.group_norm_silu(x, z(C), z(C), 2, bias_in=z(B, C), scale=z(B, C), shift=z(B, C)),
                *ddpm_fast.q_sample(x.detach(), t, schedule, z(B, C, 5, 3)),
                *ddpm_fast.step(z(B, C, 5, 3), t, x.detach(), table, noise=z(B, C, 5, 3)),
            ))
    for real, efficient in zip(*outs):
        assert torch.equal(real, efficient)


def test_reference_traces_whole_under_torch_compile(schedule):
    """The reference (the fallback, and what derivatives run on) checks tensor values with runtime asserts while
    traced, so fullgraph=True takes every op and form, and a bad timestep still raises, naming the argument."""
    tables = (ddpm_table(schedule), ddpm_table(schedule, variance_type="learned_range"),
              ddim_table(schedule, sampling_timesteps(1000, 20), eta=0.0))
    B = int(torch.randint(1, 4, ()))
    t, seeds = torch.randint(0, 1000, (B,)), torch.randint(0, 2**62, (B,))
    x, w, shift = torch.randn(B, 4, 5, 3), torch.randn(4), torch.randn(B, 4)

    # use_backend traces inside a compiled function from torch 2.7; before, each op is given backend= instead.
    in_context = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 7)
    kw = {} if in_context else {"backend": "torch"}

    def f(x, t, seeds, w, shift):
        with ddpm_fast.use_backend("torch") if in_context else contextlib.nullcontext():
            x_t, eps = ddpm_fast.q_sample(x, t, schedule, seeds=seeds, **kw)
            given, _ = ddpm_fast.q_sample(x, 5, schedule, noise=eps, target="v_prediction", **kw)
            clipped, _ = ddpm_fast.step(x_t, t, x, tables[0], seeds=seeds, clip_range=1.0, **kw)
            thresholded, _ = ddpm_fast.step(x_t, t, x, tables[0], noise=eps, thresholding=True, sample_max_value=2.0,
                                            **kw)
            learned, _ = ddpm_fast.step(torch.cat([x_t, x_t.tanh()], 1), t, x, tables[1], seeds=seeds, **kw)
            ddim, _ = ddpm_fast.step(x_t, tables[2].timesteps[:B], x, tables[2], **kw)  # eta = 0: no noise needed
            h = ddpm_fast.group_norm_silu(x, w, None, 2, shift=shift, **kw)
        return x_t, given, clipped, thresholded, learned, ddim, h

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for ours, eager in zip(compiled(x, t, seeds, w, shift), f(x, t, seeds, w, shift)):
        assert torch.equal(ours, eager)
    with pytest.raises(RuntimeError, match=r"t must lie in \[0, 999\]"):
        compiled(x, torch.full((B,), 1000), seeds, w, shift)


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
    with pytest.raises(ValueError, match=r"^q_sample: backend must be one of \('cuda', 'triton', 'cpu', 'torch'\) or "
                                         r"None, got 'gpu'$"):
        ddpm_fast.q_sample(x0, 3, schedule, seeds=torch.tensor([1]), backend="gpu")
    with pytest.raises(ValueError, match=r"^backend must be one of .* or None, got 'fast'$"):
        ddpm_fast.set_backend("fast")


def test_explicit_backend_for_tensors_it_cannot_take_says_why(monkeypatch):
    """CUDA tensors (a device object is all resolve reads: no GPU needed): the cpu backend refuses them; cuda and
    triton take them where built; a backend that is not built says why."""
    from ddpm_fast.ops import backend
    cuda, native = torch.device("cuda"), ("cpu", "cuda", "triton")
    monkeypatch.setattr(backend, "backend_missing_reason", lambda name: None)  # every backend built
    with pytest.raises(RuntimeError, match=r"^q_sample: backend 'cpu' is not available: the cpu backend takes CPU "
                                           r"tensors, got tensors on cuda$"):
        backend.resolve("q_sample", native, cuda, "cpu")
    assert [backend.resolve("q_sample", native, cuda, name) for name in ("cuda", "triton")] == ["cuda", "triton"]
    monkeypatch.setattr(backend, "backend_missing_reason", lambda name: f"no {name} in this build")
    with pytest.raises(RuntimeError, match=r"^q_sample: backend 'triton' is not available: no triton in this build$"):
        backend.resolve("q_sample", native, cuda, "triton")


def test_use_backend_nests_and_restores_after_an_error():
    assert ddpm_fast.get_backend() is None
    with ddpm_fast.use_backend("torch"):
        with ddpm_fast.use_backend("cpu"):
            assert ddpm_fast.get_backend() == "cpu"
        assert ddpm_fast.get_backend() == "torch"  # the outer one, not None
        with pytest.raises(ZeroDivisionError), ddpm_fast.use_backend("cpu"):
            1 / 0
        assert ddpm_fast.get_backend() == "torch"
    assert ddpm_fast.get_backend() is None


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
    # the torch backend is the reference itself, rounded to the dtype asked for
    torch_path = ddpm_fast.randn(seeds, (3, 5, 7), stream=9, dtype=dtype, backend="torch")
    assert torch_path.dtype == dtype and torch.equal(torch_path, ref.to(dtype).reshape(4, 3, 5, 7))
    # seeds read at their stride (a view of every other element), not as the first four of their storage
    strided = torch.stack([seeds, seeds + 1], 1)[:, 0]
    assert torch.equal(ddpm_fast.randn(strided, (3, 5, 7), stream=9, dtype=dtype, backend="cpu"), ours)
    # an int shape is a 1-d one, as torch.randn takes it; a list and a torch.Size are tuples
    for shape in (105, [105], torch.Size([105])):
        assert torch.equal(ddpm_fast.randn(seeds, shape, stream=9, dtype=dtype, backend="cpu"), ours.reshape(4, 105))


@needs_cpu_kernels
def test_randn_on_the_portable_philox_path(tmp_path):
    """CPUs without AVX2 + FMA, and ARM ones, draw the noise with the portable Philox loops, which an x86 machine
    never takes by itself: DDPM_FAST_PORTABLE_PHILOX=1 takes them in a fresh process. The reference's normals for
    streams with either word of the counter set, and 555 per sample (not a whole number of Philox groups)."""
    import subprocess
    import sys

    streams = (9, 2**32 + 7, 2**33)
    script = ("import sys, torch, ddpm_fast\n"
              "assert ddpm_fast.build_info()['cpu_philox'] == 'portable', ddpm_fast.build_info()\n"
              "seeds = torch.tensor([0, 1, -1, 2**62])\n"
              f"torch.save([ddpm_fast.randn(seeds, (3, 5, 37), stream=s, backend='cpu') for s in {streams}], "
              "sys.argv[1])\n")
    assert ddpm_fast.build_info()["cpu_philox"] in ("avx2", "portable")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "z.pt")], check=True, timeout=120,
                   env={**os.environ, "DDPM_FAST_PORTABLE_PHILOX": "1"})
    seeds = torch.tensor([0, 1, -1, 2**62])
    for stream, z in zip(streams, torch.load(tmp_path / "z.pt")):
        ref = reference.philox_normal(seeds, stream, 555).reshape(4, 3, 5, 37)
        torch.testing.assert_close(z, ref, rtol=0, atol=NOISE_ROUNDING, msg=f"stream {stream}")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_randn_half_dtypes_round_the_float32_normals_as_torch(dtype):
    """The cpu kernels store float32 math in float16 / bfloat16 with their own branch-free conversion (every op's
    half output goes through it): 2**20 normals stored in ``dtype`` are the float32 ones rounded as torch rounds
    them, bit for bit: to nearest, ties to even (~130 exact ties here) and, in float16, the subnormals below
    2**-14 (~30 of them) too. A tolerance of one ulp, as the op tests allow, would pass a conversion that
    truncates or rounds ties up."""
    seeds = torch.tensor([5, -3**30])
    z32 = ddpm_fast.randn(seeds, (2**19,), stream=4, backend="cpu")
    if dtype == torch.float16:
        assert ((z32.abs() < 2**-14) & (z32.abs() >= 2**-24)).sum() >= 10  # the subnormal range is reached
    ours = ddpm_fast.randn(seeds, (2**19,), stream=4, dtype=dtype, backend="cpu")
    assert torch.equal(ours.view(torch.int16), z32.to(dtype).view(torch.int16))


# --------------------------------------------------------------------------------------------------
# derivatives: the kernels give group_norm_silu's backward; every other derivative is the reference's
# --------------------------------------------------------------------------------------------------

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# torch's forward-mode AD scripts its decompositions on first use, and torch 2.13 deprecates torch.jit.script
forward_ad_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _derivative_cases(op, schedule, device, check, cases=2):
    """Fresh draws of `op` as a function of its differentiable float inputs: run_cases calls
    check(f, its reference twin (any float dtype), primals on `device`) at random sizes, timesteps and seeds."""
    def draw(rng):
        B, groups, clip = rng.randint(1, 3), rng.choice([1, 2, 4]), rng.choice([None, 1.0])
        # Clipping can zero x0's derivatives (where every x0 is clipped); t >= 1 keeps prev's in x_t non-zero.
        return dict(op=op, B=B, H=rng.randint(1, 5), W=rng.randint(1, 5), groups=groups,
                    C=groups * rng.randint(1, 3) if op == "group_norm_silu" else 3,
                    t=[rng.randrange(clip is not None, schedule.num_train_timesteps) for _ in range(B)],
                    seeds=[rng.randrange(2**62) for _ in range(B)], clip_range=clip)

    def run(case):
        B, C, H, W, G, clip = (case[k] for k in ("B", "C", "H", "W", "groups", "clip_range"))
        t, seeds = torch.tensor(case["t"], device=device), torch.tensor(case["seeds"], device=device)
        table = ddpm_table(schedule)
        if op == "q_sample":
            check(lambda x0, noise: torch.cat(ddpm_fast.q_sample(x0, t, schedule, noise)),
                  lambda x0, noise: torch.cat(reference.q_sample(x0, t, schedule, noise=noise)),
                  (torch.randn(B, C, H, W, device=device), torch.randn(B, C, H, W, device=device)))
        elif op == "step":
            check(lambda out, x: torch.cat(ddpm_fast.step(out, t, x, table, seeds=seeds, clip_range=clip)),
                  lambda out, x: torch.cat(reference.step(out, t, x, table, seeds=seeds, clip_range=clip)),
                  (torch.randn(B, C, H, W, device=device), torch.randn(B, C, H, W, device=device)))
        else:
            check(lambda x, w, shift: ddpm_fast.group_norm_silu(x, w, None, G, shift=shift),
                  lambda x, w, shift: reference.group_norm_silu(x, w, None, G, shift=shift),
                  (torch.randn(B, C, H, W, device=device), torch.randn(C, device=device),
                   torch.randn(B, C, device=device)))
    run_cases(draw, run, cases)


@forward_ad_warning
@pytest.mark.parametrize("op", ["q_sample", "step", "group_norm_silu"])
def test_derivatives_the_kernels_lack_are_the_reference_s(schedule, op):
    """Autograd through q_sample and step (no backward kernels), and for every op torch.func.grad / jvp and
    forward-mode dual tensors (which a custom op would answer with a zero tangent, silently): the automatic
    choice computes them with the reference, so they equal its own, to the bit."""
    def check(f, twin, primals):
        tangents = tuple(torch.randn_like(p) for p in primals)
        ref = _with_backend(f, "torch")
        if op != "group_norm_silu":  # (whose backward is the kernels': tests/test_group_norm.py)
            leaves = [p.clone().requires_grad_() for p in primals]
            ours_grads = torch.autograd.grad(f(*leaves).square().sum(), leaves)
            ref_leaves = [p.clone().requires_grad_() for p in primals]
            for a, b in zip(ours_grads, torch.autograd.grad(ref(*ref_leaves).square().sum(), ref_leaves)):
                assert torch.equal(a, b)
            assert sum(a.abs().sum() for a in ours_grads) > 0  # not zeros compared with zeros

        argnums = tuple(range(len(primals)))
        for a, b in zip(torch.func.grad(lambda *p: f(*p).square().sum(), argnums)(*primals),
                        torch.func.grad(lambda *p: ref(*p).square().sum(), argnums)(*primals)):
            assert torch.equal(a, b)
        (y, jvp), (y_ref, jvp_ref) = torch.func.jvp(f, primals, tangents), torch.func.jvp(ref, primals, tangents)
        assert torch.equal(y, y_ref) and torch.equal(jvp, jvp_ref) and jvp.abs().sum() > 0

        with torch.autograd.forward_ad.dual_level():
            out = f(*(torch.autograd.forward_ad.make_dual(p, d) for p, d in zip(primals, tangents)))
            assert torch.equal(torch.autograd.forward_ad.unpack_dual(out).tangent, jvp_ref)
    _derivative_cases(op, schedule, DEVICE, check)



@forward_ad_warning
def test_a_group_wider_than_every_gpu_fits_keeps_the_derivative_refusal():
    """More channels a group than the CUDA kernels fit everywhere (the choice then asks the launcher too): a
    torch.func.jvp still goes to the reference, not to kernels that would answer it with a zero tangent."""
    from ddpm_fast.ops.group_norm import _CUDA_FITS_EVERYWHERE
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    C = _CUDA_FITS_EVERYWHERE + 6
    x, tangent = torch.randn(2, C, 3, generator=g), torch.randn(2, C, 3, generator=g)
    f = lambda v: ddpm_fast.group_norm_silu(v, None, None, 1)  # noqa: E731
    (y, jvp), (y_ref, jvp_ref) = (torch.func.jvp(h, (x,), (tangent,)) for h in (f, _with_backend(f, "torch")))
    assert torch.equal(y, y_ref) and torch.equal(jvp, jvp_ref) and jvp.abs().sum() > 0

@forward_ad_warning
@pytest.mark.parametrize("op", ["q_sample", "step", "group_norm_silu"])
def test_forward_mode_under_torch_compile_is_the_reference_s(schedule, op):
    """A compiled function on dual tensors: the traced op cannot ask which inputs carry tangents, so under
    forward-mode AD it runs the reference (aot_eager: inductor itself drops forward-mode tangents)."""
    def check(f, twin, primals):
        tangents = tuple(torch.randn_like(p) for p in primals)
        torch._dynamo.reset()  # a fresh trace per case: the cases share f's code object (dynamo's recompile limit)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        _, expected = torch.func.jvp(_with_backend(f, "torch"), primals, tangents)
        with torch.autograd.forward_ad.dual_level():
            out = compiled(*(torch.autograd.forward_ad.make_dual(p, d) for p, d in zip(primals, tangents)))
            tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
        assert tangent is not None  # (it was None: a zero tangent)
        _, truth = torch.func.jvp(twin, tuple(p.double() for p in primals), tuple(d.double() for d in tangents))
        assert_matches_reference(tangent, expected, truth, what=f"{op}: the compiled function's tangent")
    _derivative_cases(op, schedule, DEVICE, check, cases=1)  # (a compile each)


@forward_ad_warning
@pytest.mark.parametrize("op", ["q_sample", "step", "group_norm_silu"])
def test_explicit_backend_refuses_a_derivative_its_kernels_lack(schedule, backend, op):
    """backend=<native> on such a call raises before it runs, naming the derivative: not a missing autograd
    formula at loss.backward(), nor a zero tangent."""
    def check(f, twin, primals):
        explicit = _with_backend(f, backend.name)
        match = f"{op}: backend '{backend.name}' cannot take this call: its kernels have no "
        if op != "group_norm_silu":
            for i in range(len(primals)):  # any one input that requires grad
                with pytest.raises(RuntimeError, match=match + "backward"):
                    explicit(*(p.clone().requires_grad_(j == i) for j, p in enumerate(primals)))
        with pytest.raises(RuntimeError, match=match + r"torch\.func derivative"):
            torch.func.jvp(explicit, primals, tuple(torch.randn_like(p) for p in primals))
        with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match=match + "forward-mode"):
            explicit(*(torch.autograd.forward_ad.make_dual(p, torch.randn_like(p)) for p in primals))
        assert torch.isfinite(explicit(*primals)).all()  # without a derivative, the kernels run
    _derivative_cases(op, schedule, backend.device, check, cases=1)


def test_a_noise_that_requires_grad_gets_its_gradient(schedule):
    """Only the given noise requires grad: the automatic choice takes the reference (the kernels have no
    backward), so the noise's gradient is the reference's, for q_sample and for step."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x, m, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, table = torch.randint(1, 1000, (2,), generator=g), ddpm_table(schedule)  # t >= 1: the step adds noise
    for f in (lambda z: ddpm_fast.q_sample(x, t, schedule, z)[0], lambda z: ddpm_fast.step(m, t, x, table, z)[0]):
        grads = []
        for name in (None, "torch"):
            leaf = noise.clone().requires_grad_()
            with ddpm_fast.use_backend(name):
                grads.append(torch.autograd.grad(f(leaf).square().sum(), leaf)[0])
        assert torch.equal(*grads) and grads[0].abs().sum() > 0


def _with_backend(f, name):
    def run(*args):
        with ddpm_fast.use_backend(name):
            return f(*args)
    return run


@forward_ad_warning
@needs_cpu_kernels
def test_table_copies_made_inside_a_transform_serve_later_calls():
    """The float32 tables are copied to a device once, on first use. A first use inside torch.func.jvp (the op
    on tensors the transform does not track, so the kernels run) must not keep the transform's wrapper, which
    every later call would find dead."""
    schedule = NoiseSchedule(1000, "linear")
    table = ddpm_table(schedule)
    x, seeds = _rand(2, 3, 4, 4, seed=7), torch.tensor([1, 2])

    def f(a):
        x_t, _ = ddpm_fast.q_sample(x, 10, schedule, seeds=seeds, backend="cpu")
        prev, _ = ddpm_fast.step(x, 500, x, table, seeds=seeds, backend="cpu")
        return a * x_t + prev

    torch.func.jvp(f, (x,), (x,))
    assert torch.isfinite(ddpm_fast.q_sample(x, 10, schedule, seeds=seeds, backend="cpu")[0]).all()
    assert torch.isfinite(ddpm_fast.step(x, 500, x, table, seeds=seeds, backend="cpu")[0]).all()
