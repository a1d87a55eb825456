"""The ``backend`` fixture: every op test runs on each kernel backend that this machine can run.

* ``cpu``: the C++ kernels (skipped when the extension is not built);
* ``triton``: natively on a CUDA device, otherwise on Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  set below before any kernel module is imported, because Triton reads it when a kernel is defined);
* ``cuda``: the CUDA kernels on a CUDA device; without one, the same kernel sources on the CPU through the
  emulator of CUDA's execution model that development builds carry (``ddpm_fast._cuda_emulator``,
  ``DDPM_FAST_EMULATE_CUDA=1`` set below); skipped, with the reason, when neither is there.

The interpreter costs ~10-50 ms per program, so under it the heaviest parametrizations keep to a
representative subset (``backend.subset(keep)``); on a GPU (and on the emulator) every case runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


def _triton_version() -> tuple[int, int] | None:
    """The installed triton's (major, minor), None without one; read without importing triton, whose import
    reads TRITON_INTERPRET (set below)."""
    from importlib.metadata import PackageNotFoundError, version
    for distribution in ("triton", "pytorch-triton"):
        try:
            return tuple(int(v) for v in version(distribution).split(".")[:2])
        except PackageNotFoundError:
            pass
    return None


# Triton's interpreter runs these kernels from 3.4: 3.0-3.1 read a constexpr annotation written as a string
# (this package's `from __future__ import annotations`) as a plain argument, and with NumPy 2 its stores write
# nothing; 3.2-3.3 ask for a GPU driver when an autotuned kernel is defined. With an older one and no GPU the
# triton backend counts as missing, for this reason (the header and every skip say it).
_found = _triton_version()
TRITON_INTERPRETER_TOO_OLD = None
if not torch.cuda.is_available():
    os.environ["DDPM_FAST_EMULATE_CUDA"] = "1"
    if _found is not None and _found >= (3, 4):
        os.environ["TRITON_INTERPRET"] = "1"
    elif _found is not None:
        TRITON_INTERPRETER_TOO_OLD = (f"triton {_found[0]}.{_found[1]}'s CPU interpreter cannot run the kernels (the "
                                      "tests need triton >= 3.4 there, or a GPU)")


def pytest_report_header(config):
    return TRITON_INTERPRETER_TOO_OLD


def _patch_triton_interpreter_index() -> None:
    """Triton < 3.7's interpreter turns a scalar kernel argument used as a loop bound (``range(0, Cg, ...)``)
    into ``int`` of a 1-element 1-d array: a DeprecationWarning under NumPy 1.25-2.3 (an error here, where
    warnings are errors), a TypeError from NumPy 2.4 (triton-lang/triton#9171, fixed in 3.7 by #9172).
    torch 2.11 pins Triton 3.6, so a CPU run of this suite in the GPU image's versions hits it. Re-patch the
    attribute as ``int(data.squeeze())`` in the interpreter's per-launch scope (its own restore undoes it).
    Tests only: the interpreter is a test tool, and compiled kernels on a GPU never take this path."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1" and (_found or (3, 7)) < (3, 7):
    _patch_triton_interpreter_index()

import ddpm_fast  # noqa: E402  (after TRITON_INTERPRET is set)
from ddpm_fast._native import cuda_emulator_missing_reason  # noqa: E402

if TRITON_INTERPRETER_TOO_OLD is not None:  # what build_info() says of the triton backend, in every test
    ddpm_fast._native._triton_missing_reason = lambda: TRITON_INTERPRETER_TOO_OLD

# DDPM_FAST_EMULATOR_SCHEDULE=forward|reverse|random[:seed]: the order in which the CUDA kernels' emulator
# runs threads and blocks between barriers, for the whole session (a missing barrier shows up in some
# orders and not others; scripts/emulator_memcheck.sh runs a random one).
_SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
if os.environ.get("DDPM_FAST_EMULATOR_SCHEDULE") and ddpm_fast._native._cuda_emulator is not None:
    _order, _, _seed = os.environ["DDPM_FAST_EMULATOR_SCHEDULE"].partition(":")
    ddpm_fast._native._cuda_emulator.set_schedule(_SCHEDULES[_order], int(_seed or 0))

BACKENDS = ("cpu", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device
    interpreted: bool  # triton on the CPU interpreter

    def to(self, *tensors):
        """The tensors on this backend's device (None stays None); memory formats are kept."""
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    def subset(self, keep: bool) -> None:
        """Skip a case that the interpreter need not repeat: ``keep`` marks the representative ones."""
        if self.interpreted and not keep:
            pytest.skip("triton on the CPU interpreter runs a representative subset (the full set on a GPU)")


def _unavailable(name: str) -> str | None:
    reason = ddpm_fast.build_info()["backends"][name]
    if reason != "available" and name == "cuda" and not torch.cuda.is_available():
        emulator = cuda_emulator_missing_reason()
        return None if emulator is None else f"{reason}; {emulator}"
    return None if reason == "available" else reason


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    name = request.param
    reason = _unavailable(name)
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")
    on_cuda = name in ("cuda", "triton") and torch.cuda.is_available()
    return Backend(name, torch.device("cuda" if on_cuda else "cpu"), interpreted=name == "triton" and not on_cuda)


@pytest.fixture
def backend_on_cpu():
    """``backend_on_cpu(name)`` skips the test unless backend ``name`` takes CPU tensors here: ``cpu`` the C++
    kernels; ``cuda`` the CUDA kernels' emulator (where there is no GPU)."""
    def require(name: str) -> None:
        reason = _unavailable(name)
        if name == "cuda" and torch.cuda.is_available():
            reason = "a CUDA device is present (the emulator runs the CUDA kernels only where there is none)"
        if reason is not None:
            pytest.skip(f"{name} backend on CPU tensors: {reason}")
    return require


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """On a GPU machine, tests not marked gpu still train and sample on the CPU, as they were written to (their
    bit-exact expectations are the CPU's): the device that ddpm_fast picks by itself is pinned there."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        from ddpm_fast import distributed
        monkeypatch.setattr(distributed, "default_device", lambda: torch.device("cpu"))


def _torch_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: networks at 8x8 take microseconds per op, and on a loaded 2-core
    machine two OpenMP threads waiting at barriers made the tiny UNet's forward 60x slower (0.6 s, not 10 ms)."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """torch (and so the cpu kernels, which take torch's thread count) on two threads for the test: the kernels
    split work over threads only past ~64K-256K elements, and a test of that split must not depend on the
    machine's default (one thread under some CI runners' limits)."""
    yield from _torch_threads(2)
