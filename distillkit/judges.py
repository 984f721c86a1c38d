"""Moved to :mod:`distillkit.methods.vcrd.judges`; this name stays importable (the same module object)."""
import sys

from distillkit.methods.vcrd import judges as _moved

sys.modules[__name__] = _moved
