"""The fused ops, each a ``torch.library`` custom op behind a validating Python function."""

from .backend import BACKENDS, get_backend, set_backend, use_backend
from .group_norm import group_norm_silu
from .normal import randn
from .q_sample import q_sample
from .step import step

__all__ = ["BACKENDS", "get_backend", "group_norm_silu", "q_sample", "randn", "set_backend", "step",
           "use_backend"]
