"""Training: exact resume, crash-safe checkpoints, randomness as a function of (seed, step), EMA warm-up."""

import json

import pytest
import torch

from ddpm_fast import train as train_mod
from ddpm_fast.data import load_digits
from ddpm_fast.train import (EMA, TrainConfig, Trainer, draw_step, latest_checkpoint, load_checkpoint, load_model,
                             save_checkpoint)


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
