"""Where the time of a sampling step and a training step goes: kernel time by kind, ours beside diffusers.

    python benchmarks/profile_sampling.py [--device cpu|cuda] [--preset NAME] [--steps N] [--record]
                                          [--max-seconds S]

The sampling issue asks, where a target is missed, for a profile of where the time goes. Each workload of
benchmarks/bench_sampling.py's targets (same models, same weights, bf16 autocast) runs once to warm up and
once under ``torch.profiler``; every CUDA kernel is binned by its name into a kind (convolution, GEMM,
attention, group norm, our step and noise, copies and casts, ...). Per step: the kernel time of each kind
and its number of kernels, the GPU's busy time (the union of the kernel intervals) and the span from the
first kernel's start to the last one's end. Span minus busy is time the GPU waited for the host: what
makes batch 1 launch-bound. Times under the profiler are a little longer than bench_sampling's; the kinds'
shares are what this is for. Under the profiler our fused ops go through the dispatcher (which records them by
name; ops/dispatch.py), tens of µs of host time each that a plain run skips: at batch 1, ours' span minus busy
is an upper bound.

On the CPU (the tiny preset: what the tests run) the kinds bin the self time of the profiled ops, and the
rest of the wall time (Python, and ddpm_fast's CPU kernels, which run outside any aten op) is "untraced".

``--record`` writes benchmarks/results/profile-<device>-<date>.json (machine, versions, date, git sha).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_sampling as bench  # noqa: E402
import harness  # noqa: E402

# First match wins, so the specific kinds come before the ones whose words they share: cuDNN's attention
# kernels say "sdpa" and "cudnn", its GEMMs "xmma" like its convolutions ("fprop", "dgrad", "wgrad"), and
# torch.cat's kernel is a "CatArrayBatchedCopy".
KINDS = (
    ("group norm", r"gn_(forward|backward)_kernel|group_?norm|rowwisemoments|computefusedparams"
                   r"|^_(forward|backward)(_stats)?_kernel"),
    ("step, q_sample, noise", r"ddpm_fast::|_step_kernel|_q_sample_kernel|distribution|philox|normal|randn"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv(?!ert)|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd|nchwtonhwc|nhwctonchw"),
    ("gemm", r"gemm|cublas|cutlass|nvjet|xmma|matmul|\bmm\b|aten::mm|linear"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("concat", r"catarray|aten::cat\b"),
    ("copy, cast", r"copy|cast|convert|contiguous|clone|memcpy|memset"),
    ("upsample, pad", r"upsample|interpolate|pad"),
    ("reduction", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|silu|sigmoid|where|pow|sqrt|fill|clamp|div|sub"
                    r"|exp|neg|zero|mse|sin|cos"),
)
_PATTERNS = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS]
UNTRACED = "untraced"


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in _PATTERNS if pattern.search(name)), "other")


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals (kernels of several streams may overlap)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def summarize(events, steps: int, wall_ms: float, device: torch.device) -> dict:
    """Per step: the time and count of each kind, the top kernels (ops on the CPU), busy and span."""
    if device.type == "cuda":
        timed = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.name, 0.0, e.self_cpu_time_total) for e in events
                 if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
    by_name: dict[str, list[float]] = {}
    for name, start, end in timed:
        by_name.setdefault(name, []).append(end - start)
    kinds: dict[str, dict] = {}
    for name, durations in by_name.items():
        entry = kinds.setdefault(kind_of(name), {"ms": 0.0, "count": 0.0})
        entry["ms"] += sum(durations) / 1e3 / steps
        entry["count"] += len(durations) / steps
    device_ms = sum(entry["ms"] for entry in kinds.values())
    if device.type == "cuda":
        busy_ms = _busy_us([(start, end) for _, start, end in timed]) / 1e3 / steps
        span_ms = (max((e for _, _, e in timed), default=0) - min((s for _, s, _ in timed), default=0)) / 1e3 / steps
    else:  # one thread's ops: what they do not cover is Python and our kernels (no aten op around them)
        busy_ms, span_ms = None, wall_ms / steps
        kinds[UNTRACED] = {"ms": max(0.0, span_ms - device_ms), "count": 0.0}
    total = sum(entry["ms"] for entry in kinds.values())
    for entry in kinds.values():
        entry["pct"] = 100 * entry["ms"] / total if total else 0.0
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:10]
    return {
        "device_ms": device_ms, "busy_ms": busy_ms, "span_ms": span_ms, "wall_ms": wall_ms / steps,
        "launches": len(timed) / steps,
        "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1]["ms"])),
        "top": [{"name": name[:160], "ms": sum(d) / 1e3 / steps, "count": len(d) / steps} for name, d in top],
    }


def profile_run(run: Callable[[], object], calls: int, steps: int, device: torch.device) -> dict:
    """``run`` warmed up, then ``calls`` calls of it (``steps`` steps in all) under the profiler."""
    bench.warm_up(run, device, calls=2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # torch 2.11 warns at the first profile() of a process that events of earlier cycles are dropped; this
    # profile has one cycle (and the test suite makes warnings errors).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
        with profile(activities=activities) as prof:
            begin = time.perf_counter()
            for _ in range(calls):
                run()
            bench._sync(device)
            wall_ms = (time.perf_counter() - begin) * 1e3
    return summarize(prof.events(), steps, wall_ms, device)


def workloads(device: torch.device, theirs, ours, steps: int, big: int, train_batch: int):
    """(kind, batch, variant, make): make() -> (run, calls of it to profile); the targets' best forms, ours first."""
    bf16 = torch.bfloat16
    cuda = device.type == "cuda"
    ours_cl = bench.channels_last_copy(ours) if cuda else ours
    tag = " channels_last" if cuda else ""
    yield "sampling", big, "ours eager" + tag, lambda: (bench.ours_loop(ours_cl, device, big, steps, bf16, False), 1)
    if theirs is not None:
        yield "sampling", big, "diffusers eager", lambda: (bench.diffusers_loop(theirs, device, big, steps, bf16), 1)
    if cuda:
        yield "sampling", 1, "ours graph", lambda: (bench.ours_loop(ours, device, 1, steps, bf16, True), 1)
    yield "sampling", 1, "ours eager", lambda: (bench.ours_loop(ours, device, 1, steps, bf16, False), 1)
    if theirs is not None:
        yield "sampling", 1, "diffusers eager", lambda: (bench.diffusers_loop(theirs, device, 1, steps, bf16), 1)
    # Training changes the weights: copies, as in bench_sampling.
    yield ("training", train_batch, "ours eager" + tag,
           lambda: (bench.train_step(bench.copy.deepcopy(ours_cl), device, train_batch, ours=True), steps))
    if theirs is not None:
        yield ("training", train_batch, "diffusers eager",
               lambda: (bench.train_step(bench.copy.deepcopy(theirs), device, train_batch, ours=False), steps))


def _print(row: dict) -> None:
    head = f"\n{row['kind']} batch {row['batch']}, {row['variant']}"
    if "error" in row or "skipped" in row:
        print(f"{head}: {row.get('error') or row['skipped']}", flush=True)
        return
    p = row["profile"]
    busy = "" if p["busy_ms"] is None else f", GPU busy {p['busy_ms']:.3f} ms of a {p['span_ms']:.3f} ms span"
    print(f"{head}: {p['device_ms']:.3f} ms of kernels per step in {p['launches']:.0f} launches{busy} "
          f"(wall under the profiler {p['wall_ms']:.3f} ms)")
    for kind, entry in p["kinds"].items():
        print(f"  {kind:22} {entry['ms']:9.3f} ms {entry['pct']:5.1f}%  {entry['count']:6.0f} per step")
    for top in p["top"][:3]:
        print(f"    {top['ms']:8.3f} ms x{top['count']:<4.0f} {top['name'][:100]}")


def _print_matrix(rows: list[dict]) -> None:
    """Kinds (rows) against workloads (columns), ms per step: where ours and diffusers differ."""
    done = [r for r in rows if "profile" in r]
    if not done:
        return
    kinds = list(dict.fromkeys(k for r in done for k in r["profile"]["kinds"]))
    heads = [f"{r['kind'][:5]} {r['batch']} {r['variant'].replace(' channels_last', ' cl')}" for r in done]
    width = max(12, *(len(h) for h in heads))
    print("\nms per step" + "".join(f" {h:>{width}}" for h in heads))
    for kind in kinds + ["all"]:
        cells = [r["profile"]["kinds"].get(kind, {}).get("ms", 0.0) if kind != "all" else
                 sum(e["ms"] for e in r["profile"]["kinds"].values()) for r in done]
        print(f"{kind:11}" + "".join(f" {c:>{width}.3f}" for c in cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), help="default: cifar10 on CUDA, tiny on the CPU")
    parser.add_argument("--steps", type=int, default=3, help="steps under the profiler per workload (default 3)")
    parser.add_argument("--max-seconds", type=float, help="start no new workload after this long")
    parser.add_argument("--record", action="store_true", help="write a JSON record under benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    preset = args.preset or ("cifar10" if cuda else "tiny")
    if not cuda:
        torch.set_num_threads(1)  # one thread's ops add up to its wall time

    theirs, ours = bench.make_models(preset, device)
    env = bench.environment(device)
    print(f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}; preset {preset}, "
          f"bf16 autocast, {args.steps} steps profiled per workload")
    rows = []
    for kind, batch, variant, make in workloads(device, theirs, ours, args.steps, 256 if cuda else 4,
                                                128 if cuda else 4):
        row = {"kind": kind, "batch": batch, "variant": variant, "steps": args.steps}
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise bench.OutOfTime("skipped: --max-seconds reached")
            run, calls = make()
            row["profile"] = profile_run(run, calls, args.steps, device)
        except Exception as error:  # noqa: BLE001
            bench._failed(row, error)
        rows.append(row)
        _print(row)
        if args.record:  # after every row: a run killed at its time limit keeps what it measured
            path = harness.record("profile", device, rows, {"preset": preset, "kinds": dict(KINDS)}, env)
        run = None
        if cuda:
            torch.cuda.empty_cache()
    _print_matrix(rows)
    if args.record:
        path = harness.record("profile", device, rows, {"preset": preset, "kinds": dict(KINDS)}, env)
        print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
