"""Print the fused ops against the eager reference and torch.compile of it, on this machine.

    python benchmarks/table.py [--device cpu|cuda] [--no-compile] [--record]

Columns: median ms (p20-p80) of each implementation, ours in GB/s and % of the copy bandwidth measured
in the same run, and our speed-up over each baseline. --record writes the JSON record under
benchmarks/results/ (machine, versions, date, git sha).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_group_norm  # noqa: E402
import bench_q_sample  # noqa: E402
import bench_step  # noqa: E402
from harness import copy_bandwidth_gbs, record, time_all  # noqa: E402

MODULES = (bench_q_sample, bench_step, bench_group_norm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (faster)")
    parser.add_argument("--record", action="store_true", help="write a JSON record under benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    copy = copy_bandwidth_gbs(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; copy bandwidth {copy:.1f} GB/s (measured now)\n")
    print(f"{'op':36} {'shape':18} {'dtype':8} {'layout':13} {'ours ms':>8} {'GB/s':>7} {'%copy':>6}  "
          "baselines: ms (our speed-up)")
    rows = []
    for module in MODULES:
        for case in module.cases(device):
            impls = {k: v for k, v in case.impls.items() if not (args.no_compile and k == "compile")}
            times = time_all(impls, device)
            ours = times["ours"][0]
            gbs = case.bytes / (ours * 1e-3) / 1e9
            line = (f"{case.op:36} {str(case.shape):18} {str(case.dtype)[6:]:8} {case.layout:13} {ours:8.3f} "
                    f"{gbs:7.1f} {100 * gbs / copy:5.0f}%")
            line += " " + " | ".join(f"{name} {ms:.3f} ({ms / ours:.1f}x)"
                                     for name, (ms, _, _) in times.items() if name != "ours")
            print(line, flush=True)
            rows.append({"op": case.op, "shape": case.shape, "dtype": str(case.dtype), "layout": case.layout,
                         "bytes": case.bytes, "note": case.note, "ours_gbs": gbs, "pct_copy": 100 * gbs / copy,
                         **{f"{k}_ms": {"median": v[0], "p20": v[1], "p80": v[2]} for k, v in times.items()}})
    if args.record:
        print("\nrecorded", record("ops", device, rows, {"copy_gbs": copy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
