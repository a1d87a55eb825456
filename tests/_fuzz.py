"""Randomized differential cases: each run draws fresh op configurations (shape, dtype, layout, strides,
alignment, options) and checks every one against the reference, beside the hand-picked cases.

Every run draws a new base seed unless ``DDPM_FAST_FUZZ_SEED`` gives one; a failure names the seed of its
case and the command that replays it. ``DDPM_FAST_FUZZ_CASES`` sets the number of cases per test (a long
campaign: ``DDPM_FAST_FUZZ_CASES=2000 pytest tests -k random_cases``).
"""

from __future__ import annotations

import os
import random

import torch


def run_cases(draw, check, cases: int) -> None:
    """Draw ``cases`` configurations with ``draw(rng)`` (a dict) and run ``check(case)`` on each."""
    base = os.environ.get("DDPM_FAST_FUZZ_SEED")
    base = int(base) if base else random.SystemRandom().randrange(2**31)
    for seed in range(base, base + int(os.environ.get("DDPM_FAST_FUZZ_CASES") or cases)):
        case = draw(random.Random(seed))
        torch.manual_seed(seed)  # the case's tensors
        try:
            check(case)
        except AssertionError as error:
            raise AssertionError(f"random case {case} failed; replay it with DDPM_FAST_FUZZ_SEED={seed} "
                                 f"DDPM_FAST_FUZZ_CASES=1\n{error}") from None


def run_backend_cases(backend, draw, check) -> None:
    """run_cases for an op test on a conftest ``backend``: ``draw(rng, small)``, ``check(backend, case)``;
    40 cases, or 10 on Triton's interpreter (~50 ms a program), with ``small`` keeping them to a few programs."""
    run_cases(lambda rng: draw(rng, backend.interpreted), lambda case: check(backend, case),
              cases=10 if backend.interpreted else 40)


def storage_variant(x: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    """``x``'s values on ``device`` in a storage the ops must handle. ``kind`` is one of STORAGE_KINDS:
    "contiguous"; "misaligned" (one element past a 16-byte boundary); "batch_strided" (every other sample
    of a twice larger batch: each sample dense, the batch stride not the sample size); each of those with
    "_channels_last" (NHWC; 4-D only, else NCHW); or "strided" (a non-dense view)."""
    if kind == "strided":  # the first and last dims swapped in memory
        return x.transpose(0, -1).to(device).contiguous().transpose(0, -1)
    fmt = torch.channels_last if kind.endswith("channels_last") and x.dim() == 4 else torch.contiguous_format
    if kind.startswith("misaligned"):
        strides = torch.empty(x.shape, device="meta").contiguous(memory_format=fmt).stride()
        return torch.empty(x.numel() + 1, dtype=x.dtype, device=device)[1:].as_strided(x.shape, strides).copy_(x)
    if kind.startswith("batch_strided"):
        twice = torch.empty((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
        return twice.contiguous(memory_format=fmt)[::2].copy_(x)
    return x.to(device).contiguous(memory_format=fmt)


STORAGE_KINDS = ("contiguous", "contiguous_channels_last", "misaligned", "misaligned_channels_last",
                 "batch_strided", "batch_strided_channels_last", "strided")


def storage_kinds(rng: random.Random, count: int) -> list[str]:
    """One storage kind per tensor of a call: mostly the first one's, sometimes mixed."""
    first = rng.choice(STORAGE_KINDS)
    return [first if rng.random() < 0.7 else rng.choice(STORAGE_KINDS) for _ in range(count)]


def poison(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one element, drawn at random, set to NaN (as a diverged model's output would have)."""
    x.view(-1)[torch.randint(0, x.numel(), ())] = float("nan")
    return x


def random_shape(rng: random.Random, small: bool) -> tuple[int, ...]:
    """(B, C, *spatial) with 0-3 spatial dims, odd and even sizes; ``small``: at most 2**10 elements, else 2**14."""
    batch, channels = rng.choice([1, 1, 2, 3, 5]), rng.choice([1, 2, 3, 4, 5, 8])
    budget = (2**14 if not small else 2**10) // (batch * channels)
    return (batch, channels, *random_spatial(rng, rng.choice([0, 1, 2, 2, 2, 3]), budget))


def random_spatial(rng: random.Random, dims: int, max_elements: int) -> tuple[int, ...]:
    """Spatial sizes, odd and even, that multiply to at most ``max_elements``."""
    sizes = []
    for _ in range(dims):
        room = max(1, max_elements // max(1, torch.Size(sizes).numel()))
        sizes.append(rng.choice([n for n in (1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 32, 64) if n <= room]))
    return tuple(sizes)


def random_steps_offset(rng: random.Random, T: int, steps: int | None, spacing: str) -> int:
    """A steps_offset for a schedule of T train steps sampled in ``steps`` with ``spacing``: 0 or 1 where it
    shifts timesteps ("leading") and the shifted first one stays below T (a larger one is refused, tested in
    test_schedule.py / test_diffusers_compat.py); otherwise 0."""
    if spacing == "leading" and steps and (T // steps) * (steps - 1) + 1 < T:
        return rng.choice([0, 1])
    return 0
