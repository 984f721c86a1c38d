"""distillkit: fused kernels and methods for reasoning distillation of LLMs.

``import distillkit`` loads torch only; every op and method module loads on first use.
"""
from __future__ import annotations

import importlib

from distillkit._backend import BackendUnavailable, backends
from distillkit._errors import InputError

# the one place the version is written: pyproject.toml reads this literal without importing the package
__version__ = "0.1.0"

# public name -> module that defines it (loaded on first attribute access)
_LAZY = {
    "skew_kl": "distillkit.ops.skew_kl",
    "skew_reverse_kl": "distillkit.ops.skew_kl",
    "fused_linear_skew_kl": "distillkit.ops.fused_linear",
    "fused_linear_skew_reverse_kl": "distillkit.ops.fused_linear",
    "answer_logprobs": "distillkit.ops.scoring",
    "predictive_perplexity": "distillkit.ops.scoring",
}
_SUBMODULES = ("merge", "losses", "validity", "scoring", "teachers", "methods", "world", "reference", "ops")

__all__ = ["BackendUnavailable", "InputError", "backends", "__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"distillkit.{name}")
    raise AttributeError(f"module 'distillkit' has no attribute {name!r}")
