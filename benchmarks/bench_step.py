"""The reverse step: our kernels (one column per native backend, noise drawn in the kernel) against "eager" (the reference step with
torch.randn_like noise), torch.compile of it, "reference" (the reference drawing the same contract
noise from the seeds) and, where installed, diffusers' DDPMScheduler.step."""

from __future__ import annotations

import pytest
import torch
from harness import Case, cpu_cases, natives

import ddpm_fast
from ddpm_fast import reference

SHAPES = {"cpu": [(64, 3, 64, 64)], "cuda": [(256, 3, 32, 32), (128, 3, 256, 256)]}


def _diffusers_step(t_value: int):
    try:
        from diffusers import DDPMScheduler
    except ImportError:
        return None
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              variance_type="fixed_small")
    return lambda mo, x: scheduler.step(mo, t_value, x).prev_sample


def cases(device: torch.device, full: bool = False):
    schedule = ddpm_fast.NoiseSchedule()
    table = ddpm_fast.ddpm_table(schedule, prediction_type="epsilon", variance_type="fixed_small")
    g = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES[device.type]:
        x = torch.randn(shape, generator=g, device=device)
        mo = torch.randn(shape, generator=g, device=device)
        t_value = 500
        t = torch.full((shape[0],), t_value, device=device)
        seeds = torch.randint(0, 2**62, (shape[0],), generator=g, device=device)

        def eager(x=x, mo=mo, t=t):
            return reference.step(mo, t, x, table, noise=torch.randn_like(x), clip_range=1.0)[0]

        def ours(backend, x=x, mo=mo, t=t, seeds=seeds):
            return lambda: ddpm_fast.step(mo, t, x, table, seeds=seeds, clip_range=1.0, return_pred_original=False,
                                          backend=backend)[0]

        impls = {
            **natives(device, ours),
            "eager": eager,
            "compile": torch.compile(eager),
            "reference": lambda x=x, mo=mo, t=t, seeds=seeds: reference.step(mo, t, x, table, seeds=seeds,
                                                                           clip_range=1.0)[0],
        }
        diffusers_step = _diffusers_step(t_value)
        if diffusers_step is not None:
            impls["diffusers"] = lambda mo=mo, x=x: diffusers_step(mo, x)
        yield Case("DDPM step (eps, clip, fixed_small)", shape, x.dtype, "NCHW", bytes=3 * x.nbytes, impls=impls,
                   note="reads x and the model output, writes x_prev")


@pytest.mark.parametrize("impl", ["cpu", "eager"])
def test_step_cpu(benchmark, impl):
    benchmark(cpu_cases(cases)[0].impls[impl])
