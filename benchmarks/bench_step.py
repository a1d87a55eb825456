"""The reverse step: our kernels (one column per native backend, noise drawn in the kernel) against "eager" (the
step as users write it: the table's coefficients gathered on the device, clipping, torch.randn_like noise, no host
sync), torch.compile of it, "reference" (the reference drawing the same contract noise from the seeds, checking t
on the host) and, where installed, diffusers' DDPMScheduler.step. The target rows clip; the extra rows
(threshold_cases) threshold dynamically: a per-sample quantile of |x0| first, an exact radix select (CUDA: one
kernel, three passes over the sample; Triton: four counting kernels and a finishing one before the step's)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from harness import Case, cpu_cases, natives

import ddpm_fast
from ddpm_fast import reference

SHAPES = {"cpu": [(64, 3, 64, 64)], "cuda": [(256, 3, 32, 32), (128, 3, 256, 256)]}
# Batch 1 (a cluster of blocks per sample) and large batches: small images (a sample's reads stay in L2 between
# the select's passes) and large ones (they do not: each pass reads x and the model output from DRAM again).
THRESHOLD_SHAPES = {"cpu": [(4, 3, 64, 64)], "cuda": [(1, 3, 256, 256), (256, 3, 32, 32), (128, 3, 256, 256)]}
RATIO, MAX_VALUE = 0.995, 1.5  # dynamic thresholding: diffusers' default ratio, a bound above 1 (it binds)


def _diffusers_step(t_value: int, **config):
    """diffusers' DDPMScheduler.step at ``t_value`` (its ``config`` besides the schedule) where diffusers is
    installed. diffusers is imported at the first call: building the cases (each of dram_bytes.py's profiled
    processes does) stays light."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    scheduler = None

    def step(mo, x):
        nonlocal scheduler
        if scheduler is None:
            from diffusers import DDPMScheduler
            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                      **config)
        return scheduler.step(mo, t_value, x).prev_sample
    return step


T_VALUE = 500  # every sample's timestep


def _inputs(shape, device, g):
    """x_t, the model output (both standard normal), the timesteps and the seeds of one benchmarked step."""
    x = torch.randn(shape, generator=g, device=device)
    mo = torch.randn(shape, generator=g, device=device)
    t = torch.full((shape[0],), T_VALUE, device=device)
    seeds = torch.randint(0, 2**62, (shape[0],), generator=g, device=device)
    return x, mo, t, seeds


def _coefficients(coef, t, x):
    """The contract's step coefficients of t (no learned variance), each broadcast against x: x0 = ax x + am m;
    the mean p0 x0 + p1 x + p2 m; std z."""
    return coef[t, :6].view(-1, 6, *[1] * (x.dim() - 1)).unbind(1)


def _threshold_case(shape, device, table, g) -> Case:
    x, mo, t, seeds = _inputs(shape, device, g)

    def eager(coef=table.table(device)):
        ax, am, p0, p1, p2, std = _coefficients(coef, t, x)
        x0 = ax * x + am * mo
        s = torch.quantile(x0.abs().flatten(1), RATIO, dim=1).clamp(1.0, MAX_VALUE).view(-1, 1, 1, 1)
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
        return p0 * x0 + p1 * x + p2 * mo + std * torch.randn_like(x)

    def ours(backend):
        return lambda: ddpm_fast.step(mo, t, x, table, seeds=seeds, thresholding=True, dynamic_thresholding_ratio=RATIO,
                                      sample_max_value=MAX_VALUE, return_pred_original=False, backend=backend)[0]

    impls = {**natives(device, ours), "eager": eager, "compile": torch.compile(eager)}
    diffusers_step = _diffusers_step(T_VALUE, clip_sample=False, thresholding=True, dynamic_thresholding_ratio=RATIO,
                                     sample_max_value=MAX_VALUE)
    if diffusers_step is not None:
        impls["diffusers"] = lambda: diffusers_step(mo, x)
    return Case("DDPM step (eps, thresholding)", shape, x.dtype, "NCHW", bytes=3 * x.nbytes, impls=impls,
                note="reads x and the model output (the quantile's reads again come from L2), writes x_prev",
                target=False)


def cases(device: torch.device, full: bool = False):
    schedule = ddpm_fast.NoiseSchedule()
    table = ddpm_fast.ddpm_table(schedule, prediction_type="epsilon", variance_type="fixed_small")
    g = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES[device.type]:
        x, mo, t, seeds = _inputs(shape, device, g)

        def eager(x=x, mo=mo, t=t, coef=table.table(device)):  # the contract's step for this table, clipped
            ax, am, p0, p1, p2, std = _coefficients(coef, t, x)
            x0 = (ax * x + am * mo).clamp(-1.0, 1.0)
            return p0 * x0 + p1 * x + p2 * mo + std * torch.randn_like(x)

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
        diffusers_step = _diffusers_step(T_VALUE, clip_sample=True)
        if diffusers_step is not None:
            impls["diffusers"] = lambda mo=mo, x=x: diffusers_step(mo, x)
        yield Case("DDPM step (eps, clip, fixed_small)", shape, x.dtype, "NCHW", bytes=3 * x.nbytes, impls=impls,
                   note="reads x and the model output, writes x_prev")


def threshold_cases(device: torch.device):
    """The extra rows: the step with dynamic thresholding (table.py runs them last)."""
    table = ddpm_fast.ddpm_table(ddpm_fast.NoiseSchedule(), prediction_type="epsilon", variance_type="fixed_small")
    g = torch.Generator(device=device).manual_seed(1)
    for shape in THRESHOLD_SHAPES[device.type]:
        yield _threshold_case(shape, device, table, g)


@pytest.mark.parametrize("impl", ["cpu", "eager"])
def test_step_cpu(benchmark, impl):
    benchmark(cpu_cases(cases)[0].impls[impl])
