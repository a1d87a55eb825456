"""Training: exact resume, crash-safe checkpoints, randomness as a function of (seed, step), EMA warm-up."""

import copy
import json
import math
import shutil

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
    whole = Trainer(_config(), tmp_path / "whole", dataset=digits)
    losses = whole.train()

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


def test_resume_refuses_another_schedule_or_prediction_type(tmp_path, digits):
    Trainer(_config(steps=2), tmp_path, dataset=digits).train()
    with pytest.raises(ValueError, match="trained with another prediction_type v_prediction -> epsilon"):
        Trainer(_config(prediction_type="epsilon"), tmp_path, dataset=digits).resume()
    with pytest.raises(ValueError, match="trained with another schedule .*'linear'.*'cosine'"):
        Trainer(_config(beta_schedule="cosine"), tmp_path, dataset=digits).resume()
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


def test_resume_forgets_the_log_of_the_steps_it_runs_again(tmp_path, digits):
    """A run killed after step 3, with its last checkpoint at step 2, logged step 3 (and maybe half a line):
    resumed at 2, it runs step 3 again, and the log ends with one record per step."""
    trainer = Trainer(_config(checkpoint_every=2), tmp_path, dataset=digits)
    trainer.train(steps=3)
    shutil.rmtree(latest_checkpoint(tmp_path))  # the end-of-run save at step 3 never happened
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('{"step": 4, "lo')
    resumed = Trainer(_config(checkpoint_every=2), tmp_path, dataset=digits)
    assert resumed.resume() and resumed.step == 2
    resumed.train(steps=4)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_image_folder_defaults_to_its_preset_s_size_and_sizes_that_do_not_fit_are_named(tmp_path):
    from PIL import Image
    side = int(torch.randint(17, 40, ()))
    for i in range(3):
        pixels = torch.randint(0, 256, (side, side + 3, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    for preset, size in (("tiny", 16), ("cifar10", 32)):
        assert dataset_of(TrainConfig(data=str(tmp_path), preset=preset)).shape == (3, size, size)
    assert dataset_of(TrainConfig(data=str(tmp_path), image_size=24)).shape == (3, 24, 24)
    assert unet_config_for("cifar10", 1, 64).attention_resolutions == (16,)  # the paper's 16x16, one level down
    for preset, size, why in (("tiny", 32, r"attention_resolutions \[8\] match no level's size \[32, 16\]"),
                              ("tiny", 17, "must be a multiple of 2"), ("cifar10", 36, "must be a multiple of 8")):
        made_for = PRESETS[preset].sample_size
        with pytest.raises(ValueError, match=rf"{size}x{size} images \(image_size\) do not fit preset '{preset}', "
                                             rf"made for {made_for}x{made_for}: .*{why}"):
            unet_config_for(preset, 3, size)


def test_a_failed_checkpoint_write_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"No space left on device \(writing '.*step_00000003.*'\)"):
        save_checkpoint(tmp_path, 3, {"step": 3}, {"model": {"w": torch.randn(3)}})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None and not any(tmp_path.iterdir())  # nothing half-written is left


def test_train_step_is_the_written_out_step(digits):
    """One Trainer step against the step written out here: the drawn images flipped left-right where drawn,
    q_sample's target, L_simple with min-SNR weighting, the gradient clipped (to a norm it exceeds), Adam at
    the warm-up's learning rate. Same parameters, bit for bit; a fresh run seed each time."""
    seed = int(torch.randint(0, 2**62, ()))
    config = _config(seed=seed, grad_clip=1e-3, min_snr_gamma=5.0, flip=True, prediction_type="v_prediction")
    trainer = Trainer(config, None, dataset=digits)
    model = copy.deepcopy(trainer.model)
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
        trainer = Trainer(_config(steps=3, checkpoint_every=100), None, dataset=digits)
        for module in trainer.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        losses = trainer.train()
        assert torch.equal(torch.get_rng_state(), state), "training moved the caller's random stream"
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
