"""Tolerances derived from the dtype, not guessed (STYLE.md, after flash-attention's tests).

A fast op passes when its error against a float64 evaluation is at most twice the error of plain PyTorch
(the reference run in the same dtype) plus a small per-dtype floor scaled by the result's magnitude.
"""

import torch

# One rounding of the result's magnitude in each storage dtype: what any kernel may differ by.
FLOOR = {torch.float32: 2**-22, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 2**-50}
# Noise drawn in a kernel: the same uint32 stream as the reference's, but each backend's log / sin / cos may
# round differently by a few float32 ulp of |z| <= 6.
NOISE_ROUNDING = 8 * 6 * 2**-23


def assert_matches_reference(ours, same_dtype_reference, float64_reference, dtype=None, what="output",
                             magnitude=None, known_input_error=0.0, float32_terms=None):
    """``ours`` is no further from the float64 truth than twice what PyTorch itself manages, plus a floor.

    The floor scales with ``magnitude``: by default the result's, or (for a result that is a difference
    of much larger terms) the size of the terms that cancel, which is what rounding errors scale with.
    ``float32_terms`` (per element) is the sum of |terms| that ours reduces in float32 math: its rounding
    scales with them, whatever the storage dtype. ``known_input_error`` bounds how much an input that ours
    computed itself (noise drawn in the kernel) may differ from the one the references were given, times
    its weight in the result.
    """
    dtype = dtype or ours.dtype
    truth = float64_reference.double()
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    # NaN in, NaN out, and inf where the truth overflows the result's dtype (float16 x0 at 1 / sqrt(ac) ~ 1e4):
    # the same elements non-finite, the rest judged as usual
    finite = torch.isfinite(truth.to(ours.dtype))
    ours_finite = torch.isfinite(ours.double())
    assert torch.equal(ours_finite, finite), (
        f"{what}: {int((ours_finite & ~finite).sum())} finite values where the reference has none, "
        f"{int((~ours_finite & finite).sum())} non-finite where it is finite")
    if not finite.any():
        return
    ours_err = (ours.double() - truth).abs()
    # PyTorch's own error where it has one: a NaN of its own (a float32 sqrt of a difference that rounded below
    # 0, where the truth is 0) is its failure, not a licence for ours.
    same_err = (same_dtype_reference.double() - truth).abs()[finite]
    same_err = same_err[torch.isfinite(same_err)]
    torch_err = same_err.max().item() if same_err.numel() else 0.0
    scale = max(1.0, truth.abs()[finite].max().item())
    if isinstance(magnitude, torch.Tensor):  # per element: each result's own terms
        scale = magnitude.double().clamp(min=scale)
    elif magnitude:
        scale = max(scale, magnitude)
    bound = 2 * torch_err + FLOOR[dtype] * scale + known_input_error
    if float32_terms is not None:
        bound = bound + FLOOR[torch.float32] * float32_terms.double()
    excess = (ours_err - bound)[finite]
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"{what}: error {ours_err[finite][worst].item():.3g} > bound "
        f"{(bound if isinstance(bound, float) else bound[finite][worst].item()):.3g} "
        f"(2 x PyTorch's {torch_err:.3g} + floor {FLOOR[dtype]:.3g} x the magnitude of the terms)")
