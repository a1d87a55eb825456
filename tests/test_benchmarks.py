"""benchmarks/bench_sampling.py end to end on the CPU with tiny settings: a GPU session has minutes, and
must not spend them on an error in the script (its CUDA-only rows are the GPU check's to run)."""

import sys
from pathlib import Path

import pytest

import ddpm_fast

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

pytestmark = [pytest.mark.skipif(ddpm_fast.build_info()["backends"]["cpu"] != "available",
                                 reason="the C++ extension is not built"),
              pytest.mark.usefixtures("one_thread")]


def test_bench_sampling_runs_every_row(capsys):
    import bench_sampling

    assert bench_sampling.main(["--device", "cpu", "--preset", "tiny", "--batches", "1", "--steps", "1",
                                "--no-compile", "--drift-steps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "failed:" not in out and "skipped: --max-seconds" not in out
    for row in ("sampling  bf16", "sampling  fp32", "bf16 drift, ours", "training  bf16 autocast"):
        assert row in out
    assert "ours eager" in out
