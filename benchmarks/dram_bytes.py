"""DRAM bytes and kernel time of each fused op at the issue's target shapes (and the largest thresholded step),
read from Nsight Compute.

    python benchmarks/dram_bytes.py [--backend cuda|triton]     # runs itself under ncu, prints a table

A memory-bound kernel is at its limit when DRAM moves the op's bytes once: "read x" / "ideal" near 1.0
says, e.g., that GroupNorm's normalize pass re-read its region from L2, not from DRAM. ncu reads the
hardware counters with --clock-control none (the device README: leave the clocks alone); where it
cannot (no counter access), this script says so and exits 3.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

METRICS = "gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
_CHILD = "DDPM_DRAM_BYTES_CHILD"


def _run_case(backend: str, index: int) -> int:
    """The child under ncu: warm case ``index`` up (autotuning, first launches), then run it once between
    cudaProfilerStart / Stop. Exit code 4: no such case."""
    from bench_step import threshold_cases  # noqa: PLC0415
    from table import _cases  # noqa: PLC0415

    device = torch.device("cuda")
    # The largest thresholded step too: whether the select's later passes find the samples in the L2
    largest_threshold = max(threshold_cases(device), key=lambda c: c.bytes)
    cases = [c for c in _cases(device, targets_only=True) + [largest_threshold] if backend in c.impls]
    # GroupNorm first, then that step: whether a pass re-reads its input from DRAM is the question here, and a
    # stage that runs out of time (a fresh process per case) keeps the cases it printed
    cases.sort(key=lambda c: (not c.op.startswith("group_norm"), c is not largest_threshold))
    if index >= len(cases):
        return 4
    case = cases[index]
    print(f"CASE\t{case.op}\t{case.shape}\t{str(case.dtype)[6:]}\t{case.layout}\t{case.bytes}", flush=True)
    case.impls[backend]()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    case.impls[backend]()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def _profile(ncu: str, backend: str, index: int):
    """(returncode, case fields, {kernel name: {metric: value}}, ncu's output) of case ``index``."""
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics", METRICS, "--csv",
           "--print-units", "base", sys.executable, __file__, "--backend", backend, "--case", str(index)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, _CHILD: "1"})
    case, rows = None, [line for line in proc.stdout.splitlines() if line.startswith('"')]
    for line in proc.stdout.splitlines():
        if line.startswith("CASE\t"):
            case = line.split("\t")[1:]
    kernels: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(rows))):
        entry = kernels.setdefault(f"{row['ID']}:{row['Kernel Name']}", {})
        entry[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    return proc.returncode, case, kernels, proc.stdout[-1500:] + proc.stderr[-1500:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get(_CHILD):
        return _run_case(args.backend, args.case)
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu is not on the PATH")
        return 3
    print(f"{'op':34} {'shape':18} {'dtype':8} {'layout':13} {'us':>7} {'read MB':>8} {'write MB':>8} "
          f"{'ideal MB':>8} {'DRAM/ideal':>10}  kernels")
    index = 0
    while True:
        rc, case, kernels, log = _profile(ncu, args.backend, index)
        if rc == 4:
            return 0
        if rc != 0 or case is None or not kernels:
            print(f"ncu failed on case {index} (rc {rc}):\n{log}")
            return 3
        op, shape, dtype, layout, ideal = case
        total = {m: sum(k.get(m, 0.0) for k in kernels.values()) for m in METRICS.split(",")}
        read, write = total["dram__bytes_read.sum"], total["dram__bytes_write.sum"]
        names = ", ".join(name.split(":", 1)[1].split("<")[0].split("(")[0].split("::")[-1] for name in kernels)
        print(f"{op[:34]:34} {shape:18} {dtype:8} {layout:13} {total['gpu__time_duration.sum'] / 1e3:7.1f} "
              f"{read / 1e6:8.1f} {write / 1e6:8.1f} {float(ideal) / 1e6:8.1f} "
              f"{(read + write) / float(ideal):10.2f}  {names}", flush=True)
        index += 1


if __name__ == "__main__":
    sys.exit(main())
