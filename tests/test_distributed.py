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
    model_kwargs; a tensor of another length, a 0-d tensor and other values go whole; rank 0 gets every image in
    seed order, the others None (rank and group faked in-process: all_gather hands out each rank's shard)."""
    got = {}

    class Recorder:
        def sample(self, seeds, shape, device, model_kwargs=None):
            got[distributed.rank()] = (seeds.tolist(), model_kwargs)
            return seeds.double().add(0.5).view(-1, 1, 1, 1).expand(len(seeds), *shape).float()  # images of seeds
    seeds, labels, table = torch.arange(10, 15, dtype=torch.int32), torch.randint(0, 9, (5,)), torch.randn(7)
    scale = torch.tensor(1.5)
    shards = {}

    def all_gather(out, x):  # each rank's padded shard, as the ranks sent them (one pass per rank first)
        shards[distributed.rank()] = x.clone()
        for r, shard in shards.items():
            out[r].copy_(shard)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    for _ in range(2):
        results = []
        for r in (0, 1):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            results.append(distributed.sample_sharded(
                Recorder(), seeds, [1, 2, 2], "cpu",
                model_kwargs={"class_labels": labels, "table": table, "scale": 2.0, "guidance": scale}))
    for r, part in ((0, slice(0, 3)), (1, slice(3, 5))):
        shard, kwargs = got[r]
        assert shard == seeds[part].tolist() and torch.equal(kwargs["class_labels"], labels[part])
        assert kwargs["table"] is table and kwargs["scale"] == 2.0 and kwargs["guidance"] is scale
    assert results[1] is None
    assert torch.equal(results[0], Recorder().sample(seeds.long(), (1, 2, 2), "cpu"))
    # Without model_kwargs, nothing is added to the sampler's arguments.
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.sample_sharded(Recorder(), seeds.tolist(), (1, 2, 2), "cpu").shape == (5, 1, 2, 2)
    assert got[0][1] is None
    # Without a process group: the sampler's own call, over every seed.
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    alone = distributed.sample_sharded(Recorder(), seeds, [1, 2, 2], "cpu", model_kwargs={"class_labels": labels})
    assert torch.equal(alone, results[0]) and got[0][0] == seeds.tolist() and got[0][1]["class_labels"] is labels


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


def test_without_a_process_group_every_helper_is_a_single_process_no_op(monkeypatch):
    """No torchrun variables, no group: rank 0 of 1, and no collective is ever called (one would fail here)."""
    for name in ("barrier", "destroy_process_group", "all_reduce", "all_gather_object", "all_gather",
                 "init_process_group"):
        monkeypatch.setattr(distributed.dist, name, lambda *a, **k: pytest.fail("a collective without a group"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: no group either
    assert distributed.init_from_env("gloo") is False
    distributed.barrier()
    distributed.shutdown()
    value, model = torch.randn(3), torch.nn.Linear(2, 2)
    assert distributed.mean_over_ranks(value) is value
    assert distributed.gather({"step": 4}) == [{"step": 4}]
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model


def test_init_from_env_names_what_is_missing_and_takes_the_backend_and_gpu_of_its_rank(monkeypatch):
    joined, devices = [], []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: joined.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"^WORLD_SIZE is set but RANK, MASTER_ADDR, MASTER_PORT is not: launch "
                                           r"with torchrun$"):
        distributed.init_from_env()
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(RuntimeError, match=r"^WORLD_SIZE is set but MASTER_PORT is not"):
        distributed.init_from_env()
    assert joined == []
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.init_from_env() is True and joined == [(("gloo",), {})] and devices == []  # no CUDA: gloo
    # With GPUs: nccl, on the GPU of LOCAL_RANK (not RANK: 5 % 2 is another one), modulo the GPUs there are.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.default_device() == torch.device("cuda", 0)  # no LOCAL_RANK: the first GPU
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.init_from_env() is True
    assert joined[-1] == (("nccl",), {}) and devices == [torch.device("cuda", 1)]
    assert distributed.init_from_env("gloo") is True and joined[-1] == (("gloo",), {}) and len(devices) == 1
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)  # a caller's group: used as it is
    assert distributed.init_from_env() is False and len(joined) == 3


def test_collectives_with_a_group(monkeypatch):
    """With a group (faked: 2 ranks), the helpers call their collectives; the mean of a tensor is a new tensor."""
    called, collective_device = [], distributed._collective_device
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: called.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: called.append("destroy"))
    distributed.shutdown()
    assert called == ["barrier", "destroy"]
    distributed.barrier()
    assert called == ["barrier", "destroy", "barrier"]

    other = torch.randn(2, 3)  # the other rank's value, summed in place as all_reduce does
    monkeypatch.setattr(distributed, "_collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda buf: buf.add_(other))
    value = torch.randn(2, 3, requires_grad=True)
    kept = value.detach().clone()
    mean = distributed.mean_over_ranks(value)
    torch.testing.assert_close(mean, (kept + other) / 2, rtol=0, atol=0)
    assert torch.equal(value, kept) and not mean.requires_grad  # the caller's tensor is left alone

    def all_gather_object(out, obj):
        assert len(out) == 2
        out[:] = [("rank 0", obj), ("rank 1", obj)]
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert distributed.gather(7) == [("rank 0", 7), ("rank 1", 7)]

    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: wrapped.append((model, device_ids)) or "ddp")
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cuda", 1)) == "ddp"
    assert distributed.wrap_ddp(model, torch.device("cpu")) == "ddp"
    assert wrapped == [(model, [1]), (model, None)]  # a CPU model takes no device_ids

    # nccl's collectives take tensors on this rank's GPU, gloo's on the CPU (even on a machine with GPUs).
    monkeypatch.setattr(distributed, "default_device", lambda: torch.device("cuda", 1))
    for backend, device in (("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))):
        monkeypatch.setattr(distributed.dist, "get_backend", lambda backend=backend: backend)
        assert collective_device() == device
