"""Fidelity: our whole DDPM trajectory against diffusers' on the same weights and the same noise.

* theirs: diffusers' ``UNet2DModel`` + ``DDPMScheduler`` in float32, in the loop ``DDPMPipeline.__call__``
  runs (``unet(image, t).sample``, ``scheduler.step(out, t, image, generator)``), with diffusers'
  ``randn_tensor`` replaced so that x_T and every step's noise are the noise contract's values
  (docs/contracts.md): the float32 normals our sampler draws for the same seeds (``ddpm_fast.randn``);
* ours: ``UNet.from_diffusers`` of the same model driven by ``ddpm_fast.Sampler`` (the C++ randn, step and
  GroupNorm kernels here) in float32;
* truth: the diffusers loop in float64 (the model in float64, diffusers' step formulas on our float64
  ``alphas_cumprod``) fed the same float32 noise, cast.

Tolerance (STYLE.md point 4, tests/_tolerance.py): at every checkpoint of the trajectory,
``max |ours - truth| <= 2 * max |theirs - truth| + 2**-22 * max(1, max |truth|)``. Rounding errors of both
runs grow along the trajectory alike, so diffusers' own float32 error is the yardstick. The numbers, the
negative controls run by hand and the bf16 drift are in docs/fidelity.md.

The model is a random DDPM-form UNet2DModel (google/ddpm-cifar10-32's block types and settings, shrunk to
8x8 with 8 and 16 channels; attention at 4x4) with every parameter perturbed, so no norm is the identity.
``NUM_STEPS`` steps over the full 1000-step schedule (diffusers' "leading" spacing: 996, 992, ..., 0)
keep the file at ~20 s of CPU time on the 2-core CI machine, where a forward costs ~10 ms whatever the size.
"""

import copy
import warnings

import pytest
import torch
from _tolerance import assert_matches_reference

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast.sampler import Sampler
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.unet import UNet

diffusers = pytest.importorskip("diffusers")
scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

pytestmark = pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                reason="the C++ extension is not built")

CONFIG = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
SHAPE = (3, 8, 8)
NUM_STEPS = 250
SEEDS = torch.tensor([0, 1, 2**40 + 3])
CHECKPOINTS = (NUM_STEPS // 4, NUM_STEPS // 2, 3 * NUM_STEPS // 4, NUM_STEPS)  # steps taken


def random_ddpm_unet(seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def contract_noise(seeds: torch.Tensor, stream: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, *SHAPE): the noise contract's float32 normals for these seeds and stream, cast to dtype.

    Drawn by ``ddpm_fast.randn`` (the kernel our sampler draws x_T with, and the same Box-Muller as its step
    kernel), so all three runs see the same float32 values; the reference Philox may differ from it by a
    few ulp of log / sin / cos (docs/contracts.md)."""
    return ddpm_fast.randn(seeds, SHAPE, stream).to(dtype)


def diffusers_trajectory(model, scheduler, seeds: torch.Tensor, num_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """DDPMPipeline's loop with the contract's noise; returns every x_t, x_T first: (N + 1, B, *SHAPE)."""
    x = contract_noise(seeds, reference.INITIAL_NOISE_STREAM, dtype)
    scheduler.set_timesteps(num_steps)
    states, pending = [x], []

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        assert tuple(shape) == tuple(x.shape) and generator is None, "diffusers drew noise unexpectedly"
        return pending.pop()

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
        for t in scheduler.timesteps:
            pending[:] = [contract_noise(seeds, reference.STEP_STREAM_BASE + int(t), dtype)]
            out = model(x, t).sample
            x = scheduler.step(out, t, x, generator=None).prev_sample
            assert not pending or int(t) == 0, f"no step noise drawn at t={int(t)}"  # diffusers skips t = 0
            states.append(x)
    return torch.stack(states)


def float64_twin(scheduler, schedule: NoiseSchedule):
    """diffusers' scheduler evaluating its own step formulas in float64 on the float64 alphas_cumprod."""
    twin = copy.deepcopy(scheduler)
    twin.alphas_cumprod = schedule.alphas_cumprod.clone()
    twin.one = torch.tensor(1.0, dtype=torch.float64)
    return twin


@pytest.fixture(scope="module")
def trajectories():
    """(ours, theirs, truth), each (NUM_STEPS + 1, B, *SHAPE): three runs of NUM_STEPS forwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP barriers on a loaded 2-core machine only cost time
    try:
        model = random_ddpm_unet()
        schedule = NoiseSchedule()
        scheduler = diffusers.DDPMScheduler()  # linear 1e-4..0.02, 1000 steps, fixed_small, clip 1, epsilon
        sampler = Sampler(UNet.from_diffusers(model), schedule, num_steps=NUM_STEPS)  # the same defaults
        assert sampler.timesteps.tolist() == list(range(996, -1, -4))
        _, ours = sampler.sample(SEEDS, SHAPE, return_trajectory=True)
        theirs = diffusers_trajectory(model, scheduler, SEEDS, NUM_STEPS, torch.float32)
        truth = diffusers_trajectory(copy.deepcopy(model).double(), float64_twin(scheduler, schedule), SEEDS,
                                     NUM_STEPS, torch.float64)
    finally:
        torch.set_num_threads(threads)
    return ours, theirs, truth


@pytest.mark.parametrize("steps", CHECKPOINTS)
def test_ddpm_trajectory_matches_diffusers(trajectories, steps):
    ours, theirs, truth = trajectories
    assert ours.shape == theirs.shape == truth.shape == (NUM_STEPS + 1, len(SEEDS), *SHAPE)
    assert torch.equal(ours[0], theirs[0])  # the same x_T
    assert_matches_reference(ours[steps], theirs[steps], truth[steps], dtype=torch.float32,
                             what=f"x after {steps} of {NUM_STEPS} DDPM steps")


def test_final_images_match_diffusers(trajectories):
    """The images DDPMPipeline returns ((x / 2 + 0.5).clamp(0, 1)) and ours ((x.clamp(-1, 1) + 1) / 2) agree
    with the same derived bound; and the trajectory really moved (a random model still denoises somewhere)."""
    ours, theirs, truth = trajectories
    images = [(x[-1].clamp(-1, 1) + 1) / 2 for x in (ours, theirs, truth)]
    assert_matches_reference(*images, dtype=torch.float32, what="final images in [0, 1]")
    assert (ours[-1] - ours[0]).abs().max() > 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_trajectory_matches_diffusers(trajectories, monkeypatch):
    """The same trajectory on the GPU (our CUDA / Triton kernels inside the captured graph) against the same
    CPU diffusers run and float64 truth, with the same bound. TF32 convolutions are off: the bound is
    float32's, and TF32 rounds to 10 mantissa bits."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _, theirs, truth = trajectories
    sampler = Sampler(UNet.from_diffusers(random_ddpm_unet()).cuda(), NoiseSchedule(), num_steps=NUM_STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and run eagerly
        _, ours = sampler.sample(SEEDS.cuda(), SHAPE, return_trajectory=True, cuda_graph=True)
    ours = ours.cpu()
    for steps in CHECKPOINTS:
        assert_matches_reference(ours[steps], theirs[steps], truth[steps], dtype=torch.float32,
                                 what=f"CUDA: x after {steps} of {NUM_STEPS} DDPM steps")
