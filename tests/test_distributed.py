"""torch.distributed on the CPU: torchrun with 2 gloo processes trains (DDP) and samples (sharded seeds),
and both equal what one process computes for the same global batch and seeds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_fast import Sampler, distributed
from ddpm_fast.data import load_digits
from ddpm_fast.train import TrainConfig, Trainer, load_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


DRIVER = """
import os, sys
from ddpm_fast import cli, distributed
# Both commands in one launch and one process group (a torchrun start costs three torch imports); "{rank}" in an
# argument is the rank's number.
argv = [a.replace("{rank}", os.environ["RANK"]) for a in sys.argv[1:]]
then = argv.index("--then") if "--then" in argv else len(argv)
with distributed.process_group():
    assert distributed.is_distributed()
    status = cli.main(argv[:then]) or (then < len(argv) and cli.main(argv[then + 1:]))
sys.exit(status)
"""


def _torchrun_command(tmp_path, *args):
    """The launch of DRIVER on 2 ranks, and its environment."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver), *args]
    # The CPU and gloo, even on a machine with GPUs (two ranks on one GPU is an NCCL error).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "CUDA_VISIBLE_DEVICES": ""}
    return cmd, env


def _torchrun(tmp_path, *args, timeout=300, succeeds=True):
    cmd, env = _torchrun_command(tmp_path, *args)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert (run.returncode == 0) == succeeds, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_two_gloo_processes_train_and_sample(tmp_path):
    run, out = tmp_path / "run", tmp_path / "grid.png"
    _torchrun(tmp_path, "train", "--out", str(run), "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
              "--lr", "1e-3", "--warmup-steps", "1", "--seed", "3", "--device", "cpu",
              "--then", "sample", str(run), "--num-samples", "5", "--steps", "3", "--seed", "11", "--out", str(out),
              "--device", "cpu")
    logged = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 2, "rank 0 alone logs, once per step"

    # One process, the same global batches: the DDP-averaged gradient is this batch's gradient, so the
    # losses agree up to float32 summation order (ranks average two half-batch means).
    torch.set_num_threads(1)
    single = Trainer(TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1, seed=3), None,
                     dataset=load_digits("train"))
    np.testing.assert_allclose(logged, single.train(), rtol=1e-5)
    distributed_model, schedule, _ = load_model(run, weights="model")
    a = torch.cat([p.flatten() for p in distributed_model.parameters()])
    b = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    # Adam divides each gradient element by its own magnitude, so an element whose gradient is ~0 may move
    # by up to lr either way on a rounding difference: every element is within 2 steps x lr, and all
    # but a handful agree to float32 rounding of the summation order.
    assert (a - b).abs().max() <= 2 * 1e-3
    close = torch.isclose(a, b, rtol=1e-4, atol=1e-6)
    assert close.float().mean() > 0.999, f"{(~close).sum()} of {a.numel()} parameters differ"

    # Sharded sampling: 5 seeds over 2 ranks (3 + 2), gathered on rank 0 in seed order.
    with np.load(out.with_suffix(".npz")) as npz:
        gathered, seeds = torch.from_numpy(npz["images"]), npz["seeds"].tolist()
    assert seeds == [11, 12, 13, 14, 15] and gathered.shape == (5, 1, 16, 16)
    ema, schedule, _ = load_model(run)
    expected = Sampler(ema, schedule, method="ddim", num_steps=3).sample(seeds, (1, 16, 16))
    # Each image is a function of its seed; only the model's batch-size-dependent rounding differs.
    torch.testing.assert_close(gathered, expected, rtol=0, atol=1e-4)


def test_ctrl_c_to_torchrun_ends_every_rank_after_one_step_with_its_checkpoint(tmp_path):
    """Ctrl-C reaches torchrun's agent (its workers run in sessions of their own), which sends SIGINT on to every
    rank: each asks to stop at its own moment, the vote rides the loss's all-reduce, and both ranks end after the
    same step with a checkpoint of it, no logged step lost."""
    import signal
    import time
    run = tmp_path / "run"
    # Steps enough to outlast the test; finite, so that ranks a failed test leaves behind end by themselves.
    cmd, env = _torchrun_command(tmp_path, "train", "--out", str(run), "--steps", "2000", "--batch-size", "8",
                                 "--checkpoint-every", "100000", "--device", "cpu")
    log = run / "log.jsonl"
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (log.is_file() and log.read_text().count("\n") >= 3) and agent.poll() is None:
            assert time.monotonic() < deadline, "no training steps logged within 240 s"
            time.sleep(0.2)
        agent.send_signal(signal.SIGINT)
        _, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:  # the agent passes SIGTERM on to its ranks
            agent.terminate()
            try:
                agent.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.communicate()
    said = " ".join(stderr.split())
    assert said.count("stopping after this step to save a checkpoint") == 2, said[-3000:]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step_{steps[-1]:08d}"], (checkpoints, steps[-1])


def test_ranks_that_see_different_checkpoints_stop_before_training(tmp_path):
    """Nodes without a shared filesystem: rank 0 resumes from the checkpoint it sees, rank 1 sees none and starts
    afresh. They would train two models (DDP averages their gradients) and, at different steps, end with a
    hang; every rank stops before its first step instead, saying why."""
    from ddpm_fast import cli
    assert cli.main(["train", "--out", str(tmp_path / "run0"), "--steps", "1", "--batch-size", "8",
                     "--device", "cpu"]) == 0
    run = _torchrun(tmp_path, "train", "--out", str(tmp_path / "run{rank}"), "--steps", "2", "--batch-size", "8",
                    "--device", "cpu", succeeds=False)
    said = " ".join(run.stderr.split())
    assert said.count("the torch.distributed ranks start at different steps (rank 0: 1, rank 1: 0)") == 2, said
    assert not (tmp_path / "run1" / "checkpoints").exists()  # rank 1 took no step


def test_sharded_sampling_splits_per_sample_conditioning_with_the_seeds(monkeypatch):
    """5 seeds over 2 ranks (3 + 2): each rank's sampler gets its seeds and their rows of a (5, ...) tensor in
    model_kwargs; a tensor of another length and other values go whole (rank and group faked in-process)."""
    got = {}

    class Recorder:
        def sample(self, seeds, shape, device, model_kwargs):
            got[distributed.rank()] = (seeds.tolist(), model_kwargs)
            return torch.zeros((len(seeds), *shape))
    seeds, labels, table = torch.arange(10, 15), torch.randint(0, 9, (5,)), torch.randn(7)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "all_gather", lambda out, x: None)
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        distributed.sample_sharded(Recorder(), seeds, (1, 2, 2), "cpu",
                                   model_kwargs={"class_labels": labels, "table": table, "scale": 2.0})
    for r, part in ((0, slice(0, 3)), (1, slice(3, 5))):
        shard, kwargs = got[r]
        assert shard == seeds[part].tolist() and torch.equal(kwargs["class_labels"], labels[part])
        assert kwargs["table"] is table and kwargs["scale"] == 2.0


def test_process_group_leaves_with_peers_on_success_and_at_exit_on_error(monkeypatch):
    """A body that raises must not reach shutdown's barrier: its peers may be blocked in a collective it
    will never join, and the barrier would hold this rank for the group's whole timeout."""
    left = []
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: True)
    monkeypatch.setattr(distributed, "shutdown", lambda: left.append("shutdown"))
    with distributed.process_group():
        pass
    assert left == ["shutdown"]
    with pytest.raises(KeyError, match="boom"), distributed.process_group():
        raise KeyError("boom")
    assert left == ["shutdown"]
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: False)  # a caller's group, or none
    with distributed.process_group():
        pass
    assert left == ["shutdown"]
    asked = []  # train / sample --device cpu join with gloo, where a GPU machine would pick nccl
    monkeypatch.setattr(distributed, "init_from_env", lambda backend=None: asked.append(backend))
    with distributed.process_group("gloo"):
        pass
    assert asked == ["gloo"]
