"""Moved to :mod:`distillkit.pipeline.answers`; this name stays importable (the same module object)."""
import sys

from distillkit.pipeline import answers as _moved

sys.modules[__name__] = _moved
