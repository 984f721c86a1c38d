"""Moved to :mod:`distillkit.pipeline.train`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import train as _moved

sys.modules[__name__] = _moved
