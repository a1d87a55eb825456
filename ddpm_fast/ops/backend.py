"""Which implementation runs an op: ``cuda | triton | cpu | torch``.

Each op declares the native backends it has kernels for. The choice, in order: the call's ``backend=``,
then the global one (:func:`set_backend` / :func:`use_backend`), then automatic by the device of the
inputs: CUDA tensors take the faster of ``cuda`` and ``triton`` for that op (:data:`CUDA_PREFERENCE`),
then the other (``triton`` is what runs when the extension was built without CUDA); CPU tensors take
``cpu`` (never ``triton``: on the CPU it is the interpreter, a test vehicle, so only on request);
``torch`` (the pure-PyTorch reference) is the fallback everywhere. An explicit request that cannot run
raises and says why. A call past a kernel's shape limit (a GroupNorm group too wide for the CUDA kernels'
shared memory), or one that needs a derivative the kernels do not give (:func:`derivative_refusal`), skips
that backend in the automatic choice, and an explicit request for it raises before anything runs. ``cuda``
takes CPU tensors only under ``DDPM_FAST_EMULATE_CUDA=1``, through the emulator of the CUDA kernels that
development builds carry (a test vehicle, like Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch
from torch._C._functorch import is_gradtrackingtensor
from torch.autograd import forward_ad

from .._native import backend_missing_reason, cuda_emulator_missing_reason

BACKENDS = ("cuda", "triton", "cpu", "torch")

# Per op, the order in which CUDA tensors try the two GPU backends: the faster first, by the median times
# of the op's benchmark cases in the newest GPU record of benchmarks/results/ (`python benchmarks/table.py
# --device cuda --record`; `python benchmarks/preference.py` prints this table from it). No GPU record
# compares them yet, so the compiled kernels lead everywhere; a GPU session that records both updates this
# table (and the README's backend section) from its numbers. The step with dynamic thresholding has an entry of
# its own: its time is mostly the per-sample select, whose kernels differ from the step's.
CUDA_PREFERENCE = {
    "q_sample": ("cuda", "triton"),
    "step": ("cuda", "triton"),
    "step_thresholding": ("cuda", "triton"),
    "group_norm_silu": ("cuda", "triton"),
}


class _State(threading.local):
    backend: str | None = None  # a class default: reading it needs no getattr fallback (~2 us a call)


_state = _State()


def _check_name(backend: str | None, argument: str) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS} or None, got {backend!r}")


def set_backend(backend: str | None) -> None:
    """Force ``backend`` for every op on this thread (None: choose automatically)."""
    _check_name(backend, "backend")
    _state.backend = backend


def get_backend() -> str | None:
    """The backend forced on this thread, or None when ops choose automatically."""
    return _state.backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """``with use_backend("torch"): ...`` forces a backend inside the block (inside a ``torch.compile``d function
    from torch 2.7: older versions' dynamo cannot trace it; pass ``backend=`` to each op there)."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def on_device(where: torch.Tensor | torch.device):
    """Launch on the GPU of ``where`` (a tensor or a device), whichever is current: native and Triton kernels
    launch on the current device (a no-op context on the CPU)."""
    device = where.device if isinstance(where, torch.Tensor) else where
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def derivative_refusal(tensors, has_backward: bool) -> Callable[[str], str] | None:
    """A ``refuses`` for :func:`resolve` when the call needs a derivative that the native kernels do not
    give (the reference gives them all), else None: a backward (an input that requires grad, for an op
    without one), or a derivative of torch.func's (grad, jvp, ...) or of forward-mode AD (dual tensors),
    which would otherwise come back as zero without an error. The global states are asked first: a call
    under none of them (every inference and GroupNorm training call) costs ~1 us."""
    compiling = torch.compiler.is_compiling()
    grad = not has_backward and torch.is_grad_enabled()
    dual = forward_ad._current_level >= 0  # a module global: dynamo guards on it (and recompiles)
    transforms = not compiling and torch._C._are_functorch_transforms_active()  # (dynamo would not trace it)
    if not (grad or transforms or dual):
        return None
    tensors = [t for t in tensors if t is not None]
    why = None
    if grad and any(t.requires_grad for t in tensors):
        why = "its kernels have no backward, and an input requires grad (detach it, or run without grad)"
    elif transforms and any(is_gradtrackingtensor(t) for t in tensors):
        why = "its kernels have no torch.func derivative (grad, jvp, ...)"
    elif dual and (compiling or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)):
        # (a traced graph cannot ask which inputs carry tangents: under forward-mode AD, all go to the reference)
        why = "its kernels have no forward-mode derivative (a dual tensor is an input)"
    return None if why is None else (lambda candidate: why)


def _runs_on(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot take tensors on ``device``, or None."""
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got tensors on {device}"
    if backend == "cuda" and device.type == "cpu":
        reason = cuda_emulator_missing_reason()
        return None if reason is None else f"the cuda backend takes CUDA tensors, got CPU tensors ({reason})"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and (device.type != "cpu"
                                                          or os.environ.get("TRITON_INTERPRET") != "1"):
        return f"the triton backend takes CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device}"
    return backend_missing_reason(backend)


def _auto_order(op: str, device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return CUDA_PREFERENCE.get(op, ("cuda", "triton")) + ("torch",)
    if device_type == "cpu":
        return ("cpu", "torch")
    return ("torch",)


def resolve(op: str, native: tuple[str, ...], device: torch.device, backend: str | None,
            refuses: Callable[[str], str | None] | None = None, preference: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``; ``native`` lists the backends with kernels for it.
    ``preference`` names the :data:`CUDA_PREFERENCE` entry of a variant of the op (default: ``op``'s).

    ``refuses(candidate)``, when given, says why a candidate's kernels cannot take this call (a shape past a
    device limit): the automatic choice moves on to the next; an explicit request raises before anything
    runs (so a training step cannot fail in its backward after a forward that ran).
    """
    _check_name(backend, f"{op}: backend")
    requested = backend or get_backend()
    if requested is not None:
        if requested != "torch" and requested not in native:
            raise NotImplementedError(f"{op}: no {requested} kernel yet (kernels: {native + ('torch',)})")
        reason = _runs_on(requested, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {reason}")
        reason = refuses(requested) if refuses is not None and requested != "torch" else None
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} cannot take this call: {reason} "
                               f"(backend=None chooses one that can)")
        return requested
    for candidate in _auto_order(preference or op, device.type):
        if candidate == "torch" or (candidate in native and _runs_on(candidate, device) is None
                                    and (refuses is None or refuses(candidate) is None)):
            return candidate
    return "torch"
