"""The ddpm-fast command line: --help everywhere, one-line errors (exit 2), train -> sample, bench dispatch, demo."""

import dataclasses
import functools
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image as PIL

import ddpm_fast.sampler
from ddpm_fast import cli

SUBCOMMANDS = ("demo", "train", "sample", "evaluate", "bench", "info")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ddpm-fast " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--out", "x", "--batch-size", "0"], ["--batch-size", "must be > 0"]),
    (["train", "--out", "x", "--prediction-type", "noise"], ["--prediction-type", "invalid choice"]),
    (["sample", "m", "--num-samples", "two"], ["--num-samples", "expected an integer"]),
    (["frobnicate"], ["invalid choice"]),
    (["train"], ["--out"]),
    (["train", "--out", "x", "--time-limit", "nan"], ["--time-limit", "must be > 0 and finite, got 'nan'"]),
])
def test_bad_arguments_are_one_line(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    _one_line_error(capsys, *fragments)


def test_bad_files_are_one_line(tmp_path, capsys):
    assert cli.main(["sample", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, f"model {str(tmp_path / 'missing')!r} does not exist")
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, "dataset", "does not exist")
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "holds no images")
    assert cli.main(["sample", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "holds no complete checkpoint")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert cli.main(["sample", str(bad)]) == 2
    _one_line_error(capsys, "unreadable")


def test_error_from_a_real_process_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    assert run.returncode == 2
    expected = f"ddpm-fast sample: error: model {str(tmp_path / 'nope')!r} does not exist"
    assert run.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize("error, said", [
    (RuntimeError("a message\n   over  lines"), "a message over lines"),
    (ImportError("No module named 'triton'"), "No module named 'triton'"),
    (OSError(), "OSError"),  # no message: its type
])
def test_errors_are_one_line_unless_debugging(error, said, monkeypatch, capsys):
    """What a command raises of the kinds a bad input gives is one line, its whitespace folded; DDPM_FAST_DEBUG=1
    lets the traceback through."""
    def fail(args):
        raise error
    monkeypatch.setattr(cli, "cmd_info", fail)
    monkeypatch.delenv("DDPM_FAST_DEBUG", raising=False)
    assert cli.main(["info"]) == 2
    assert _one_line_error(capsys) == f"ddpm-fast info: error: {said}"
    monkeypatch.setenv("DDPM_FAST_DEBUG", "1")
    with pytest.raises(type(error)):
        cli.main(["info"])


@pytest.mark.parametrize("argv, policy", [([command], None) for command in SUBCOMMANDS] + [([], None),
                                                                                           (["train"], "ACTIVE")])
def test_heavy_commands_restart_with_sleeping_openmp_threads(argv, policy, monkeypatch):
    """libgomp reads OMP_WAIT_POLICY when torch loads: the commands that run torch's kernels for minutes re-run
    themselves with PASSIVE, unless the user chose a policy; the others are not worth a restart."""
    restarts = argv[:1] in (["demo"], ["train"], ["sample"], ["evaluate"]) and policy is None
    execs = []
    monkeypatch.setattr(os, "execv", lambda path, args: execs.append((path, args)))
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    cli._restart_with_passive_openmp(argv)
    assert execs == ([(sys.executable, [sys.executable, "-m", "ddpm_fast", *argv])] if restarts else [])
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if restarts else policy)


def test_train_device(tmp_path, monkeypatch, capsys):
    """train --device: the Trainer gets it ("cuda" alone: each rank's GPU); one GPU for every rank under torchrun
    is refused; a machine without CUDA says so before any work. Data kept off the device is noted."""
    import ddpm_fast.train
    devices = []
    init = ddpm_fast.train.Trainer.__init__
    monkeypatch.setattr(ddpm_fast.train.Trainer, "__init__",
                        lambda self, *a, **kw: devices.append(kw.get("device")) or init(self, *a, **kw))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                     "--device", "cpu"]) == 0
    assert devices == [torch.device("cpu")]
    monkeypatch.setattr(ddpm_fast.train, "_holds_data", lambda device, data: False)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "run2"), "--steps", "1", "--batch-size", "4",
                     "--device", "cpu"]) == 0
    assert "note: the data (0.0 GiB) stays in host memory, as it takes more than a quarter of cpu's free memory: " \
           "each step copies its batch" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(cli.UsageError, match="--device cuda: this machine has no CUDA device"):
        cli._train_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli._train_device("cuda") is None and cli._train_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(cli.UsageError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        cli._train_device("cuda:2")  # indices count from 0
    # The process group's backend: gloo for the CPU (on a GPU machine torch's default would be nccl).
    assert cli._group_backend(torch.device("cpu")) == "gloo"
    assert cli._group_backend(torch.device("cuda", 1)) is None and cli._group_backend(None) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cli.UsageError, match="under torchrun every rank would train on that one GPU"):
        cli._train_device("cuda:1")


def test_samples_on_a_gpu_are_saved(tmp_path):
    """Images that a GPU sampled (a CUDA tensor: numpy() refuses it) are written as the CPU's are."""
    class OnDevice(torch.Tensor):
        def numpy(self, *args, **kwargs):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")

        def cpu(self, *args, **kwargs):
            return torch.Tensor(self.as_subclass(torch.Tensor))
    images = (torch.rand(2, 1, 4, 4) * 2 - 1).as_subclass(OnDevice)
    png, npz = cli._save_samples(images, [3, 4], tmp_path / "g.png")
    with np.load(npz) as saved:
        assert np.array_equal(saved["images"], images.as_subclass(torch.Tensor).numpy())


def test_train_then_sample(tmp_path, capsys):
    from ddpm_fast.train import TrainConfig, load_model
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1"]) == 0
    assert cli.main(["train", "--out", str(run), "--steps", "3", "--batch-size", "4"]) == 0
    said = capsys.readouterr().out
    assert f"resumed from step 2 ({run}); changed since: steps 2 -> 3, checkpoint_every 1 -> 1000\n" in said
    # The command line's defaults are TrainConfig's.
    assert load_model(run)[2]["train"] == dataclasses.asdict(TrainConfig(steps=3, batch_size=4))
    out = tmp_path / "new" / "grid.png"  # its folder made on the way
    assert cli.main(["sample", str(run), "--num-samples", "3", "--steps", "2", "--out", str(out), "--seed", "5"]) == 0
    with np.load(out.with_suffix(".npz")) as npz:
        assert npz["images"].shape == (3, 1, 16, 16) and npz["seeds"].tolist() == [5, 6, 7]
    assert out.read_bytes().startswith(b"\x89PNG")
    for seed in (-2**63, 2**63 - 2):  # the ends of the int64 range: seeds SEED and SEED + 1
        assert cli.main(["sample", str(run), "--num-samples", "2", "--steps", "1", "--out", str(out),
                         "--seed", str(seed)]) == 0
        with np.load(out.with_suffix(".npz")) as npz:
            assert npz["seeds"].dtype == np.int64 and npz["seeds"].tolist() == [seed, seed + 1]
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--num-images", "4", "--bpd-timesteps", "2", "--num-samples", "4",
                     "--sample-steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpd"] > 0 and 0 <= result["confidence"] <= 1 and result["frechet"] >= 0


def _record_samplers(monkeypatch):
    """The keyword arguments of every Sampler built from here on, with its schedule under "schedule"."""
    built = []
    init = ddpm_fast.sampler.Sampler.__init__

    def record(self, model, schedule, **kw):
        built.append({"schedule": schedule, **kw})
        init(self, model, schedule, **kw)
    monkeypatch.setattr(ddpm_fast.sampler.Sampler, "__init__", record)
    return built


def test_train_options_reach_the_run_and_the_samplers(tmp_path, monkeypatch, capsys):
    """Each train option lands in the run's config (read back from its checkpoint); sample and evaluate build
    their samplers with the run's prediction type and their own steps, backend and sample count."""
    from ddpm_fast.evaluate import digit_scores
    from ddpm_fast.train import TrainConfig, load_model
    rng = np.random.default_rng()
    expected = TrainConfig(
        image_size=16, prediction_type=str(rng.choice(["sample", "v_prediction"])),
        min_snr_gamma=float(rng.uniform(1, 9)), num_train_timesteps=int(rng.integers(100, 1000)),
        beta_schedule=str(rng.choice(["scaled_linear", "cosine", "sigmoid", "laplace"])), batch_size=4, steps=1,
        lr=float(rng.uniform(1e-4, 1e-3)), warmup_steps=int(rng.integers(1, 1000)),
        grad_clip=float(rng.uniform(0.1, 5)), ema_decay=float(rng.uniform(0.9, 0.999)), ema_warmup=False, flip=True,
        amp="none",
        seed=int(rng.integers(1, 2**62)), checkpoint_every=int(rng.integers(2, 1000)), sample_every=1, num_samples=2,
        sample_steps=2)
    flags = {"image-size": "image_size", "prediction-type": "prediction_type", "min-snr-gamma": "min_snr_gamma",
             "timesteps": "num_train_timesteps", "beta-schedule": "beta_schedule", "batch-size": "batch_size",
             "steps": "steps", "lr": "lr", "warmup-steps": "warmup_steps", "grad-clip": "grad_clip",
             "ema-decay": "ema_decay", "amp": "amp", "seed": "seed", "checkpoint-every": "checkpoint_every",
             "sample-every": "sample_every", "num-samples": "num_samples", "sample-steps": "sample_steps"}
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--no-ema-warmup", "--flip",
                     *[a for flag, field in flags.items() for a in (f"--{flag}", str(getattr(expected, field)))]]) == 0
    assert load_model(run)[2]["train"] == dataclasses.asdict(expected)

    built, scored = _record_samplers(monkeypatch), []
    monkeypatch.setattr(ddpm_fast.evaluate, "digit_scores", lambda samples: scored.append(len(samples)) or
                        digit_scores(samples))
    # On a GPU the torch backend cannot be captured either: --cuda-graph falls back, with a warning, everywhere.
    with pytest.warns(RuntimeWarning, match="cuda_graph=True needs"):
        assert cli.main(["sample", str(run), "--num-samples", "2", "--steps", "3", "--backend", "torch",
                         "--cuda-graph", "--out", str(tmp_path / "g.png")]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--num-images", "2", "--bpd-timesteps", "4", "--num-samples", "3",
                     "--sample-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["strata"] == 4 and scored == [3]
    wanted = [{"num_steps": 3, "backend": "torch"}, {"num_steps": 2}]  # sample's, then evaluate's
    assert len(built) == 2 and all(b.items() >= {**w, "prediction_type": expected.prediction_type}.items()
                                   for b, w in zip(built, wanted)), built


def test_sample_a_diffusers_folder(tmp_path, monkeypatch, capsys):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  down_block_types=("DownBlock2D", "DownBlock2D"), layers_per_block=1,
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    model.save_pretrained(tmp_path / "unet")
    scheduler = dict(num_train_timesteps=100, variance_type="fixed_large", clip_sample=False,
                     timestep_spacing="trailing", prediction_type="v_prediction")
    diffusers.DDPMScheduler(**scheduler).save_pretrained(tmp_path / "scheduler")
    # The JSON files are UTF-8 whatever the locale's encoding (ASCII here, as under LANG=C without UTF-8 mode;
    # cp1252 on Windows): non-ASCII text in them loads.
    for config in (tmp_path / "unet" / "config.json", tmp_path / "scheduler" / "scheduler_config.json"):
        saved = json.loads(config.read_text(encoding="utf-8"))
        config.write_text(json.dumps({**saved, "_name_or_path": "modèle ünet"}, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(pathlib.Path, "read_text", functools.partialmethod(pathlib.Path.read_text, encoding="ascii"))
    built = _record_samplers(monkeypatch)  # the options each sampler was built with: every one the config holds
    for method in ("ddpm", "ddim"):
        out = tmp_path / f"{method}.png"
        assert cli.main(["sample", str(tmp_path), "--num-samples", "2", "--steps", "2", "--out", str(out),
                         "--method", method]) == 0
        with np.load(out.with_suffix(".npz")) as npz:
            assert npz["images"].shape == (2, 1, 8, 8)
    common = dict(timestep_spacing="trailing", clip_range=None, prediction_type="v_prediction")
    assert built[0].items() >= {**common, "variance_type": "fixed_large"}.items()
    assert built[1].items() >= common.items() and "variance_type" not in built[1]
    assert [b["schedule"].num_train_timesteps for b in built] == [100, 100]  # the schedule is the config's too

    # The unet/ folder itself: its pipeline's scheduler when the folder above is a pipeline's (model_index.json),
    # never an unrelated scheduler/ that happens to sit beside it; else a scheduler_config.json of its own.
    diffusers.DDPMScheduler(**{**scheduler, "prediction_type": "sample"}).save_pretrained(tmp_path / "unet")
    for pipeline in (True, False):
        (tmp_path / "model_index.json").unlink(missing_ok=True)
        if pipeline:
            (tmp_path / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
        built.clear()
        assert cli.main(["sample", str(tmp_path / "unet"), "--num-samples", "1", "--steps", "2",
                         "--out", str(tmp_path / "u.png")]) == 0
        assert built[0].get("prediction_type") == ("v_prediction" if pipeline else "sample"), built
    own = tmp_path / "unet" / "scheduler_config.json"
    own.write_text("{not json")
    capsys.readouterr()
    assert cli.main(["sample", str(tmp_path / "unet"), "--out", str(tmp_path / "u.png")]) == 2
    _one_line_error(capsys, f"unreadable {str(own)!r}")


def test_bench_dispatches_to_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert cli.main(["bench"]) == 2
    _one_line_error(capsys, "benchmarks are not installed")
    (tmp_path / "benchmarks").mkdir()
    # A table that fails: its exit status is the command's, whatever the other table returns.
    (tmp_path / "benchmarks" / "table.py").write_text("def main(argv):\n    print('TABLE', argv)\n    return 3\n")
    assert cli.main(["bench", "--no-compile", "--quick", "--device", "cpu"]) == 3
    out = capsys.readouterr().out
    assert "TABLE ['--device', 'cpu', '--no-compile', '--targets-only']" in out
    assert "bench_sampling.py is not in this checkout" in out
    assert cli.main(["bench", "--threads", "0"]) == 2  # checked before any table runs
    _one_line_error(capsys, "--threads must be >= 1, got 0")
    (tmp_path / "benchmarks" / "bench_sampling.py").write_text("TABLE = 'no main() here'\n")
    assert cli.main(["bench"]) == 3
    assert "(bench_sampling.py has no main(): skipped)" in capsys.readouterr().out
    (tmp_path / "benchmarks" / "bench_sampling.py").write_text("def main(argv):\n    print('SAMPLING', argv)\n")
    seconds = str(float(np.random.default_rng().uniform(1, 100)))
    assert cli.main(["bench", "--quick", "--record", "--max-seconds", seconds]) == 3
    assert f"SAMPLING ['--max-seconds', '{seconds}', '--record', '--quick']" in capsys.readouterr().out
    # The folder left the import path with the script: a later `import bench_sampling` is the real one.
    assert str(tmp_path / "benchmarks") not in sys.path


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backends" in json.loads(capsys.readouterr().out)
    assert cli.main(["info", "--threads", "2"]) == 0 and torch.get_num_threads() == 2  # one_thread restores it
    capsys.readouterr()
    assert cli.main(["info", "--threads", "0"]) == 2
    _one_line_error(capsys, "--threads must be >= 1, got 0")


def test_bench_names_a_device_it_cannot_use(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    _one_line_error(capsys, "--device cuda: this machine has no CUDA device")


def test_a_source_checkout_without_its_extension_says_so(tmp_path):
    """Run from a checkout's folder, its ddpm_fast/ (no compiled _C) shadows the installed one: build_info says
    that, not Python's "partially initialized module ... circular import"."""
    import shutil
    shutil.copytree(os.path.dirname(ddpm_fast.__file__), tmp_path / "ddpm_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = ("import sys\n"  # only the standard finders (classes): an editable install's would find the build
            "sys.meta_path = [f for f in sys.meta_path if isinstance(f, type)]\n"
            "import ddpm_fast\n"
            "assert ddpm_fast.__file__.startswith(sys.argv[1]), ddpm_fast.__file__\n"
            "print(ddpm_fast.build_info()['backends']['cpu'])\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert f"ddpm_fast was imported from {tmp_path / 'ddpm_fast'}, which holds no compiled _C" in out
    assert "circular" not in out


def test_demo_end_to_end_small(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    built = _record_samplers(monkeypatch)
    assert cli.main(["demo", "--out", str(out), "--train-seconds", "30", "--max-steps", "2", "--batch-size", "8",
                     "--samples", "4", "--sample-steps", "2", "--bpd-timesteps", "2", "--bpd-images", "3",
                     "--bench-batch", "2", "--bench-steps", "2",
                     "--threads", "1"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    for key in ("confidence", "frechet", "bpd", "fused_images_per_s", "reference_images_per_s", "grid"):
        assert key in summary
    assert summary["steps"] <= 2 and os.path.exists(summary["grid"])
    said = capsys.readouterr().out
    assert "sampling throughput" in said and "variational bound on 3 held-out digits" in said
    logged = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["loss"] == logged[-1]  # the last step's
    # The samples, then the throughput's fused run and its reference run (the torch backend everywhere).
    assert [b.get("backend") for b in built] == [None, None, "torch"]


def test_demo_json_is_written_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """demo.json is written atomically: a write that fails after its bytes went out (a full disk) keeps what the
    file held (here a finished demo's summary) and leaves no temporary file; the demo stops with a one-line error."""
    import errno
    demo = tmp_path / "demo"
    demo.mkdir()
    summary = {"steps": int(torch.randint(1, 10**6, ())), "bpd": float(torch.rand(()))}
    (demo / "demo.json").write_text(json.dumps(summary, indent=2))

    def full_disk(fd):
        assert os.path.getsize(os.readlink(f"/proc/self/fd/{fd}")) > 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_disk)
    small = ["--train-seconds", "5", "--max-steps", "1", "--batch-size", "4", "--samples", "2", "--sample-steps", "1",
             "--bpd-timesteps", "2", "--bpd-images", "2", "--bench-batch", "1", "--bench-steps", "1", "--threads", "1"]
    assert cli.main(["demo", "--out", str(demo), *small]) == 2
    _one_line_error(capsys, os.strerror(errno.ENOSPC))
    assert json.loads((demo / "demo.json").read_text()) == summary
    assert [p.name for p in demo.iterdir()] == ["demo.json"]


def test_demo_replaces_only_a_demo_s_checkpoints(tmp_path, capsys):
    """A training run's folder given to the demo is refused, its checkpoints and log kept; a demo's own
    (demo.json marks it, from the start: an interrupted demo too) is cleared."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 10}\n')
    assert cli.main(["demo", "--out", str(run)]) == 2
    _one_line_error(capsys, "holds checkpoints and log.jsonl of a run that is not a demo's")
    assert (run / "checkpoints" / "step_00000010").is_dir() and (run / "log.jsonl").read_text() == '{"step": 10}\n'
    demo = tmp_path / "demo"
    cli._clear_demo_folder(demo)  # as a demo starts: the marker first
    assert json.loads((demo / "demo.json").read_text()) == {"status": "running"}
    (demo / "checkpoints" / "step_00000010").mkdir(parents=True)
    (demo / "log.jsonl").write_text("{}\n")
    cli._clear_demo_folder(demo)
    assert not (demo / "checkpoints").exists() and not (demo / "log.jsonl").exists()
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "file")]) == 2
    _one_line_error(capsys, f"--out {str(tmp_path / 'file')!r} is not a folder")


def test_output_folders_are_checked_up_front_and_made_only_for_work_that_runs(tmp_path, capsys):
    out = tmp_path / "new" / "deep" / "g.png"
    assert cli.main(["sample", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    _one_line_error(capsys, "does not exist")
    assert not (tmp_path / "new").exists()  # a failed load leaves no folders behind
    (tmp_path / "file").write_text("x")
    for flag_out in (tmp_path / "file", tmp_path / "file" / "run"):  # not a folder: before the data is read
        assert cli.main(["train", "--data", str(tmp_path / "no-data"), "--out", str(flag_out)]) == 2
        _one_line_error(capsys, f"--out {str(flag_out)!r}: cannot make the run folder")
    assert cli.main(["sample", str(tmp_path / "no-model"), "--out", str(tmp_path / "file" / "g.png")]) == 2
    _one_line_error(capsys, f"--out: {str(tmp_path / 'file')!r} is not a folder")


def test_sample_output_and_device_are_checked_before_sampling(tmp_path, capsys, monkeypatch):
    """--out must be a writable .png (an .npz --out was overwritten by its own images' .npz, losing the PNG),
    --device must exist (torch's error is an assert), the seeds int64: all before any model is read."""
    monkeypatch.setattr(cli, "_load_sampling_model", lambda path: pytest.fail("checked too late"))
    for out, fragment in (("x.npz", "must end in .png"), ("x", "must end in .png")):
        assert cli.main(["sample", "m", "--out", str(tmp_path / out)]) == 2
        _one_line_error(capsys, "--out", fragment)
    for folder in ("dir.png", "npz.npz"):  # the grid's name, or its .npz's
        (tmp_path / folder).mkdir()
        assert cli.main(["sample", "m", "--out", str(tmp_path / folder.replace(".npz", ".png"))]) == 2
        _one_line_error(capsys, f"--out: {str(tmp_path / folder)!r} is a directory")
    with monkeypatch.context() as patch:  # root may write anywhere: a folder this user may not
        patch.setattr(os, "access", lambda path, mode: False)
        assert cli.main(["sample", "m", "--out", str(tmp_path / "g.png")]) == 2
        _one_line_error(capsys, f"--out: cannot write into {str(tmp_path)!r}")
    (tmp_path / "old.PNG").write_bytes(b"an earlier grid")
    cli._check_output(tmp_path / "old.PNG")  # overwritten, whatever the suffix's case
    assert cli.main(["sample", "m", "--out", str(tmp_path / "g.png"), "--seed", str(2**63 - 2),
                     "--num-samples", "3"]) == 2
    _one_line_error(capsys, "--seed", "int64")
    assert cli.main(["sample", "m", "--out", str(tmp_path / "g.png"), "--device", "nowhere"]) == 2
    _one_line_error(capsys, "--device: ", "nowhere")
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        assert cli.main(["sample", "m", "--out", str(tmp_path / "g.png"), "--device", "cuda"]) == 2
        _one_line_error(capsys, "--device cuda: this machine has no CUDA device")
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(tmp_path / "t"), "--time-limit", "inf"])
    _one_line_error(capsys, "--time-limit", "must be > 0 and finite")
    assert cli.build_parser().parse_args(["train", "--out", "t", "--grad-clip", "inf"]).grad_clip == float("inf")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--samples", "1"])
    _one_line_error(capsys, "--samples", "must be >= 2")
    with monkeypatch.context() as patch:
        patch.setattr(os, "cpu_count", lambda: 64)
        parsed = cli.build_parser().parse_args(["demo", "--samples", "2"])
    assert parsed.samples == 2 and parsed.threads == 2  # the least allowed; two threads at most by default
    assert cli.build_parser().parse_args(["sample", "m"]).steps == 50  # as its --help says (and the training grids)


def test_missing_cuda_device_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cli.UsageError, match="--device cuda:1: this machine has no CUDA device"):
        cli._device("cuda:1")
    assert cli._device("cpu") == torch.device("cpu")


def test_samples_with_nan_are_written_with_a_warning(tmp_path, capsys):
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    images[1, 0, 2, 3] = float("nan")
    cli._save_samples(images, [0, 1, 2], tmp_path / "g.png")
    assert capsys.readouterr().err == ("ddpm-fast: warning: 1 of 3 samples hold NaN or inf values (seeds 1; a diverged "
                                       "model?)\n")
    with np.load(tmp_path / "g.npz") as npz:
        assert np.isnan(npz["images"][1, 0, 2, 3]) and np.isfinite(npz["images"][[0, 2]]).all()


def test_sample_says_once_which_seeds_gave_nan(tmp_path, capsys):
    """A diverged model's samples: one warning line from the command, naming the seeds (the Sampler's own warning
    would repeat it; pytest turns a warning into an error here, so it must not reach the caller)."""
    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "1", "--batch-size", "4"]) == 0
    ema = next((run / "checkpoints").iterdir()) / "ema.safetensors"
    weights = load_file(ema)
    weights["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, ema)
    capsys.readouterr()
    assert cli.main(["sample", str(run), "--num-samples", "3", "--seed", "5", "--steps", "2",
                     "--out", str(tmp_path / "g.png")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "NaN" in line]
    assert warned == ["ddpm-fast: warning: 3 of 3 samples hold NaN or inf values (seeds 5, 6, 7; a diverged model?)"]


def test_infinite_samples_are_named_though_clamping_hides_them(tmp_path, capsys):
    """An image that ends +inf is clamped to 1.0 (no NaN left to see): the Sampler's finding still reaches the
    command's one warning; other warnings pass on."""
    from ddpm_fast import NoiseSchedule, Sampler
    # One float16 step from t = 999 (ac ~ 4e-5) without clipping: x0 ~ -1e7 overflows to -inf, and no NaN.
    sampler = Sampler(lambda x, t: torch.full_like(x, 60000.0), NoiseSchedule(1000), num_steps=1,
                      timestep_spacing="trailing", clip_range=None)
    with pytest.warns(UserWarning, match="another warning"), cli._non_finite_seeds() as non_finite:
        images = sampler.sample([4, 5, 6], (1, 4, 4), dtype=torch.float16)
        warnings.warn("another warning", UserWarning)
    assert non_finite == [4, 5, 6] and bool(images.isfinite().all())
    cli._save_samples(images, [4, 5, 6], tmp_path / "g.png", non_finite)
    assert "3 of 3 samples hold NaN or inf values (seeds 4, 5, 6;" in capsys.readouterr().err


def test_a_failed_write_keeps_the_previous_samples(tmp_path, monkeypatch):
    """Both outputs are written atomically: a failure writing the .npz leaves the earlier one whole."""
    images, out = torch.rand(2, 1, 4, 4) * 2 - 1, tmp_path / "g.png"
    cli._save_samples(images, [0, 1], out)
    before = out.with_suffix(".npz").read_bytes()
    real_replace = os.replace

    def fail_for_npz(src, dst):
        if str(dst).endswith(".npz"):
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", fail_for_npz)
    with pytest.raises(OSError, match="disk full"):
        cli._save_samples(-images, [5, 6], out)
    assert out.with_suffix(".npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz", "g.png"]  # no temporary file left


@pytest.fixture
def ctrl_c_raises():
    """SIGINT as an interactive Python has it: a test run started in the background of a script (`pytest &`)
    inherits SIGINT ignored, which train keeps (test_train_started_with_ctrl_c_ignored_keeps_ignoring_it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupting(monkeypatch, at: int, signals: int = 1):
    """Trainer steps that send ``signals`` SIGINTs to this process right after step ``at``."""
    from ddpm_fast.train import Trainer
    step = Trainer._queue_step

    def interrupted_step(self):
        loss = step(self)
        if self.step == at:
            for _ in range(signals):
                signal.raise_signal(signal.SIGINT)  # the handler runs here, between bytecodes: mid-loop
        return loss
    monkeypatch.setattr(Trainer, "_queue_step", interrupted_step)


def test_ctrl_c_saves_the_step_it_ends_and_a_second_stops_at_once(tmp_path, capsys, monkeypatch, ctrl_c_raises):
    """The first SIGINT (Ctrl-C) lets the step finish, saves it and exits 130; resuming continues exactly as
    the uninterrupted run; a second SIGINT raises at once, as before (nothing saved)."""
    from ddpm_fast.train import latest_checkpoint, load_model
    run, whole = tmp_path / "run", tmp_path / "whole"
    argv = ["--steps", "5", "--batch-size", "4", "--checkpoint-every", "1000"]
    assert cli.main(["train", "--out", str(whole), *argv]) == 0
    interrupt_at = int(torch.randint(1, 4, ()))
    with monkeypatch.context() as patch:
        _interrupting(patch, interrupt_at)
        capsys.readouterr()
        assert cli.main(["train", "--out", str(run), *argv]) == 130
    assert f"interrupted at step {interrupt_at}, saved" in capsys.readouterr().err
    assert latest_checkpoint(run).name == f"step_{interrupt_at:08d}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert cli.main(["train", "--out", str(run), *argv]) == 0
    for a, b in zip(load_model(whole)[0].parameters(), load_model(run)[0].parameters()):
        assert torch.equal(a, b)
    # Twice: stop now, unsaved (the checkpoint of step 5 stays the newest).
    _interrupting(monkeypatch, at=6, signals=2)
    assert cli.main(["train", "--out", str(run), "--steps", "8", "--batch-size", "4"]) == 130
    assert "ddpm-fast train: interrupted" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step_00000005"


def test_train_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path, monkeypatch):
    """Started as `ddpm-fast train &` in a script, a run has SIGINT ignored (the terminal's Ctrl-C is for the
    foreground): train runs to its last step through one and leaves it ignored, as Python itself does."""
    from ddpm_fast.train import latest_checkpoint
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _interrupting(monkeypatch, at=1)
        assert cli.main(["train", "--out", str(tmp_path), "--steps", "3", "--batch-size", "4"]) == 0
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_no_resume_refuses_a_folder_with_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1"]) == 0
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--batch-size", "4", "--no-resume"]) == 2
    _one_line_error(capsys, "holds a checkpoint of step 2", "--no-resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept
    config = (run / "checkpoints" / "step_00000002" / "config.json").read_bytes()
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--batch-size", "4", "--lr", "0.1"]) == 0
    assert "nothing to train: the checkpoint is at step 2 and --steps is 2" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_00000002" / "config.json").read_bytes() == config  # not re-saved


def _write_cifar(folder, names):
    rng = np.random.default_rng()
    for name in names:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_evaluate_bounds_held_out_cifar_and_the_recorded_training_folder(tmp_path, monkeypatch, capsys):
    """CIFAR-10: the bound on test_batch, not the training batches. An image folder (no held-out split): its
    training images, found by the absolute path the run recorded from any directory, and refused when a
    relative path (an older run's) names other data from here."""
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    _write_cifar(cifar, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        PIL.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    small = ["--steps", "1", "--batch-size", "4", "--preset", "tiny", "--image-size", "16"]
    for data in ("cifar", "imgs"):
        assert cli.main(["train", "--data", data, "--out", f"run_{data}", *small]) == 0
    (tmp_path / "test_only").mkdir()
    _write_cifar(tmp_path / "test_only", ["test_batch"])
    capsys.readouterr()
    assert cli.main(["train", "--data", "test_only", "--out", "run_test_only", *small]) == 0
    said = capsys.readouterr().out
    assert "note: 'test_only' holds CIFAR-10's test_batch only: training on its 4 test images" in said
    evaluate = ["--num-images", "3", "--bpd-timesteps", "2"]
    other = tmp_path / "elsewhere"
    (other / "imgs").mkdir(parents=True)  # same relative name, other images
    PIL.fromarray(np.zeros((16, 16, 3), np.uint8) + 9).save(other / "imgs" / "x.png")
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert cli.main(["evaluate", str(tmp_path / "run_cifar"), *evaluate]) == 0
    assert json.loads(capsys.readouterr().out)["bound_images"] == "3 held-out images of cifar10-test"
    assert cli.main(["evaluate", str(tmp_path / "run_imgs"), *evaluate]) == 0
    assert json.loads(capsys.readouterr().out)["bound_images"] == "3 training images of imgs"
    for config in (tmp_path / "run_imgs" / "checkpoints").glob("*/config.json"):  # as an older run recorded it
        saved = json.loads(config.read_text())
        saved["train"]["data"] = "imgs"
        config.write_text(json.dumps(saved))
    assert cli.main(["evaluate", str(tmp_path / "run_imgs"), *evaluate]) == 2
    _one_line_error(capsys, "the data at 'imgs'", "'size': 1", "is not what the run was trained on", "'size': 5")


def test_evaluate_a_digits_model_of_another_size(monkeypatch, capsys):
    """The bound is computed on held-out digits at the model's size (a digits model trained at 8x8 here); the
    digit scorer reads 16x16 digits only, so it is left out."""
    from ddpm_fast import train
    from ddpm_fast.schedule import NoiseSchedule
    from ddpm_fast.unet import PRESETS, UNet
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(PRESETS["tiny"], sample_size=8, in_channels=1, out_channels=1,
                                     attention_resolutions=())).eval()
    config = {"train": {"data": "digits", "image_size": 8}, "prediction_type": "epsilon"}
    monkeypatch.setattr(train, "load_model", lambda path: (model, NoiseSchedule(), config))
    from ddpm_fast.evaluate import variational_bound
    images, bpd = [], cli._bpd
    monkeypatch.setattr(cli, "_bpd", lambda m, x0, *args: (images.append(x0), bpd(m, x0, *args))[1])
    assert cli.main(["evaluate", "run", "--num-images", "2", "--bpd-timesteps", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [tuple(x0.shape) for x0 in images] == [(2, 1, 8, 8)] and "confidence" not in result
    bound = variational_bound(model, images[0], NoiseSchedule(), num_timesteps=2)
    assert result["bpd"] > 0 and result == {"bound_images": "2 held-out images of digits-test", "bpd_seconds":
        result["bpd_seconds"], "bpd": round(bound["bpd"], 3), "prior_bpd": round(bound["prior_bpd"], 5),
        "decoder_bpd": round(bound["decoder_bpd"], 3), "strata": len(bound["timesteps"])}
    del config["train"]  # a checkpoint that does not say what it was trained on
    assert cli.main(["evaluate", "run"]) == 2
    _one_line_error(capsys, "'run': its config.json does not name the data it was trained on")
