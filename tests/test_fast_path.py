"""The eager fast path (ops/dispatch.py): without autograd or tracing, a fused op runs its implementation
without the dispatcher; its outputs must equal the custom op's bit for bit, and every situation where the
dispatcher has work must still go through it."""

import contextlib

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_fast
from ddpm_fast.ops import dispatch
from ddpm_fast.schedule import NoiseSchedule, ddim_table, ddpm_table, sampling_timesteps


needs_cpu_kernels = pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                       reason="the C++ extension is not built")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


@pytest.fixture
def calls(monkeypatch):
    """Each fused op call from now on, as (route, op name): route "fast" (the implementation, called by
    dispatch.call) or "custom op" (through the dispatcher, which calls the implementation on its own)."""
    log = []
    for op, implementation in list(dispatch._IMPLEMENTATIONS.items()):
        def fast(*args, _name=op._name, _implementation=implementation):
            log.append(("fast", _name))
            return _implementation(*args)
        monkeypatch.setitem(dispatch._IMPLEMENTATIONS, op, fast)
    through_dispatcher = CustomOpDef.__call__

    def custom_op(op, *args, **kwargs):
        log.append(("custom op", op._name))
        return through_dispatcher(op, *args, **kwargs)

    monkeypatch.setattr(CustomOpDef, "__call__", custom_op)
    return log


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=g).to(dtype)


def _group_norm_case(backend, seed, shape, dtype, channels_last, time_embedding):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = _rand(g, *shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.nn.Parameter(_rand(g, C)), torch.nn.Parameter(_rand(g, C))  # as the U-Net passes them
    kwargs = {"bias_in": _rand(g, B, C, 1, 1)} if time_embedding == "add" else {
        "scale": _rand(g, B, C), "shift": _rand(g, B, C)}
    x, w, b = backend.to(x, w, b)
    kwargs = {k: backend.to(v) for k, v in kwargs.items()}
    groups = C // 4 if C > 4 else C
    return lambda: ddpm_fast.group_norm_silu(x, w, b, groups, backend=backend.name, **kwargs)


def _q_sample_case(backend, schedule, seed, shape, dtype, channels_last, target):
    g = torch.Generator().manual_seed(seed)
    x0, noise = _rand(g, *shape, dtype=dtype), _rand(g, *shape, dtype=dtype)
    if channels_last:
        x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    seeds = torch.randint(-2**62, 2**62, (shape[0],), generator=g)
    x0, noise, t, seeds = backend.to(x0, noise, t, seeds)
    if target == "epsilon":  # the noise given, and a batch stride of 2 samples (a view)
        return lambda: ddpm_fast.q_sample(x0[::2], t[::2], schedule, noise[::2], backend=backend.name)
    return lambda: ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, stream=7, target=target, backend=backend.name)


def _step_case(backend, schedule, seed, shape, dtype, channels_last, kind):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    if kind == "ddim":
        table = ddim_table(schedule, sampling_timesteps(1000, 50, "leading", steps_offset=1),
                           prediction_type="v_prediction")
    else:
        table = ddpm_table(schedule, variance_type="learned_range" if kind == "learned_range" else "fixed_small")
    sample = _rand(g, *shape, dtype=dtype)
    model_output = _rand(g, B, 2 * C if kind == "learned_range" else C, *shape[2:], dtype=dtype).clamp(-1, 1)
    if channels_last:
        sample, model_output = (v.contiguous(memory_format=torch.channels_last) for v in (sample, model_output))
    t = table.timesteps[torch.randint(0, len(table.timesteps), (B,), generator=g)]
    seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
    sample, model_output, t, seeds = backend.to(sample, model_output, t, seeds)
    options = {"ddim": {"clip_range": 1.0},
               "ddpm": {"seeds": seeds, "thresholding": True, "sample_max_value": 2.0},
               "learned_range": {"seeds": seeds, "return_pred_original": False}}[kind]
    return lambda: ddpm_fast.step(model_output, t, sample, table, backend=backend.name, **options)


# (shape, dtype, channels_last, variant): an odd spatial size, a batch of 1 at the U-Net's sizes, one channel
# per group (group norm), half precisions, channels_last; the interpreter keeps the first case of each op.
CASES = [((2, 12, 5, 7), torch.float32, False, 0), ((1, 32, 8, 8), torch.float32, True, 1),
         ((4, 4, 3, 3), torch.float16, False, 2), ((3, 8, 6, 6), torch.bfloat16, True, 0)]


def _case(op, backend, schedule, index):
    shape, dtype, channels_last, variant = CASES[index]
    seed = 1000 * index + {"group_norm_silu": 1, "q_sample": 2, "step": 3}[op]
    if op == "group_norm_silu":
        return _group_norm_case(backend, seed, shape, dtype, channels_last, ("add", "scale_shift", "add")[variant])
    if op == "q_sample":
        shape = (2 * shape[0], *shape[1:])  # the epsilon case takes every second sample
        return _q_sample_case(backend, schedule, seed, shape, dtype, channels_last,
                              ("epsilon", "v_prediction", "sample")[variant])
    return _step_case(backend, schedule, seed, shape, dtype, channels_last, ("ddpm", "ddim", "learned_range")[variant])


def _assert_identical(fast, slow):
    for a, b in zip(fast, slow):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b), f"largest difference {(a.double() - b.double()).abs().max().item()}"


@pytest.mark.parametrize("op", ["group_norm_silu", "q_sample", "step"])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_fast_path_equals_custom_op_bit_for_bit(op, index, backend, schedule, calls, monkeypatch):
    backend.subset(index == 0)
    run = _case(op, backend, schedule, index)
    with torch.no_grad():
        fast = run()
        monkeypatch.setattr(dispatch, "needs_dispatcher", lambda args: True)
        slow = run()
    assert calls == [("fast", op), ("custom op", op)]
    as_tuple = (lambda out: (out,)) if op == "group_norm_silu" else tuple
    _assert_identical(as_tuple(fast), as_tuple(slow))


def test_group_norm_backward_fast_path_equals_custom_op(backend, calls, monkeypatch):
    """Training: the forward records through the custom op; its backward (run with grad mode off) takes the
    fast path, with the same gradients."""
    g = torch.Generator().manual_seed(7)
    x, w, b, scale, shift, dy = backend.to(_rand(g, 2, 12, 5, 7), _rand(g, 12), _rand(g, 12), _rand(g, 2, 12),
                                           _rand(g, 2, 12), _rand(g, 2, 12, 5, 7))
    leaves = [v.requires_grad_() for v in (x, w, b, scale, shift)]

    def gradients():
        y = ddpm_fast.group_norm_silu(x, w, b, 4, scale=scale, shift=shift, backend=backend.name)
        return torch.autograd.grad(y, leaves, dy)

    fast = gradients()
    monkeypatch.setattr(dispatch, "needs_dispatcher", lambda args: True)
    slow = gradients()
    assert calls == [("custom op", "group_norm_silu"), ("fast", "group_norm_silu_backward"),
                     ("custom op", "group_norm_silu"), ("custom op", "group_norm_silu_backward")]
    _assert_identical(fast, slow)


class _PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("situation", ["autograd", "dispatch mode", "function mode", "profiler", "negated view",
                                       "subclass"])
@needs_cpu_kernels
def test_dispatcher_runs_whenever_it_has_work(situation, calls):
    g = torch.Generator().manual_seed(11)
    x, w = _rand(g, 2, 8, 4, 4), _rand(g, 8)
    expected = ddpm_fast.group_norm_silu(x, w, None, 2, backend="cpu")
    context = {"autograd": contextlib.nullcontext, "dispatch mode": _PassThroughDispatch,
               "function mode": _PassThroughFunction, "profiler": torch.autograd.profiler.profile}
    if situation == "autograd":
        w.requires_grad_()
    elif situation == "negated view":  # x's values, stored negated: the dispatcher materialises them
        x = torch.complex(torch.zeros_like(x), -x).conj().imag
        assert x.is_neg()
    elif situation == "subclass":
        x = x.as_subclass(_Subclass)
    with context.get(situation, torch.no_grad)():
        y = ddpm_fast.group_norm_silu(x, w, None, 2, backend="cpu")
    assert calls == [("fast", "group_norm_silu"), ("custom op", "group_norm_silu")]
    assert torch.equal(y.as_subclass(torch.Tensor), expected)


# No batching rule: vmap runs the op once per sample, through the dispatcher; the implementation would see
# batched tensors and read their raw memory.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@needs_cpu_kernels
def test_vmap_goes_through_the_dispatcher(calls):
    g = torch.Generator().manual_seed(12)
    x, w = _rand(g, 3, 2, 8, 4, 4), _rand(g, 8)
    with torch.no_grad():
        expected = torch.stack([ddpm_fast.group_norm_silu(v, w, None, 2, backend="cpu") for v in x])
        calls.clear()
        y = torch.vmap(lambda v: ddpm_fast.group_norm_silu(v, w, None, 2, backend="cpu"))(x)
    assert calls == [("custom op", "group_norm_silu")]
    assert torch.equal(y, expected)


@needs_cpu_kernels
def test_tracing_records_the_custom_op():
    """make_fx with real tensors: plain tensors, so only its mode on the stack says the call is traced."""
    with torch.no_grad():
        graph = make_fx(lambda x: ddpm_fast.group_norm_silu(x, None, None, 2, backend="cpu"))(torch.randn(2, 4, 3, 3))
    assert torch.ops.ddpm_fast.group_norm_silu.default in {node.target for node in graph.graph.nodes}



# torch 2.13 deprecates torch.jit.trace; the wrapper's checks of sizes warn that the trace fixes them
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@needs_cpu_kernels
def test_jit_trace_records_the_custom_op(calls):
    """torch.jit.trace: plain tensors and no mode, only the tracing state says the call is traced; the
    implementation called directly would leave its kernel out of the trace (an uninitialised output)."""
    g = torch.Generator().manual_seed(13)
    x, other = _rand(g, 2, 8, 4, 4), _rand(g, 2, 8, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(lambda v: ddpm_fast.group_norm_silu(v, None, None, 2, backend="cpu"), x)
        assert calls[0] == ("custom op", "group_norm_silu")  # the traced run (check_trace then reruns it eagerly)
        assert torch.equal(traced(other), ddpm_fast.group_norm_silu(other, None, None, 2, backend="cpu"))

@needs_cpu_kernels
def test_sampling_takes_the_fast_path(schedule, calls):
    """DDIM sampling with the tiny U-Net: every group norm and step runs without the dispatcher. (The first
    call's one recording forward runs under a dispatch mode, so through the dispatcher: see weight_casts.)"""
    from ddpm_fast.sampler import Sampler
    from ddpm_fast.unet import UNet

    torch.manual_seed(0)
    sampler = Sampler(UNet.preset("tiny").eval(), schedule, method="ddim", num_steps=2)
    sampler.sample(torch.arange(2))
    assert ("custom op", "group_norm_silu") in calls  # the recording forward
    calls.clear()
    images = sampler.sample(torch.arange(2))
    assert images.shape == (2, 3, 16, 16)
    assert {route for route, _ in calls} == {"fast"}
    assert {name for _, name in calls} == {"group_norm_silu", "step"}
