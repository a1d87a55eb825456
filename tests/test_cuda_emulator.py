"""The emulator of the CUDA kernels (csrc/cuda_emulator), on which the cuda backend's tests run where there
is no GPU. It must catch what a GPU would refuse, hang on or get wrong, or a green run of the kernels on it
would mean nothing (its small faulty kernels: selftest.cpp); and the kernels' results must not depend on
what it emulates: the order in which threads run between barriers, or the device (an H200 splits small
batch x groups over thread-block clusters, an A100 cannot).
"""

import itertools

import pytest
import torch
from _tolerance import assert_matches_reference

import ddpm_fast
from ddpm_fast import _native, reference
from ddpm_fast.ops.group_norm import _CUDA_FITS_EVERYWHERE
from ddpm_fast.schedule import NoiseSchedule, ddpm_table

emulator = _native._cuda_emulator
pytestmark = pytest.mark.skipif(emulator is None or torch.cuda.is_available(),
                                reason="the CUDA kernels' emulator is not built" if emulator is None
                                else "a CUDA device is present: the cuda backend runs there")

FORWARD, REVERSE, RANDOM = 0, 1, 2
H200, A100, L4 = 0, 1, 2


@pytest.fixture
def emulated(monkeypatch):
    """The emulator for this test, back to the session's thread order and the H200 after it."""
    monkeypatch.setenv(_native.EMULATE_CUDA_ENV, "1")
    schedule = emulator.get_schedule()
    emulator.take_stats()
    yield emulator
    emulator.set_schedule(*schedule)
    emulator.set_device(H200)


# --------------------------------------------------------------------------------------------------
# it catches what a GPU would not let pass
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, error", [
    ("partial_shuffle", r"deadlock: of 32 threads, 0 wait at __syncthreads, 16 at a warp shuffle"),
    ("misaligned_vector_load", r"misaligned load \(thread \d+ of block 0,0\)"),
    ("too_many_threads", r"launch refused: cudaErrorInvalidConfiguration"),
    ("shared_over_48k_without_attribute", r"launch refused: cudaErrorInvalidValue"),
])
def test_faults_a_gpu_would_raise_become_errors(emulated, kernel, error):
    with pytest.raises(RuntimeError, match=error):
        emulated.selftest(kernel)


@pytest.mark.parametrize("kernel", ["unwritten_shared", "peer_read_after_exit"])
def test_shared_memory_nobody_wrote_or_whose_block_left_reads_as_nan(emulated, kernel):
    out = torch.tensor(emulated.selftest(kernel))
    assert torch.isnan(out[:32]).all() and (out[32:] == 0).all()


def test_a_missing_barrier_makes_the_result_depend_on_the_thread_order(emulated):
    """Each thread reads its neighbour's shared slot with no barrier after the writes: which value it sees
    depends on who ran first. A correct kernel (a warp's butterfly sum) gives the same in every order."""
    results = {}
    for order in (FORWARD, REVERSE):
        emulated.set_schedule(order)
        results[order] = torch.tensor(emulated.selftest("missing_barrier"))
        assert emulated.selftest("warp_sum")[:32] == [496.0] * 32
    assert not torch.equal(results[FORWARD], results[REVERSE])


def test_launches_on_the_emulator_fail_with_the_ops_error(emulated):
    """The same launch-error path as on a GPU: a region wider than shared memory is refused, naming the op."""
    x = torch.randn(1, 4096, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"group_norm_silu_backward: needs \d+ bytes of shared memory"):
        ddpm_fast.group_norm_silu(x, None, None, 1, backend="cuda").sum().backward()


# --------------------------------------------------------------------------------------------------
# the kernels do not depend on what is emulated
# --------------------------------------------------------------------------------------------------


def _gn_forward_backward(x, w, b, scale, shift, groups, dy):
    leaves = [v.detach().clone().requires_grad_() for v in (x, w, b, scale, shift)]
    y = ddpm_fast.group_norm_silu(*leaves[:3], groups, scale=leaves[3], shift=leaves[4], backend="cuda")
    return (y, *torch.autograd.grad(y, leaves, dy))


def _gn_inputs(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(B, C, generator=g) * 0.5,
            torch.randn(B, C, generator=g), torch.randn(shape, generator=g))


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_is_the_same_in_every_thread_order(emulated, channels_last):
    """Batch 1 splits each region over a cluster of 8 blocks: forward, reverse and shuffled thread and
    block orders give the same outputs bit for bit, except dweight / dbias, whose atomics add in the order
    the blocks finish (as on a GPU)."""
    x, w, b, scale, shift, dy = _gn_inputs((1, 64, 16, 16), channels_last, 1)
    runs = []
    for order, seed in ((FORWARD, 0), (REVERSE, 0), (RANDOM, 1), (RANDOM, 2)):
        emulated.set_schedule(order, seed)
        runs.append(_gn_forward_backward(x, w, b, scale, shift, 8, dy))
        assert emulated.take_stats()["max_cluster"] == 8, "the case must reach the cluster split"
    for other in runs[1:]:
        for i, (a, c) in enumerate(zip(runs[0], other)):
            if i in (2, 3):  # dweight, dbias
                torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, c), f"output {i} depends on the thread order"


def test_step_and_noise_are_the_same_in_every_thread_order(emulated):
    """The thresholding step (a radix select per sample over a cluster of blocks) and the channels-last noise tiles."""
    schedule = NoiseSchedule(1000, "linear")
    table = ddpm_table(schedule)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    mo = torch.randn(2, 5, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    t, seeds = torch.tensor([700, 20]), torch.tensor([11, -4])
    runs = []
    for order, seed in ((FORWARD, 0), (REVERSE, 0), (RANDOM, 5)):
        emulated.set_schedule(order, seed)
        runs.append((*ddpm_fast.step(mo, t, x, table, seeds=seeds, thresholding=True, backend="cuda"),
                     ddpm_fast.q_sample(x, t, schedule, seeds=seeds, backend="cuda")[1]))
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


@pytest.mark.parametrize("device, shape, cluster", [
    (H200, (1, 3, 96, 96), 8), (H200, (20, 3, 16, 16), 5), (A100, (1, 3, 96, 96), 1)])
def test_thresholding_splits_a_small_batch_over_a_cluster(emulated, device, shape, cluster):
    """Dynamic thresholding's quantile: with fewer samples than SMs a sample takes a cluster of blocks on an
    H200, the largest (<= 8) of which every sample's cluster is resident at once (batch 20: 6 is too many for
    the emulated GPCs of 16 and 18 SMs), one block on an A100; the blocks count digits of their own keys, then
    each sums the cluster's counts. Every split selects the reference's quantile exactly, on coarse values
    (ties: the same key on both sides of the quantile; a NaN in one sample makes that sample NaN) and on
    continuous ones (the next key from above the last pass's candidates), in both layouts (channels-last
    noise: the tile walk)."""
    emulated.set_device(device)
    table = ddpm_table(NoiseSchedule(1000, "linear"), prediction_type="sample")  # x0 = the model output
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, shape[:1], generator=g)
    seeds = torch.randint(-2**62, 2**62, shape[:1], generator=g)
    coarse = torch.randint(-30, 31, shape, generator=g) / 10.0
    if shape[0] > 1:
        coarse[shape[0] // 2].view(-1)[128 * 3 + 5] = float("nan")  # among the keys of the cluster's 4th block
    for mo in (coarse, torch.randn(shape, generator=g) * 1.5):
        for layout, ratio in ((torch.contiguous_format, 0.995), (torch.channels_last, 0.6)):
            x_in, mo_in = x.contiguous(memory_format=layout), mo.contiguous(memory_format=layout)
            # sample_max_value above every quantile here: s is the kernel's quantile itself
            kwargs = dict(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=8.0)
            prev, x0 = ddpm_fast.step(mo_in, t, x_in, table, seeds=seeds, backend="cuda", **kwargs)
            assert emulated.take_stats()["max_cluster"] == cluster
            noise = torch.cat([ddpm_fast.randn(seeds[b:b + 1], shape[1:], stream=reference.STEP_STREAM_BASE + int(t[b]),
                                               backend="cuda") for b in range(shape[0])])
            ref_prev, ref_x0 = reference.step(mo, t, x, table, noise=noise, **kwargs)
            q = torch.quantile(mo.abs().flatten(1), ratio, dim=1)  # x0 = mo
            assert ((q > 1) & (q < 8)).sum() == q.isfinite().sum() > 0  # s is the quantile, not a bound
            torch.testing.assert_close(x0, ref_x0, rtol=2**-22, atol=0, equal_nan=True)
            torch.testing.assert_close(prev, ref_prev, rtol=2**-21, atol=2**-22, equal_nan=True)


@pytest.mark.parametrize("shape, cluster", [((70, 1, 224, 224), 3), ((70, 1, 160, 160), 1)])
def test_thresholding_keeps_a_large_batch_in_the_l2(emulated, shape, cluster):
    """With more samples than half the SMs, a sample takes the smallest cluster at which the x and m of the
    samples in flight fit in half the H200's L2 (50 MiB), so that the select's later passes read them there:
    70 samples of 224x224 (28 MB) do not in one block each, nor 66 clusters of 2; 42 clusters of 3 do. 70 of
    160x160 (14 MB) fit in one block each. The quantile is the reference's either way."""
    emulated.set_device(H200)
    table = ddpm_table(NoiseSchedule(1000, "linear"), prediction_type="sample")  # x0 = the model output
    g = torch.Generator().manual_seed(sum(shape))
    x, mo, noise = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, shape[:1], generator=g)
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=8.0)
    prev, x0 = ddpm_fast.step(mo, t, x, table, noise=noise, backend="cuda", **kwargs)
    assert emulated.take_stats()["max_cluster"] == cluster
    ref_prev, ref_x0 = reference.step(mo, t, x, table, noise=noise, **kwargs)
    torch.testing.assert_close(x0, ref_x0, rtol=2**-22, atol=0)
    torch.testing.assert_close(prev, ref_prev, rtol=2**-21, atol=2**-22)


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_a100_without_clusters_computes_the_same_group_norm(emulated, channels_last):
    """On an emulated A100 the kernels run one block per region (no clusters); both devices match the
    reference (the split changes only the order of the sums)."""
    inputs = _gn_inputs((1, 64, 16, 16), channels_last, 4)
    x, w, b, scale, shift, dy = inputs
    truth = reference.group_norm_silu(x.double(), w.double(), b.double(), 8, scale=scale.double(),
                                      shift=shift.double())
    ref = reference.group_norm_silu(x, w, b, 8, scale=scale, shift=shift)
    for device, clusters in ((H200, 8), (A100, 1)):
        emulated.set_device(device)
        y = _gn_forward_backward(*inputs[:5], 8, dy)[0]
        assert emulated.take_stats()["max_cluster"] == clusters
        assert_matches_reference(y, ref, truth, what=f"y on emulated device {device}")


# --------------------------------------------------------------------------------------------------
# the launchers' limits, as the automatic backend choice asks them (group_norm_refusal)
# --------------------------------------------------------------------------------------------------


def _widest_group(emulated, backward):
    """The most channels of one group that group_norm_refusal accepts on the current device (float32, NCHW)."""
    lo, hi = 1, 8192  # accepted, refused
    assert emulated.group_norm_refusal(1, lo, 4, 1, 0, 0, backward) == ""
    assert emulated.group_norm_refusal(1, hi, 4, 1, 0, 0, backward) != ""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if emulated.group_norm_refusal(1, mid, 4, 1, 0, 0, backward) == "" else (lo, mid)
    return lo


@pytest.mark.parametrize("device, widest_forward, widest_backward", [
    (H200, 4096, 3632), (A100, 4096, 2608), (L4, 2815, 1584)])
def test_group_norm_refusal_is_what_the_launchers_raise(emulated, device, widest_forward, widest_backward):
    """At the widest group it accepts, forward and backward run; one channel wider, the launch raises the very
    message it gave (a group past kMaxChannels, or a block past the device's shared memory)."""
    emulated.set_device(device)
    for backward, widest in ((False, widest_forward), (True, widest_backward)):
        assert _widest_group(emulated, backward) == widest
        for channels in (widest, widest + 1):
            x = torch.randn(1, channels, 2, 2, requires_grad=backward)
            why = emulated.group_norm_refusal(1, channels, 4, 1, 0, 0, backward)

            def run():
                y = ddpm_fast.group_norm_silu(x, None, None, 1, backend="cuda")
                assert torch.isfinite(y).all()
                if backward:
                    y.sum().backward()
                    assert torch.isfinite(x.grad).all()

            if channels == widest:
                run()
            else:
                with pytest.raises((ValueError, RuntimeError)) as error:
                    run()
                assert why and why in str(error.value)


def test_groups_the_choice_does_not_ask_about_fit_on_every_target(emulated):
    """group_norm_silu asks the launcher only about groups wider than _CUDA_FITS_EVERYWHERE channels: narrower
    ones must fit, forward and backward, every layout, dtype and size, on the target GPU with the least shared
    memory (99 KB a block: sm_86, sm_89, sm_120; the emulated L4)."""
    emulated.set_device(L4)
    for per_group in range(1, _CUDA_FITS_EVERYWHERE + 1):
        for S, groups, layout, dtype in itertools.product((1, 7, 64, 4096), (1, 8), (0, 1), (0, 2)):
            why = emulated.group_norm_refusal(2, per_group * groups, S, groups, layout, dtype, True)
            assert why == "", (per_group, S, groups, layout, dtype, why)
