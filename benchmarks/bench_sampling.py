"""End to end: DDPM sampling and one training step, diffusers' UNet2DModel + DDPMScheduler against ours.

    python benchmarks/bench_sampling.py [--device cpu|cuda] [--quick] [--record] [--preset NAME]
                                        [--batches 1,16,256] [--steps N] [--no-compile] [--drift-steps N]
                                        [--max-seconds S] [--threads N]

Both sides run the same weights: diffusers' ``UNet2DModel`` of the preset's architecture (random weights,
seed 0; ``unet.diffusers_config``) and ``UNet.from_diffusers`` of it, so the work per step is identical.
Without diffusers installed, ours still runs (a ``UNet.preset`` with random weights) and the baselines
are reported as skipped.

Sampling rows give milliseconds per DDPM step (UNet forward + scheduler step) and images per second for
the full 1000-step DDPM (batch / (1000 x seconds per step)):

* diffusers eager: the loop of ``DDPMPipeline.__call__`` (``unet(x, t).sample``, ``scheduler.step(...,
  generator)``), with the UNet's timestep already on the device (DDPMPipeline passes a CPU one, whose copy
  waits for the GPU every step: we give the baseline its best form);
* diffusers compile / compile reduce-overhead: the same loop on ``torch.compile(unet[, mode=...])``;
* ours eager: ``Sampler(UNet.from_diffusers(unet))``, noise drawn in the step kernel from per-sample seeds;
* ours graph: the same with ``cuda_graph=True`` (one captured model + step replayed per step; CUDA only);
* ours graph channels_last (``--quick``: the largest batch only): the model's weights and activations in
  channels_last.
* ours compile graph channels_last (the largest batch, when ``--compile`` and time is left, after the
  training rows): the same under ``torch.compile`` (Inductor fuses the elementwise work around our kernels).

Precisions: ``bf16`` = float32 weights and samples, the UNet under ``torch.autocast(bfloat16)`` (as the
H200 anchors in the issue were measured); ``tf32`` = float32 with TF32 matmuls and convolutions (CUDA
only); ``fp32`` = plain float32 (the CPU's second precision). The training step (batch 128 on CUDA):
noise a batch (diffusers' ``add_noise`` / our fused ``q_sample``), forward under bf16 autocast, MSE to the
noise, backward, ``torch.optim.Adam`` (PyTorch's default implementation) step; on CUDA ours also with the
weights (so the activations) in channels_last. "ours Trainer" times what ``ddpm-fast train`` runs: our
``Trainer`` loop, which also clips the gradient and updates the EMA (see ``trainer_steps``).

Timing: each measurement times a whole run of ``--steps`` sampling steps (or training steps), back to back
as a user runs them, with CUDA events on the GPU and the wall clock on the CPU, after warm-up (which
includes compilation, reported separately); median and p20 / p80 over the repetitions.

bf16 drift (``--drift-steps``, 0 to skip): the full 1000-step DDPM from the same seeds with the UNet in float32 and
under bf16 autocast; the distance between the two final image batches (docs/fidelity.md).

``--quick`` (what fits ~2.5 minutes on an H200, compilation included): batches 1 and 256, bf16 only,
10 steps per run, compile default at batch 256 and reduce-overhead at batch 1 (the issue's anchors), ours
in channels_last at batch 256, the training step, our bf16 drift. ``--record`` writes
benchmarks/results/sampling-<device>-<date>.json with the machine, versions, date and git sha.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import ddpm_fast
from ddpm_fast import NoiseSchedule, Sampler, UNet
from ddpm_fast.data import ImageDataset
from ddpm_fast.train import TrainConfig, Trainer
from ddpm_fast.unet import PRESETS, diffusers_config

T = 1000  # train timesteps of every preset's schedule (DDPM's linear betas)

try:
    import diffusers
except ImportError as error:  # the GPU image may not have it: ours is still timed
    diffusers, DIFFUSERS_MISSING = None, f"diffusers is not installed ({error})"
else:
    DIFFUSERS_MISSING = None


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def _quantiles(values: list[float]) -> dict:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"median": statistics.median(values), "p20": pick(0.2), "p80": pick(0.8)}


def time_runs(run: Callable[[], object], device: torch.device, reps: int) -> dict:
    """Milliseconds per call of ``run`` over ``reps`` calls (after the caller's warm-up): CUDA events around
    each call on the GPU (the queue drained before each), the wall clock on the CPU."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(run: Callable[[], object], device: torch.device, calls: int = 2) -> float:
    """Seconds the first call took (compilation, capture, autotuning), after ``calls`` calls."""
    begin = time.perf_counter()
    run()
    _sync(device)
    first = time.perf_counter() - begin
    for _ in range(calls - 1):
        run()
    _sync(device)
    return first


# --------------------------------------------------------------------------------------------------
# precision and models
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions inside the block (CUDA; no effect on the CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Autocast(torch.nn.Module):
    """``model(x, t)`` under ``torch.autocast(dtype)`` (None: as is); float32 weights, float32 x in and out.

    A Module, so the Sampler sees the parameters (its CUDA graph is keyed on them)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.config = model.config

    def forward(self, x, t):
        cast = contextlib.nullcontext() if self.dtype is None else torch.autocast(x.device.type, dtype=self.dtype)
        with cast:
            out = self.model(x, t)
        out = out.sample if hasattr(out, "sample") else out
        return out.float()


PRECISIONS = {"bf16": torch.bfloat16, "tf32": None, "fp32": None}


def channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its weights (so its activations) in channels_last; ``model`` is left as it is."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def make_models(preset: str, device: torch.device):
    """(theirs or None, ours): diffusers' UNet2DModel of the preset (random weights, seed 0) and ours loaded
    from it; without diffusers, ours alone from the preset (seed 0)."""
    torch.manual_seed(0)
    if diffusers is None:
        return None, UNet.preset(preset).to(device).eval()
    theirs = diffusers.UNet2DModel(**diffusers_config(PRESETS[preset])).eval()
    ours = UNet.from_diffusers(theirs)
    return theirs.to(device), ours.to(device).eval()


# --------------------------------------------------------------------------------------------------
# the workloads
# --------------------------------------------------------------------------------------------------


def diffusers_loop(unet, device: torch.device, batch: int, steps: int, dtype: torch.dtype | None, seed: int = 0,
                   num_inference_steps: int = T) -> Callable[[], torch.Tensor]:
    """``run()``: DDPMPipeline's loop for the first ``steps`` of a ``num_inference_steps`` DDPM from the same
    x_T; the model output is cast to float32 before the step (so a bf16 run draws the same float32 noise)."""
    model = Autocast(unet, dtype)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps[:steps]
    on_device = [t.to(device) for t in timesteps]  # separate 0-d tensors, not views (compile guards)
    size = unet.config.sample_size
    x_T = torch.randn((batch, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    x_T = x_T.to(device)

    @torch.no_grad()
    def run():
        generator = torch.Generator(device).manual_seed(seed)
        x = x_T
        for t, t_device in zip(timesteps, on_device):
            x = scheduler.step(model(x, t_device), t, x, generator=generator).prev_sample
        return x
    return run


def ours_loop(model, device: torch.device, batch: int, steps: int, dtype: torch.dtype | None, graph: bool,
              num_steps: int | None = None) -> Callable[[], torch.Tensor]:
    """``run()``: our Sampler for ``steps`` DDPM steps (``num_steps`` steps over the 1000-step schedule:
    the same work per step), seeds 0 .. batch - 1."""
    sampler = Sampler(Autocast(model, dtype), NoiseSchedule(T), num_steps=num_steps or steps)
    seeds = torch.arange(batch, device=device)
    return lambda: sampler.sample(seeds, device=device, cuda_graph=graph)


def train_step(model, device: torch.device, batch: int, ours: bool) -> Callable[[], None]:
    """``run()``: one DDPM training step at ``batch`` (noising, bf16-autocast forward, MSE, backward, Adam)."""
    model.train()
    size, channels = model.config.sample_size, model.config.in_channels
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand((batch, channels, size, size), generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    schedule, scheduler = NoiseSchedule(T), None if ours else diffusers.DDPMScheduler(num_train_timesteps=T)
    counter = [0]

    def run():
        counter[0] += 1
        t = torch.randint(0, T, (batch,), device=device)
        if ours:
            seeds = torch.arange(batch, device=device) + counter[0] * batch
            x_t, target = ddpm_fast.q_sample(x0, t, schedule, seeds=seeds)
        else:
            target = torch.randn_like(x0)
            x_t = scheduler.add_noise(x0, target, t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x_t, t)
            out = out.sample if hasattr(out, "sample") else out
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def trainer_steps(preset: str, device: torch.device, batch: int) -> Callable[[int], None]:
    """``run(n)``: n steps of our ``Trainer``, the loop ``ddpm-fast train`` runs (the step's draws in one pinned
    copy, the fused q_sample, the forward under bf16 autocast on CUDA, L_simple, gradient clipping, Adam, the
    EMA, each loss read a step late), on random images of the preset's shape."""
    config = PRESETS[preset]
    shape = (4 * batch, config.in_channels, config.sample_size, config.sample_size)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    trainer = Trainer(TrainConfig(preset=preset, batch_size=batch, warmup_steps=0, checkpoint_every=2**30), None,
                      dataset=ImageDataset("random", images), device=device)
    return lambda n: trainer.train(steps=trainer.step + n)


def images_distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two batches of images in [-1, 1] are: max and mean |a - b|, and the fraction of values that
    land on different 8-bit levels once written as images."""
    a, b = a.float().clamp(-1, 1), b.float().clamp(-1, 1)
    levels = lambda x: ((x + 1) * 127.5).round()  # noqa: E731
    return {"max_abs": (a - b).abs().max().item(), "mean_abs": (a - b).abs().mean().item(),
            "frac_8bit_changed": (levels(a) != levels(b)).float().mean().item()}


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def plan(args, device: torch.device) -> dict:
    """What to run, from the CLI and the device (the CPU gets the tiny preset and small batches)."""
    cuda, quick = device.type == "cuda", args.quick
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    if cuda:
        batches, steps = ((1, 256), 10) if quick else ((1, 16, 256), 20)
        precisions = ("bf16",) if quick else ("bf16", "tf32")
    else:
        batches, steps, precisions = (1, 4), 3, ("bf16", "fp32")
    batches = args.batches or batches
    p = {
        "preset": args.preset or ("cifar10" if cuda else "tiny"),
        "batches": batches,
        "precisions": precisions,
        "steps": args.steps or steps,
        "reps": 5 if cuda else 3,
        "compile": cuda if args.compile is None else args.compile,
        "compile_backend": args.compile_backend,
        "train_batch": 128 if cuda else 4,
        "train_steps": (args.steps or steps) if cuda else 1,
        "drift_steps": args.drift_steps if args.drift_steps is not None else T if cuda else 20,
        "drift_batch": args.drift_batch or (16 if cuda else 2),
        "drift_diffusers": not quick,
        # channels_last is cuDNN's native layout for bf16 convolutions: the large batch's likely best form
        "channels_last": set() if not cuda else {max(batches)} if quick else set(batches),
        "deadline": deadline,
    }
    if quick:  # the compile anchors only: default at the largest batch, reduce-overhead at batch 1
        p["compile_cases"] = {("default", max(p["batches"])), ("reduce-overhead", min(p["batches"]))}
    else:
        p["compile_cases"] = {(mode, b) for mode in ("default", "reduce-overhead") for b in p["batches"]}
    return p


class OutOfTime(Exception):
    """--max-seconds has passed: the measurement is skipped, not failed."""


def _check_time(p: dict) -> None:
    if p["deadline"] is not None and time.monotonic() > p["deadline"]:
        raise OutOfTime("skipped: --max-seconds reached")


def _failed(row: dict, error: Exception) -> None:
    """Note in the row why it has no numbers: "skipped" past --max-seconds, else "error" (with the message)."""
    if isinstance(error, OutOfTime):
        row["skipped"] = str(error)
    else:
        row["error"] = f"{type(error).__name__}: {error}"[:300]


def _row(rows: list, print_row: Callable, **row) -> None:
    rows.append(row)
    print_row(row)


def _time_sampling(p: dict, device: torch.device, precision: str, batch: int, variants: dict[str, Callable],
                   print_row: Callable) -> list[dict]:
    """One row per variant: ``make()`` gives the run of ``p["steps"]`` sampling steps to warm up and time."""
    rows = []
    for name, make in variants.items():
        row = dict(kind="sampling", precision=precision, batch=batch, variant=name, steps=p["steps"])
        run = None
        try:
            _check_time(p)
            run = make()
            row["first_call_s"] = warm_up(run, device)
            timing = time_runs(run, device, p["reps"])
            row["ms_per_step"] = {k: v / p["steps"] for k, v in timing.items()}
            row["images_per_s"] = batch / (T * row["ms_per_step"]["median"] * 1e-3)
        except Exception as error:  # noqa: BLE001 - report and go on: a GPU run is one shot
            _failed(row, error)
        _row(rows, print_row, **row)
        run = None  # frees this variant's buffers and CUDA graph before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compile_model(model, p: dict, mode: str = "default"):
    """``torch.compile(model)`` in ``mode`` with the plan's backend (another backend than Inductor takes no
    mode: --compile-backend eager checks these paths in seconds on the CPU)."""
    if p["compile_backend"] != "inductor":
        return torch.compile(model, dynamic=False, backend=p["compile_backend"])
    return torch.compile(model, dynamic=False, **({} if mode == "default" else {"mode": mode}))


def compiled_rows(p: dict, device: torch.device, ours, print_row: Callable) -> list[dict]:
    """Ours under torch.compile (Inductor fuses the bias adds, residual adds and casts around our kernels)
    at the largest batch, bf16: after the target rows, as it only runs when time is left (a compile costs
    about a minute). On CUDA in channels_last and captured with the step (``cuda_graph=True``)."""
    if not p["compile"] or "bf16" not in p["precisions"]:
        return []
    cuda = device.type == "cuda"
    batch = max(p["batches"])
    name = "ours compile graph channels_last" if cuda else "ours compile"

    def make():
        model = compile_model(channels_last_copy(ours) if cuda else ours, p)
        return ours_loop(model, device, batch, p["steps"], torch.bfloat16, graph=cuda)
    return _time_sampling(p, device, "bf16", batch, {name: make}, print_row)


def sampling_rows(p: dict, device: torch.device, theirs, ours, print_row: Callable) -> list[dict]:
    rows = []
    compiled = {}
    for precision in p["precisions"]:
        dtype = PRECISIONS[precision]
        with tf32(precision == "tf32"):
            for batch in p["batches"]:
                variants: dict[str, Callable[[], Callable]] = {}
                if theirs is not None:
                    variants["diffusers eager"] = lambda: diffusers_loop(theirs, device, batch, p["steps"], dtype)
                    for mode in ("default", "reduce-overhead"):
                        if p["compile"] and (mode, batch) in p["compile_cases"] and precision == "bf16":
                            def make(mode=mode):
                                if mode not in compiled:
                                    compiled[mode] = compile_model(theirs, p, mode)
                                return diffusers_loop(compiled[mode], device, batch, p["steps"], dtype)
                            variants[f"diffusers compile {mode}"] = make
                variants["ours eager"] = lambda: ours_loop(ours, device, batch, p["steps"], dtype, graph=False)
                if device.type == "cuda":
                    variants["ours graph"] = lambda: ours_loop(ours, device, batch, p["steps"], dtype, graph=True)
                    if batch in p["channels_last"]:
                        def channels_last():
                            return ours_loop(channels_last_copy(ours), device, batch, p["steps"], dtype, graph=True)
                        variants["ours graph channels_last"] = channels_last
                rows += _time_sampling(p, device, precision, batch, variants, print_row)
    return rows


def training_rows(p: dict, device: torch.device, theirs, ours, print_row: Callable) -> list[dict]:
    rows = []
    # Copies: training changes the weights, and the drift rows (after these) sample the models as made.
    batch, n = p["train_batch"], p["train_steps"]

    def loop(make_model, ours_: bool) -> Callable[[int], None]:
        one = train_step(make_model(), device, batch, ours=ours_)
        return lambda steps: [one() for _ in range(steps)]
    sides = ([("diffusers eager", lambda: loop(lambda: copy.deepcopy(theirs), False))] if theirs is not None else [])
    sides.append(("ours eager", lambda: loop(lambda: copy.deepcopy(ours), True)))
    if device.type == "cuda":  # cuDNN's native layout for bf16 convolutions, forward and backward
        sides.append(("ours eager channels_last", lambda: loop(lambda: channels_last_copy(ours), True)))
    sides.append(("ours Trainer", lambda: trainer_steps(p["preset"], device, batch)))
    for name, make in sides:
        row = dict(kind="training", precision="bf16 autocast", batch=batch, variant=name, steps=n)
        try:
            _check_time(p)
            steps = make()
            row["first_call_s"] = warm_up(lambda: steps(1), device, calls=3)
            timing = time_runs(lambda: steps(n), device, p["reps"])
            row["ms_per_step"] = {k: v / n for k, v in timing.items()}
        except Exception as error:  # noqa: BLE001
            _failed(row, error)
        _row(rows, print_row, **row)
        steps = None  # frees the copy and its optimizer state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def drift_rows(p: dict, device: torch.device, theirs, ours) -> list[dict]:
    """bf16 autocast against float32 over a whole DDPM (``drift_steps`` steps over the 1000-step schedule)."""
    n, batch, rows = p["drift_steps"], p["drift_batch"], []
    if not n:
        return rows
    sides = [("ours", lambda dtype: ours_loop(ours, device, batch, n, dtype, graph=device.type == "cuda"))]
    if theirs is not None and p["drift_diffusers"]:
        sides.append(("diffusers", lambda dtype: diffusers_loop(theirs, device, batch, n, dtype,
                                                                num_inference_steps=n)))
    for name, make in sides:
        row = dict(kind="bf16 drift", variant=name, batch=batch, steps=n, preset=p["preset"])
        try:
            _check_time(p)
            with tf32(False):
                fp32 = make(None)().clamp(-1, 1)
                bf16 = make(torch.bfloat16)().clamp(-1, 1)
            row.update(images_distance(bf16, fp32))
        except Exception as error:  # noqa: BLE001
            _failed(row, error)
        print(f"bf16 drift, {name}: " + (row.get("error") or row.get("skipped") or
              f"max |bf16 - fp32| {row['max_abs']:.3g}, mean {row['mean_abs']:.3g}, "
              f"{100 * row['frac_8bit_changed']:.1f}% of 8-bit values changed"), flush=True)
        rows.append(row)
    return rows


def environment(device: torch.device) -> dict:
    """The op benchmarks' record environment (machine, versions, date, git sha) plus diffusers' version."""
    return {**harness.environment(device),
            "diffusers": diffusers.__version__ if diffusers is not None else DIFFUSERS_MISSING}


def _print_row(row: dict) -> None:
    head = f"{row['kind']:9} {row['precision']:13} {row['batch']:>5}  {row['variant']:30}"
    if "error" in row or "skipped" in row:
        print(f"{head} " + (f"failed: {row['error']}" if "error" in row else row["skipped"]), flush=True)
        return
    ms = row["ms_per_step"]
    line = f"{head} {ms['median']:9.3f}  ({ms['p20']:.3f}-{ms['p80']:.3f})"
    line += f" {row['images_per_s']:10.3g}" if "images_per_s" in row else " " * 11
    print(f"{line}   {row['first_call_s']:6.1f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", "--targets-only", dest="quick", action="store_true",
                        help="the subset that fits ~2.5 minutes on an H200 (the issue's target workloads)")
    parser.add_argument("--max-seconds", type=float, help="start no new measurement after this long")
    parser.add_argument("--record", action="store_true", help="write a JSON record under benchmarks/results/")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: cifar10 on CUDA, tiny on the CPU")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")),
                        help="comma-separated batch sizes (default: 1,16,256 on CUDA, 1,4 on the CPU)")
    parser.add_argument("--steps", type=int, help="sampling steps per timed run (default: 20, quick 10, CPU 3)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time torch.compile baselines (default on CUDA only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (default inductor; another one ignores the modes)")
    parser.add_argument("--drift-steps", type=int, help="steps of the bf16 drift runs over the 1000-step schedule "
                        "(default: 1000 on CUDA, 20 on the CPU; 0 skips the measurement)")
    parser.add_argument("--drift-batch", type=int, help="images in the bf16 drift runs (default: 16 CUDA, 2 CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, 1 for the tiny preset)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    p = plan(args, device)
    if device.type == "cpu" and args.threads is None and p["preset"] == "tiny":
        args.threads = 1  # tiny tensors: OpenMP barriers cost more than a second core gives (tests/test_sampler.py)
    if args.threads:
        torch.set_num_threads(args.threads)

    theirs, ours = make_models(p["preset"], device)
    env = environment(device)
    print(f"{env['device']}; torch {env['torch']}, triton {env.get('triton')}, diffusers {env['diffusers']}")
    print(f"preset {p['preset']} ({sum(q.numel() for q in ours.parameters()) / 1e6:.1f}M parameters), "
          f"{p['steps']} steps per timed run, {p['reps']} runs")
    if theirs is None:
        print(f"diffusers baselines skipped: {DIFFUSERS_MISSING}")
    if not p["compile"]:
        print("torch.compile baselines skipped (--compile to run them)")
    print(f"\n{'kind':9} {'precision':13} {'batch':>5}  {'variant':30} {'ms/step':>9}  {'(p20-p80)':15}"
          f"{'img/s':>8}   first call s")

    plan_json = {k: sorted(v) if isinstance(v, set) else v for k, v in p.items()}
    so_far = []

    def on_row(row: dict) -> None:
        _print_row(row)
        so_far.append(row)
        if args.record:  # after every row: a run killed at its time limit keeps what it measured
            harness.record("sampling", device, so_far, {"plan": plan_json}, env)

    rows = sampling_rows(p, device, theirs, ours, on_row)
    rows += training_rows(p, device, theirs, ours, on_row)  # a target row: before the (long) drift runs
    rows += compiled_rows(p, device, ours, on_row)
    rows += drift_rows(p, device, theirs, ours)

    if args.record:
        path = harness.record("sampling", device, rows, {"plan": plan_json}, env)
        print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
