"""Each fused op's ``torch.library`` registration, and a call that skips the dispatcher when it has no work.

Through the dispatcher a custom op call costs ~70 µs of Python before the implementation runs (the autograd
wrapper, the redispatch, the output-alias checks): on the CPU, 1 thread, ``group_norm_silu`` on (1, 32, 8, 8)
float32 took 108 µs through ``torch.ops`` and 36 µs calling the implementation, and a batch-1 U-Net forward
makes ~30 such calls. When nothing between the call and the implementation would act on it, :func:`call`
runs the implementation itself: the same function, so the same outputs, bit for bit. The custom op stays
what ``torch.compile``, ``opcheck``, autograd, ``register_fake`` and every mode see.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._C import (_are_functorch_transforms_active, _is_tracing, _len_torch_dispatch_stack,
                      _len_torch_function_stack)
from torch.autograd import _profiler_enabled
from torch.compiler import is_compiling

# nn.Parameter disables __torch_function__, so it reaches kernels as a plain tensor; any other subclass may
# override what the op means. The other arguments of our schemas are None, bool, int, float and str; any
# other type (a SymInt, say) means someone is tracing.
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, str})
_IMPLEMENTATIONS: dict[object, Callable] = {}


def custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())`` as a decorator, for ops that :func:`call` runs."""
    def register(implementation: Callable):
        op = torch.library.custom_op(name, implementation, mutates_args=())
        _IMPLEMENTATIONS[op] = implementation
        return op
    return register


def needs_dispatcher(args) -> bool:
    """Whether anything could act on a call with ``args`` between the op and its implementation.

    Tracing (torch.compile / export, jit.trace), a TorchDispatchMode (FakeTensorMode, FunctionalTensorMode,
    make_fx, user modes) or TorchFunctionMode, a functorch transform (vmap, grad), the profiler (it records
    the op by name), a tensor subclass, a negated view (the dispatcher materialises it, e.g. ``z.conj().imag``)
    or autograd (grad mode on and a tensor requiring grad: torch's own rule for recording the op), or a zero
    tensor (autograd's efficient zeros have no storage: the dispatcher materialises them).
    """
    if (is_compiling()  # first: under dynamo the rest is never traced
            or _len_torch_dispatch_stack() or _len_torch_function_stack() or _are_functorch_transforms_active()
            or _is_tracing() or _profiler_enabled()):
        return True
    grad = torch.is_grad_enabled()
    for value in args:  # type(...) in a set, not isinstance: ~2x cheaper, and exact
        kind = type(value)
        if kind in _PLAIN_TENSORS:
            if value.is_neg() or value._is_zerotensor() or (grad and value.requires_grad):
                return True
        elif kind not in _PLAIN_SCALARS:
            return True
    return False


def call(op, *args):
    """``op(*args)`` for an op registered with :func:`custom_op`, straight to its implementation when the
    dispatcher has no work (see :func:`needs_dispatcher`)."""
    if needs_dispatcher(args):
        return op(*args)
    return _IMPLEMENTATIONS[op](*args)
