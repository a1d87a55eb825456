"""Loads the compiled module ``ddpm_fast._C`` and says clearly what was built and why a backend is missing."""

from __future__ import annotations

import functools
import importlib.util
import os

try:
    from . import _C
except ImportError as error:  # a source checkout that was never built, or a broken build
    _C = None
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if not any(name.startswith("_C.") for name in os.listdir(_HERE)):
        # Python's own message ("partially initialized module ... circular import") would mislead here.
        _IMPORT_ERROR: str | None = (
            f"ddpm_fast was imported from {_HERE}, which holds no compiled _C: a source checkout shadows an "
            "installed ddpm_fast when Python runs from its folder; run from another folder, or build it here "
            "with `pip install -e .`")
    else:
        _IMPORT_ERROR = f"ddpm_fast._C could not be imported ({error}); rebuild it with `pip install .`"
else:
    _IMPORT_ERROR = None

# The CUDA kernels' sources compiled for the host and run by an emulator of CUDA's execution model
# (csrc/cuda_emulator): a test vehicle that development builds carry. With DDPM_FAST_EMULATE_CUDA=1 the
# cuda backend takes CPU tensors through it, when asked for (never by automatic choice).
# DDPM_FAST_CUDA_EMULATOR_MODULE names another build of it to load instead (scripts/emulator_memcheck.sh
# loads one built with AddressSanitizer).


def _load_cuda_emulator():
    path = os.environ.get("DDPM_FAST_CUDA_EMULATOR_MODULE")
    if path:
        spec = importlib.util.spec_from_file_location(f"{__package__}._cuda_emulator", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        from . import _cuda_emulator
    except ImportError:
        return None
    return _cuda_emulator


_cuda_emulator = _load_cuda_emulator()

EMULATE_CUDA_ENV = "DDPM_FAST_EMULATE_CUDA"


def cpu_kernels():
    """The C++ CPU launchers, or None when the extension is missing."""
    return None if _C is None else _C.cpu


def cuda_kernels():
    """The CUDA launchers, or None when the extension was built without CUDA."""
    return getattr(_C, "cuda", None)


def native_kernels(backend: str, device):
    """The launchers of the compiled ``cpu`` or ``cuda`` backend for tensors on ``device`` (``_C.cpu`` /
    ``_C.cuda``; the CUDA kernels' emulator for CPU tensors on the ``cuda`` backend)."""
    if backend == "cpu":
        return cpu_kernels()
    return _cuda_emulator if device.type == "cpu" else cuda_kernels()


def launch_context(backend: str, device) -> int:
    """The last argument of every native launcher: the thread count on the CPU, the current stream's handle
    on CUDA (kernels run on the caller's stream; the emulator takes none)."""
    import torch

    if backend == "cpu":
        return torch.get_num_threads()
    return 0 if device.type == "cpu" else torch.cuda.current_stream(device).cuda_stream


def cuda_emulator_missing_reason() -> str | None:
    """Why the cuda backend cannot take CPU tensors through the emulator now, or None when it can."""
    if _cuda_emulator is None:
        return ("the CUDA kernels' emulator is not built (editable builds with the CUDA headers build it; "
                "DDPM_FAST_CUDA_EMULATOR=ON forces it)")
    if os.environ.get(EMULATE_CUDA_ENV) != "1":
        return f"set {EMULATE_CUDA_ENV}=1 to run the CUDA kernels on the CPU emulator"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_runtime() -> dict | None:
    kernels = cuda_kernels()
    return None if kernels is None else kernels.runtime_info()


def _cuda_version(version: int) -> str:
    """CUDA's integer versions as text: 12040 -> "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _triton_missing_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def backend_missing_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None when it can (op coverage aside)."""
    import torch

    if backend == "torch":
        return None
    if backend == "cpu":
        return _IMPORT_ERROR
    if backend == "cuda":
        if _C is None:
            return _IMPORT_ERROR
        if cuda_kernels() is None:
            return f"the extension was built without CUDA ({_C.build_info()['cuda_missing_reason']})"
        runtime = _cuda_runtime()
        if runtime["device_count"] == 0:
            driver, built = runtime["driver_version"], runtime["runtime_version"]
            if 0 < driver < built // 1000 * 1000:  # the same major version runs (CUDA's minor-version compatibility)
                return (f"the NVIDIA driver supports CUDA up to {_cuda_version(driver)}, and this extension was built "
                        f"with CUDA {_cuda_version(built)}: update the driver, or build with a CUDA toolkit the driver "
                        f"supports ({runtime['error']})")
            if driver == 0:  # cudaDriverGetVersion's answer without a driver, whose error reads "insufficient"
                return f"no NVIDIA driver is installed ({runtime['error']})"
            return f"no CUDA device ({runtime['error']})"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (a CPU build of PyTorch?)"
        return None
    if backend == "triton":
        reason = _triton_missing_reason()
        if reason is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "no CUDA device for Triton (set TRITON_INTERPRET=1 to run it on the CPU interpreter)"
        return reason
    raise ValueError(f"unknown backend {backend!r}")


def build_info() -> dict:
    """Version, compiler, CUDA version and architectures, and each backend's availability (with the reason)."""
    import torch

    from . import __version__

    info = {"version": __version__, "torch": torch.__version__}
    if _C is None:
        info.update(compiler=None, cpu_philox=None, cpu_clone=None, cuda_compiled=False, cuda_version=None,
                    cuda_archs="", cuda_missing_reason=_IMPORT_ERROR)
    else:
        info.update(_C.build_info())
        runtime = _cuda_runtime()
        if runtime is not None:
            info["cuda_runtime"] = runtime
    info["backends"] = {name: backend_missing_reason(name) or "available"
                        for name in ("cuda", "triton", "cpu", "torch")}
    info["cuda_emulator"] = cuda_emulator_missing_reason() or "available"
    return info
