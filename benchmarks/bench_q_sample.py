"""q_sample: our kernels (one column per native backend, noise drawn in the kernel) against "eager" (what users
run today, as diffusers' add_noise: torch.randn_like, the coefficients gathered on the device, no host sync),
torch.compile of that, and "reference" (the reference itself drawing the same contract noise from the seeds, in
eager PyTorch, checking t on the host). pytest-benchmark: ``pytest benchmarks -o python_files='bench_*.py'``."""

from __future__ import annotations

import pytest
import torch
from harness import Case, cpu_cases, natives

import ddpm_fast
from ddpm_fast import reference

SHAPES = {"cpu": [(64, 3, 64, 64)], "cuda": [(256, 3, 32, 32), (128, 3, 256, 256)]}


def cases(device: torch.device, full: bool = False):
    schedule = ddpm_fast.NoiseSchedule()
    rows = schedule.q_table(device)  # (T, 2) float32: sqrt(alphas_cumprod), sqrt(1 - alphas_cumprod)
    g = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES[device.type]:
        x0 = torch.rand(shape, generator=g, device=device) * 2 - 1
        t = torch.randint(0, 1000, (shape[0],), generator=g, device=device)
        seeds = torch.randint(0, 2**62, (shape[0],), generator=g, device=device)

        def eager(x0=x0, t=t):
            noise = torch.randn_like(x0)
            a, s = rows[t].view(-1, 2, *[1] * (x0.dim() - 1)).unbind(1)
            return a * x0 + s * noise, noise

        def ours(backend, x0=x0, t=t, seeds=seeds):
            return lambda: ddpm_fast.q_sample(x0, t, schedule, seeds=seeds, backend=backend)

        yield Case("q_sample (noise drawn)", shape, x0.dtype, "NCHW", bytes=3 * x0.nbytes, impls={
            **natives(device, ours),
            "eager": eager,
            "compile": torch.compile(eager),
            "reference": lambda x0=x0, t=t, seeds=seeds: reference.q_sample(x0, t, schedule, seeds=seeds),
        }, note="reads x0, writes x_t and eps")


@pytest.mark.parametrize("impl", ["cpu", "eager"])
def test_q_sample_cpu(benchmark, impl):
    benchmark(cpu_cases(cases)[0].impls[impl])
