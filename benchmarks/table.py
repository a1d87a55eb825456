"""Print the fused ops against the eager reference and torch.compile of it, on this machine.

    python benchmarks/table.py [--device cpu|cuda] [--no-compile] [--targets-only] [--max-seconds S] [--record]
                               [--warm-only --shard K/N]

Columns: median ms (p20-p80) of each of our kernel backends ("cuda" and "triton" on a GPU, "cpu" on the
CPU) in GB/s and % of the copy bandwidth measured in the same run, then each baseline's median ms and the
fastest native backend's speed-up over it. The issue's target shapes run first, the extra shapes after
them; --max-seconds stops starting new cases after that long (the record says so). --record writes the
JSON record under benchmarks/results/ (machine, versions, date, git sha). An implementation that fails is
reported with its error in its row; the other columns and cases still run.

--warm-only --shard K/N calls each implementation of every N-th case (from the K-th) once and times
nothing: N such processes side by side compile the Triton kernels (each autotuning configuration) and the
torch.compile baselines into the on-disk caches, so that the timed run that follows, alone on the GPU,
finds them compiled. On a fresh machine compiling is most of an op benchmark's time, and one process
compiles one kernel at a time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_group_norm  # noqa: E402
import bench_q_sample  # noqa: E402
import bench_step  # noqa: E402
from harness import NATIVE, copy_bandwidth_gbs, environment, record, time_all  # noqa: E402

# In this order (the targets of each first, then the extra shapes): the extra shapes (GroupNorm's) run
# before the thresholded step's, which are ours.
CASES = (bench_q_sample.cases, bench_step.cases, bench_group_norm.cases, bench_step.threshold_cases)


def _cases(device: torch.device, targets_only: bool):
    cases = [case for cases_of in CASES for case in cases_of(device)]
    targets = [case for case in cases if case.target]
    return targets if targets_only else targets + [case for case in cases if not case.target]


def _call_once(fn, device: torch.device) -> str | None:
    """Run ``fn`` once (to its end on the device); its error as one line, or None."""
    try:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - reported, not raised: a GPU run is one shot
        return f"{type(error).__name__}: {error}"[:300]
    return None


def _time_case(impls: dict, device: torch.device) -> tuple[dict, dict]:
    """(times, errors): each implementation is called once first, and one that fails gets its error instead
    of a time, so that one failing kernel does not cost the whole table; the others are timed together."""
    errors = {name: error for name, fn in impls.items() if (error := _call_once(fn, device)) is not None}
    return time_all({name: fn for name, fn in impls.items() if name not in errors}, device), errors


def warm(cases: list, device: torch.device, shard: tuple[int, int], skip: set) -> int:
    """Call each implementation (but ``skip``) of this shard's cases once, compiling what it compiles."""
    k, n = shard
    for case in cases[k::n]:
        for name, fn in case.impls.items():
            if name in skip:
                continue
            begin = time.monotonic()
            error = _call_once(fn, device)
            print(f"warm {k}/{n} {case.op} {case.shape} {str(case.dtype)[6:]} {case.layout} {name}: "
                  f"{error[:120] if error else 'ok'} ({time.monotonic() - begin:.1f} s)", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (faster)")
    parser.add_argument("--targets-only", action="store_true", help="only the issue's target shapes")
    parser.add_argument("--max-seconds", type=float, default=None, help="start no new case after this long")
    parser.add_argument("--record", action="store_true", help="write a JSON record under benchmarks/results/")
    parser.add_argument("--warm-only", action="store_true", help="compile into the caches, time nothing")
    parser.add_argument("--shard", default="0/1", help="K/N: with --warm-only, every N-th case from the K-th")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.monotonic()
    skip = {"compile"} if args.no_compile else set()
    if args.warm_only:
        k, n = (int(v) for v in args.shard.split("/"))
        return warm(list(_cases(device, args.targets_only)), device, (k, n), skip)

    copy = copy_bandwidth_gbs(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; copy bandwidth {copy:.1f} GB/s (measured now)\n")
    print(f"{'op':34} {'shape':18} {'dtype':8} {'layout':13}  ours: ms GB/s %copy per backend  |  "
          "baselines: ms (speed-up of our fastest)")
    rows, skipped = [], 0
    cases = _cases(device, args.targets_only)
    env = environment(device) if args.record else None
    extra = {"copy_gbs": copy, "cases_not_run": len(cases), "compile": not args.no_compile}
    for n, case in enumerate(cases):
        if args.max_seconds is not None and time.monotonic() - start > args.max_seconds:
            skipped = len(cases) - n
            print(f"\n--max-seconds {args.max_seconds:g} reached: {skipped} cases not run")
            break
        impls = {k: v for k, v in case.impls.items() if k not in skip}
        times, errors = _time_case(impls, device)
        ours = {k: times[k][0] for k in NATIVE if k in times}
        gbs = {k: case.bytes / (ms * 1e-3) / 1e9 for k, ms in ours.items()}
        best = min(ours.values()) if ours else None
        line = f"{case.op:34} {str(case.shape):18} {str(case.dtype)[6:]:8} {case.layout:13} "
        line += " ".join(f"{k} {ms:.3f} {gbs[k]:.1f} {100 * gbs[k] / copy:.0f}%" for k, ms in ours.items())
        line += "  | " + " | ".join(f"{name} {ms:.3f}" + (f" ({ms / best:.1f}x)" if best else "")
                                     for name, (ms, _, _) in times.items() if name not in ours)
        line += "".join(f"  | {name} FAILED: {error}" for name, error in errors.items())
        print(line, flush=True)
        rows.append({"op": case.op, "shape": case.shape, "dtype": str(case.dtype), "layout": case.layout,
                     "bytes": case.bytes, "note": case.note, "target": case.target, "errors": errors,
                     **{f"{k}_gbs": v for k, v in gbs.items()},
                     **{f"{k}_pct_copy": 100 * v / copy for k, v in gbs.items()},
                     **{f"{k}_ms": {"median": v[0], "p20": v[1], "p80": v[2]} for k, v in times.items()}})
        if args.record:  # after every row: a run killed at its time limit keeps what it measured
            extra["cases_not_run"] = len(cases) - n - 1
            record("ops", device, rows, extra, env)
    if args.record:
        extra["cases_not_run"] = skipped or extra["cases_not_run"]
        print("\nrecorded", record("ops", device, rows, extra, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
