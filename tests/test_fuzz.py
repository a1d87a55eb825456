"""The random-case helpers (tests/_fuzz.py) make the storage they name, with the values they were given."""

import math
import random

import pytest
import torch
from _fuzz import STORAGE_KINDS, random_spatial, run_cases, storage_variant


@pytest.mark.parametrize("kind", STORAGE_KINDS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (3, 5, 7), (2, 9)])
def test_storage_variants_keep_values_and_have_their_layout(kind, shape):
    x = torch.randn(shape)
    y = storage_variant(x, kind, torch.device("cpu"))
    assert torch.equal(y, x)
    fmt = torch.channels_last if kind.endswith("channels_last") and len(shape) == 4 else torch.contiguous_format
    if kind == "strided":
        assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    elif kind.startswith("batch_strided"):  # each sample dense, the batch stride twice the sample size
        assert y.stride(0) == 2 * math.prod(shape[1:]) and y[:1].is_contiguous(memory_format=fmt)
    else:
        assert y.is_contiguous(memory_format=fmt)
    assert (y.data_ptr() % 16 != 0) == kind.startswith("misaligned")


def test_random_spatial_stays_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        dims, budget = rng.randint(0, 3), rng.randint(1, 5000)
        sizes = random_spatial(rng, dims, budget)
        assert len(sizes) == dims and math.prod(sizes) <= max(1, budget)


def test_a_failing_case_names_the_seed_that_replays_it(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_FUZZ_SEED", "41")
    monkeypatch.delenv("DDPM_FAST_FUZZ_CASES", raising=False)
    drawn = []

    def check(case):
        drawn.append(case)
        assert len(drawn) < 2, "boom"
    with pytest.raises(AssertionError, match=r"DDPM_FAST_FUZZ_SEED=42 DDPM_FAST_FUZZ_CASES=1\nboom"):
        run_cases(lambda rng: {"u": rng.random()}, check, cases=3)
    assert drawn[1] == {"u": random.Random(42).random()}
