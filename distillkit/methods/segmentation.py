"""Moved to :mod:`distillkit.methods.cord.segmentation`; this name stays importable (the same module object)."""
import sys

from distillkit.methods.cord import segmentation as _moved

sys.modules[__name__] = _moved
