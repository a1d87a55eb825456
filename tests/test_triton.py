"""What only the triton backend has: its Philox counter mapping, its multi-tile paths, its in-kernel
guards, its launch configurations, and the automatic backend choice around it.

On a machine without a CUDA device these run on Triton's CPU interpreter (conftest sets TRITON_INTERPRET).
"""

import importlib
from types import SimpleNamespace

import pytest
import torch
from _tolerance import NOISE_ROUNDING, assert_matches_reference
from conftest import Backend
from test_group_norm import _inputs as _gn_inputs, assert_output_and_grads_match

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.ops import backend as backend_choice
from ddpm_fast.schedule import NoiseSchedule, ddpm_table

TRITON = ddpm_fast.build_info()["backends"]["triton"]
if TRITON != "available":
    pytest.skip(f"triton backend: {TRITON}", allow_module_level=True)

import triton  # noqa: E402  (only where the backend runs)
import triton.language as tl  # noqa: E402

from ddpm_fast.ops.triton._common import LAUNCH_OPTIONS, contract_philox  # noqa: E402
from ddpm_fast.ops.triton._tiles import sample_tile  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_BACKEND = Backend("triton", DEVICE, interpreted=not torch.cuda.is_available())


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(1000, "linear")


@triton.jit
def _philox_kernel(seed_ptr, j_ptr, stream_ptr, out_ptr, N: tl.constexpr):
    """Program p: the words of seeds[p], streams[p] for every j (the kernels load a sample's seed as a scalar)."""
    k = tl.arange(0, N)
    seed = tl.load(seed_ptr + tl.program_id(0))
    stream = tl.load(stream_ptr + tl.program_id(0))
    x0, x1, x2, x3 = contract_philox(seed, tl.load(j_ptr + k), stream & 0xFFFFFFFF, stream >> 32)
    base = out_ptr + tl.program_id(0) * 4 * N + k * 4
    tl.store(base, x0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(base + 1, x1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(base + 2, x2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(base + 3, x3.to(tl.int64) & 0xFFFFFFFF)


def _philox_words(seeds, j, streams):
    """Four uint32 words (as int64) per (seed, j, stream) from the kernels' own Philox helper."""
    out = torch.empty(seeds.shape[0], j.shape[0], 4, dtype=torch.int64, device=DEVICE)
    _philox_kernel[(seeds.shape[0],)](seeds.to(DEVICE), j.to(DEVICE), streams.to(DEVICE), out, N=j.shape[0])
    return out.cpu()


def test_philox_counter_mapping_is_the_contract():
    """Triton's tl.philox with counter (j lo, j hi, stream lo, stream hi) and the seed as key is bit-exact with
    reference.philox4x32_10, including j and streams past 2**32 (the reverse step's streams are 2**32 + t)."""
    seeds = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**40) - 7])
    j = torch.tensor([0, 1, 2, 3, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 3 * 2**33 + 11], dtype=torch.int64)
    j = torch.cat([j, torch.arange(6, dtype=torch.int64) + 77])  # 16 entries (a power of two for tl.arange)
    streams = torch.tensor([0, 5, 2**32, 2**32 + 999, 2**33])
    ours = _philox_words(seeds, j, streams)
    counter = torch.stack(torch.broadcast_tensors(
        (j & 0xFFFFFFFF)[None, :], (j >> 32)[None, :], (streams & 0xFFFFFFFF)[:, None], (streams >> 32)[:, None]),
        dim=-1)
    key = torch.stack([seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF], dim=-1)[:, None, :]
    assert torch.equal(ours, reference.philox4x32_10(counter, key))


def test_streams_past_2_31_draw_the_contract_noise(schedule):
    """The launcher hands the stream's low word to the kernel as the int32 of its bits (one argument type for
    every stream); the kernel reads it back as uint32, so streams at and past 2**31 draw the contract's noise."""
    g = torch.Generator().manual_seed(17)
    x0 = torch.rand((2, 3, 4, 5), generator=g) * 2 - 1
    t = torch.tensor([10, 600])
    seeds = torch.randint(-2**62, 2**62, (2,), generator=g)
    for stream in (2**31 - 1, 2**31, 2**31 + 12345, 2**32 - 1):
        _, eps = ddpm_fast.q_sample(x0.to(DEVICE), t.to(DEVICE), schedule, seeds=seeds.to(DEVICE), stream=stream,
                                    backend="triton")
        ref = reference.philox_normal(seeds, stream, x0[0].numel()).reshape(x0.shape)
        torch.testing.assert_close(eps.cpu(), ref, rtol=0, atol=NOISE_ROUNDING, msg=f"stream {stream}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels: the interpreter compiles nothing")
def test_values_outside_addresses_compile_no_variants(schedule, monkeypatch):
    """Triton compiles a variant per value class of an int argument (== 1, divisible by 16, int32 or int64) and
    per constexpr: the stream (a new one per training step), the table's length and, in NCHW, C (which the
    channels-last tile sizes follow) must reuse one compiled kernel each."""
    from ddpm_fast.ops.triton import q_sample as triton_q_sample
    from ddpm_fast.ops.triton import step as triton_step

    compiled = {}  # {kernel: {the configuration autotuning chose (one where it is off): compiled kernels}}
    for module, name in ((triton_q_sample, "_q_sample_kernel"), (triton_step, "_step_kernel")):
        kernel = getattr(module, name)

        def run(*args, _run=kernel.run, _kernel=kernel, _name=name, **kwargs):
            launched = _run(*args, **kwargs)  # the CompiledKernel that ran
            compiled.setdefault(_name, {}).setdefault(str(_kernel.best_config), set()).add(id(launched))
            return launched
        monkeypatch.setattr(kernel, "run", run)
    for C in (3, 5):
        x0 = torch.rand(2, C, 4, 5, device=DEVICE)
        t, seeds = torch.tensor([3, 900], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
        for stream in (0, 1, 7, 32, 2**31 + 3):
            ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, stream=stream, backend="triton")
        for table in (ddpm_table(schedule), ddpm_table(NoiseSchedule(64, "linear"))):  # 1000 and 64 rows
            ddpm_fast.step(x0, table.timesteps[:2].to(DEVICE), x0, table, seeds=seeds, clip_range=1.0,
                           backend="triton")
    assert set(compiled) == {"_q_sample_kernel", "_step_kernel"}
    assert all(len(kernels) == 1 for per_config in compiled.values() for kernels in per_config.values()), compiled


@pytest.mark.parametrize("shape, channels_last", [
    ((2, 3, 64, 72), False),  # 13824 elements per sample: two NCHW tiles
    ((2, 4, 64, 64), False),  # 16384: whole tiles only (8192 here, 1024-4096 on a GPU), no partial last one
    ((2, 3, 64, 72), True),   # channels_last: several spatial tiles, S a multiple of 4
    ((1, 160, 5, 3), True),   # 160 channels: two channel tiles; S = 15 draws per element
    ((2, 160, 8, 9), True),   # two channel tiles x two spatial tiles (64 pixels, 128 channels), S a multiple of 4
    ((1, 160, 5, 13), True),  # the same with S = 65, one draw per element
])
def test_multi_tile_samples_match_the_reference(schedule, shape, channels_last):
    """Samples spread over several programs (the CI shapes elsewhere fit in one tile under the interpreter)."""
    g = torch.Generator().manual_seed(sum(shape))
    x0 = torch.rand(shape, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    seeds = torch.randint(-2**62, 2**62, (shape[0],), generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_t, eps = ddpm_fast.q_sample(x0.contiguous(memory_format=fmt).to(DEVICE), t.to(DEVICE), schedule,
                                  seeds=seeds.to(DEVICE), stream=7, backend="triton")
    ref_eps = reference.philox_normal(seeds, 7, x0[0].numel()).reshape(shape)
    torch.testing.assert_close(eps.cpu(), ref_eps, rtol=0, atol=NOISE_ROUNDING)
    ref, _ = reference.q_sample(x0, t, schedule, noise=eps.cpu())
    assert_matches_reference(x_t.cpu(), ref, reference.q_sample(x0.double(), t, schedule, noise=eps.cpu().double())[0])

    table = ddpm_table(schedule, variance_type="fixed_large")
    model_output = torch.randn(shape, generator=g)
    prev, _ = ddpm_fast.step(model_output.contiguous(memory_format=fmt).to(DEVICE), t.to(DEVICE),
                             x0.contiguous(memory_format=fmt).to(DEVICE), table, seeds=seeds.to(DEVICE),
                             clip_range=1.0, backend="triton")
    z = reference.philox_normal(seeds, reference.STEP_STREAM_BASE + t, x0[0].numel()).reshape(shape)
    ref_prev, _ = reference.step(model_output, t, x0, table, noise=z, clip_range=1.0)
    ref64_prev, _ = reference.step(model_output.double(), t, x0.double(), table, noise=z.double(), clip_range=1.0)
    ax, am, p0, p1, p2, std = table.coef[t, :6].reshape(shape[0], 6, *[1] * (len(shape) - 1)).unbind(1)
    terms = p0.abs() * ((ax * x0).abs() + (am * model_output).abs()) + (p1 * x0).abs() + (p2 * model_output).abs() \
        + (std * z).abs()  # what float32 rounding scales with (test_step.py derives it the same way)
    assert_matches_reference(prev.cpu(), ref_prev, ref64_prev, magnitude=terms)


@triton.jit
def _tile_kernel(out_ptr, C, S, CHANNELS_LAST: tl.constexpr, S_MULTIPLE_OF_4: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program p's sample_tile as four rows of BLOCK int64 (in tile order): offset from the batch's start, j, lane,
    mask."""
    b, offsets, j, lane, mask = sample_tile(tl.program_id(0), C, S, CHANNELS_LAST, S_MULTIPLE_OF_4, BLOCK, BLOCK_S,
                                            BLOCK_C)
    zero = offsets.to(tl.int64) * 0  # j and lane broadcast to the tile's shape
    row = out_ptr + tl.program_id(0) * 4 * BLOCK + tl.arange(0, BLOCK)
    tl.store(row, tl.reshape(b * C * S + offsets + zero, (BLOCK,)))
    tl.store(row + BLOCK, tl.reshape(j + zero, (BLOCK,)))
    tl.store(row + 2 * BLOCK, tl.reshape(lane + zero, (BLOCK,)))
    tl.store(row + 3 * BLOCK, tl.reshape(mask.to(tl.int64) + zero, (BLOCK,)))


@pytest.mark.parametrize("B, C, S, channels_last", [
    (3, 5, 21, False),   # 105 elements per sample, BLOCK 64: a partial last tile
    (2, 4, 32, False),   # 128: whole tiles only
    (2, 20, 16, True),   # 16-channel tiles x 4-pixel tiles: 2 x 4 tiles, S a multiple of 4
    (2, 20, 15, True),   # 2 x 4 tiles, odd S (tile counts with a common factor: a wrong order of the tiles shows)
    (1, 3, 8, True),     # fewer channels than a channel tile
])
def test_sample_tiles_cover_each_element_once(B, C, S, channels_last):
    """The elementwise kernels' tiling (_tiles.sample_tile, small blocks so that a few elements make many tiles of
    each kind): over the grid, the unmasked elements are each element of the batch exactly once (no element
    twice, none past a sample's end: under the interpreter's in-order programs a stray store past the end is
    overwritten by the next sample's program, or lands past the buffer), each with j, lane of its logical NCHW
    index 4 j + lane."""
    from ddpm_fast.ops.triton._tiles import CHANNELS_LAST_BLOCKS, programs_per_sample

    meta = {"C": C, "S": S, "CHANNELS_LAST": channels_last, "BLOCK": 64}
    meta.update({name: rule(meta) for name, rule in CHANNELS_LAST_BLOCKS.items()})
    grid = B * programs_per_sample(meta, C, S, channels_last)
    out = torch.full((grid, 4, 64), -1, dtype=torch.int64, device=DEVICE)
    _tile_kernel[(grid,)](out, C, S, channels_last, meta["S_MULTIPLE_OF_4"], 64, meta["BLOCK_S"], meta["BLOCK_C"])
    offset, j, lane, mask = out.cpu().transpose(0, 1).reshape(4, -1)
    offset, j, lane = offset[mask == 1], j[mask == 1], lane[mask == 1]
    assert torch.equal(offset.sort().values, torch.arange(B * C * S)), "each element once"
    within = offset % (C * S)
    logical = (within % C) * S + within // C if channels_last else within
    assert torch.equal(4 * j + lane, logical) and ((lane >= 0) & (lane < 4)).all()


def test_step_noise_of_timesteps_past_2_16():
    """The drawn noise's stream is 2**32 + t with t's whole low word: a table of 70000 rows, t past 2**16 (betas
    small enough that alpha_cumprod stays far from 0 there)."""
    from test_step import assert_step_matches

    table = ddpm_table(NoiseSchedule(70000, "linear", beta_start=1e-7, beta_end=2e-5))
    g = torch.Generator().manual_seed(29)
    x, m = torch.randn((3, 2, 4, 5), generator=g), torch.randn((3, 2, 4, 5), generator=g)
    t = torch.tensor([2**16 + 7, 69999, 40000])
    seeds = torch.randint(-2**62, 2**62, (3,), generator=g)
    prev, x0 = ddpm_fast.step(m.to(DEVICE), t.to(DEVICE), x.to(DEVICE), table, seeds=seeds.to(DEVICE),
                              backend="triton")
    assert_step_matches(prev.cpu(), x0.cpu(), table, x, m, None, t, seeds=seeds)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_elementwise_kernels_write_nothing_past_their_outputs(schedule, layout):
    """q_sample's and step's outputs as the first samples of larger buffers: the sample after them keeps its values
    (the interpreter's programs run in order, so only a store past the last sample's end can show; the tiles
    themselves: test_sample_tiles_cover_each_element_once)."""
    from ddpm_fast.ops.triton import q_sample as triton_q_sample
    from ddpm_fast.ops.triton import step as triton_step

    g = torch.Generator().manual_seed(len(layout))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    shape = (2, 5, 7, 3)  # 105 elements a sample: the last tile partial in either layout
    # inputs too as the first samples of larger tensors: a read past the end stays inside an allocation
    x0, m = (torch.randn((3, *shape[1:]), generator=g).contiguous(memory_format=fmt).to(DEVICE)[:2] for _ in range(2))
    t = torch.randint(1, 1000, (2,), generator=g).to(DEVICE)
    seeds = torch.randint(-2**62, 2**62, (2,), generator=g).to(DEVICE)
    buffers = [torch.randn((3, *shape[1:]), generator=g).contiguous(memory_format=fmt).to(DEVICE) for _ in range(4)]
    before = [buf[2].clone() for buf in buffers]
    triton_q_sample.launch(x0, t, schedule.q_table(DEVICE), None, seeds, 7, 1, buffers[0][:2], buffers[1][:2],
                           int(layout == "channels_last"))
    table = ddpm_table(schedule).table(DEVICE)
    triton_step.launch(x0, m, None, t, table, None, seeds, 1.0, 0.0, 1.0, buffers[2][:2], buffers[3][:2],
                       int(layout == "channels_last"))
    for i, (buf, kept) in enumerate(zip(buffers, before)):
        assert torch.equal(buf[2], kept), f"output {i} wrote past its end"
        assert buf[:2].isfinite().all()


# Dynamic thresholding's radix select (ops/triton/_select.py): its s against torch.quantile bit for bit (the select is
# exact, and x0 = ax * x + am * m is computed here with the kernels' rounding: float32 products, then the sum).
# IDENTITY's one row makes x0 the model output itself (0 * x + 1 * m), for keys built on purpose.
IDENTITY = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
NO_BOUND = 2.0**100  # a sample_max_value that binds nowhere here


def _assert_thresholds(x, m, t, table, ratio):
    """s of _select.thresholds is clamp(torch.quantile(|x0|, ratio), 1, NO_BOUND) exactly, NaN where it is NaN; the
    inputs keep it above 1, where the clamp would hide a wrong quantile."""
    from ddpm_fast.ops.triton._select import thresholds

    ours = thresholds(x.to(DEVICE), m.to(DEVICE), t.to(DEVICE), table.to(DEVICE), ratio, NO_BOUND).cpu()
    rows = table[t]
    x0 = rows[:, :1] * x.float().flatten(1) + rows[:, 1:2] * m.float().flatten(1)
    expected = torch.quantile(x0.abs(), ratio, dim=1).clamp(1.0, NO_BOUND)
    assert (expected[~expected.isnan()] > 1).all(), expected
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)


def _with_x0(m):
    """(x, m, t, table) whose x0 is m itself: a zero x_t at IDENTITY's row."""
    return torch.zeros_like(m), m, torch.zeros(m.shape[0], dtype=torch.int64), IDENTITY


def _ulps_above(value, ulps):
    return (torch.tensor(value).view(torch.int32) + ulps).view(torch.float32)


def _select_case(name, g):
    """(x, m, t, table, ratios) of a named case."""
    table = ddpm_table(NoiseSchedule(1000, "linear")).table()
    if name == "per-sample t":  # real coefficients, each sample at its own t
        x, m = torch.randn((3, 3, 9, 7), generator=g) * 3, torch.randn((3, 3, 9, 7), generator=g) * 3
        return x, m, torch.tensor([999, 500, 3]), table, [0.995]
    if name in ("float16", "bfloat16"):  # storage read as float32, as the step kernel reads it
        x, m = (torch.randn((2, 2, 8, 8), generator=g) * 3 for _ in range(2))
        return x.to(getattr(torch, name)), m.to(getattr(torch, name)), torch.tensor([700, 40]), table, [0.9]
    if name == "ties":  # quarter steps: runs of equal keys at rank lo and across lo, lo + 1; a sample all equal
        m = torch.randint(-12, 13, (3, 2, 10, 10), generator=g) / 4
        m[2] = 2.5
        return (*_with_x0(m), [0.9, 0.995])
    if name == "whole position":  # ratio * (n - 1) exactly 25 and 75: no interpolation (lo == hi)
        return (*_with_x0(1 + torch.rand((2, 1, 101), generator=g) * 9), [0.25, 0.75])
    if name == "ratio 1":  # the maximum
        return (*_with_x0(1 + torch.rand((2, 3, 5, 5), generator=g) * 9), [1.0])
    if name == "n = 1, 2":  # one key (lo = hi = 0); two keys, interpolated half way
        return (*_with_x0(1 + torch.rand((3, 1, 1), generator=g) * 9), [0.5]), \
            (*_with_x0(1 + torch.rand((3, 2, 1), generator=g) * 9), [0.5])
    if name == "next value":
        # Rank lo + 1 holds 1.5 + 5 ulps (its first three 8-bit digits are rank lo's 1.5's: the last pass's counts
        # give it), 1.5 + 256 ulps or 2.0 (an earlier digit differs: the smallest key above the last candidates),
        # or 1.5 itself (a tie at lo). pos = 50.6, 60% of the way: a neighbour off by one ulp shows.
        rows = []
        for v1 in (_ulps_above(1.5, 5), _ulps_above(1.5, 256), torch.tensor(2.0), torch.tensor(1.5)):
            values = torch.cat([torch.full((50,), 1.25), torch.tensor([1.5, v1]), torch.full((48,), 3.0)])
            signs = torch.randint(0, 2, (100,), generator=g) * 2 - 1.0
            rows.append(values[torch.randperm(100, generator=g)] * signs)
        return (*_with_x0(torch.stack(rows).view(4, 1, 10, 10)), [50.6 / 99])
    if name == "zeros":  # half the keys 0 (x0 exactly 0: zero padding), ranks lo, lo + 1 the last 0 and the
        # smallest non-zero: a block's padding lanes (also keys 0) must count nowhere
        m = torch.where(torch.rand((2, 3, 10, 10), generator=g) < 0.5, 0.0, 4 + torch.rand((2, 3, 10, 10), generator=g))
        zeros = int((m[0] == 0).sum())
        m[1] = m[0].flatten()[torch.randperm(300, generator=g)].view(3, 10, 10)  # the same keys in another order
        return (*_with_x0(m), [(zeros - 0.5) / 299])
    if name == "NaN in one sample":  # s is NaN there, also where the NaN's rank is not near pos; the others' as ever
        x, m = torch.randn((3, 2, 6, 6), generator=g) * 3, torch.randn((3, 2, 6, 6), generator=g) * 3
        m[1, 1, 2, 3] = float("nan")
        return x, m, torch.tensor([900, 900, 900]), table, [0.5, 0.995]
    if name == "inf":  # the quantile on +inf (lerp(inf, inf) is NaN); one inf, the largest: w < 0.5 or not
        m = 1 + torch.rand((2, 1, 100), generator=g) * 9
        m[0, 0, 10:] = float("inf")
        m[1, 0, 7] = -float("inf")  # |x0| = +inf
        return (*_with_x0(m), [0.5, 0.99, 0.995])
    raise ValueError(name)


@pytest.mark.parametrize("name", ["per-sample t", "float16", "bfloat16", "ties", "whole position", "ratio 1",
                                  "n = 1, 2", "next value", "zeros", "NaN in one sample", "inf"])
@pytest.mark.parametrize("kernels", ["one per sample", "passes"])
def test_threshold_select_is_torch_quantile(name, kernels, monkeypatch):
    """Both paths: one program a sample (samples of at most MAX_TILES blocks: all of these), and the passes'
    kernels with their shared counts (forced here; on a GPU the next test runs them, and these cases' ~20 more
    compiled variants would cost the GPU check's test stage ~30 s)."""
    from ddpm_fast.ops.triton import _select

    if kernels == "passes":
        if DEVICE.type == "cuda":
            pytest.skip("on a GPU the passes' kernels run in test_threshold_select_over_several_programs_per_sample")
        monkeypatch.setattr(_select, "MAX_TILES", 0)
    case = _select_case(name, torch.Generator().manual_seed(len(name)))
    for x, m, t, table, ratios in case if isinstance(case[0], tuple) else [case]:
        for ratio in ratios:
            _assert_thresholds(x, m, t, table, ratio)


def test_threshold_select_over_several_programs_per_sample(monkeypatch):
    """Blocks of 256 keys, 3 a program: 3441 keys make 14 blocks in 5 programs, whose last holds a partial block
    and one wholly past the end (under the interpreter one program takes a whole sample otherwise)."""
    from ddpm_fast.ops.triton import _select

    for name, value in (("BLOCK", 256), ("MAX_TILES", 3), ("TARGET_PROGRAMS", 1)):
        monkeypatch.setattr(_select, name, value)
    assert _select.tiling(2, 3441) == (3, 5)
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn((2, 3, 31, 37), generator=g) * 3, torch.randn((2, 3, 31, 37), generator=g) * 3
    x[0], m[0] = 0.0, torch.randint(-40, 41, (3, 31, 37), generator=g) / 8  # ties spread over the programs
    for ratio in (0.5, 0.995):
        _assert_thresholds(x, m, torch.tensor([900, 500]), ddpm_table(NoiseSchedule(1000, "linear")).table(), ratio)


def test_threshold_select_tiling(monkeypatch):
    """The GPU's tiling: programs of whole blocks, none empty, about TARGET_PROGRAMS of them where the batch allows
    (the benchmarked shapes below), more blocks a program only where the grid's second axis would overflow."""
    from ddpm_fast.ops.triton import _select

    monkeypatch.setattr(_select, "BLOCK", 2048)
    monkeypatch.setattr(_select, "MAX_TILES", 8)
    assert _select.tiling(1, 3 * 256 * 256) == (1, 96)
    assert _select.tiling(256, 3 * 32 * 32) == (1, 2)
    assert _select.tiling(128, 3 * 256 * 256) == (8, 12)
    for B, n in ((1, 1), (3, 2049), (64, 10**6), (1, 2**31 - 2**16), (5000, 777)):
        tiles, programs = _select.tiling(B, n)
        blocks = triton.cdiv(n, 2048)
        assert (programs - 1) * tiles < blocks <= programs * tiles and programs <= _select.MAX_GRID_Y, (B, n)
        assert tiles <= 8 or programs == _select.MAX_GRID_Y or triton.cdiv(blocks, tiles - 1) > _select.MAX_GRID_Y


@pytest.mark.parametrize("layout", ["channels_last", "batch strides", "learned_range"])
def test_thresholded_step_layouts(schedule, layout):
    """The launcher hands the select each layout's samples (dense per sample, batch strides of views, the
    prediction half of learned_range's model output): x0 equals the reference's bit for bit (s is exact), prev to
    test_step.py's bound."""
    from test_step import assert_step_matches

    variance = "learned_range" if layout == "learned_range" else "fixed_small"
    table = ddpm_table(schedule, variance_type=variance)
    g = torch.Generator().manual_seed(len(layout))
    shape = (3, 3, 9, 10)
    x, noise = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)
    mo = torch.randn((3, 6, 9, 10), generator=g) * 2
    if variance == "learned_range":
        mo[:, 3:] = torch.rand((3, 3, 9, 10), generator=g) * 2 - 1
    else:
        mo = mo[:, :3] if layout == "batch strides" else mo[:, :3].contiguous()
    if layout == "channels_last":
        x, mo = x.contiguous(memory_format=torch.channels_last), mo.contiguous(memory_format=torch.channels_last)
    if layout == "batch strides":
        x = torch.cat([x, x], dim=1)[:, :3]
    t = torch.tensor([999, 420, 35])
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    prev, x0 = ddpm_fast.step(mo.to(DEVICE), t.to(DEVICE), x.to(DEVICE), table, noise.to(DEVICE), backend="triton",
                              **kwargs)
    _, ref_x0 = reference.step(mo, t, x, table, noise=noise, **kwargs)
    assert torch.equal(x0.cpu(), ref_x0)
    assert_step_matches(prev.cpu(), x0.cpu(), table, x, mo, noise, t, **kwargs)


@pytest.mark.parametrize("shape, groups", [
    ((1, 4, 48, 48), 1),  # a group of 9216 elements: several spatial tiles per group
    ((2, 8192, 1), 1),    # 8192 channels in one group: several channel tiles
])
def test_group_norm_multi_tile_groups(shape, groups):
    """The output and every gradient within test_group_norm's bounds, which add the float32 rounding of the terms
    each gradient sums: twice PyTorch's own error alone moves with PyTorch's summation order (under
    ATEN_CPU_CAPABILITY=default a dbias summed over 2304 elements came out at 5x PyTorch's error)."""
    x, p = _gn_inputs(shape, "both", torch.float32, seed=shape[1])
    assert_output_and_grads_match(TRITON_BACKEND, x, p, groups)


# The split path of group_norm (grid (B * G, SPLIT): per-chunk partials, then a merge per group) is taken on a
# GPU when B * G is small; choose_split() says 1 off the GPU, so these tests force it. Batch 1 and few groups
# keep the interpreter's programs (B * G * SPLIT per kernel) few.
def _force_split(monkeypatch, split):
    from ddpm_fast.ops.triton import group_norm as triton_group_norm

    monkeypatch.setattr(triton_group_norm, "choose_split", lambda groups, Cg, S, device: split)


TRITON_BACKEND = SimpleNamespace(name="triton", device=DEVICE)  # test_group_norm's helpers take a conftest Backend


@pytest.mark.parametrize("shape, groups, form, dtype, channels_last, split, act", [
    ((1, 4, 5, 7), 2, "both", torch.float32, False, 3, "silu"),            # odd H x W: chunks of 12, 12, 11 pixels
    ((1, 8, 6, 6), 2, "bias_in", torch.float16, True, 3, "silu"),          # channels_last chunks of 12 pixels
    ((1, 6, 4, 5), 2, "scale_shift", torch.bfloat16, True, 3, "silu"),     # 3 channels per group (not a power of 2)
    ((1, 3, 7, 3), 3, "plain", torch.float32, False, 2, "silu"),           # one channel per group, no affine
    ((1, 2, 96, 96), 1, "scale_shift", torch.bfloat16, False, 2, "silu"),  # chunks of 4608 pixels: 3 tiles each
    ((2, 4100, 2), 1, "both", torch.float32, False, 2, "silu"),            # 4100 channels: two channel tiles a chunk
    ((2, 6, 5, 7), 3, "both", torch.float32, False, 3, "none"),            # the backward takes dy itself
])
def test_group_norm_split_path_matches_reference(monkeypatch, shape, groups, form, dtype, channels_last, split, act):
    """Forward and every gradient through the split path, against the reference (test_group_norm.py's bounds)."""
    from test_group_norm import _inputs, assert_output_and_grads_match

    _force_split(monkeypatch, split)
    x, p = _inputs(shape, form, dtype, seed=sum(shape), channels_last=channels_last, affine=form != "plain")
    ours = assert_output_and_grads_match(TRITON_BACKEND, x, p, groups, act)
    if channels_last:
        assert ours["x"].is_contiguous(memory_format=torch.channels_last)


def test_group_norm_split_path_is_deterministic(monkeypatch):
    """The partials are merged in a fixed order (no atomics): two runs agree bit for bit."""
    from test_group_norm import _inputs, _output_and_grads

    _force_split(monkeypatch, 3)
    x, p = _inputs((1, 2, 5, 7), "both", torch.float32, seed=5)
    (y1, first), (y2, second) = (_output_and_grads(x, p, 1, "silu", TRITON_BACKEND) for _ in range(2))
    assert torch.equal(y1, y2)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("split", [1, 3])
def test_group_norm_statistics_survive_a_large_mean(monkeypatch, offset, split):
    """Unit spread around a mean of 100 or 1000: E[x^2] - E[x]^2 in float32 would lose the variance to
    cancellation (relative error ~ offset^2 * 2^-24, 6e-4 at 100); one-pass shifted sums merged with Chan's
    formula keep mean and rstd within a few ulp of the float64 values, over several tiles and chunks."""
    _force_split(monkeypatch, split)
    g = torch.Generator().manual_seed(int(offset) + split)
    shape, groups = (1, 4, 48, 48), 2  # 4608-element groups: 2 tiles of pixels per channel, or 3 chunks
    x = torch.randn(shape, generator=g) + offset
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), None, None, None,
                                                        groups, 1e-5, 1, "triton")
    h = x.double().reshape(1, groups, -1)
    true_mean, true_var = h.mean(dim=2), h.var(dim=2, unbiased=False)
    true_rstd = (true_var + 1e-5).rsqrt()
    ulp = 2.0**-23
    assert ((mean.cpu().double() - true_mean).abs() <= 2 * ulp * true_mean.abs()).all(), (mean, true_mean)
    assert ((rstd.cpu().double() - true_rstd).abs() <= 8 * ulp * true_rstd).all(), (rstd, true_rstd)
    ref = reference.group_norm_silu(x, w, b, groups)
    assert_matches_reference(y.cpu(), ref, reference.group_norm_silu(x.double(), w.double(), b.double(), groups))


def test_group_norm_split_choice(monkeypatch):
    """SPLIT fills about SPLIT_PROGRAMS_PER_SM programs per SM when B * G is small, keeps chunks of at least
    SPLIT_MIN_CHUNK_ELEMENTS, and never splits off the GPU; the chunking covers S with no empty chunk."""
    from ddpm_fast.ops.triton import group_norm as triton_group_norm

    monkeypatch.setattr(triton_group_norm, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)

    def plan(B, C, H, W, G, device=cuda):
        split = triton_group_norm.choose_split(B * G, C // G, H * W, device)
        return triton_group_norm._chunking(H * W, split)

    assert plan(1, 320, 64, 64, 32) == (9, 464)   # 32 programs -> 288
    assert plan(8, 320, 64, 64, 32) == (2, 2048)  # 256 -> 512
    assert plan(128, 128, 32, 32, 32) == (1, 1024)  # 4096 programs: enough
    assert plan(1, 128, 32, 32, 32) == (1, 1024)  # 4096-element groups: too small to split
    assert plan(1, 320, 64, 64, 32, device=torch.device("cpu")) == (1, 4096)
    for S in (1, 2, 7, 35, 100, 1000, 4096, 65536):
        for want in (1, 2, 3, 5, 9, 32):
            split, chunk = triton_group_norm._chunking(S, want)
            assert 1 <= split <= max(1, min(want, S)) and (split - 1) * chunk < S <= split * chunk, (S, want)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU-tensor checks; on CUDA the kernels guard instead")
def test_bad_timesteps_raise_on_cpu_tensors(schedule):
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"q_sample: t must lie in \[0, 999\].*max 1000"):
        ddpm_fast.q_sample(x0, torch.tensor([3, 1000]), schedule, seeds=torch.tensor([1, 2]), backend="triton")
    table = ddpm_table(schedule)
    with pytest.raises(ValueError, match=r"step: t must lie in \[0, 999\].*min -1"):
        ddpm_fast.step(x0, torch.tensor([-1, 5]), x0, table, seeds=torch.tensor([1, 2]), backend="triton")


def test_bad_timestep_poisons_only_its_sample_in_kernel(schedule, monkeypatch):
    """On CUDA a range check would sync, so the kernels write NaN for a sample whose t is outside the table
    (the host check is switched off here to reach the kernels' own guard)."""
    from ddpm_fast.ops.triton import q_sample as triton_q_sample
    from ddpm_fast.ops.triton import step as triton_step

    monkeypatch.setattr(triton_q_sample, "check_t_range", lambda *args: None)
    monkeypatch.setattr(triton_step, "check_t_range", lambda *args: None)
    x0 = torch.randn(4, 3, 4, 4, device=DEVICE)
    t = torch.tensor([3, 1000, -1, 2**40], device=DEVICE)  # 2**40: far outside, a fault where a kernel read that row
    seeds = torch.tensor([1, 2, 3, 4], device=DEVICE)
    table = ddpm_table(schedule)
    outputs = [*torch.ops.ddpm_fast.q_sample(x0, t, schedule.q_table(DEVICE), None, seeds, 0, 1, "triton"),
               *torch.ops.ddpm_fast.step(x0, x0, None, t, table.table(DEVICE), None, seeds, 1.0, 0.0, 1.0, True,
                                         "triton"),
               *torch.ops.ddpm_fast.step(x0, x0, None, t, table.table(DEVICE), None, seeds, 0.0, 0.995, 1.0, True,
                                         "triton")]  # thresholded: the select reads the table at a clamped row
    for out in outputs:  # x_t, the v target, prev, x0, thresholded prev and x0
        assert out[0].isfinite().all() and out[1:].isnan().all()


def test_missing_noise_raises_on_cpu_tensors_and_is_nan_in_kernel(schedule):
    """A row that adds noise with neither noise nor seeds: the cpu backend's error for CPU tensors, NaN for
    that sample from the kernel itself (what CUDA tensors get; the op layer above never lets it happen)."""
    from ddpm_fast.ops.triton import step as triton_step
    from ddpm_fast.ops.triton._tiles import programs_per_sample

    table = ddpm_table(schedule).table(DEVICE)
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    t = torch.tensor([0, 500], device=DEVICE)  # DDPM adds no noise at t = 0
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"step: timestep t\[1\] = 500 adds noise"):
            torch.ops.ddpm_fast.step(x, x, None, t, table, None, None, 0.0, 0.0, 1.0, False, "triton")
    prev = torch.empty_like(x)
    triton_step._step_kernel[lambda meta: (2 * programs_per_sample(meta, 3, 16, False),)](
        x, 48, x, 48, x, 0, t, table, table.shape[0], x, 0, t, prev, prev, t, 0.0, 3, 16,
        NOISE=triton_step.NO_NOISE, HAS_V=False, WRITE_X0=False, THRESHOLD=False, CLIP=False, CHANNELS_LAST=False,
        S_MULTIPLE_OF_4=False, **LAUNCH_OPTIONS)  # as the launcher passes them
    assert prev[0].isfinite().all() and prev[1].isnan().all()


def test_interpreter_runs_one_configuration():
    from ddpm_fast.ops.triton import _common

    space = _common.configs([{"BLOCK": 1024}, {"BLOCK": 2048}], {"BLOCK": 8192}, num_warps=(4, 8))
    if _common.INTERPRET:
        assert [c.kwargs for c in space] == [{"BLOCK": 8192}]
    elif _common.AUTOTUNE:
        assert len(space) == 4


def test_autotuning_off_takes_the_middle_gpu_configuration(monkeypatch):
    """DDPM_FAST_TRITON_AUTOTUNE=0 (read at import, patched here): one GPU configuration, nothing to tune."""
    from ddpm_fast.ops.triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    space = _common.configs([{"BLOCK": 1024}, {"BLOCK": 2048}, {"BLOCK": 4096}], {"BLOCK": 8192}, num_warps=(4, 8))
    assert [(c.kwargs, c.num_warps) for c in space] == [({"BLOCK": 2048}, 4)]
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    assert len(_common.configs([{"BLOCK": 1024}, {"BLOCK": 2048}], {"BLOCK": 8192}, num_warps=(4, 8))) == 4
    # 4096 elements on 4 warps (32 a thread) spill on sm_90: left out of the space
    space = _common.configs([{"TILE": 1024}, {"TILE": 4096}], {"TILE": 4096}, num_warps=(4, 8))
    assert [(c.kwargs["TILE"], c.num_warps) for c in space] == [(1024, 4), (1024, 8), (4096, 8)]


def test_automatic_choice_never_picks_triton_for_cpu_tensors():
    cpu = torch.device("cpu")
    chosen = backend_choice.resolve("q_sample", ("cpu", "cuda", "triton"), cpu, None)
    assert chosen == ("cpu" if ddpm_fast.build_info()["backends"]["cpu"] == "available" else "torch")
    assert backend_choice.resolve("q_sample", ("triton",), cpu, None) == "torch"
    assert backend_choice.resolve("q_sample", ("triton",), cpu, "triton") == "triton"  # only when asked


def test_cuda_tensors_prefer_per_op_table_and_fall_back_to_triton(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(backend_choice, "_runs_on", lambda name, device: None)  # pretend both GPU backends run
    monkeypatch.setitem(backend_choice.CUDA_PREFERENCE, "step", ("triton", "cuda"))
    assert backend_choice.resolve("step", ("cpu", "cuda", "triton"), cuda, None) == "triton"
    assert backend_choice.resolve("q_sample", ("cpu", "cuda", "triton"), cuda, None) == "cuda"
    # an extension built without CUDA: triton
    monkeypatch.setattr(backend_choice, "_runs_on", lambda name, device: "no CUDA" if name == "cuda" else None)
    assert backend_choice.resolve("q_sample", ("cpu", "cuda", "triton"), cuda, None) == "triton"


def test_a_thresholded_step_takes_its_own_preference_entry(monkeypatch):
    """Its time is the select's, so CUDA_PREFERENCE orders it apart from the plain step: resolve reads the entry
    that ddpm_fast.step names."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(backend_choice, "_runs_on", lambda name, device: None)
    monkeypatch.setitem(backend_choice.CUDA_PREFERENCE, "step", ("cuda", "triton"))
    monkeypatch.setitem(backend_choice.CUDA_PREFERENCE, "step_thresholding", ("triton", "cuda"))
    native = ("cpu", "cuda", "triton")
    assert backend_choice.resolve("step", native, cuda, None) == "cuda"
    assert backend_choice.resolve("step", native, cuda, None, preference="step_thresholding") == "triton"

    step_op = importlib.import_module("ddpm_fast.ops.step")  # (the package's name `step` is the op's function)
    named = []
    real = step_op.resolve
    monkeypatch.setattr(step_op, "resolve", lambda *args, **kwargs: named.append(kwargs["preference"])
                        or real(*args, **kwargs))
    table = ddpm_table(NoiseSchedule(1000, "linear"))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x, m = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for thresholding in (False, True):
        ddpm_fast.step(m, 500, x, table, seeds=torch.tensor([1, 2]), thresholding=thresholding)
    assert named == ["step", "step_thresholding"]


# Compiles representative kernel variants for an H100/H200 (sm_90) in a subprocess without TRITON_INTERPRET:
# the interpreter runs code that the compiler rejects (it once accepted a helper whose constexpr branches
# returned different shapes), so CI without a GPU still checks that the kernels lower to a cubin
# (Triton ships ptxas; no GPU or driver is needed).
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddpm_fast.ops.triton import _select, group_norm, q_sample, step

def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through autotune and heuristics
    return kernel

def compile_for_sm90(kernel, types, constexprs):
    fn = jit_function(kernel)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "*fp32") for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "enable_fp_fusion": False})

ints = {name: "i32" for name in ("C", "S", "G", "Cg", "CHUNK", "SPLIT", "num_t", "stream_lo", "stream_hi")}
ints.update({name: "i64" for name in ("x0_bs", "noise_bs", "x_bs", "m_bs", "v_bs")})
ints.update({name: "i32" for name in ("n", "rank", "tiles", "need_next")})
ints.update(t_ptr="*i64", seeds_ptr="*i64", group_size="fp32", eps="fp32", clip="fp32", hist_ptr="*i32", w="fp32",
            max_value="fp32")

def types(dtype):
    return {**ints, **{name: "*" + dtype for name in ("x0_ptr", "noise_ptr", "xt_ptr", "target_ptr", "x_ptr", "m_ptr",
                                                      "v_ptr", "prev_ptr", "y_ptr", "dy_ptr", "dx_ptr")}}

# each tile shape of the elementwise kernels, with the heaviest options (NCHW: the tile constants the launchers
# pass there, which the NCHW tile does not read)
for dtype, cl, s4 in (("fp16", False, False), ("bf16", True, True), ("fp32", True, False)):
    tile = dict(BLOCK_S=512, BLOCK_C=4) if cl else dict(BLOCK_S=2048, BLOCK_C=1)
    compile_for_sm90(q_sample._q_sample_kernel, types(dtype), dict(
        DRAW=True, V_TARGET=True, CHANNELS_LAST=cl, S_MULTIPLE_OF_4=s4, BLOCK=2048, **tile))
    tile = dict(BLOCK_S=32, BLOCK_C=32) if cl else dict(BLOCK_S=1024, BLOCK_C=1)
    compile_for_sm90(step._step_kernel, types(dtype), dict(
        NOISE=2, HAS_V=True, WRITE_X0=True, THRESHOLD=cl, CLIP=not cl, CHANNELS_LAST=cl, S_MULTIPLE_OF_4=s4,
        BLOCK=1024, **tile))
compile_for_sm90(step._step_kernel, types("fp32"), dict(
    NOISE=0, HAS_V=False, WRITE_X0=False, THRESHOLD=False, CLIP=False, CHANNELS_LAST=False, S_MULTIPLE_OF_4=False,
    BLOCK=1024, BLOCK_S=1024, BLOCK_C=1))
# the thresholding select: its first, a middle and its last pass (each its own code), the finish, and all of
# them in one program
for dtype, p in (("fp32", 0), ("bf16", 1), ("fp16", _select.PASSES - 1)):
    compile_for_sm90(_select._pass_kernel, types(dtype), dict(
        PASS=p, BINS=_select.TOP_BINS if p == 0 else _select.RADIX, BLOCK=2048))
compile_for_sm90(_select._finish_kernel, ints, {})
compile_for_sm90(_select._sample_kernel, types("bf16"), dict(BLOCK=2048))
# group_norm: the fused one-chunk kernels and both kernels of the split path, full and bare options
for dtype, cl, full in (("bf16", True, True), ("fp32", False, True), ("fp16", False, False)):
    flags = dict(HAS_W=full, HAS_BIAS=full, HAS_BIN=full, HAS_SCALE=full, HAS_SHIFT=full, SILU=full,
                 CHANNELS_LAST=cl, TILE=2048, BLOCK_CG=4, BLOCK_S=512, SPLIT_P2=8, BLOCK_CP=4)
    grads = dict(DBIN=full, DSCALE=full, DSHIFT=full, DW=full, DB=full)
    for partials in (False, True):
        compile_for_sm90(group_norm._forward_kernel, types(dtype), dict(flags, PARTIALS=partials))
        compile_for_sm90(group_norm._backward_kernel, types(dtype), dict(flags, **grads, PARTIALS=partials))
    compile_for_sm90(group_norm._forward_stats_kernel, types(dtype), {
        k: flags[k] for k in ("HAS_BIN", "CHANNELS_LAST", "TILE", "BLOCK_CG", "BLOCK_S", "SPLIT_P2", "BLOCK_CP")})
    compile_for_sm90(group_norm._backward_stats_kernel, types(dtype), flags)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test compiles the kernels it runs")
def test_kernels_compile_for_sm90_without_a_gpu():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
