"""torch.distributed glue: process-group setup from torchrun's environment, DDP, sharded sampling.

Launch any number of processes with torchrun (``torchrun --nproc-per-node 8 -m ddpm_fast train ...``);
each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins the group (nccl on CUDA, gloo on the CPU) and
takes its own GPU. Without those variables everything here is a single-process no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = ["barrier", "default_device", "gather", "init_from_env", "is_distributed", "mean_over_ranks",
           "process_group", "rank", "sample_sharded", "shutdown", "world_size", "wrap_ddp"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def default_device() -> torch.device:
    """This process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether this call created it.

    A group that already exists (a caller's) is used as it is and left to that caller to destroy.
    backend: None picks nccl when CUDA is available, else gloo.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Leave the process group, every rank together.

    The barrier is not ceremony. Gloo's worker thread drops its reference to a finished collective's
    tensors after the caller has moved on, and dropping the last reference to a tensor that Python has let
    go of takes the GIL. A rank that reaches interpreter exit first (rank 1 returns from the gather while
    rank 0 still writes the images) aborts that thread mid-destructor: "terminate called without an active
    exception", SIGABRT, in 1 of 28 looped two-process runs. Waiting in the barrier releases the GIL, and
    the worker thread finishes while this rank waits for the slowest one.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None) -> Iterator[None]:
    """The body runs in torchrun's process group when there is one (``init_from_env(backend)``).

    A body that returns leaves the group with ``shutdown``, together with the other ranks. A body that
    raises leaves it to process exit: a barrier would wait, up to the group's timeout, for peers that are
    blocked in a collective this rank will never join, while torchrun stops them as soon as this one exits.
    """
    created = init_from_env(backend)
    yield  # an exception from the body is raised here and skips the shutdown
    if created:
        shutdown()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    return default_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(value: Tensor) -> Tensor:
    """``value`` (float32, any shape) averaged over ranks; itself without a process group. Nothing waits for
    the result, which stays on the device."""
    if not is_distributed():
        return value
    buf = value.detach().float().to(_collective_device(), copy=True)
    dist.all_reduce(buf)
    return buf / world_size()


def gather(value) -> list:
    """``value`` of every rank, in rank order (a picklable object; ``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def wrap_ddp(model: nn.Module, device: torch.device) -> Callable:
    """The module to call for training: DistributedDataParallel under a process group, else the model."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sample_sharded(sampler, seeds: Tensor, shape, device, **kwargs) -> Tensor | None:
    """``sampler.sample`` over ``seeds`` split into contiguous shards, one per rank, gathered on rank 0.

    Each image depends on its seed only, so the result equals one process sampling every seed. A tensor of
    ``model_kwargs`` with one row per seed is split with the seeds; other values go to every rank whole.
    Returns (len(seeds), *shape) on rank 0 (CPU), None on the other ranks; without a process group, the
    plain ``sampler.sample(seeds)`` (moved to the CPU).
    """
    seeds = torch.as_tensor(seeds, dtype=torch.int64).cpu()
    if not is_distributed():
        return sampler.sample(seeds.to(device), tuple(shape), device=device, **kwargs).cpu()
    n, world = seeds.shape[0], world_size()
    per_rank = -(-n // world)
    part = slice(rank() * per_rank, (rank() + 1) * per_rank)
    if kwargs.get("model_kwargs"):  # per-sample conditioning (a tensor of len(seeds) rows) goes with its seeds,
        kwargs["model_kwargs"] = pytree.tree_map(  # also inside containers, as the Sampler takes them
            lambda v: v[part] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v, kwargs["model_kwargs"])
    images = sampler.sample(seeds[part].to(device), tuple(shape), device=device, **kwargs)
    # all_gather needs equal shapes: pad each shard to per_rank images (nccl and gloo both support it).
    padded = images.new_zeros((per_rank, *shape))
    padded[:images.shape[0]] = images
    padded = padded.to(_collective_device())
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    if rank() != 0:
        return None
    return torch.cat(gathered).cpu()[:n]
