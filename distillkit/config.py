"""Moved to :mod:`distillkit.pipeline.config`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import config as _moved

sys.modules[__name__] = _moved
