"""Moved to :mod:`distillkit.pipeline.runs`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import runs as _moved

sys.modules[__name__] = _moved
