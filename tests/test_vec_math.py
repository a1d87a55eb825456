"""The CPU kernels' own float32 log / sincos / exp / silu (csrc/cpu/vec_math.h) against float64, at the accuracy
its header states, in the version of the kernels that this CPU takes (build_info()["cpu_clone"]). The op tests
cannot hold them this tightly: a noise value may differ from the reference's by NOISE_ROUNDING (5.7e-6), which
let through a sincos whose range reduction dropped its third part of pi / 2 (3e-7 rad)."""

import math

import pytest
import torch

import ddpm_fast
from ddpm_fast._native import _C

pytestmark = pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                reason="the C++ CPU extension is not built")
POINTS = 1 << 22
TWO_PI = 6.283185307179586  # the contract's float32 2 pi rounds to 6.2831855


def _vec_math(fn: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float().contiguous()
    a, b = torch.empty_like(x), torch.empty_like(x)
    _C.cpu.vec_math(fn, x.data_ptr(), a.data_ptr(), b.data_ptr(), x.numel())
    return a, b


def _uniform(lo: float, hi: float) -> torch.Tensor:
    """POINTS fresh float32 values in [lo, hi], the ends included."""
    x = torch.rand(POINTS, dtype=torch.float64) * (hi - lo) + lo
    return torch.cat([torch.tensor([lo, hi], dtype=torch.float64), x]).float()


def _worst(ours: torch.Tensor, truth: torch.Tensor, x: torch.Tensor, relative: bool) -> tuple[float, float]:
    """The largest error of ours (relative to |truth| or absolute) and the x where it is."""
    err = (ours.double() - truth).abs() / (truth.abs() if relative else 1.0)
    i = int(err.argmax())
    return err[i].item(), x[i].item()


def test_log_on_the_uniforms_box_muller_takes():
    """vlog_pos on [1e-7, 1] (Box-Muller's radius takes log(max(u, 1e-7))): relative error <= 1.0e-7 (~0.8 ulp),
    exact 0 at 1. Uniform and log-uniform points (the tail draws the largest radii)."""
    x = torch.cat([_uniform(1e-7, 1.0), torch.exp(_uniform(math.log(1e-7), 0.0).double()).float()]).clamp(1e-7, 1.0)
    ours, _ = _vec_math("log", x)
    truth = x.double().log()
    assert torch.equal(ours[x == 1.0], torch.zeros_like(ours[x == 1.0]))
    worst, at = _worst(ours[x < 1.0], truth[x < 1.0], x[x < 1.0], relative=True)
    assert worst <= 1.0e-7, f"log: relative error {worst:.3g} at x = {at!r}"


def test_sincos_on_the_angles_box_muller_takes():
    """vsincos on [0, 2 pi] (theta = float32(2 pi) * u): absolute error <= 1.0e-7 in either."""
    x = _uniform(0.0, TWO_PI)
    s, c = _vec_math("sincos", x)
    for name, ours, truth in (("sin", s, x.double().sin()), ("cos", c, x.double().cos())):
        worst, at = _worst(ours, truth, x, relative=False)
        assert worst <= 1.0e-7, f"{name}: absolute error {worst:.3g} at x = {at!r}"


def test_exp_and_its_limits():
    """vexp on [-87, 87]: relative error <= 1.0e-7. Below FLT_MIN's log (-87.3365) it flushes to 0, above FLT_MAX's
    (88.7228) it is +inf, NaN stays NaN."""
    x = _uniform(-87.0, 87.0)
    ours, _ = _vec_math("exp", x)
    worst, at = _worst(ours, x.double().exp(), x, relative=True)
    assert worst <= 1.0e-7, f"exp: relative error {worst:.3g} at x = {at!r}"
    edges = torch.tensor([-87.34, -100.0, -float("inf"), 88.73, 1000.0, float("inf"), float("nan")])
    ours, _ = _vec_math("exp", edges)
    expected = torch.tensor([0.0, 0.0, 0.0, float("inf"), float("inf"), float("inf"), float("nan")])
    torch.testing.assert_close(ours, expected, equal_nan=True, rtol=0, atol=0)


def test_silu_and_its_limits():
    """vsilu on [-88.7, 100]: relative error <= 2.0e-7 (PyTorch's own float32 silu: 1.7e-7). Below -88.72 exp(-x)
    overflows and the result is -0, +inf stays +inf, -inf and NaN give NaN: all as PyTorch's CPU silu."""
    x = _uniform(-88.7, 100.0)
    ours, _ = _vec_math("silu", x)
    truth = x.double() * torch.sigmoid(x.double())
    worst, at = _worst(ours, truth, x, relative=True)
    assert worst <= 2.0e-7, f"silu: relative error {worst:.3g} at x = {at!r}"
    edges = torch.tensor([-88.73, -95.0, -300.0, float("inf"), -float("inf"), float("nan")])
    ours, _ = _vec_math("silu", edges)
    torch.testing.assert_close(ours, torch.nn.functional.silu(edges), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(ours[:3]), torch.ones(3, dtype=torch.bool))


def test_an_unknown_function_is_refused_by_name():
    x = torch.ones(4)
    with pytest.raises(ValueError, match=r"vec_math: fn must be 'log', 'sincos', 'exp' or 'silu', got 'tan'"):
        _C.cpu.vec_math("tan", x.data_ptr(), x.data_ptr(), x.data_ptr(), 4)


def test_build_info_names_the_version_of_the_kernels_taken():
    """x86-64 glibc builds carry an AVX2 + FMA version and a baseline one (GCC names the first x86-64-v3, Clang
    avx2); DDPM_FAST_CPU_DISPATCH=OFF, or another platform, builds one ("single")."""
    assert ddpm_fast.build_info()["cpu_clone"] in ("x86-64-v3", "avx2", "baseline", "single")
