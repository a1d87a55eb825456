"""The weight casts of a sampling loop, made once per run instead of once per step.

Under autocast every Linear and convolution casts its float32 weight and bias to the autocast dtype. An
eager loop inside one autocast region casts each weight once (autocast caches the casts while the region
lasts), but a region entered inside the model (a wrapper calling ``torch.autocast`` per forward) or a
captured CUDA graph (which must not keep autocast's cache, see the Sampler) casts them again every step:
156 cast kernels per step for the cifar10 U-Net (its 65 convolutions and 24 attention projections),
about half as many as all its other kernels at batch 1. A model held in bfloat16 casts too: every fused
GroupNorm takes its weight and bias in float32 (102 casts), and the time embedding and its projections run in
float32 (70 more): 172 casts per cifar10 step.

:meth:`WeightCasts.record` runs the model once and notes the parameters of its layers that are cast to
one other dtype and used in no other way. :meth:`WeightCasts.swapped` puts casts of exactly those in their
place for a sampling run (made once per run, into the same tensors each time). Autocast then
finds them already in its dtype and casts nothing, so every other kernel reads the values it read before:
the outputs are the same, bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _CastRecorder(TorchDispatchMode):
    """Notes, per parameter, the dtypes it is cast to and whether any other op reads it."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names                      # id(parameter) -> name
        self.casts: dict[str, set] = {}         # name -> dtypes it was cast to
        self.read: set[str] = set()             # names some other op read as they are

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and id(source) in self.names and _only_dtype(source, kwargs):
            self.casts.setdefault(self.names[id(source)], set()).add(kwargs["dtype"])
        else:
            for value in tree_leaves((args, kwargs)):
                if isinstance(value, Tensor) and id(value) in self.names:
                    self.read.add(self.names[id(value)])
        return func(*args, **kwargs)


def _only_dtype(source: Tensor, kwargs: dict) -> bool:
    """Whether a ``_to_copy`` of ``source`` changes its floating dtype and nothing else."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    return (source.is_floating_point() and dtype is not None and dtype.is_floating_point and dtype != source.dtype
            and (device is None or torch.device(device) == source.device)
            and kwargs.get("layout") in (None, torch.strided)
            and kwargs.get("memory_format") in (None, torch.preserve_format))


def _known_layer(module: nn.Module) -> bool:
    """PyTorch's layers and ours, and subclasses of Linear and the convolutions (LoRA-style layers keep
    F.linear / F.conv*): no kernel outside the dispatcher reads their parameters."""
    return (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            or type(module).__module__.startswith(("torch.nn.", "ddpm_fast.")))


Slot = tuple[dict, str, Tensor]  # (a module's _parameters or _buffers, the name in it, the tensor there)


def parameter_slots(model: nn.Module) -> list[Slot]:
    """Where each parameter and buffer of ``model`` sits, by one walk over its modules: a plain recursion,
    ~3x cheaper than ``named_parameters()`` (0.4 ms against 1.1 ms for the cifar10 U-Net here), and a
    sampler looks at its model's tensors on every call."""
    slots: list[Slot] = []
    add = slots.append

    def walk(module: nn.Module) -> None:
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    add((table, name, tensor))
        for child in module._modules.values():
            if child is not None:
                walk(child)

    walk(model)
    return slots


def storage_key(slots: list[Slot]) -> tuple:
    """What a captured graph or a recorded plan bakes in: every tensor's address and dtype."""
    return tuple((tensor.data_ptr(), tensor.dtype) for _, _, tensor in slots)


class WeightCasts:
    """Casts of some of ``model``'s parameters, swapped in for the parameters during a sampling run.

    Build with :meth:`record`; ``plan`` maps each hoisted parameter's name to its cast dtype.
    """

    def __init__(self, model: nn.Module, plan: dict[str, torch.dtype]):
        self.model, self.plan = model, plan
        params = dict(model.named_parameters())
        self._sources = {id(params[name]): (params[name], dtype) for name, dtype in plan.items()}
        # id(source) -> its cast, a Parameter of the source's requires_grad
        self._casts: dict[int, nn.Parameter] = {}

    @classmethod
    def record(cls, model: nn.Module, run: Callable[[], object]) -> "WeightCasts":
        """Run ``run()`` (one forward of ``model``) and keep the parameters it only ever casts, each to one dtype.

        The global random state is restored afterwards, so the extra forward leaves a dropout in train mode
        drawing what it would have drawn.
        """
        # Candidates: parameters of layers known to read them through the dispatcher only (where the
        # recording sees every read); the recording keeps those that are only cast.
        owned = {id(p) for m in model.modules() if _known_layer(m) for p in m._parameters.values() if p is not None}
        names = {id(p): name for name, p in model.named_parameters() if id(p) in owned}
        recorder = _CastRecorder(names)
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), recorder:
            run()
        plan = {name: next(iter(dtypes)) for name, dtypes in recorder.casts.items()
                if len(dtypes) == 1 and name not in recorder.read}
        return cls(model, plan)

    def refresh(self) -> None:
        """Make the casts, or redo them all in place (a captured graph keeps reading the same cast tensors).

        Every call recasts: a write through ``.data`` (diffusers' ``EMAModel.copy_to``, for one) leaves the
        parameter's version counter alone, so nothing cheaper can tell a changed weight from an unchanged one.
        One cast per weight per sampling run is what hoisting saves the other steps of the run from."""
        casts = self._casts
        for key, (source, dtype) in self._sources.items():
            cast = casts.get(key)
            # Each cast keeps its parameter's requires_grad, though nothing is recorded under no_grad: matmul
            # picks its kernels by it (a weight that requires grad folds a 3-d input into one mm), as it does
            # for autocast's casts; another flag would change the bits of an attention projection.
            if cast is None:
                casts[key] = nn.Parameter(source.detach().to(dtype), requires_grad=source.requires_grad)
                continue
            with torch.no_grad():
                cast.copy_(source)
            cast.requires_grad_(source.requires_grad)

    @contextlib.contextmanager
    def swapped(self, slots: list[Slot]) -> Iterator[None]:
        """The casts in the ``slots`` (from :func:`parameter_slots`) of their parameters while the block runs."""
        self.refresh()
        saved = [(table, name, tensor) for table, name, tensor in slots if id(tensor) in self._casts]
        try:
            for table, name, tensor in saved:
                table[name] = self._casts[id(tensor)]
            yield
        finally:
            for table, name, tensor in reversed(saved):
                table[name] = tensor
