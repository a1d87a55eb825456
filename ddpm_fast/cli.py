"""The ``ddpm-fast`` command line: train, sample, evaluate, bench, info, demo.

Every subcommand has ``--help``. A bad argument, file or dataset ends the program with one readable
line on stderr (``ddpm-fast <command>: error: ...``) and exit code 2, never a traceback; set
``DDPM_FAST_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

PROG = "ddpm-fast"
REPO_ROOT = Path(__file__).resolve().parent.parent


class UsageError(Exception):
    """A bad command line or input file, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text stays behind --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------- helpers

def _set_threads(threads: int | None) -> None:
    import torch
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _positive(kind, least=None, finite=False):
    """An argparse type: a number > 0 (>= ``least``; not inf where ``finite``: a time, say)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value > 0 or (finite and value == math.inf):
            raise argparse.ArgumentTypeError(f"must be > 0{' and finite' if finite else ''}, got {text!r}")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _device(text: str | None):
    """The --device to run on, checked before the work: torch's own error for a missing CUDA is an assert."""
    import torch
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise UsageError(f"--device {text}: this machine has {found} (torch {torch.__version__})")
    return device


def _load_sampling_model(path: str):
    """(model, schedule, scheduler config: what `scheduler_options` reads) from our checkpoint, or a diffusers
    UNet2DModel / pipeline folder."""
    from .schedule import NoiseSchedule
    from .train import load_model
    from .unet import UNet, diffusers_unet_folder
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {path!r} does not exist")
    try:
        config_file = Path(diffusers_unet_folder(p)) / "config.json"
    except FileNotFoundError:  # no config.json: one of our checkpoints
        config_file = None
    if config_file is not None:
        try:
            class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")  # JSON: UTF-8
        except json.JSONDecodeError as error:
            raise ValueError(f"unreadable {str(config_file)!r}: {error}") from None
        if class_name is not None:  # a diffusers folder
            unet_dir = config_file.parent
            model = UNet.from_diffusers(unet_dir)
            # The pipeline's scheduler: the folder given holds unet/, or the unet/ given sits in a pipeline folder
            # (model_index.json): a bare UNet folder never takes an unrelated scheduler/ beside it.
            parent = p.absolute().parent
            pipeline = p if unet_dir != p else parent if (parent / "model_index.json").is_file() else None
            candidates = ([pipeline / "scheduler" / "scheduler_config.json"] if pipeline else []) + \
                [p / "scheduler_config.json"]
            scheduler_file = next((f for f in candidates if f.is_file()), None)
            try:
                scheduler = json.loads(scheduler_file.read_text(encoding="utf-8")) if scheduler_file else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"unreadable {str(scheduler_file)!r}: {error}") from None
            return model, NoiseSchedule.from_config(scheduler), scheduler
    model, schedule, config = load_model(p)
    return model, schedule, {"prediction_type": config["prediction_type"]}


def _check_output(out: Path) -> None:
    """Before the work: ``out`` is a .png that can be written (the images go beside it as .npz)."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out names the PNG grid and must end in .png (the images go beside it as .npz), "
                         f"got {str(out)!r}")
    for path in (out, out.with_suffix(".npz")):
        if path.is_dir():
            raise UsageError(f"--out: {str(path)!r} is a directory")
    # Nothing is created yet (a model that fails to load leaves no folders): the nearest existing folder on the
    # way must take new entries.
    existing = out.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out: cannot write into {str(existing)!r}")


@contextlib.contextmanager
def _non_finite_seeds():
    """Yields a list that gets the seeds of the images the Sampler found holding NaN or infinity inside (which
    clamping hides from _save_samples); its warning is not shown: _save_samples says it once, for all of them
    (under torchrun, each rank's Sampler would say it for its share). Other warnings pass on."""
    from .sampler import NonFiniteImagesWarning
    seeds: list[int] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonFiniteImagesWarning)
            yield seeds
    finally:  # outside the recording, so the others are shown (or raised) as they would have been
        for w in caught:
            if isinstance(w.message, NonFiniteImagesWarning):
                seeds.extend(w.message.seeds)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _save_samples(images, seeds, out: Path, non_finite=()) -> tuple[Path, Path]:
    """Write the PNG grid and the .npz; warn of the samples holding NaN, or ``non_finite`` (seeds the Sampler found
    holding NaN or infinity before it clamped)."""
    import io

    import numpy as np

    from .sampler import seed_list, write_atomically
    from .train import write_sample_grid
    has_nan, non_finite = (~images.isfinite()).flatten(1).any(1).tolist(), set(non_finite)
    broken = [seed for seed, bad in zip(seeds, has_nan) if bad or seed in non_finite]
    if broken:  # the grid shows them as flat colour, which reads as a bad sample, not a broken model
        print(f"{PROG}: warning: {len(broken)} of {len(images)} samples hold NaN or inf values "
              f"(seeds {seed_list(broken)}; a diverged model?)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_sample_grid(images, out)
    npz, buffer = out.with_suffix(".npz"), io.BytesIO()
    np.savez(buffer, images=images.float().cpu().numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    write_atomically(npz, buffer.getvalue())
    return out, npz


# --------------------------------------------------------------------------------------- subcommands

def cmd_train(args) -> int:
    from . import distributed
    from .train import TrainConfig, Trainer
    _set_threads(args.threads)
    device = _train_device(args.device)
    with distributed.process_group(_group_backend(device)):
        # The data's absolute path, so that evaluate finds it from any directory.
        data = args.data if args.data == "digits" else str(Path(args.data).resolve())
        config = TrainConfig(
            data=data, image_size=args.image_size, preset=args.preset, prediction_type=args.prediction_type,
            min_snr_gamma=args.min_snr_gamma, num_train_timesteps=args.timesteps, beta_schedule=args.beta_schedule,
            batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
            grad_clip=args.grad_clip, ema_decay=args.ema_decay, ema_warmup=not args.no_ema_warmup, flip=args.flip,
            amp=args.amp, seed=args.seed, checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
            num_samples=args.num_samples, sample_steps=args.sample_steps)
        try:  # the run folder, made before the data is read and the first step runs
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {args.out!r}: cannot make the run folder ({error.strerror or error})") from None
        trainer = Trainer(config, args.out, progress=True, device=device)
        if trainer.dataset.name == "cifar10-test":
            _say(f"note: {args.data!r} holds CIFAR-10's test_batch only: training on its {len(trainer.dataset)} "
                 "test images")
        if not trainer.data_on_device:
            _say(f"note: the data ({trainer.dataset.data.nbytes / 2**30:.1f} GiB) stays in host memory, as it takes "
                 f"more than a quarter of {trainer.device}'s free memory: each step copies its batch")
        if not args.no_resume and trainer.resume():
            changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in trainer.changed_on_resume.items())
            _say(f"resumed from step {trainer.step} ({args.out})" + (f"; changed since: {changed}" if changed else ""))
            if trainer.step >= args.steps:
                _say(f"nothing to train: the checkpoint is at step {trainer.step} and --steps is {args.steps}")
        start = time.perf_counter()
        with _stop_on_interrupt(trainer):
            losses = trainer.train(time_limit=args.time_limit)
        if losses:
            _say(f"step {trainer.step}: loss {losses[-1]:.4f}; {len(losses)} steps in "
                 f"{time.perf_counter() - start:.0f} s; checkpoints in {Path(args.out) / 'checkpoints'}")
        if trainer.stop_requested:
            print(f"{PROG} train: interrupted at step {trainer.step}, saved; the same command resumes it",
                  file=sys.stderr)
            return 130
    return 0


def _group_backend(device) -> str | None:
    """torchrun's process group for --device: gloo for the CPU (a GPU machine would pick nccl), else the default."""
    return "gloo" if device is not None and device.type == "cpu" else None


def _train_device(text: str | None):
    """train's --device: None (and "cuda") is each rank's own GPU, else the CPU; "cpu"; "cuda:N" one GPU, for a
    single process only (under torchrun every rank would take the same one)."""
    import os
    if text is None:
        return None
    device = _device(text)
    if device.type == "cuda" and device.index is None:
        return None
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"--device {text}: under torchrun every rank would train on that one GPU; give --device cuda "
                         "(each rank its LOCAL_RANK's GPU)")
    return device


@contextlib.contextmanager
def _stop_on_interrupt(trainer):
    """The first Ctrl-C ends training after the current step, with a checkpoint (up to checkpoint_every steps
    would be lost otherwise); a second one interrupts at once, as usual. A process started with SIGINT ignored
    (`cmd &` in a script: the terminal's Ctrl-C is for the foreground) keeps ignoring it, as Python does."""
    if (threading.current_thread() is not threading.main_thread()  # signal handlers belong to the main thread
            or signal.getsignal(signal.SIGINT) == signal.SIG_IGN):
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, previous)
        print(f"{PROG} train: stopping after this step to save a checkpoint (Ctrl-C again: stop now, unsaved)",
              file=sys.stderr, flush=True)
        trainer.request_stop()

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_sample(args) -> int:
    import torch
    from . import distributed
    from .sampler import Sampler, scheduler_options
    _set_threads(args.threads)
    _check_output(Path(args.out))
    if not -2**63 <= args.seed <= 2**63 - args.num_samples:
        raise UsageError(f"--seed: the seeds SEED .. SEED + {args.num_samples - 1} must be int64, got {args.seed}")
    device = None if args.device is None else _device(args.device)
    with distributed.process_group(_group_backend(device)):
        model, schedule, scheduler_config = _load_sampling_model(args.model)
        options = scheduler_options(scheduler_config, args.method)
        device = distributed.default_device() if device is None else device
        model = model.to(device)
        sampler = Sampler(model, schedule, method=args.method, num_steps=args.steps, backend=args.backend, **options)
        # arange(seed, seed + N) would take an end past int64 for the last allowed SEED, 2**63 - N
        seeds = torch.arange(args.num_samples, dtype=torch.int64) + args.seed
        cfg = model.config
        with _non_finite_seeds() as non_finite:
            images = distributed.sample_sharded(sampler, seeds, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                                device, progress=distributed.rank() == 0, cuda_graph=args.cuda_graph)
        non_finite = [seed for found in distributed.gather(non_finite) for seed in found]  # every rank's
        if images is not None:
            png, npz = _save_samples(images, seeds.tolist(), Path(args.out), non_finite)
            _say(f"wrote {png} and {npz} ({args.num_samples} samples, {sampler.method} {sampler.num_steps} steps)")
    return 0


def cmd_evaluate(args) -> int:
    import torch
    from .data import to_unit_range
    from .sampler import Sampler
    from .train import load_model
    _set_threads(args.threads)
    model, schedule, config = load_model(args.checkpoint)
    train = config.get("train") or {}
    if "data" not in train:
        raise UsageError(f"{args.checkpoint!r}: its config.json does not name the data it was trained on")
    data, size = train["data"], model.config.sample_size
    real, held_out = _bound_images(data, size, config.get("dataset"))
    x0 = to_unit_range(real.data[:args.num_images])
    result = {"bound_images": f"{x0.shape[0]} {'held-out' if held_out else 'training'} images of {real.name}"}
    bound = _timed(lambda: _bpd(model, x0, schedule, config["prediction_type"], args.bpd_timesteps), result, "bpd")
    if data == "digits" and size == 16:  # the digit scorer reads 16x16 digits
        sampler = Sampler(model, schedule, method="ddim", num_steps=args.sample_steps,
                          prediction_type=config["prediction_type"])
        samples = sampler.sample(torch.arange(args.num_samples), progress=True)
        result.update(_digit_scores(samples))
    result.update(bound)
    print(json.dumps(result, indent=2))
    return 0


def _bound_images(data: str, size: int, recorded: dict | None):
    """(the images for evaluate's bound, whether held out): the held-out split where the data has one, else
    the training images, which must be those the run recorded (a relative path may name other data here)."""
    from .data import has_held_out_split, load_dataset
    if has_held_out_split(data):
        return load_dataset(data, size, split="test"), True
    real = load_dataset(data, size)
    found = {"name": real.name, "size": len(real), "shape": list(real.shape)}
    if recorded is not None and found != recorded:
        raise UsageError(f"the data at {data!r} ({found}) is not what the run was trained on ({recorded}); "
                         "evaluate from where that path names the training data")
    return real, False


def _bench_argv(args, name: str) -> list[str]:
    """Our bench options in the form each benchmark script takes them."""
    argv = [] if args.device is None else ["--device", args.device]
    if args.max_seconds is not None:
        argv += ["--max-seconds", str(args.max_seconds)]
    if args.record:
        argv.append("--record")
    if name == "table":
        argv += ["--no-compile"] if args.no_compile else []
        argv += ["--targets-only"] if args.quick else []
    else:
        argv += ["--quick"] if args.quick else []
    return argv


def cmd_bench(args) -> int:
    import importlib.util
    table = REPO_ROOT / "benchmarks" / "table.py"
    if not table.is_file():
        raise UsageError(f"the benchmarks are not installed with the package: run `{PROG} bench` from a checkout "
                         f"of the repository (looked for {table})")
    _set_threads(args.threads)
    if args.device is not None:
        _device(args.device)  # the scripts would fail on it with a traceback
    status = 0
    for name in ("table", "bench_sampling"):
        file = REPO_ROOT / "benchmarks" / f"{name}.py"
        if not file.is_file():
            print(f"\n({file.name} is not in this checkout: no {name.replace('bench_', '')} table)")
            continue
        # The scripts import their neighbours (harness.py): the folder is on the path while one runs, and only then.
        sys.path.insert(0, str(file.parent))
        try:
            spec = importlib.util.spec_from_file_location(f"_ddpm_fast_bench_{name}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not hasattr(module, "main"):
                print(f"\n({file.name} has no main(): skipped)")
                continue
            print(f"\n== {file.relative_to(REPO_ROOT)} ==", flush=True)
            status |= int(module.main(_bench_argv(args, name)) or 0)
        finally:
            sys.path.remove(str(file.parent))
    return status


def cmd_info(args) -> int:
    from . import build_info
    _set_threads(args.threads)  # checked as everywhere, though build_info runs no kernel
    print(json.dumps(build_info(), indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------- demo

def _say(message: str) -> None:
    from . import distributed
    if distributed.rank() == 0:  # one line per run, not one per torchrun rank
        print(message, flush=True)


def _timed(fn, timings: dict, name: str):
    start = time.perf_counter()
    value = fn()
    timings[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    return value


def _bpd(model, x0, schedule, prediction_type, timesteps):
    from .evaluate import variational_bound
    r = variational_bound(model, x0, schedule, prediction_type=prediction_type, num_timesteps=timesteps,
                          progress=True)
    return {"bpd": round(r["bpd"], 3), "prior_bpd": round(r["prior_bpd"], 5), "decoder_bpd": round(r["decoder_bpd"], 3),
            "strata": len(r["timesteps"])}


def _digit_scores(samples):
    from .evaluate import digit_scores
    s = digit_scores(samples)
    return {k: round(v, 4) for k, v in s.items()}


def _throughput(model, schedule, batch: int, steps: int) -> dict:
    """Images per second of DDIM sampling with the fused ops and with the reference backend everywhere."""
    import torch
    from .ops import use_backend
    from .sampler import Sampler
    seeds = torch.arange(batch, dtype=torch.int64)
    result = {}
    for name, backend in (("fused", None), ("reference", "torch")):
        with use_backend(backend) if backend else contextlib.nullcontext():
            sampler = Sampler(model, schedule, method="ddim", num_steps=steps, backend=backend)
            sampler.sample(seeds[:2])  # warm-up: first-call allocations and lazy initialisation
            start = time.perf_counter()
            sampler.sample(seeds)
            result[name] = batch / (time.perf_counter() - start)
    return result


def _clear_demo_folder(out: Path) -> None:
    """Empty the demo's checkpoints/ and log.jsonl, which a previous demo would otherwise resume or outlive.

    Only a demo's folder: demo.json (written first, rewritten with the summary at the end) marks it, so a
    training run's folder given as --out is refused, not wiped."""
    marker = out / "demo.json"
    held = [name for name in ("checkpoints", "log.jsonl") if (out / name).exists()]
    if held and not marker.is_file():
        raise UsageError(f"--out {str(out)!r} holds {' and '.join(held)} of a run that is not a demo's; the demo "
                         "replaces them, so give it another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is not a folder")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, {"status": "running"})


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a write that fails (a full disk) leaves the file as it was."""
    from .sampler import write_atomically
    write_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def cmd_demo(args) -> int:
    import torch
    from .data import load_digits
    from .sampler import Sampler
    from .train import TrainConfig, Trainer
    _set_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    _clear_demo_folder(out)
    _say(f"ddpm-fast demo: the tiny U-Net on scikit-learn's digits (8x8 -> 16x16), {torch.get_num_threads()} "
         f"CPU thread(s), training for {args.train_seconds:.0f} s")
    config = TrainConfig(data="digits", preset="tiny", batch_size=args.batch_size, steps=args.max_steps, lr=args.lr,
                         warmup_steps=100, min_snr_gamma=5.0, ema_decay=0.9999, ema_warmup=True,
                         checkpoint_every=args.max_steps,
                         seed=args.seed, num_samples=args.samples, sample_steps=args.sample_steps)
    trainer = Trainer(config, out, dataset=load_digits("train"), progress=True)
    timings: dict = {}
    losses = _timed(lambda: trainer.train(time_limit=args.train_seconds), timings, "train")
    _say(f"trained {trainer.step} steps ({trainer.step * args.batch_size / len(trainer.dataset):.1f} epochs) in "
         f"{timings['train_seconds']} s, final loss {sum(losses[-50:]) / len(losses[-50:]):.4f} (mean of the last 50); "
         f"checkpoint {out / 'checkpoints' / f'step_{trainer.step:08d}'}")

    model = trainer.ema_model()
    sampler = Sampler(model, trainer.schedule, method="ddim", num_steps=args.sample_steps)
    seeds = list(range(args.samples))
    with _non_finite_seeds() as non_finite:
        samples = _timed(lambda: sampler.sample(seeds, (1, 16, 16), progress=True), timings, "sample")
    png, npz = _save_samples(samples, seeds, out / "samples.png", non_finite)
    _say(f"{args.samples} samples (fused DDIM, {args.sample_steps} steps) in {timings['sample_seconds']} s -> {png}")

    scores = _timed(lambda: _digit_scores(samples), timings, "score")
    real = _digit_scores(load_digits("train").images[:args.samples])
    _say(f"digit scores of the samples: confidence {scores['confidence']:.3f}, Fréchet distance "
         f"{scores['frechet']:.1f}, {100 * scores['digit_fraction']:.0f}% read as digits "
         f"(real training digits score {real['confidence']:.3f} and {real['frechet']:.1f}; pure noise ~0 and ~1000)")
    held_out = load_digits("test").images[:args.bpd_images]
    bound = _timed(lambda: _bpd(model, held_out, trainer.schedule, "epsilon", args.bpd_timesteps), timings, "bpd")
    _say(f"variational bound on {held_out.shape[0]} held-out digits: {bound['bpd']:.3f} bits/dim (L_T "
         f"{bound['prior_bpd']:.5f}, L_0 {bound['decoder_bpd']:.3f}; {bound['strata']} log-spaced strata of t)")
    speed = _timed(lambda: _throughput(model, trainer.schedule, args.bench_batch, args.bench_steps), timings, "bench")
    _say(f"sampling throughput, {args.bench_batch} images x {args.bench_steps} DDIM steps: fused "
         f"{speed['fused']:.1f} images/s, reference backend {speed['reference']:.1f} images/s "
         f"({speed['fused'] / speed['reference']:.2f}x)")
    summary = {"steps": trainer.step, "loss": losses[-1] if losses else None, **scores, **bound,
               "fused_images_per_s": round(speed["fused"], 2), "reference_images_per_s": round(speed["reference"], 2),
               "threads": torch.get_num_threads(), **timings,
               "total_seconds": round(time.perf_counter() - start, 1), "grid": str(png)}
    _write_json(out / "demo.json", summary)
    _say(f"done in {summary['total_seconds']:.0f} s; summary in {out / 'demo.json'}")
    return 0


# --------------------------------------------------------------------------------------------- parser

def _default_threads() -> int:
    # The demo's default: see README ("The demo"): two threads measured fastest on a 2-core machine.
    return min(2, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train, sample, evaluate and benchmark DDPMs on the fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,sample,evaluate,bench,info}",
                                parser_class=_Parser)

    def add(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        return p

    demo = add("demo", "Train the tiny U-Net on the bundled digits for a few minutes, sample, score, time.")
    demo.add_argument("--out", default="runs/demo",
                      help="output folder (a previous demo's checkpoints/ is replaced; another run's is refused)")
    demo.add_argument("--train-seconds", type=_positive(float, finite=True), default=300.0,
                      help="training time budget")
    demo.add_argument("--max-steps", type=_positive(int), default=20_000, help="training step cap")
    demo.add_argument("--batch-size", type=_positive(int), default=32)
    demo.add_argument("--lr", type=_positive(float), default=1e-3)
    demo.add_argument("--samples", type=_positive(int, least=2), default=256, help="images to sample and score")
    demo.add_argument("--sample-steps", type=_positive(int), default=30, help="DDIM steps")
    demo.add_argument("--bpd-timesteps", type=_positive(int), default=30,
                      help="strata of the variational-bound estimate (999: the exact sum)")
    demo.add_argument("--bpd-images", type=_positive(int), default=100, help="held-out digits for the bound")
    demo.add_argument("--bench-batch", type=_positive(int), default=32, help="batch of the throughput comparison")
    demo.add_argument("--bench-steps", type=_positive(int), default=20, help="DDIM steps of the throughput comparison")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo, threads=_default_threads())

    train = add("train", "Train a U-Net (resumes from OUT's latest checkpoint). Under torchrun: DDP over all ranks.")
    train.add_argument("--data", default="digits", help="'digits', an image folder or a CIFAR-10 python directory")
    train.add_argument("--out", required=True, help="run folder: checkpoints/, samples/, log.jsonl")
    train.add_argument("--image-size", type=_positive(int), default=None,
                       help="resize images (default: digits 16, CIFAR-10 32, an image folder the preset's size)")
    train.add_argument("--preset", default="tiny", help="U-Net preset: tiny, cifar10, celebahq256, lsun256")
    train.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "sample", "v_prediction"))
    train.add_argument("--min-snr-gamma", type=_positive(float), default=None, help="min-SNR weighting, e.g. 5")
    train.add_argument("--timesteps", type=_positive(int), default=1000, help="diffusion steps T")
    train.add_argument("--beta-schedule", default="linear",
                       choices=("linear", "scaled_linear", "cosine", "sigmoid", "laplace"))
    train.add_argument("--batch-size", type=_positive(int), default=64, help="global batch (split across ranks)")
    train.add_argument("--steps", type=_positive(int), default=10_000)
    train.add_argument("--time-limit", type=_positive(float, finite=True), default=None,
                       help="stop after this many seconds")
    train.add_argument("--lr", type=_positive(float), default=2e-4)
    train.add_argument("--warmup-steps", type=int, default=500)
    train.add_argument("--grad-clip", type=_positive(float), default=1.0)
    train.add_argument("--ema-decay", type=float, default=0.9999)
    train.add_argument("--no-ema-warmup", action="store_true", help="use --ema-decay from the first step")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips (default: off for digits, on for image folders and CIFAR-10)")
    train.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"), help="auto: bf16 on CUDA")
    train.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the rank's GPU, else CPU)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=_positive(int), default=1000)
    train.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    train.add_argument("--num-samples", type=_positive(int), default=64)
    train.add_argument("--sample-steps", type=_positive(int), default=50)
    train.add_argument("--no-resume", action="store_true",
                       help="start from scratch; OUT must hold no checkpoints (an earlier run's are never deleted)")
    train.set_defaults(func=cmd_train)

    sample = add("sample", "Sample a trained model (our checkpoint or a diffusers UNet2DModel folder) to PNG + .npz.")
    sample.add_argument("model", help="a checkpoint, a run folder (its latest checkpoint) or a diffusers folder")
    sample.add_argument("--out", default="samples.png", help="the PNG grid; the images go next to it as .npz")
    sample.add_argument("--num-samples", type=_positive(int), default=64, help="number of images")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    sample.add_argument("--method", default="ddim", choices=("ddim", "ddpm"))
    sample.add_argument("--steps", type=_positive(int), default=50, help="sampling steps")
    sample.add_argument("--backend", default=None, choices=("cuda", "triton", "cpu", "torch"),
                        help="the step op's backend (default: by device)")
    sample.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the rank's GPU, else CPU)")
    sample.add_argument("--cuda-graph", action="store_true", help="replay one captured model + step per step (CUDA)")
    sample.set_defaults(func=cmd_sample)

    evaluate = add("evaluate", "Bits/dim (variational bound) of a checkpoint; digit scores for digit models.")
    evaluate.add_argument("checkpoint", help="a checkpoint or run folder")
    evaluate.add_argument("--num-images", type=_positive(int), default=300,
                          help="images for the bound: held out (digits, CIFAR-10's test_batch), else the training "
                               "images (an image folder)")
    evaluate.add_argument("--bpd-timesteps", type=_positive(int), default=100, help="999: the exact sum")
    evaluate.add_argument("--num-samples", type=_positive(int, least=2), default=256, help="samples to score (digits)")
    evaluate.add_argument("--sample-steps", type=_positive(int), default=50)
    evaluate.set_defaults(func=cmd_evaluate)

    bench = add("bench", "The op table (benchmarks/table.py) and the sampling + training table "
                         "(benchmarks/bench_sampling.py) on this machine; needs a checkout of the repository.")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--quick", action="store_true", help="only the target shapes / the short sampling runs")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines of the op table")
    bench.add_argument("--max-seconds", type=_positive(float, finite=True), default=None,
                       help="per table: no new case after this")
    bench.add_argument("--record", action="store_true", help="write JSON records under benchmarks/results/")
    bench.set_defaults(func=cmd_bench)

    info = add("info", "Print ddpm_fast.build_info(): the compiled backends, CUDA architectures, versions.")
    info.set_defaults(func=cmd_info)
    return parser


# Commands that run torch's CPU kernels for minutes: worth a restart with sleeping OpenMP threads.
_HEAVY = ("demo", "train", "sample", "evaluate")


def _restart_with_passive_openmp(argv: list[str]) -> None:
    """Re-run this command with OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    libgomp reads the policy once, when torch loads, so it cannot be changed in-process. With the
    default (spinning) policy, a training step of the tiny U-Net took 12 s instead of 0.6 s on a 2-core
    machine shared with other work (README, "The demo"); sleeping threads cost ~nothing when idle.
    """
    if "OMP_WAIT_POLICY" in os.environ or not argv or argv[0] not in _HEAVY:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "ddpm_fast", *argv])


def main(argv=None) -> int:
    """The console script. ``argv`` None: the process's own arguments (and the OpenMP restart above)."""
    if argv is None:
        argv = sys.argv[1:]
        _restart_with_passive_openmp(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        if os.environ.get("DDPM_FAST_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
