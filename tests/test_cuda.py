"""CUDA-kernel specifics that the shared op tests (test_q_sample / test_step / test_group_norm, run on every
backend) do not reach: CUDA-graph capture, the 16-byte and the scalar paths (misaligned pointers, odd
sizes), the channels-last noise tiles, GroupNorm's misaligned path against its aligned one and its run-to-run
determinism (its strategies, such as the cluster split of small batch x groups, are test_group_norm.py's
test_kernel_strategies, on every backend), the device-side timestep guard, the launch-error path, and the noise
against the CPU kernels'.

Every test runs the cuda backend: on a CUDA device (an extension built with DDPM_FAST_CUDA=ON), or
without one on the CPU through the emulator of the CUDA kernels that development builds carry
(``ddpm_fast._cuda_emulator``, tests/test_cuda_emulator.py), except CUDA-graph capture, which needs the
device. Without either the whole module skips and says which is missing.
"""

from types import SimpleNamespace

import pytest
import torch
from _fuzz import storage_variant
from _tolerance import FLOOR, NOISE_ROUNDING, assert_matches_reference
from conftest import Backend
from test_group_norm import (_group_norm as _gn_forward, _inputs as _gn_test_inputs,
                             _output_and_grads as _gn_output_and_grads, assert_output_and_grads_match)
from test_step import _magnitudes  # the per-element size of the terms a step's rounding scales with

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast._native import cuda_emulator_missing_reason
from ddpm_fast.ops import backend as backend_choice, group_norm as group_norm_module
from ddpm_fast.schedule import NoiseSchedule, ddpm_table


def _cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        emulator = cuda_emulator_missing_reason()
        return None if emulator is None else f"needs a CUDA device or the CUDA kernels' emulator ({emulator})"
    reason = ddpm_fast.build_info()["backends"]["cuda"]
    return None if reason == "available" else f"cuda backend: {reason}"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_cuda_missing() is not None, reason=str(_cuda_missing()))]
# The kernels' device: the GPU, or the CPU through the emulator.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = Backend("cuda", torch.device(DEVICE), interpreted=False)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_NAMES = ["float32", "float16", "bfloat16"]  # ids that -k can select (gpu_check.sh's racecheck)
CPU_HAS_KERNELS = ddpm_fast.build_info()["backends"]["cpu"] == "available"
needs_cpu_kernels = pytest.mark.skipif(not CPU_HAS_KERNELS, reason="the C++ CPU extension is not built")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale + offset).to(dtype)


def _seeds(batch, seed):
    return torch.randint(-2**62, 2**62, (batch,), generator=_gen(seed))


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x (same shape, dtype, memory format) whose data pointer is one element past a 16-byte
    boundary, so every 16-byte access is impossible and the kernels must take their scalar path."""
    cl = reference.memory_format_of(x) == torch.channels_last
    out = storage_variant(x, "misaligned_channels_last" if cl else "misaligned", x.device)
    assert out.data_ptr() % 16 != 0
    return out


# --------------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_graph_capture_of_a_ten_step_loop_replays_with_new_seeds(schedule):
    """q_sample + step, 10 steps in one captured graph: the seeds and timesteps are read on the device, so
    writing new seeds into the captured tensor draws new noise and the same seeds reproduce bit for bit."""
    table = ddpm_table(schedule, variance_type="fixed_small")
    B, shape = 4, (4, 3, 9, 11)  # odd H x W: the kernels' tails run inside the graph too
    x0 = _randn(shape, 1).cuda()
    seeds = _seeds(B, 2).cuda()
    t = torch.tensor([999, 640, 77, 1], device="cuda")

    def loop():
        x = x0
        for k in range(10):
            x_t, eps = ddpm_fast.q_sample(x, t, schedule, seeds=seeds, stream=k, backend="cuda")
            x, _ = ddpm_fast.step(eps * 0.5, t, x_t, table, seeds=seeds, clip_range=1.0, backend="cuda")
        return x

    eager = loop()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs recommends
        loop()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop()

    graph.replay()
    first = out.clone()
    assert torch.equal(first, eager), "the replay differs from the eager loop with the same seeds"
    assert torch.isfinite(first).all()

    seeds.copy_(_seeds(B, 3).cuda())
    graph.replay()
    second = out.clone()
    differs = (second != first).flatten(1).any(dim=1)
    assert differs.all(), "new seeds in the captured tensor must draw new noise for every sample"
    assert torch.equal(second, loop()), "the replay with new seeds differs from the eager loop with them"

    seeds.copy_(_seeds(B, 2).cuda())
    graph.replay()
    assert torch.equal(out, first), "the same seeds must reproduce the first replay exactly"


# --------------------------------------------------------------------------------------------------
# the noise against the CPU kernels (same seeds)
# --------------------------------------------------------------------------------------------------


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 3, 17, 9), (2, 70, 5, 3), (2, 5, 64, 1)])
def test_q_sample_noise_equals_cpu_kernel(schedule, shape, channels_last):
    """The epsilon target is the drawn noise itself: equal to the CPU kernel's up to log/sin/cos rounding.
    C = 70 > 64 splits channels-last tiles along the channels; H x W odd puts Philox groups across rows."""
    x0 = _randn(shape, 4)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    t, seeds = torch.tensor([3, 500, 999])[: shape[0]], _seeds(shape[0], 5)
    _, cpu = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, stream=11, backend="cpu")
    _, gpu = ddpm_fast.q_sample(x0.to(DEVICE), t.to(DEVICE), schedule, seeds=seeds.to(DEVICE), stream=11,
                                backend="cuda")
    assert gpu.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=NOISE_ROUNDING)
    # And the contract itself, in logical NCHW order whatever the layout.
    ref = reference.philox_normal(seeds, 11, x0[0].numel()).reshape(shape)
    torch.testing.assert_close(gpu.cpu().contiguous(), ref, rtol=0, atol=NOISE_ROUNDING)


@needs_cpu_kernels
def test_randn_equals_cpu_kernel():
    seeds = _seeds(5, 0)
    cpu = ddpm_fast.randn(seeds, (3, 17, 9), backend="cpu")
    ours = ddpm_fast.randn(seeds.to(DEVICE), (3, 17, 9), backend="cuda")
    torch.testing.assert_close(ours.cpu(), cpu, rtol=0, atol=NOISE_ROUNDING)


@needs_cpu_kernels
def test_more_samples_than_the_y_grid_takes(schedule):
    """Past gridDim.y's 65535: randn's y-blocks walk the batch (it used to refuse), as q_sample's do, in the
    flat walk (NCHW) and in the tile walk (channels-last noise drawn per tile)."""
    B = 65535 + int(torch.randint(1, 4, ()))
    seeds = torch.randint(-2**63, 2**63 - 1, (B,), dtype=torch.int64)
    ours = ddpm_fast.randn(seeds.to(DEVICE), (1, 1, 3), backend="cuda")
    torch.testing.assert_close(ours.cpu(), ddpm_fast.randn(seeds, (1, 1, 3), backend="cpu"), rtol=0,
                               atol=NOISE_ROUNDING)
    x0, t = _randn((B, 1, 1, 3), 12), torch.randint(0, schedule.num_train_timesteps, (B,))
    x_t, eps = ddpm_fast.q_sample(x0.to(DEVICE), t.to(DEVICE), schedule, seeds=seeds.to(DEVICE), backend="cuda")
    cpu_x_t, cpu_eps = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, backend="cpu")
    torch.testing.assert_close(eps.cpu(), cpu_eps, rtol=0, atol=NOISE_ROUNDING)
    torch.testing.assert_close(x_t.cpu(), cpu_x_t, rtol=0, atol=NOISE_ROUNDING + FLOOR[torch.float32] * 8)
    x0 = _randn((B, 2, 1, 2), 13).contiguous(memory_format=torch.channels_last)
    _, eps = ddpm_fast.q_sample(x0.to(DEVICE), t.to(DEVICE), schedule, seeds=seeds.to(DEVICE), backend="cuda")
    assert eps.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(eps.cpu(), ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, backend="cpu")[1], rtol=0,
                               atol=NOISE_ROUNDING)


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("learned", [False, True])
def test_step_noise_equals_cpu_kernel(schedule, channels_last, learned):
    """The step's drawn noise (stream 2**32 + t per sample) equals the CPU kernel's: the outputs agree to
    the noise's rounding times std * sigma plus one float32 rounding of the result."""
    table = ddpm_table(schedule, variance_type="learned_range" if learned else "fixed_small")
    shape = (3, 6, 7, 5)
    x = _randn(shape, 6)
    C = shape[1]
    mo = _randn((3, 2 * C if learned else C, 7, 5), 7)
    if learned:
        mo[:, C:] = torch.rand((3, C, 7, 5), generator=_gen(8)) * 2 - 1
    if channels_last:
        x, mo = (v.contiguous(memory_format=torch.channels_last) for v in (x, mo))
    t, seeds = torch.tensor([999, 421, 0]), _seeds(3, 9)
    cpu, _ = ddpm_fast.step(mo, t, x, table, seeds=seeds, backend="cpu")
    gpu, _ = ddpm_fast.step(mo.to(DEVICE), t.to(DEVICE), x.to(DEVICE), table, seeds=seeds.to(DEVICE), backend="cuda")
    std = table.coef[t, 5].float().reshape(3, 1, 1, 1)
    sigma_max = torch.exp(0.5 * table.coef[t, 6:8].abs().max(dim=1).values).float().reshape(3, 1, 1, 1)
    bound = std * (sigma_max if learned else 1.0) * NOISE_ROUNDING + 2**-21 * (1 + cpu.abs())
    assert ((gpu.cpu() - cpu).abs() <= bound).all()
    # The last sample sits at t = 0 (no noise): there the two kernels do the same float math.
    torch.testing.assert_close(gpu.cpu()[2], cpu[2], rtol=2**-21, atol=2**-22)


# --------------------------------------------------------------------------------------------------
# 16-byte and scalar paths, layouts, odd sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 5, 7, 9), (1, 1, 1, 13)])
def test_q_sample_misaligned_equals_aligned(schedule, dtype, shape):
    """Storage offset 1 takes the scalar path; it computes what the 16-byte path does (n = 192 divides into
    vectors, 315 and 13 leave tails)."""
    x0, noise = _randn(shape, 10, dtype).to(DEVICE), _randn(shape, 11, dtype).to(DEVICE)
    t, seeds = torch.randint(0, 1000, (shape[0],), generator=_gen(12)).to(DEVICE), _seeds(shape[0], 13).to(DEVICE)
    for kwargs in ({"seeds": seeds}, {"noise": noise}):
        aligned = ddpm_fast.q_sample(x0, t, schedule, target="v_prediction", backend="cuda", **kwargs)
        moved = {k: _misaligned(v) if k == "noise" else v for k, v in kwargs.items()}
        scalar = ddpm_fast.q_sample(_misaligned(x0), t, schedule, target="v_prediction", backend="cuda", **moved)
        for a, s in zip(aligned, scalar):
            torch.testing.assert_close(s, a, rtol=2**-22, atol=2**-23)
    x_t, eps = ddpm_fast.q_sample(_misaligned(x0), t, schedule, noise=_misaligned(noise), backend="cuda")
    ref_x_t, _ = reference.q_sample(x0, t, schedule, noise=noise)
    ref64, _ = reference.q_sample(x0.double(), t, schedule, noise=noise.double())
    assert_matches_reference(x_t, ref_x_t, ref64, what="x_t (misaligned)")
    assert torch.equal(eps, noise)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("post", [{}, {"clip_range": 1.0}, {"thresholding": True, "sample_max_value": 3.0}])
def test_step_misaligned_and_channels_last_agree(schedule, dtype, post):
    """The flat 16-byte walk, the scalar walk (misaligned) and the channels-last tile walk (noise drawn per
    tile) give the same step; with thresholding each sample's quantile comes from its cluster of blocks."""
    table = ddpm_table(schedule, variance_type="learned_range")
    shape = (3, 5, 9, 7)
    x = _randn(shape, 14, dtype).to(DEVICE)
    mo = torch.cat([_randn(shape, 15), torch.rand(shape, generator=_gen(16)) * 2 - 1], dim=1).to(dtype).to(DEVICE)
    t, seeds = torch.tensor([999, 500, 3]).to(DEVICE), _seeds(3, 17).to(DEVICE)
    prev, x0 = ddpm_fast.step(mo, t, x, table, seeds=seeds, backend="cuda", **post)
    prev_s, x0_s = ddpm_fast.step(_misaligned(mo), t, _misaligned(x), table, seeds=seeds, backend="cuda", **post)
    cl = lambda v: v.contiguous(memory_format=torch.channels_last)  # noqa: E731
    prev_c, x0_c = ddpm_fast.step(cl(mo), t, cl(x), table, seeds=seeds, backend="cuda", **post)
    # The walks do the same float32 math per element; allow one rounding of the stored result.
    tol = {"rtol": 2 * FLOOR[dtype], "atol": 2 * FLOOR[dtype]}
    for other in (prev_s, prev_c):
        torch.testing.assert_close(other.float(), prev.float(), **tol)
    for other in (x0_s, x0_c):
        torch.testing.assert_close(other.float(), x0.float(), **tol)
    assert prev_c.is_contiguous(memory_format=torch.channels_last)
    # Against the reference given the very noise the kernel drew (randn on CUDA runs the same Philox and
    # the same float math), so only the step's own arithmetic is compared.
    noise = torch.cat([ddpm_fast.randn(seeds[b:b + 1], shape[1:], stream=reference.STEP_STREAM_BASE + int(t[b]),
                                       backend="cuda") for b in range(3)]).cpu()
    ref = reference.step(mo.cpu(), t.cpu(), x.cpu(), table, noise=noise.to(dtype), **post)
    ref64 = reference.step(mo.cpu().double(), t.cpu(), x.cpu().double(), table, noise=noise.double(), **post)
    x0_terms, prev_terms = _magnitudes(table, t.cpu(), x.cpu(), mo.cpu(), noise)
    assert_matches_reference(x0.cpu(), ref[1], ref64[1], what="pred_original_sample", magnitude=x0_terms)
    assert_matches_reference(prev.cpu(), ref[0], ref64[0], what="prev_sample", magnitude=prev_terms)


# --------------------------------------------------------------------------------------------------
# the timestep guard and the launch-error path
# --------------------------------------------------------------------------------------------------


def test_timesteps_out_of_range_give_nan_not_out_of_bounds_reads(schedule):
    """The CUDA launchers do not read t on the host (that would sync): a t outside [0, T) writes NaN for
    its sample and never indexes the table; the other samples are untouched."""
    table = ddpm_table(schedule)
    shape = (4, 3, 6, 6)
    x, mo = _randn(shape, 20).to(DEVICE), _randn(shape, 21).to(DEVICE)
    t = torch.tensor([10, 1000, -1, 2**40]).to(DEVICE)
    seeds = _seeds(4, 22).to(DEVICE)
    x_t, eps = ddpm_fast.q_sample(x, t, schedule, seeds=seeds, backend="cuda")
    prev, x0 = ddpm_fast.step(mo, t, x, table, seeds=seeds, backend="cuda")
    prev_thr, _ = ddpm_fast.step(mo, t, x, table, seeds=seeds, thresholding=True, backend="cuda")
    for out in (x_t, eps, prev, x0, prev_thr):
        assert torch.isfinite(out[0]).all()
        assert torch.isnan(out[1:]).all()
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # no illegal address was raised by the kernels
    good, _ = ddpm_fast.q_sample(x[:1], t[:1], schedule, seeds=seeds[:1], backend="cuda")
    assert torch.equal(good, x_t[:1])


def test_launch_failure_raises_naming_the_op():
    """A region too wide for shared memory (one group of 4096 channels: the backward needs 256 KB, more than
    any GPU gives a block) fails at launch, refused by the launcher before CUDA would: a Python RuntimeError
    that names the op and the sizes, and later launches work. The ops are called below the public function,
    whose backend choice would refuse the call before any launch (the tests below)."""
    x = _randn((1, 4096, 2, 2), 23).to(DEVICE)
    with pytest.raises(RuntimeError, match=r"group_norm_silu(_backward)?: needs \d+ bytes of shared memory"):
        # the forward needs 148 KB: it fits on Hopper, not on Ampere
        y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, None, None, None, None, None, 1, 1e-5, 1, "cuda")
        torch.ops.ddpm_fast.group_norm_silu_backward(y, x, None, None, None, None, None, mean, rstd, 1, 1, "cuda")
    ok = ddpm_fast.group_norm_silu(x[:, :8], None, None, 2, backend="cuda")
    assert torch.isfinite(ok).all()


def _record_launches(monkeypatch) -> list:
    """The (direction, backend) of every GroupNorm launch from now on, in order."""
    ran = []
    for table, direction in ((group_norm_module._FORWARD, "forward"), (group_norm_module._BACKWARD, "backward")):
        for name, launcher in list(table.items()):
            monkeypatch.setitem(table, name, lambda *args, _launch=launcher, _ran=(direction, name):
                                (ran.append(_ran), _launch(*args))[1])
    return ran


def test_explicit_cuda_refuses_a_group_too_wide_before_running(monkeypatch):
    """backend="cuda" on one group of 4096 channels: inference runs; under autograd, whose backward would
    not fit, the call raises before its forward launches (not in loss.backward() after it), naming the
    backend, the sizes and the way out."""
    ran = _record_launches(monkeypatch)
    x = _randn((1, 4096, 2, 2), 24).to(DEVICE)
    with torch.no_grad():
        ddpm_fast.group_norm_silu(x, None, None, 1, backend="cuda")
        # a parameter that requires grad, without grad mode: no backward will run, so the forward is taken
        ddpm_fast.group_norm_silu(x, torch.randn(4096, device=DEVICE, requires_grad=True), None, 1, backend="cuda")
    assert ran == [("forward", "cuda")] * 2
    ran.clear()
    with pytest.raises(RuntimeError, match=r"group_norm_silu: backend 'cuda' cannot take this call: "
                                           r"group_norm_silu_backward: needs \d+ bytes.*backend=None"):
        ddpm_fast.group_norm_silu(x.requires_grad_(), None, None, 1, backend="cuda")
    assert ran == []


def test_automatic_choice_moves_past_a_group_too_wide_for_the_cuda_kernels(monkeypatch):
    """One group of 4096 channels: the CUDA forward takes it, the backward's shared memory cannot (64 bytes a
    channel; an H200 gives a block 227 KB). The automatic choice asks the launcher first: inference runs the
    cuda forward; training runs forward and backward on the next backend, with the gradients right, instead
    of failing in its backward. (An explicit backend="cuda" raises before it runs: the test above.)"""
    # cuda first, whatever CUDA_PREFERENCE says; on the CPU the emulated H200 takes part as a GPU would
    monkeypatch.setattr(backend_choice, "_auto_order", lambda op, device_type: ("cuda", "triton", "torch"))
    ran = _record_launches(monkeypatch)
    x, p = _gn_test_inputs((2, 4096, 2, 2), "scale_shift", torch.float32, seed=31)
    with torch.no_grad():
        ddpm_fast.group_norm_silu(*(v.to(DEVICE) for v in (x, p["weight"], p["bias"])), 1)
    assert ran == [("forward", "cuda")]
    ran.clear()
    assert_output_and_grads_match(SimpleNamespace(name=None, device=DEVICE), x, p, 1)
    # the next backend: triton's kernels where it runs, else the reference (which launches none)
    triton_runs = ddpm_fast.build_info()["backends"]["triton"] == "available"
    assert ran == ([("forward", "triton"), ("backward", "triton")] if triton_runs else []), ran


# --------------------------------------------------------------------------------------------------
# GroupNorm: the scalar path against the 16-byte one, determinism
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 20, 5, 7), (2, 16, 6, 8)])
def test_group_norm_misaligned_equals_aligned(shape, dtype, channels_last):
    """Storage offset 1 (scalar loads) computes what the aligned call does. (2, 16, 6, 8) aligned takes the
    16-byte path in every dtype and layout; (2, 20, 5, 7) only in channels_last float32 (5 accesses of 4
    channels per pixel). The paths sum in different orders: the statistics agree to float32 rounding, so a
    half-precision output may round one ulp apart."""
    x, p = _gn_test_inputs(shape, "both", dtype, seed=26, channels_last=channels_last)
    y = _gn_forward(CUDA, x.to(DEVICE), p, 4)
    y_s = _gn_forward(CUDA, _misaligned(x.to(DEVICE)), p, 4)
    ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    torch.testing.assert_close(y_s.float(), y.float(), rtol=2**-20 + ulp, atol=2**-20)


def test_group_norm_is_deterministic_except_parameter_sums():
    """The forward and dx come out bit-identical run to run (fixed reduction order); dweight / dbias are
    atomics over samples and agree to rounding."""
    x, p = _gn_test_inputs((8, 64, 16, 16), "scale_shift", torch.float32, seed=27)
    (y1, g1), (y2, g2) = (_gn_output_and_grads(x, p, 8, "silu", CUDA) for _ in range(2))
    assert torch.equal(y1, y2) and torch.equal(g1["x"], g2["x"])
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the op layer on CUDA: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_opcheck_on_cuda(schedule):
    x0, noise = _randn((2, 3, 5, 7), 29).to(DEVICE), _randn((2, 3, 5, 7), 30).to(DEVICE)
    t, seeds = torch.tensor([10, 900]).to(DEVICE), torch.tensor([3, -7]).to(DEVICE)
    table = ddpm_table(schedule, variance_type="learned_range")
    mo, var = _randn((2, 3, 5, 7), 31).to(DEVICE), (torch.rand(2, 3, 5, 7) * 2 - 1).to(DEVICE)
    x = _randn((2, 8, 4, 4), 32).to(DEVICE).requires_grad_()
    w, b = _randn((8,), 33).to(DEVICE).requires_grad_(), _randn((8,), 34).to(DEVICE)
    sc, sh = _randn((2, 8), 35).to(DEVICE).requires_grad_(), _randn((2, 8), 36).to(DEVICE)
    cl = x0.contiguous(memory_format=torch.channels_last)
    cases = [
        (torch.ops.ddpm_fast.q_sample.default, (x0, t, schedule.q_table(DEVICE), None, seeds, 3, 1, "cuda")),
        (torch.ops.ddpm_fast.q_sample.default, (cl, t, schedule.q_table(DEVICE), noise, None, 0, 0, "cuda")),
        (torch.ops.ddpm_fast.step.default,
         (x0, mo, var, t, table.table(DEVICE), None, seeds, 1.0, 0.0, 1.0, True, "cuda")),
        (torch.ops.ddpm_fast.step.default,
         (cl, mo, var, t, table.table(DEVICE), noise, None, 0.0, 0.995, 2.0, False, "cuda")),
        (torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, None, sc, sh, 4, 1e-5, 1, "cuda")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_on_cuda(schedule):
    table = ddpm_table(schedule)

    def train_and_sample(x0, t, seeds, x, w, b, scale, shift):
        x_t, eps = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, backend="cuda")
        prev, _ = ddpm_fast.step(eps, t, x_t, table, seeds=seeds, clip_range=1.0, backend="cuda")
        h = ddpm_fast.group_norm_silu(x, w, b, 4, scale=scale, shift=shift, backend="cuda")
        return prev, h

    args = (_randn((2, 3, 8, 8), 37).to(DEVICE), torch.tensor([5, 700]).to(DEVICE), torch.tensor([1, 2]).to(DEVICE),
            _randn((2, 8, 4, 4), 38).to(DEVICE).requires_grad_(), _randn((8,), 39).to(DEVICE).requires_grad_(),
            _randn((8,), 40).to(DEVICE), _randn((2, 8), 41).to(DEVICE).requires_grad_(), _randn((2, 8), 42).to(DEVICE))
    prev, h = torch.compile(train_and_sample, fullgraph=True)(*args)
    prev_eager, h_eager = train_and_sample(*args)
    assert torch.equal(prev, prev_eager)
    torch.testing.assert_close(h, h_eager)
