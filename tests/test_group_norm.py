"""The fused group_norm_silu (each kernel backend, forward and backward) against the reference."""

import numpy as np
import pytest
import torch
from _fuzz import poison, random_spatial, run_backend_cases, storage_kinds, storage_variant
from _tolerance import assert_matches_reference

import ddpm_fast
from ddpm_fast import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_NAMES = ["float32", "float16", "bfloat16"]  # ids that -k can select (scripts/gpu_check.sh's racecheck)
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


def _group_norm(backend, x, p, groups, act="silu", eps=1e-5):
    """ddpm_fast.group_norm_silu on ``backend`` (inputs moved to its device), the output back on the CPU."""
    x, *small = backend.to(x, *(p.get(k) for k in ("weight", "bias", "bias_in", "scale", "shift")))
    weight, bias, bias_in, scale, shift = small
    return ddpm_fast.group_norm_silu(x, weight, bias, groups, eps, bias_in=bias_in, scale=scale, shift=shift,
                                     act=act, backend=backend.name).cpu()


def _reference(x, groups, p, act, dtype=None, eps=1e-5):
    cast = (lambda v: None if v is None else v.to(dtype)) if dtype else (lambda v: v)
    return reference.group_norm_silu(cast(x), cast(p["weight"]), cast(p["bias"]), groups, eps,
                                     bias_in=cast(p.get("bias_in")), scale=cast(p.get("scale")),
                                     shift=cast(p.get("shift")), act=act)


def _assert_output_matches(y, x, groups, p, act="silu", eps=1e-5):
    """y, group_norm_silu of (x, p) on a backend, against the reference in x's dtype and in float64."""
    assert_matches_reference(y, _reference(x, groups, p, act, eps=eps), _reference(x, groups, p, act, torch.float64,
                                                                                   eps=eps))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("shape, groups, form", CASES)
@pytest.mark.parametrize("act", ["silu", "none"])
def test_forward_matches_reference(backend, shape, groups, form, dtype, act):
    backend.subset(keep=shape[0] * groups <= 8 or dtype == torch.float32)  # the interpreter pays per group
    x, p = _inputs(shape, form, dtype, seed=shape[1] + groups, affine=form != "plain")
    y = _group_norm(backend, x, p, groups, act)
    assert y.dtype == dtype and y.shape == x.shape
    _assert_output_matches(y, x, groups, p, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("shape, groups", [((2, 32, 8, 8), 8), ((1, 6, 5, 7), 3), ((2, 12, 4, 4), 12)])
@pytest.mark.parametrize("kind", ["contiguous_channels_last", "batch_strided_channels_last"])
def test_channels_last(backend, shape, groups, dtype, kind):
    """channels_last, and channels_last samples at a batch stride of their own (every other one of a larger batch):
    the output is channels_last."""
    backend.subset(keep=kind == "contiguous_channels_last" or dtype == torch.float32)
    x, p = _inputs(shape, "both", dtype, seed=1)
    y = _group_norm(backend, storage_variant(x, kind, backend.device), p, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_output_matches(y, x, groups, p)


def _grads(x, p, groups, act, backend, dtype=None, seed=0, eps=1e-5):
    """Gradients of sum(out * w) for a random w, through ``backend`` (a conftest Backend, or "reference" in
    ``dtype``), on the CPU."""
    return _output_and_grads(x, p, groups, act, backend, dtype, seed, eps)[1]


def _output_and_grads(x, p, groups, act, backend, dtype=None, seed=0, eps=1e-5, upstream="contiguous"):
    """(output, _grads' gradients by input name), on the CPU. The upstream gradient reaches the backward in
    the storage ``upstream`` names (tests/_fuzz.py's storage_variant)."""
    device = "cpu" if backend == "reference" else backend.device
    leaves = {k: v.detach().to(device=device, dtype=dtype or v.dtype).requires_grad_()
              for k, v in p.items() if v is not None}
    xx = x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_()
    kwargs = {k: leaves.get(k) for k in ("bias_in", "scale", "shift")}
    if backend == "reference":
        y = reference.group_norm_silu(xx, leaves.get("weight"), leaves.get("bias"), groups, eps, act=act, **kwargs)
    else:
        y = ddpm_fast.group_norm_silu(xx, leaves.get("weight"), leaves.get("bias"), groups, eps, act=act,
                                      backend=backend.name, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(storage_variant(dy, upstream, device))  # autograd hands a dy of the shape and dtype over as it is
    return y.detach().cpu(), {"x": xx.grad.cpu(), **{k: v.grad.cpu() for k, v in leaves.items()}}


def _cancelling_terms(x, p, groups, eps=1e-5):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) subtracts terms of size rstd * |dxhat|;
    with few elements per group they cancel almost exactly, so rounding scales with them, not with dx.
    |dxhat| <= |upstream| * max silu' (1.1) * |weight| * |1 + scale|, the upstream gradient N(0, 1), |.| < 5 here."""
    B, C = x.shape[:2]
    h = x.double() + (p["bias_in"].double().reshape(B, C, *[1] * (x.dim() - 2)) if "bias_in" in p else 0)
    rstd = _finite_max(h.reshape(B, groups, -1).var(dim=2, unbiased=False).add(eps).rsqrt())
    weight = _finite_max(p["weight"].abs()) if p["weight"] is not None else 1.0
    scale = 1 + _finite_max(p["scale"].double().abs()) if "scale" in p else 1.0
    return rstd * 5.0 * 1.1 * weight * scale


def _finite_max(t) -> float:
    """The largest finite value (0 if none): a group holding NaN judges its NaN, not the others' bounds."""
    finite = t[torch.isfinite(t)]
    return finite.max().item() if finite.numel() else 0.0


def _float32_terms(x, p, groups, act, eps, seed=0):
    """Per element of each result (the output "y" and each input's gradient), the |terms| the kernels' float32
    math rounds (float64): a result that sums or subtracts larger terms carries their rounding, not its own.

    * xhat = (h - mean) * rstd carries the rounding of h and of the float32 mean: (|h| + |mean|) * rstd, not
      |xhat| (|mean| / std ulps of every xhat, for PyTorch and us alike);
    * each dy1 = dy * silu'(y1) is evaluated at a y1 that carries its own terms' rounding, |silu''| < 0.5
      times theirs;
    * the (B, C) and (C,) gradients sum their terms over the batch and positions (dshift = sum(dy1) cancels).
    """
    B, C = x.shape[:2]
    per_bc, per_c = (B, C, *[1] * (x.dim() - 2)), (1, C, *[1] * (x.dim() - 2))
    get = lambda name, shape, default: (p[name].double().reshape(shape)  # noqa: E731
                                        if p.get(name) is not None else default)
    h = (x.double() + get("bias_in", per_bc, 0.0)).reshape(B, groups, -1)
    mean, rstd = h.mean(2, keepdim=True), h.var(2, unbiased=False, keepdim=True).add(eps).rsqrt()
    xhat = ((h - mean) * rstd).reshape(x.shape)
    xhat_terms = ((h.abs() + mean.abs()) * rstd).reshape(x.shape)
    weight, bias = get("weight", per_c, 1.0), get("bias", per_c, 0.0)
    scale1, shift = 1 + get("scale", per_bc, 0.0), get("shift", per_bc, 0.0)
    y0 = xhat * weight + bias
    y1 = y0 * scale1 + shift
    y0_terms = xhat_terms * abs(weight) + abs(bias)
    y1_terms = y0_terms * abs(scale1) + abs(shift)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).double().abs()
    if act == "silu":
        sigmoid = torch.sigmoid(y1)
        dy = dy * ((sigmoid * (1 + y1 * (1 - sigmoid))).abs() + 0.5 * y1_terms)
    spatial = tuple(range(2, x.dim()))
    dy0 = dy * abs(scale1)
    # dx = dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dbias_in its sum over a channel
    dxhat, xhat_g = (dy0 * abs(weight)).reshape(B, groups, -1), xhat_terms.reshape(B, groups, -1)
    dh = (rstd * (dxhat + dxhat.mean(2, keepdim=True) + xhat_g * (dxhat * xhat_g).mean(2, keepdim=True)))
    dh = dh.reshape(x.shape)
    return {"y": 1.1 * y1_terms, "x": dh, "bias_in": dh.sum(spatial), "weight": (dy0 * xhat_terms).sum((0, *spatial)),
            "bias": dy0.sum((0, *spatial)), "scale": (dy * y0_terms).sum(spatial), "shift": dy.sum(spatial)}


def assert_output_and_grads_match(backend, x, p, groups, act="silu", upstream="contiguous") -> dict:
    """The output and every gradient through ``backend`` (a conftest Backend, or anything with its ``name`` and
    ``device``) against the reference's (assert_grads_match); returns our gradients."""
    y, ours = _output_and_grads(x, p, groups, act, backend, upstream=upstream)
    y_same, same = _output_and_grads(x, p, groups, act, "reference")
    y_truth, truth = _output_and_grads(x, p, groups, act, "reference", dtype=torch.float64)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=reference.memory_format_of(x))
    assert_matches_reference(y, y_same, y_truth)
    assert_grads_match(ours, same, truth, x, p, groups, act=act)
    return ours


def assert_grads_match(ours: dict, same: dict, truth: dict, x, p: dict, groups: int, eps=1e-5,
                       act="silu") -> None:
    """Every gradient (by input name) within the reference's own rounding of the float64 truth, plus the
    float32 rounding of the terms it is computed from (_float32_terms); dx and dbias_in also carry the float32
    rounding of the group's cancelling terms (the kernels' math is float32 in every storage dtype: at a half
    dtype's floor those terms would bound any dx of a small group)."""
    assert set(ours) == set(truth)
    terms = _float32_terms(x, p, groups, act, eps)
    cancelling = _cancelling_terms(x, p, groups, eps)
    for name in truth:
        assert ours[name].dtype == (x if name == "x" else p[name]).dtype
        float32_terms = terms[name] + cancelling if name in ("x", "bias_in") else terms[name]
        assert_matches_reference(ours[name], same[name], truth[name], dtype=x.dtype, what=f"grad of {name}",
                                 float32_terms=float32_terms)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("shape, groups, form, channels_last",
                         [(*case, False) for case in CASES] + [(*case, True) for case in CASES if len(case[0]) == 4])
def test_backward_matches_reference(backend, shape, groups, form, dtype, channels_last):
    backend.subset(keep=shape[0] * groups <= 8 or (dtype == torch.float32 and not channels_last))
    x, p = _inputs(shape, form, dtype, seed=groups, channels_last=channels_last, affine=form != "plain")
    ours = assert_output_and_grads_match(backend, x, p, groups)
    if channels_last:
        assert ours["x"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_without_activation(backend, channels_last):
    """act="none": the backward takes dy itself, not dy * silu'(y1) (the backward tests above have SiLU). Batch 2
    x 3 groups: the cuda kernels split each group over a cluster of blocks."""
    x, p = _inputs((2, 6, 9, 11), "both", torch.float32, seed=45, channels_last=channels_last)
    assert_output_and_grads_match(backend, x, p, 3, "none")


# (shape, groups, form): shapes that take the kernels' strategies (the cuda kernels' in brackets)
STRATEGY_CASES = [
    ((1, 320, 64, 64), 32, "scale_shift"),  # batch 1 at 64 x 64 x 320 [32 groups split over clusters of 8 blocks]
    ((2, 4, 128, 128), 1, "both"),          # one group of 64K elements [far wider than one block]
    ((3, 12, 5, 7), 12, "bias_in"),          # one channel per group, odd H x W
    ((2, 1024, 2, 3), 1, "scale_shift"),     # 1024 channels in one group [a region wider than 512 channels]
    ((4, 256, 4, 4), 32, "both"),            # 4 x 4 spatial [many groups per block]
    ((1, 264, 3, 3), 44, "both"),            # [channels_last: 264 channels take 16-byte accesses, a region's 66 not]
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, groups, form", STRATEGY_CASES)
def test_kernel_strategies(backend, shape, groups, form, dtype, channels_last):
    """Each way the kernels divide a GroupNorm's work: the output and every gradient against the reference."""
    backend.subset(keep=dtype == torch.float32 and not channels_last)
    x, p = _inputs(shape, form, dtype, seed=24, channels_last=channels_last)
    assert_output_and_grads_match(backend, x, p, groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_NAMES[:2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_with_a_misaligned_upstream_gradient(backend, dtype, channels_last):
    """An upstream gradient one element past 16 bytes beside an aligned x (autograd hands dy over as it is): the
    backward must read dy on a path that does not need it aligned (the cuda kernels' 16-byte loads would fault)."""
    x, p = _inputs((2, 16, 6, 8), "both", dtype, seed=43, channels_last=channels_last)
    upstream = "misaligned_channels_last" if channels_last else "misaligned"
    assert_output_and_grads_match(backend, x, p, 4, upstream=upstream)


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


def test_eps_must_be_a_number(backend):
    """A string eps is refused by name on every backend (it reached a comparison with 0: a TypeError of str and
    int); a NumPy float is a number and is taken."""
    x, p = _inputs((2, 4, 2, 2), "plain", torch.float32, seed=4)
    for name in (backend.name, "torch"):
        with pytest.raises(TypeError, match=r"group_norm_silu: eps must be a float, got str '1e-05'"):
            ddpm_fast.group_norm_silu(backend.to(x), None, None, 2, "1e-05", backend=name)
    y = _group_norm(backend, x, p, 2, eps=0.125)
    assert torch.equal(_group_norm(backend, x, p, 2, eps=np.float32(0.125)), y)
    # and the eps given is the one used (0.125 against a variance ~9 moves rstd by ~0.7 %)
    _assert_output_matches(y, x, 2, p, eps=0.125)



def test_torch_backend_is_the_reference():
    """backend="torch" is reference.group_norm_silu with every argument passed on: eps, bias_in, scale, shift,
    act."""
    x, p = _inputs((2, 8, 4, 4), "both", torch.float32, seed=int(torch.randint(0, 2**31, ())))
    for act in ("silu", "none"):
        y = ddpm_fast.group_norm_silu(x, p["weight"], p["bias"], 4, 0.25, bias_in=p["bias_in"], scale=p["scale"],
                                      shift=p["shift"], act=act, backend="torch")
        assert torch.equal(y, _reference(x, 4, p, act, eps=0.25))


def test_empty_batch_gives_zero_parameter_gradients(backend):
    """An empty batch: no kernel runs, an empty output, and each parameter's gradient zero (its buffer is
    written by the wrapper, not left as it was allocated: freed non-zero buffers of its size come first here)."""
    C = 64
    x = torch.empty(0, C, 3, 3, device=backend.device, requires_grad=True)
    w, b = (torch.randn(C, device=backend.device, requires_grad=True) for _ in range(2))
    y = ddpm_fast.group_norm_silu(x, w, b, 8, backend=backend.name)
    junk = [torch.full((C,), 7.0, device=backend.device) for _ in range(8)]
    del junk  # freed non-zero buffers of the gradients' size, which their allocation may get back
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert y.shape == x.shape and gx.shape == x.shape
    assert torch.equal(gw.cpu(), torch.zeros(C)) and torch.equal(gb.cpu(), torch.zeros(C))

@pytest.mark.parametrize("channels_last", [False, True])
def test_outliers_at_either_end_cost_no_accuracy(backend, channels_last):
    """Each channel's first pixel 100 std below its mean and its last 100 std above (corners after zero padding),
    in groups of 2**15: the statistics' shifted sums must take neither as their shift (the Triton kernel's first
    pixel cost rstd 3e-4; the CUDA kernels' median of five pixels of a chunk, taken at its least or greatest,
    ~1e-4)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(2, 4, 128, 128, generator=g) + torch.empty(2, 4, 1, 1).uniform_(-3, 3, generator=g)
    x[:, :, 0, 0] -= 100.0
    x[:, :, -1, -1] += 100.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = {"weight": None, "bias": None}
    y = _group_norm(backend, x, p, 2, act="none")
    _assert_output_matches(y, x, 2, p, "none")


def test_channels_last_3d_gives_contiguous_output(backend):
    """contracts.md's layouts are NCHW and (4-D) channels_last: a channels_last_3d x is read like any strided one,
    and every backend, the reference included, returns a contiguous output."""
    x, p = _inputs((2, 4, 2, 3, 2), "both", torch.float32, seed=5)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    y, ref = _group_norm(backend, x, p, 2), _reference(x, 2, p, "silu")
    assert y.is_contiguous() and ref.is_contiguous()
    assert_matches_reference(y, ref, _reference(x, 2, p, "silu", torch.float64))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, groups", [((3, 4, 149, 151), 1), ((1, 6, 211, 213), 3)])
def test_few_large_groups_split_over_two_threads(backend, two_threads, shape, groups, channels_last):
    """~270K elements in 3 groups (three samples of one, one of three): too few for two threads to take whole
    groups (or samples) each, so the cpu kernels split each sample along the spatial axis into chunks, the last
    one shorter, on two threads (partial sums reduced in order, then the normalization; the backward alike).
    The output and every gradient against the reference."""
    backend.subset(keep=False)  # the interpreter would take minutes; the split is the cpu kernels' own
    x, p = _inputs(shape, "both", torch.float32, seed=21, channels_last=channels_last)
    assert_output_and_grads_match(backend, x, p, groups)


@pytest.mark.parametrize("act", ["silu", "none"])
def test_one_element_per_group_with_bias_in(backend, act):
    """(B, C, 1, 1) with a group per channel: each group is the one value h = x + bias_in, its mean is h and
    h - mean is exactly 0, as in PyTorch's separate add, so y is act(bias * (1 + scale) + shift). Only if h is
    rounded before the mean is subtracted: x + (bias_in - mean) leaves h's rounding error, which rstd = 1 /
    sqrt(eps) (~316) magnifies."""
    x, p = _inputs((3, 8, 1, 1), "both", torch.float32, seed=23)
    y = _group_norm(backend, x, p, 8, act)
    _assert_output_matches(y, x, 8, p, act)


# Triton's interpreter evaluates exp with NumPy, which warns where it overflows to inf (as meant here).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_far_from_zero(backend, channels_last):
    """Pre-activations far below -88.7, where exp(-y) overflows float32 (silu -> -0, its derivative -> 0, as
    in PyTorch: y / inf), and far above (silu -> y, derivative -> 1): a shift of -200, -95, +95 or +200 on
    some channels of a sample. An exp that saturates instead of overflowing gives y / 2 and a gradient of
    dy / 2 there."""
    x, p = _inputs((2, 8, 3, 5), "scale_shift", torch.float32, seed=24, channels_last=channels_last)
    p["shift"][0, :4] = torch.tensor([-200.0, -95.0, 95.0, 200.0])
    p["shift"][1, 4:] = torch.tensor([-300.0, -90.0, 90.0, 300.0])
    assert_output_and_grads_match(backend, x, p, 4)


def _random_case(rng, small: bool) -> dict:
    """A configuration drawn at random; ``small`` keeps it to a few programs for Triton's interpreter."""
    groups = rng.choice([1, 2, 3, 4, 8, 32] if not small else [1, 2, 3])
    per_group = rng.choice([1, 2, 3, 4, 5, 8, 16, 40])
    batch = rng.choice([1, 1, 2, 3, 4])
    budget = (2**17 if not small else 2**12) // (batch * groups * per_group)
    spatial = random_spatial(rng, rng.choice([1, 2, 2, 2, 3]), max(1, budget))
    return dict(shape=(batch, groups * per_group, *spatial), groups=groups, dtype=rng.choice(DTYPES),
                affine=rng.choice(["both", "both", "none", "weight", "bias"]),
                time=[k for k in ("bias_in", "scale", "shift") if rng.random() < 0.5],
                param_dtype=rng.choice(["x", "float32"]), storage=storage_kinds(rng, 1)[0],
                param_storage=rng.choice(["contiguous", "misaligned", "strided"]),
                x_scale=rng.choice([0.1, 1.0, 3.0]), x_offset=rng.choice([0.0, 0.7, -2.0, 20.0]),
                constant_group=rng.random() < 0.1, nan=rng.random() < 0.1, eps=rng.choice([1e-5, 1e-6, 1e-3]),
                act=rng.choice(["silu", "none"]), backward=rng.random() < 0.5)


def _check_random_case(backend, case):
    B, C = case["shape"][:2]
    dtype, groups, eps, act = case["dtype"], case["groups"], case["eps"], case["act"]
    x = (torch.randn(case["shape"]) + case["x_offset"]) * case["x_scale"]  # offset 20: |mean| / std ~ 20
    if case["constant_group"]:  # zero variance: rstd = 1 / sqrt(eps)
        x[-1, -(C // groups):] = 1.5
    if case["nan"]:  # its group's outputs and gradients are NaN, as in the reference
        poison(x)
    x = storage_variant(x.to(dtype), case["storage"], backend.device)
    param_dtype = dtype if case["param_dtype"] == "x" else torch.float32
    p = {"weight": torch.randn(C) if case["affine"] in ("both", "weight") else None,
         "bias": torch.randn(C) if case["affine"] in ("both", "bias") else None,
         **{k: torch.randn(B, C) * (0.5 if k == "scale" else 1.0) for k in case["time"]}}
    p = {k: None if v is None else v.to(param_dtype) for k, v in p.items()}
    on_device = {k: None if v is None else storage_variant(v, case["param_storage"], backend.device)
                 for k, v in p.items()}
    x_cpu = x.cpu()
    if not case["backward"]:
        y = _group_norm(backend, x, on_device, groups, act, eps)
        assert y.dtype == dtype and y.shape == x.shape
        assert_matches_reference(y, _reference(x_cpu, groups, p, act, eps=eps),
                                 _reference(x_cpu, groups, p, act, torch.float64, eps=eps),
                                 float32_terms=_float32_terms(x_cpu, p, groups, act, eps)["y"])
        return
    ours = _grads(x, on_device, groups, act, backend, eps=eps)
    same = _grads(x_cpu, p, groups, act, "reference", eps=eps)
    truth = _grads(x_cpu, p, groups, act, "reference", dtype=torch.float64, eps=eps)
    assert_grads_match(ours, same, truth, x_cpu, p, groups, eps, act)


def test_random_cases(backend):
    """Fresh random configurations each run (tests/_fuzz.py), forward or backward, against the reference."""
    run_backend_cases(backend, _random_case, _check_random_case)
