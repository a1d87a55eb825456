"""The ``triton`` backend: Triton kernels of the fused ops.

A kernel module is imported on the first call that uses it, so importing ddpm_fast never imports Triton
(which may be absent, and which reads ``TRITON_INTERPRET`` when its kernels are defined).
"""

from __future__ import annotations

import importlib


def launcher(module: str, function: str = "launch"):
    """A launcher that imports ``ddpm_fast.ops.triton.<module>`` when first called and runs ``function``."""
    def launch(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(*args)

    launch.__name__ = f"triton_{module}_{function}"
    return launch
