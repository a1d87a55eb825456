"""group_norm_silu with a scale/shift time embedding: ours against the eager reference and
torch.compile of it, forward and forward + backward."""

from __future__ import annotations

import pytest
import torch
from harness import Case, cpu_cases

import ddpm_fast
from ddpm_fast import reference

SHAPES = {
    "cpu": [((16, 128, 32, 32), torch.float32, False)],
    "cuda": [((128, 128, 32, 32), torch.float32, False), ((128, 128, 32, 32), torch.bfloat16, True),
             ((8, 320, 64, 64), torch.float32, False)],
}
GROUPS = 32


def _inputs(shape, dtype, channels_last, device, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, generator=g, device=device), torch.randn(C, generator=g, device=device)
    scale, shift = (torch.randn(B, C, generator=g, device=device).to(dtype) for _ in range(2))
    for v in (x, w, b, scale, shift):
        v.requires_grad_(requires_grad)
    return x, w, b, scale, shift


def _forward(fn):
    return lambda x, w, b, scale, shift: fn(x, w, b, GROUPS, scale=scale, shift=shift)


def _torch_ops(x, w, b, scale, shift):
    """What a U-Net written with torch.nn does (diffusers' ResnetBlock2D with scale_shift)."""
    y = torch.nn.functional.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype))
    return torch.nn.functional.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def cases(device: torch.device, full: bool = False):
    for shape, dtype, channels_last in SHAPES[device.type]:
        layout = "channels_last" if channels_last else "NCHW"
        args = _inputs(shape, dtype, channels_last, device)
        ours, eager = _forward(ddpm_fast.group_norm_silu), _forward(reference.group_norm_silu)
        compiled = torch.compile(eager)
        yield Case("group_norm_silu fwd (scale/shift)", shape, dtype, layout, bytes=2 * args[0].nbytes, impls={
            "ours": lambda: ours(*args), "eager": lambda: eager(*args), "compile": lambda: compiled(*args),
            "torch.nn": lambda: _torch_ops(*args)},
            note="reads x, writes y")

        grad_args = _inputs(shape, dtype, channels_last, device, requires_grad=True)
        dy = torch.randn_like(grad_args[0])

        def train(fn):
            def run():
                out = fn(*grad_args)
                return torch.autograd.grad(out, grad_args, dy)
            return run
        yield Case("group_norm_silu fwd+bwd", shape, dtype, layout, bytes=5 * args[0].nbytes, impls={
            "ours": train(ours), "eager": train(eager), "compile": train(compiled), "torch.nn": train(_torch_ops)},
            note="fwd reads x, writes y; bwd reads x and dy, writes dx")


@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("which", [0, 1], ids=["forward", "forward_backward"])
def test_group_norm_silu_cpu(benchmark, impl, which):
    benchmark(cpu_cases(cases)[which].impls[impl])
