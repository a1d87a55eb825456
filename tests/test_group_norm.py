"""The fused group_norm_silu (each kernel backend, forward and backward) against the reference."""

import pytest
import torch
from _tolerance import assert_matches_reference

import ddpm_fast
from ddpm_fast import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [
    # (shape, groups, form)
    ((2, 32, 8, 8), 8, "scale_shift"),   # improved-DDPM ResBlock
    ((2, 32, 8, 8), 8, "bias_in"),       # DDPM ResBlock: time embedding added before the norm
    ((1, 6, 5, 7), 3, "both"),           # batch 1, odd H x W
    ((3, 12, 3, 3), 12, "scale_shift"),  # one channel per group
    ((2, 20, 7, 5), 4, "plain"),         # C not a multiple of 8, no time embedding, no affine
    ((1, 4, 64, 64), 1, "scale_shift"),  # one group of 16K elements: far beyond one tile of work
    ((2, 8, 12), 2, "bias_in"),          # 3-D (B, C, L)
    ((4, 8, 1, 1), 4, "both"),           # 1 x 1 spatial: two elements per group
]


def _inputs(shape, form, dtype, seed, channels_last=False, affine=True):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    # An offset mean checks the variance is not computed as E[x^2] - E[x]^2 in float32.
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = {"weight": torch.randn(C, generator=g) if affine else None,
         "bias": torch.randn(C, generator=g) if affine else None}
    if form in ("bias_in", "both"):
        p["bias_in"] = torch.randn(B, C, generator=g).to(dtype)
    if form in ("scale_shift", "both"):
        p["scale"] = (torch.randn(B, C, generator=g) * 0.5).to(dtype)
        p["shift"] = torch.randn(B, C, generator=g).to(dtype)
    return x, p


def _group_norm(backend, x, p, groups, act="silu"):
    """ddpm_fast.group_norm_silu on ``backend`` (inputs moved to its device), the output back on the CPU."""
    x, *small = backend.to(x, *(p.get(k) for k in ("weight", "bias", "bias_in", "scale", "shift")))
    weight, bias, bias_in, scale, shift = small
    return ddpm_fast.group_norm_silu(x, weight, bias, groups, bias_in=bias_in, scale=scale, shift=shift, act=act,
                                     backend=backend.name).cpu()


def _reference(x, groups, p, act, dtype=None):
    cast = (lambda v: None if v is None else v.to(dtype)) if dtype else (lambda v: v)
    return reference.group_norm_silu(cast(x), cast(p["weight"]), cast(p["bias"]), groups,
                                     bias_in=cast(p.get("bias_in")), scale=cast(p.get("scale")),
                                     shift=cast(p.get("shift")), act=act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups, form", CASES)
@pytest.mark.parametrize("act", ["silu", "none"])
def test_forward_matches_reference(backend, shape, groups, form, dtype, act):
    backend.subset(keep=shape[0] * groups <= 8 or dtype == torch.float32)  # the interpreter pays per group
    x, p = _inputs(shape, form, dtype, seed=shape[1] + groups, affine=form != "plain")
    y = _group_norm(backend, x, p, groups, act)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches_reference(y, _reference(x, groups, p, act), _reference(x, groups, p, act, torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups", [((2, 32, 8, 8), 8), ((1, 6, 5, 7), 3), ((2, 12, 4, 4), 12)])
def test_channels_last(backend, shape, groups, dtype):
    x, p = _inputs(shape, "both", dtype, seed=1, channels_last=True)
    y = _group_norm(backend, x, p, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(y, _reference(x, groups, p, "silu"), _reference(x, groups, p, "silu", torch.float64))


def _grads(x, p, groups, act, backend, dtype=None, seed=0):
    """Gradients of sum(out * w) for a random w, through ``backend`` (a conftest Backend, or "reference" in
    ``dtype``), on the CPU."""
    device = "cpu" if backend == "reference" else backend.device
    leaves = {k: v.detach().to(device=device, dtype=dtype or v.dtype).requires_grad_()
              for k, v in p.items() if v is not None}
    xx = x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_()
    kwargs = {k: leaves.get(k) for k in ("bias_in", "scale", "shift")}
    if backend == "reference":
        y = reference.group_norm_silu(xx, leaves.get("weight"), leaves.get("bias"), groups, act=act, **kwargs)
    else:
        y = ddpm_fast.group_norm_silu(xx, leaves.get("weight"), leaves.get("bias"), groups, act=act,
                                      backend=backend.name, **kwargs)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=y.dtype)
    (y * w).sum().backward()
    return {"x": xx.grad.cpu(), **{k: v.grad.cpu() for k, v in leaves.items()}}


def _cancelling_terms(x, p, groups):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) subtracts terms of size rstd * |dxhat|;
    with few elements per group they cancel almost exactly, so rounding scales with them, not with dx.
    |dxhat| <= |upstream| * max silu' (1.1) * |weight| * |1 + scale|, the upstream gradient N(0, 1), |.| < 5 here."""
    B, C = x.shape[:2]
    h = x.double() + (p["bias_in"].double().reshape(B, C, *[1] * (x.dim() - 2)) if "bias_in" in p else 0)
    rstd = h.reshape(B, groups, -1).var(dim=2, unbiased=False).add(1e-5).rsqrt().max().item()
    weight = p["weight"].abs().max().item() if p["weight"] is not None else 1.0
    scale = 1 + p["scale"].double().abs().max().item() if "scale" in p else 1.0
    return rstd * 5.0 * 1.1 * weight * scale


def assert_grads_match(ours: dict, same: dict, truth: dict, x, p: dict, groups: int) -> None:
    """Every gradient (by input name) within the reference's own rounding of the float64 truth; dx and
    dbias_in scale with the group's cancelling terms."""
    assert set(ours) == set(truth)
    for name in truth:
        assert ours[name].dtype == (x if name == "x" else p[name]).dtype
        magnitude = _cancelling_terms(x, p, groups) if name in ("x", "bias_in") else None
        assert_matches_reference(ours[name], same[name], truth[name], dtype=x.dtype, what=f"grad of {name}",
                                 magnitude=magnitude)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups, form, channels_last",
                         [(*case, False) for case in CASES] + [(*case, True) for case in CASES if len(case[0]) == 4])
def test_backward_matches_reference(backend, shape, groups, form, dtype, channels_last):
    backend.subset(keep=shape[0] * groups <= 8 or (dtype == torch.float32 and not channels_last))
    x, p = _inputs(shape, form, dtype, seed=groups, channels_last=channels_last, affine=form != "plain")
    ours = _grads(x, p, groups, "silu", backend)
    same = _grads(x, p, groups, "silu", "reference")
    truth = _grads(x, p, groups, "silu", "reference", dtype=torch.float64)
    assert_grads_match(ours, same, truth, x, p, groups)
    if channels_last:
        assert ours["x"].is_contiguous(memory_format=torch.channels_last)


def test_broadcast_time_embedding_shapes(backend):
    """(B, C, 1, 1) time embeddings, as U-Nets produce them, equal (B, C) ones."""
    x, p = _inputs((2, 8, 4, 4), "both", torch.float32, seed=2)
    a = _group_norm(backend, x, p, 4)
    b = _group_norm(backend, x, {**p, **{k: p[k][..., None, None] for k in ("bias_in", "scale", "shift")}}, 4)
    assert torch.equal(a, b)


def test_bf16_activations_with_float32_parameters(backend):
    """Under autocast the norm's parameters stay float32 while activations are bfloat16."""
    x, p = _inputs((2, 8, 4, 4), "scale_shift", torch.bfloat16, seed=3)
    y = _group_norm(backend, x, p, 4)
    assert y.dtype == torch.bfloat16
    truth = _reference(x.double(), 4, {k: v.double() for k, v in p.items()}, "silu")
    assert_matches_reference(y, _reference(x, 4, p, "silu"), truth)
