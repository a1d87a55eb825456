"""Timing and records shared by the op benchmarks.

GPU: ``triton.testing.do_bench`` (CUDA events, cache flushed between runs) gives median / p20 / p80.
CPU: the same quantiles over wall-clock repetitions after a warm-up. Bandwidth is reported against the
copy bandwidth measured in the same run (bytes read + written by ``dst.copy_(src)``).

Our kernels get one column per native backend this machine runs (:func:`native_backends`): "cuda" and
"triton" on a GPU, "cpu" on the CPU, beside the baselines ("eager", "compile", "reference", ...).
"""

from __future__ import annotations

import dataclasses
import functools
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


NATIVE = ("cuda", "triton", "cpu")


def native_backends(device: torch.device) -> list[str]:
    """Our kernel backends that get a column on ``device``: cuda and triton on a GPU, cpu on the CPU (each
    only where build_info() says it is available)."""
    import ddpm_fast
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    backends = ddpm_fast.build_info()["backends"]
    return [name for name in wanted if backends[name] == "available"]


def natives(device: torch.device, make: Callable[[str], Callable]) -> dict[str, Callable]:
    """{backend: make(backend)} for each of :func:`native_backends`."""
    return {name: make(name) for name in native_backends(device)}


@dataclasses.dataclass
class Case:
    """One benchmarked configuration: ``impls`` maps a name (a native backend "cuda" / "triton" / "cpu", or a
    baseline "eager", "compile", ...) to a callable. ``target``: one of the issue's target rows (the rest
    are extra shapes, run after the targets)."""
    op: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    bytes: int          # bytes the op must move at least (its memory-bound limit)
    impls: dict[str, Callable]
    note: str = ""
    target: bool = True


@functools.lru_cache(maxsize=None)
def cpu_cases(cases: Callable) -> list[Case]:
    """A bench module's CPU cases, built once per session for its pytest-benchmark tests."""
    return list(cases(torch.device("cpu")))


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def _wall_ms(fn: Callable, seconds: float, max_reps: int) -> list[float]:
    times, spent = [], 0.0
    while len(times) < 3 or (spent < seconds and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        spent += times[-1] / 1e3
    return times


def time_ms(fn: Callable, device: torch.device, min_seconds: float = 0.4, max_reps: int = 200) -> tuple[float, ...]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    fn()  # warm-up: first-call allocations, compiled graphs
    return _quantiles(_wall_ms(fn, min_seconds, max_reps))


def time_all(impls: dict[str, Callable], device: torch.device, rounds: int = 6) -> dict[str, tuple[float, ...]]:
    """(median, p20, p80) ms of each implementation. On the CPU the implementations take turns over
    several rounds, so a neighbour's load on a shared machine hits them alike and the ratios hold."""
    if device.type == "cuda":
        return {name: time_ms(fn, device) for name, fn in impls.items()}
    for fn in impls.values():
        fn()
        fn()
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            samples[name] += _wall_ms(fn, 0.1, 50)
    return {name: _quantiles(times) for name, times in samples.items()}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Device copy bandwidth in GB/s (read + write), measured now, as the ceiling for memory-bound ops."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (median * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    import ddpm_fast
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
           "torch": torch.__version__, "ddpm_fast": ddpm_fast.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "build": ddpm_fast.build_info()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def record(name: str, device: torch.device, rows: list[dict], extra: dict, env: dict | None = None) -> Path:
    """Write the rows with the machine and versions (``env``, default :func:`environment`) to
    benchmarks/results/<name>-<device>-<date>.json, atomically. Called again with the same ``env`` it rewrites
    the same file: the benchmarks save after every row, so a run killed at its time limit keeps what it measured."""
    env = env or environment(device)
    RESULTS.mkdir(exist_ok=True)
    stamp = env["date"][:19].replace(":", "")
    path = RESULTS / f"{name}-{device.type}-{stamp}.json"
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps({"environment": env, **extra, "rows": rows}, indent=1, default=str) + "\n")
    partial.replace(path)
    return path
