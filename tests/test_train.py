"""Training: exact resume, crash-safe checkpoints, randomness as a function of (seed, step), EMA warm-up."""

import contextlib
import copy
import json
import math
import os
import re
import shutil
import warnings

import pytest
import torch

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast import train as train_mod
from ddpm_fast.data import ImageDataset, load_digits, to_unit_range
from ddpm_fast.unet import PRESETS
from ddpm_fast.train import (EMA, TrainConfig, Trainer, dataset_of, draw_step, latest_checkpoint, load_checkpoint,
                             load_model, save_checkpoint, unet_config_for)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def digits():
    data = load_digits("train")
    data.images, data.labels = data.images[:40], data.labels[:40]  # small: an epoch is 5 steps of 8
    return data


def _config(**overrides):
    base = dict(batch_size=8, steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=3, seed=7,
                prediction_type="v_prediction", min_snr_gamma=5.0, flip=True)
    return TrainConfig(**{**base, **overrides})


def test_resume_continues_exactly(tmp_path, digits):
    whole = Trainer(_config(keep_checkpoints=1), tmp_path / "whole", dataset=digits)
    losses = whole.train()
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] == ["step_00000006"]  # keeps 1
    # The checkpoint holds both sets of weights, each under its name, loaded in eval mode.
    for weights, params in (("ema", whole.ema.params), ("model", list(whole.model.parameters()))):
        model, _, _ = load_model(tmp_path / "whole", weights=weights)
        assert not model.training and all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    with pytest.raises(ValueError, match="load_model: weights must be 'ema' or 'model', got 'best'"):
        load_model(tmp_path / "whole", weights="best")

    first = Trainer(_config(), tmp_path / "split", dataset=digits)
    assert first.train(steps=3) == losses[:3]
    del first  # "the process dies"; a new one picks up the checkpoint
    resumed = Trainer(_config(), tmp_path / "split", dataset=digits)
    assert resumed.resume() and resumed.step == 3
    assert resumed.train() == losses[3:], "the loss after resuming must equal the uninterrupted run's"
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.params, resumed.ema.params):
        assert torch.equal(a, b)
    assert len(set(losses)) == len(losses), "every step sees a different batch"
    # On the CPU the model trains in channels_last (oneDNN's faster layout), and resumes into it.
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in resumed.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1))


def test_interrupted_checkpoint_is_never_loaded(tmp_path, digits, monkeypatch):
    trainer = Trainer(_config(checkpoint_every=100), tmp_path, dataset=digits)
    trainer.train(steps=2)  # ends with a checkpoint at step 2
    good = latest_checkpoint(tmp_path)
    assert good.name == "step_00000002"
    trainer.train_step()  # the next save is at step 3 ...

    real_write = train_mod._write_safetensors
    calls = []

    def crash_midway(path, tensors):  # ... and the machine dies half way through its second file
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a file")
            raise OSError("simulated crash while writing")
        real_write(path, tensors)
    monkeypatch.setattr(train_mod, "_write_safetensors", crash_midway)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save()
    monkeypatch.setattr(train_mod, "_write_safetensors", real_write)

    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    model, _, config = load_model(tmp_path)  # loads, and it is step 2's
    assert config["step"] == 2
    fresh = Trainer(_config(checkpoint_every=100), tmp_path, dataset=digits)
    assert fresh.resume() and fresh.step == 2

    # A temporary folder a hard kill left behind is invisible to loading and removed by the next save.
    stale = tmp_path / "checkpoints" / ".tmp-step_00000009-1"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # a step folder without config.json is not complete
    assert latest_checkpoint(tmp_path) == good
    fresh.train(steps=3)
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step_00000003"


def test_checkpoint_keeps_newest_and_refuses_foreign(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": step}, {"ema": {"w": torch.full((2,), float(step))}}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    config, folder = load_checkpoint(tmp_path / "step_00000003")
    assert config["step"] == 3 and config["x"] == 3
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a ddpm_fast checkpoint"):
        load_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_draw_step_is_a_function_of_seed_and_step():
    a, b = draw_step(3, 5, 8, 20, 1000), draw_step(3, 5, 8, 20, 1000)
    for field in ("indices", "t", "flip", "seeds"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(draw_step(4, 5, 8, 20, 1000).t, a.t)
    # Steps 0..4 of batch 8 cover two epochs of 20 images: each epoch sees every image once.
    seen = torch.cat([draw_step(3, s, 8, 20, 1000).indices for s in range(5)])
    assert torch.equal(seen[:20].sort().values, torch.arange(20))
    assert torch.equal(seen[20:40].sort().values, torch.arange(20))
    assert not torch.equal(seen[:20], seen[20:40]), "each epoch has its own permutation"
    seeds = torch.cat([draw_step(3, s, 8, 20, 1000).seeds for s in range(5)])
    assert seeds.unique().numel() == seeds.numel() and seeds.min() >= 0
    # Each use of (seed, step) has its own stream: no two purposes share a number.
    purposes = (train_mod._PERMUTATION, train_mod._BATCH, train_mod._NOISE, train_mod._DROPOUT, train_mod._SAMPLES)
    assert len(set(purposes)) == len(purposes)


def test_draw_step_covers_every_timestep_flips_half_and_keeps_noise_seeds_in_int64(monkeypatch):
    """t ~ U[0, T) reaches both ends, a flip is a fair coin (1024 draws: 5 standard deviations of a fair coin's
    mean, 5 * 0.5 / 32), and the noise seeds stay distinct and >= 0 when derive_seed gives its largest value."""
    seed, T = int(torch.randint(0, 2**62, ())), int(torch.randint(3, 8, ()))
    draws = [draw_step(seed, step, 64, 40, T) for step in range(16)]
    assert torch.equal(torch.cat([d.t for d in draws]).unique(), torch.arange(T))
    assert abs(torch.cat([d.flip for d in draws]).double().mean().item() - 0.5) < 5 * 0.5 / 32
    monkeypatch.setattr(train_mod, "derive_seed", lambda *values: 2**63 - 1)
    seeds = draw_step(seed, 0, 64, 40, T).seeds
    assert seeds.min() >= 0 and seeds.unique().numel() == 64


def test_derive_seed_is_63_bits_and_the_same_in_every_version():
    """A resume replays the batches of the run it continues only while derive_seed stays the same function: its
    values here were computed by this version. Every value fits a 63-bit seed."""
    assert train_mod.derive_seed(0) == 5153396120588991192
    assert train_mod.derive_seed(7, train_mod._NOISE, 123456) == 5382561961571422695
    values = torch.randint(-2**63, 2**63 - 1, (64, 3)).tolist()
    assert all(0 <= train_mod.derive_seed(*v) < 2**63 for v in values)


def test_ema_warmup_and_average():
    model = torch.nn.Linear(3, 1)
    ema = EMA(model, decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    start = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for avg, p0 in zip(ema.params, start):
        torch.testing.assert_close(avg, p0 + 0.9)  # lerp by 1 - 0.1
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(2 / 11)  # the next update's: (1 + 1) / (10 + 1)
    ema.updates = 10**6
    assert ema.current_decay() == 0.9999
    assert EMA(model, 0.999, warmup=False).current_decay() == 0.999


def test_bf16_autocast_step_and_config_errors(digits):
    trainer = Trainer(_config(amp="bf16"), None, dataset=digits)
    before = [p.clone() for p in trainer.model.parameters()]
    loss = trainer.train_step()
    assert loss == loss and loss > 0  # finite
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ValueError, match="prediction_type"):
        TrainConfig(prediction_type="noise")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="sample_steps=60 must be at most num_train_timesteps=50"):
        TrainConfig(num_train_timesteps=50, sample_every=5, sample_steps=60)  # refused before any step
    for seed in (-1, 2**63, 2**64, True):  # 2**64 trained exactly as seed 0 did
        with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*63\), got {seed!r}"):
            TrainConfig(seed=seed)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("field, value, message", [
    ("preset", "huge", f"preset must be one of {tuple(PRESETS)}, got 'huge'"),
    ("amp", "fp16", "amp must be 'auto', 'bf16' or 'none', got 'fp16'"),
    ("steps", -1, "steps must be a positive int, got -1"),
    ("batch_size", True, "batch_size must be a positive int, got True"),
    ("sample_every", True, "sample_every must be an int >= 0, got True"),
    ("warmup_steps", -1, "warmup_steps must be an int >= 0, got -1"),
    ("lr", math.inf, "lr must be a finite number > 0, got inf"),
    ("grad_clip", 0.0, "grad_clip must be > 0, got 0.0"),
    ("min_snr_gamma", 0.0, "min_snr_gamma must be > 0 or None, got 0.0"),
])
def test_config_errors_name_the_field_and_its_value(field, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape('TrainConfig: ' + message)}$"):
        TrainConfig(**{field: value})


def test_config_accepts_the_ends_of_each_range():
    """No steps, no warm-up, an EMA that copies the weights (decay 0), grids of as many DDIM steps as the schedule
    has; sample_steps past the schedule when no grid is made (it is only read for grids)."""
    TrainConfig(steps=0, warmup_steps=0, ema_decay=0.0)
    TrainConfig(num_train_timesteps=50, sample_every=5, sample_steps=50)
    TrainConfig(num_train_timesteps=50, sample_every=0, sample_steps=60)


def test_autocast_is_bf16_when_asked_and_by_default_on_cuda_only():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a GPU, torch disables a cuda autocast and says so
        for amp, device, autocasts in (("bf16", "cpu", True), ("auto", "cpu", False), ("none", "cpu", False),
                                       ("bf16", "cuda", True), ("auto", "cuda", True), ("none", "cuda", False)):
            context = train_mod._autocast(amp, torch.device(device))
            if autocasts:
                assert (context.device, context.fast_dtype) == (device, torch.bfloat16)
            else:
                assert isinstance(context, contextlib.nullcontext)


def test_trainer_refuses_images_that_are_not_square_and_batches_the_ranks_cannot_split(digits, monkeypatch):
    wide = ImageDataset("wide", torch.rand(4, 1, 16, 24) * 2 - 1)
    with pytest.raises(ValueError, match="Trainer: images must be square, got 16x24"):
        Trainer(_config(), None, dataset=wide)
    monkeypatch.setattr(train_mod.dist_utils, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by the 3 torch.distributed ranks"):
        Trainer(_config(), None, dataset=digits)


def test_flip_defaults_to_the_dataset_s_and_the_learning_rate_warms_up_linearly(digits):
    for data in (digits, _as_bytes(digits)):  # digits: no flips; 8-bit photos: flips
        for flip in (None, True, False):
            assert Trainer(_config(flip=flip), None, dataset=data).flip is (data.flip if flip is None else flip)
    lr = float(torch.empty(()).uniform_(1e-4, 1e-3))
    trainer = Trainer(_config(lr=lr, warmup_steps=4), None, dataset=digits)
    assert [trainer.lr_at(step) for step in range(6)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr])
    assert Trainer(_config(lr=lr, warmup_steps=0), None, dataset=digits).lr_at(0) == lr


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_never_deletes_a_newer_run_s_checkpoints(tmp_path, digits):
    """A fresh run in a folder holding a later step of another run (the CLI's --no-resume) would write step 3,
    and keeping the two newest would delete it at once: it is refused before its first step, and the older
    run's checkpoints stay as they were."""
    Trainer(_config(), tmp_path, dataset=digits).train()
    before = _files(tmp_path / "checkpoints")
    fresh = Trainer(_config(seed=8), tmp_path, dataset=digits)
    with pytest.raises(ValueError, match="holds a checkpoint of step 6, past this run's step 0"):
        fresh.train()
    assert fresh.step == 0 and _files(tmp_path / "checkpoints") == before


def test_resaving_a_step_keeps_the_old_copy_until_the_new_one_is_in(tmp_path, monkeypatch):
    """Re-saving a step moves the old copy aside and deletes it only once the new one is in place: a failure
    of that rename puts the old one back, and a kill between the two renames is mended by the next save."""
    save_checkpoint(tmp_path, 2, {"run": "old"}, {"ema": {"w": torch.randn(3)}})
    before = _files(tmp_path)
    real_replace = train_mod.os.replace

    def fail_into_place(src, dst):
        if str(src).startswith(str(tmp_path / ".tmp-step")):
            raise OSError("simulated failure")
        real_replace(src, dst)
    monkeypatch.setattr(train_mod.os, "replace", fail_into_place)
    with pytest.raises(OSError, match="simulated failure"):
        save_checkpoint(tmp_path, 2, {"run": "new"}, {"ema": {"w": torch.randn(3)}})
    monkeypatch.setattr(train_mod.os, "replace", real_replace)
    assert _files(tmp_path) == before

    (tmp_path / "step_00000002").rename(tmp_path / ".old-step_00000002-12345")  # killed between the renames
    assert latest_checkpoint(tmp_path).name == ".old-step_00000002-12345"  # what resume and a fresh run see
    assert load_checkpoint(tmp_path)[0]["run"] == "old"
    save_checkpoint(tmp_path, 3, {"run": "next"}, {"ema": {"w": torch.randn(3)}})
    assert {p.name for p in tmp_path.iterdir()} == {"step_00000002", "step_00000003"}
    assert load_checkpoint(tmp_path / "step_00000002")[0]["run"] == "old"
    save_checkpoint(tmp_path, 3, {"run": "again"}, {"ema": {"w": torch.randn(3)}})  # a re-save that succeeds
    assert {p.name for p in tmp_path.iterdir()} == {"step_00000002", "step_00000003"}
    assert load_checkpoint(tmp_path)[0]["run"] == "again"
    # Killed after the new copy came in and before the old one left: the one in place is the step, also where the
    # folder lists the copy aside first.
    shutil.copytree(tmp_path / "step_00000002", tmp_path / ".old-step_00000003-1")
    listing = train_mod.Path.iterdir
    monkeypatch.setattr(train_mod.Path, "iterdir",
                        lambda folder: iter(sorted(listing(folder), key=lambda p: p.name.startswith("step_"))))
    assert load_checkpoint(tmp_path)[0]["run"] == "again"


def test_resume_refuses_another_schedule_or_prediction_type(tmp_path, digits):
    Trainer(_config(steps=2), tmp_path, dataset=digits).train()
    with pytest.raises(ValueError, match="trained with another prediction_type v_prediction -> epsilon"):
        Trainer(_config(prediction_type="epsilon"), tmp_path, dataset=digits).resume()
    with pytest.raises(ValueError, match="trained with another schedule .*'linear'.*'cosine'"):
        Trainer(_config(beta_schedule="cosine"), tmp_path, dataset=digits).resume()
    (tmp_path / "empty").mkdir()  # a folder asked for explicitly must hold a checkpoint
    with pytest.raises(FileNotFoundError, match="'.*empty' is not a checkpoint and holds no complete checkpoint"):
        Trainer(_config(), tmp_path, dataset=digits).resume(tmp_path / "empty")
    resumed = Trainer(_config(lr=3e-4, batch_size=4), tmp_path, dataset=digits)  # training settings may change
    assert resumed.resume() and resumed.step == 2
    assert resumed.changed_on_resume == {"steps": (2, 6), "lr": (1e-3, 3e-4), "batch_size": (8, 4)}
    # Another U-Net (the preset, or the data's channels or size) is refused naming what differs and the flags.
    rgb = copy.copy(digits)
    rgb.images = digits.images.expand(-1, 3, -1, -1)
    with pytest.raises(ValueError, match=r"its U-Net differs from this run's \(in_channels 1 -> 3, out_channels 1 "
                                         r"-> 3\); give the run's --preset, --data and --image-size"):
        Trainer(_config(), tmp_path, dataset=rgb).resume()
    # The same settings on other images (a folder edited since, say) resume, and say so.
    fewer = copy.copy(digits)
    fewer.images = digits.images[:30]
    resumed = Trainer(_config(), tmp_path, dataset=fewer)
    assert resumed.resume()
    old, new = resumed.changed_on_resume.pop("dataset")
    assert (old["size"], new["size"]) == (40, 30) and resumed.changed_on_resume == {"steps": (2, 6)}


def test_damaged_checkpoints_are_named_not_tracebacks(tmp_path, digits):
    Trainer(_config(steps=2), tmp_path, dataset=digits).train()
    folder = latest_checkpoint(tmp_path)
    # Every file is read before any state changes: a damaged optimizer file leaves the Trainer as it was.
    optimizer = folder / "optimizer.safetensors"
    intact = optimizer.read_bytes()
    optimizer.write_bytes(intact[:100])
    trainer = Trainer(_config(), tmp_path, dataset=digits)
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=r"damaged checkpoint file .*optimizer\.safetensors"):
        trainer.resume()
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    optimizer.write_bytes(intact)
    weights = train_mod._read_safetensors(folder / "model.safetensors")
    ema = folder / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"damaged checkpoint file .*ema\.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"damaged checkpoint file .*ema\.safetensors"):
        Trainer(_config(), tmp_path, dataset=digits).resume()
    # weights of another U-Net under this config: one line naming the file and what differs
    save_checkpoint(tmp_path / "checkpoints", 2, json.loads((folder / "config.json").read_text()),
                    {"ema": {"w": torch.randn(3)}, "model": {}, "optimizer": {}})
    with pytest.raises(ValueError, match=r"ema\.safetensors' does not hold the weights .* 1 unexpected \['w'\]"):
        load_model(tmp_path)
    first, *_, last = sorted(weights)  # a tensor missing, or one of another shape: named too
    missing = {k: v for k, v in weights.items() if k != last}
    reshaped = {**weights, first: torch.randn(weights[first].numel() + 1)}
    for ema_weights, what in ((missing, f"1 missing {[last]}, 0 unexpected [], 0 of another shape []"),
                              (reshaped, f"0 missing [], 0 unexpected [], 1 of another shape {[first]}")):
        save_checkpoint(tmp_path / "checkpoints", 2, json.loads((folder / "config.json").read_text()),
                        {"ema": ema_weights, "model": {}, "optimizer": {}})
        with pytest.raises(ValueError, match=re.escape(what)):
            load_model(tmp_path)
    config = folder / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "unet"}))
    with pytest.raises(ValueError, match=r"lacks \['unet'\]"):
        load_model(tmp_path)
    config.write_text(json.dumps({**saved, "unet": {**saved["unet"], "skip_scale": 0.5}}))
    for load in (lambda: load_model(tmp_path), lambda: Trainer(_config(), tmp_path, dataset=digits).resume()):
        with pytest.raises(ValueError, match=r"config\.json' describes its U-Net with fields this ddpm_fast does not "
                                             r"know: skip_scale \(written by another version\?\)"):
            load()
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a ddpm_fast checkpoint"):
        load_model(tmp_path)


def test_resume_forgets_the_log_of_the_steps_it_runs_again(tmp_path, digits, monkeypatch):
    """A run killed after step 3, with its last checkpoint at step 2, logged step 3 (and maybe half a line):
    resumed at 2, it runs step 3 again, and the log ends with one record per step."""
    trainer = Trainer(_config(checkpoint_every=2), tmp_path, dataset=digits)
    trainer.train(steps=3)
    shutil.rmtree(latest_checkpoint(tmp_path))  # the end-of-run save at step 3 never happened
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"step": 4, "lo')
    resumed = Trainer(_config(checkpoint_every=2), tmp_path, dataset=digits)
    assert resumed.resume() and resumed.step == 2
    # The log is replaced atomically: a failure while rewriting it (a full disk) leaves it as it was.
    log = (tmp_path / "log.jsonl").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            resumed.train(steps=4)
    assert (tmp_path / "log.jsonl").read_bytes() == log
    resumed.train(steps=4)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records] == [resumed.lr_at(step) for step in range(4)]  # step s + 1 ran at lr_at(s)


def test_image_folder_defaults_to_its_preset_s_size_and_sizes_that_do_not_fit_are_named(tmp_path):
    from PIL import Image
    side = int(torch.randint(17, 40, ()))
    for i in range(3):
        pixels = torch.randint(0, 256, (side, side + 3, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    for preset, size in (("tiny", 16), ("cifar10", 32)):
        assert dataset_of(TrainConfig(data=str(tmp_path), preset=preset)).shape == (3, size, size)
    assert dataset_of(TrainConfig(data=str(tmp_path), image_size=24)).shape == (3, 24, 24)
    # The digits and a CIFAR-10 folder keep their own size (None) whatever the preset was made for.
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    (cifar / "data_batch_1").touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_mod, "load_dataset", lambda spec, size: size)
        for data, preset in (("digits", "cifar10"), (str(cifar), "tiny")):
            assert dataset_of(TrainConfig(data=data, preset=preset)) is None
    assert unet_config_for("cifar10", 1, 64).attention_resolutions == (16,)  # the paper's 16x16, one level down
    for preset, size, why in (("tiny", 32, r"attention_resolutions \[8\] match no level's size \[32, 16\]"),
                              ("tiny", 17, "must be a multiple of 2"), ("cifar10", 36, "must be a multiple of 8")):
        made_for = PRESETS[preset].sample_size
        with pytest.raises(ValueError, match=rf"{size}x{size} images \(image_size\) do not fit preset '{preset}', "
                                             rf"made for {made_for}x{made_for}: .*{why}"):
            unet_config_for(preset, 3, size)


def _full_disk(fd):
    import errno
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError, match=r"No space left on device \(writing '.*step_00000003[^/]*/model\.safetensors'\)"):
        save_checkpoint(tmp_path, 3, {"step": 3}, {"model": {"w": torch.randn(3)}})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None and not any(tmp_path.iterdir())  # nothing half-written is left


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the synced files through /proc (Linux)")
def test_a_checkpoint_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """Each file, then the temporary folder (its entries), then the parent (the rename): a crash after the save
    returns keeps the checkpoint."""
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    save_checkpoint(tmp_path, 3, {}, {"model": {"w": torch.randn(3)}})
    tmp = os.path.realpath(tmp_path / f".tmp-step_00000003-{os.getpid()}")
    assert synced == [f"{tmp}/model.safetensors", f"{tmp}/config.json", tmp, os.path.realpath(tmp_path)]


def test_train_step_is_the_written_out_step(digits):
    """One Trainer step against the step written out here: the drawn images flipped left-right where drawn,
    q_sample's target, dropout drawn from (seed, step, rank), L_simple with min-SNR weighting, the gradient clipped
    (to a norm it exceeds), Adam at the warm-up's learning rate, then the EMA of the new weights. Same parameters
    and average, bit for bit; a fresh run seed each time."""
    seed = int(torch.randint(0, 2**62, ()))
    decay = float(torch.empty(()).uniform_(0.5, 0.99))  # the EMA without warm-up: its own decay from the start
    config = _config(seed=seed, grad_clip=1e-3, min_snr_gamma=5.0, flip=True, prediction_type="v_prediction",
                     ema_decay=decay, ema_warmup=False)
    trainer = Trainer(config, None, dataset=digits)
    for module in trainer.model.modules():  # dropout on (the tiny preset has none), drawn from (seed, step, rank)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.2
    model = copy.deepcopy(trainer.model)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=trainer.lr_at(0))

    draw = draw_step(seed, 0, config.batch_size, len(digits), config.num_train_timesteps)
    x0 = digits.images[draw.indices]
    x0 = torch.stack([image.flip(-1) if flip else image for image, flip in zip(x0, draw.flip.tolist())])
    x_t, target = ddpm_fast.q_sample(x0, draw.t, trainer.schedule, seeds=draw.seeds, target="v_prediction")
    torch.manual_seed(train_mod.derive_seed(seed, train_mod._DROPOUT, 0, 0))
    model.train()
    loss = reference.l_simple_loss(model(x_t, draw.t).float(), target, draw.t, trainer.schedule, "v_prediction",
                                   5.0)
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3) > 1e-3  # the clipping acts
    optimizer.step()

    assert trainer.train_step() == loss.item()
    for ours, written_out in zip(trainer.model.parameters(), model.parameters()):
        assert torch.equal(ours, written_out)
    for average, p0, p in zip(trainer.ema.params, initial, model.parameters()):  # of the weights after the step
        assert torch.equal(average, p0.lerp(p.detach(), 1.0 - decay))
    # Over a few steps the flips take both values (a draw that never flips would pass the step above).
    flips = torch.cat([draw_step(seed, s, 8, 40, 1000).flip for s in range(8)])
    assert flips.any() and not flips.all()


def test_bytes_train_as_the_floats_they_stand_for():
    """A dataset held as uint8 (8-bit images) is copied to the device as bytes and mapped to [-1, 1] per batch:
    the run equals one on the same images given as float32, bit for bit."""
    pixels = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    runs = [Trainer(_config(steps=3, checkpoint_every=100), None, dataset=ImageDataset("bytes", data)).train()
            for data in (pixels, to_unit_range(pixels))]
    assert runs[0] == runs[1]


def test_dropout_follows_seed_and_step_and_the_caller_s_random_stream_is_left_alone(digits):
    """Dropout draws from the global generator, which the step seeds from (seed, step, rank) for its forward:
    the losses are a function of the run, whatever the caller seeded. And after training, the caller's
    stream is where it was (each step used to reseed it for good)."""
    def run(caller_seed: int, dropout: float) -> list[float]:
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        trainer = Trainer(_config(steps=3, checkpoint_every=100), None, dataset=digits)
        for module in trainer.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        trainer.model.eval()  # as a caller's evaluation leaves it: a step trains in train mode all the same
        losses = trainer.train()
        assert torch.equal(torch.get_rng_state(), state), "building or training moved the caller's random stream"
        return losses

    first, second = (int(seed) for seed in torch.randint(0, 2**62, (2,)))
    assert run(first, 0.3) == run(second, 0.3)
    assert run(first, 0.3) != run(first, 0.0)  # dropout acts in these runs


def test_a_stop_asked_for_during_a_save_ends_that_step(digits, monkeypatch):
    """One process: a request_stop (Ctrl-C) that lands while a checkpoint is written ends training there, without
    another step and another checkpoint."""
    trainer = Trainer(_config(steps=10, checkpoint_every=2), None, dataset=digits)
    monkeypatch.setattr(trainer, "save", lambda: trainer.request_stop() if trainer.step == 2 else None)
    assert len(trainer.train()) == 2 and trainer.step == 2
    assert len(trainer.train(steps=4)) == 2 and trainer.step == 4  # the request ended that train(), not this one


def test_a_checkpoint_and_a_grid_follow_the_record_of_their_step(tmp_path, digits, monkeypatch):
    """When a checkpoint or a grid is made, log.jsonl already holds its step's record (a resume keeps the records up
    to its step). The grids: every sample_every steps, of num_samples images (or the number asked for), DDIM with
    sample_steps steps and the run's prediction type, named by the zero-padded step."""
    trainer = Trainer(_config(steps=4, checkpoint_every=2, sample_every=3, num_samples=3, sample_steps=2), tmp_path,
                      dataset=digits)
    last_record = lambda: json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"]  # noqa: E731
    made, sampler, grid = [], train_mod.Sampler, train_mod.write_sample_grid
    monkeypatch.setattr(train_mod, "Sampler", lambda *args, **kwargs: made.append(kwargs) or sampler(*args, **kwargs))
    monkeypatch.setattr(train_mod, "write_sample_grid",
                        lambda images, path: made.append((last_record(), len(images))) or grid(images, path))
    save, saved = trainer.save, []
    monkeypatch.setattr(trainer, "save", lambda: saved.append((trainer.step, last_record())) or save())
    trainer.train()
    assert saved == [(2, 2), (4, 4)]
    kind = dict(method="ddim", num_steps=2, prediction_type="v_prediction")
    assert made == [kind, (3, 3)]
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_00000003.png"]
    assert trainer.sample_grid(tmp_path / "five.png", num_samples=5) == tmp_path / "five.png"
    assert made[2:] == [kind, (4, 5)]
    # The grid enlarges small images to ~48 px, and leaves larger ones as they are.
    from PIL import Image
    for size, scale in ((16, 3), (64, 1)):
        train_mod.write_sample_grid(torch.rand(1, 3, size, size) * 2 - 1, tmp_path / "one.png")
        with Image.open(tmp_path / "one.png") as image:
            assert image.size == (size * scale + 4,) * 2  # 2 px of padding each side


def test_ranks_stop_together_the_step_after_a_vote(digits, monkeypatch):
    """Under torch.distributed a step's vote to stop (request_stop or the time limit, on any rank) travels in
    the all-reduce of its loss, read when the next step is queued: every rank ends after that next step. Here
    another rank votes during step 3 (a stand-in for the all-reduce): this one stops after step 4, and the
    losses it returns and logs are the ranks' means."""
    trainer = Trainer(_config(steps=10, checkpoint_every=100), None, dataset=digits)
    trainer.world = 2  # this rank trains the first half of each batch

    def with_other_rank(status):  # the other rank: loss 1.0, and a vote to stop in step 3
        other = torch.tensor([1.0, 1.0 if trainer.step == 3 else 0.0])
        return (status + other) / 2
    monkeypatch.setattr(train_mod.dist_utils, "mean_over_ranks", with_other_rank)
    own = []
    queue = Trainer._queue_step
    monkeypatch.setattr(Trainer, "_queue_step", lambda self: own.append(queue(self)) or own[-1])
    losses = trainer.train()
    assert trainer.step == 4 and len(losses) == 4
    assert losses == [((loss + 1.0) / 2).item() for loss in own]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_never_waits_for_the_gpu(digits):
    """Nothing in a step makes the host wait for the stream: the draws reach the GPU in one copy from pinned
    memory, the min-SNR weights too, and the loop reads each loss from pinned memory after an event (which sync
    debug mode does not count, and which waits for that copy only: see the next test). After a first step's
    one-time set-up."""
    import warnings
    trainer = Trainer(_config(steps=7, checkpoint_every=100), None, dataset=digits, device="cuda")
    trainer.train(steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], f"{len(syncs)} host syncs in 6 steps: {syncs[:3]}"
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reading_a_loss_leaves_the_gpu_its_queued_work():
    """The loop's read of step s's loss returns while step s + 1 still runs (here: half a second of GPU sleep
    queued after the copy); ``.tolist()`` on the device tensor would have waited for it."""
    expected = torch.rand(2)
    copy = train_mod._HostCopy(expected.cuda())
    torch.cuda._sleep(10**9)  # ~0.5 s at the H200's clock: the next step
    assert copy.values() == expected.tolist()
    assert not torch.cuda.current_stream().query(), "the read waited for the work queued after the copy"
    torch.cuda.synchronize()


def _as_bytes(data: ImageDataset) -> ImageDataset:
    """The digits as 8-bit pixels, as a CIFAR-10 or an image folder holds them."""
    return ImageDataset("bytes", ((data.images + 1) * 127.5).round().to(torch.uint8), data.labels, True)


def _batches(monkeypatch) -> list:
    """The [-1, 1] batches the Trainer maps from its data from now on, in order."""
    seen, mapped = [], train_mod.to_unit_range

    def record(data):
        batch = mapped(data)
        seen.append(batch.cpu())
        return batch  # on its own device: the step goes on there
    monkeypatch.setattr(train_mod, "to_unit_range", record)
    return seen


def test_data_too_large_for_the_gpu_stays_on_the_host_and_trains_the_same(digits, monkeypatch):
    """A dataset stays on the GPU while it takes at most a quarter of the memory free there (data already on a
    device stays there); a larger one stays in host memory and each step copies its batch: the same batches, so
    the same losses."""
    data = digits.data
    for free, fits in ((4 * data.nbytes, True), (4 * data.nbytes - 1, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert train_mod._holds_data(torch.device("cuda"), data) is fits
        assert train_mod._holds_data(torch.device("cuda"), data.to("meta"))
    monkeypatch.undo()
    assert train_mod._holds_data(torch.device("cpu"), data)
    batches = _batches(monkeypatch)
    on_device = Trainer(_config(), None, dataset=_as_bytes(digits)).train(steps=3)
    monkeypatch.setattr(train_mod, "_holds_data", lambda device, data: False)
    on_host = Trainer(_config(), None, dataset=_as_bytes(digits))
    assert not on_host.data_on_device
    assert on_host.train(steps=3) == on_device
    assert len(batches) == 6 and all(torch.equal(a, b) for a, b in zip(batches[:3], batches[3:]))


def test_each_rank_trains_its_slice_of_the_global_batch(digits, monkeypatch):
    """Under torch.distributed rank r of R trains images r*G/R .. (r+1)*G/R - 1 of the global batch G."""
    trainer = Trainer(_config(), None, dataset=digits)
    trainer.rank, trainer.world = 1, 2
    batches = _batches(monkeypatch)
    trainer.train_step()  # no process group: the loss's mean over ranks is its own
    indices = draw_step(7, 0, 8, len(digits), 1000).indices
    assert len(batches) == 1 and torch.equal(batches[0], to_unit_range(digits.data[indices[4:]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_held_data_trains_as_device_held_data_on_a_gpu(digits, monkeypatch):
    """Batches copied from host memory (pinned, without waiting) are the batches gathered on the GPU, bit for
    bit. (The losses are not compared: the GroupNorm backward's float atomics round differently run to run.)"""
    as_bytes = _as_bytes(digits)
    batches = _batches(monkeypatch)
    on_device = Trainer(_config(), None, dataset=as_bytes, device="cuda")
    assert on_device.data_on_device
    on_device.train(steps=4)
    monkeypatch.setattr(train_mod, "_holds_data", lambda device, data: False)
    on_host = Trainer(_config(), None, dataset=as_bytes, device="cuda")
    assert not on_host.data_on_device and not on_host.images.is_cuda
    assert all(math.isfinite(loss) for loss in on_host.train(steps=4))
    assert len(batches) == 8 and all(torch.equal(a, b) for a, b in zip(batches[:4], batches[4:]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_a_gpu_and_resumes(tmp_path, digits):
    """The CUDA path (bf16 autocast by default, the fused q_sample with device seeds, the EMA on the device): the
    losses are finite, a checkpoint loads on the CPU, and resuming continues from it on the GPU."""
    trainer = Trainer(_config(steps=3), tmp_path, dataset=digits, device="cuda")
    assert next(trainer.model.parameters()).is_cuda
    losses = trainer.train()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model, _, _ = load_model(tmp_path)
    assert next(model.parameters()).device.type == "cpu"
    resumed = Trainer(_config(steps=5), tmp_path, dataset=digits, device="cuda")
    assert resumed.resume() and resumed.step == 3
    more = resumed.train()
    assert len(more) == 2 and all(torch.isfinite(torch.tensor(more)))


def test_a_failing_step_keeps_the_records_of_the_steps_before_it(tmp_path, digits, monkeypatch):
    """A step reads its loss once the next step is queued: a failure in that next step must not drop the record of
    the one before it, nor the failure."""
    fails_at = int(torch.randint(2, 6, ()))
    trainer = Trainer(_config(checkpoint_every=100), tmp_path, dataset=digits)
    forward = trainer._forward

    def failing(*args):
        if trainer.step == fails_at - 1:
            raise RuntimeError("out of memory (a stand-in)")
        return forward(*args)

    monkeypatch.setattr(trainer, "_forward", failing)
    with pytest.raises(RuntimeError, match="a stand-in"):
        trainer.train(steps=6)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, fails_at))
