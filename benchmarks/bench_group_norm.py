"""group_norm_silu with a scale/shift time embedding: our kernels (one column per native backend) against the
eager reference, torch.compile of it and plain torch.nn ops, forward and forward + backward.

GPU rows: the issue's targets (forward and forward + backward), then the extra shapes (forward) in float32
and bfloat16, NCHW and channels_last."""

from __future__ import annotations

import pytest
import torch
from harness import Case, cpu_cases, natives

import ddpm_fast
from ddpm_fast import reference

SHAPES = {
    "cpu": [((16, 128, 32, 32), torch.float32, False)],
    "cuda": [((128, 128, 32, 32), torch.float32, False), ((128, 128, 32, 32), torch.bfloat16, True),
             ((8, 320, 64, 64), torch.float32, False)],
}
# The "also benchmark" shapes (GPU, forward): each in both dtypes and both layouts.
EXTRA_SHAPES = [(128, 256, 16, 16), (128, 256, 4, 4), (8, 1280, 16, 16), (1, 320, 64, 64)]
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


def _forward_case(shape, dtype, channels_last, device, target=True):
    layout = "channels_last" if channels_last else "NCHW"
    args = _inputs(shape, dtype, channels_last, device)
    eager = _forward(reference.group_norm_silu)
    compiled = torch.compile(eager)

    def ours(backend):
        fn = _forward(lambda *a, **k: ddpm_fast.group_norm_silu(*a, **k, backend=backend))
        return lambda: fn(*args)

    return Case("group_norm_silu fwd (scale/shift)", shape, dtype, layout, bytes=2 * args[0].nbytes, impls={
        **natives(device, ours), "eager": lambda: eager(*args), "compile": lambda: compiled(*args),
        "torch.nn": lambda: _torch_ops(*args)}, note="reads x, writes y", target=target)


def _train_case(shape, dtype, channels_last, device):
    layout = "channels_last" if channels_last else "NCHW"
    grad_args = _inputs(shape, dtype, channels_last, device, requires_grad=True)
    dy = torch.randn_like(grad_args[0])
    eager = _forward(reference.group_norm_silu)
    compiled = torch.compile(eager)

    def train(fn):
        def run():
            out = fn(*grad_args)
            return torch.autograd.grad(out, grad_args, dy)
        return run

    def ours(backend):
        return train(_forward(lambda *a, **k: ddpm_fast.group_norm_silu(*a, **k, backend=backend)))

    return Case("group_norm_silu fwd+bwd", shape, dtype, layout, bytes=5 * grad_args[0].nbytes, impls={
        **natives(device, ours), "eager": train(eager), "compile": train(compiled), "torch.nn": train(_torch_ops)},
        note="fwd reads x, writes y; bwd reads x and dy, writes dx")


def cases(device: torch.device, full: bool = False):
    for shape, dtype, channels_last in SHAPES[device.type]:
        yield _forward_case(shape, dtype, channels_last, device)
        yield _train_case(shape, dtype, channels_last, device)
    if device.type == "cuda":
        for shape in EXTRA_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                for channels_last in (False, True):
                    yield _forward_case(shape, dtype, channels_last, device, target=False)


@pytest.mark.parametrize("impl", ["cpu", "eager"])
@pytest.mark.parametrize("which", [0, 1], ids=["forward", "forward_backward"])
def test_group_norm_silu_cpu(benchmark, impl, which):
    benchmark(cpu_cases(cases)[which].impls[impl])
