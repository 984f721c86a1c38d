"""Generation backends behind one interface (:class:`Teacher.propose`): ``hf`` (default) and ``vllm``.

Backends load lazily: ``import distillkit.teachers`` does not import transformers or vllm.
"""
from __future__ import annotations

from distillkit.teachers.base import Proposal, StepBoundary, StringStop, Teacher, as_boundary

__all__ = ["Proposal", "StepBoundary", "StringStop", "Teacher", "as_boundary", "load_teacher"]


def load_teacher(path: str, *, backend: str = "hf", name: str | None = None, **kwargs) -> Teacher:
    """A teacher from a checkpoint path or Hub id with the named backend ("hf" or "vllm")."""
    if backend == "hf":
        from distillkit.teachers.hf import HFTeacher

        return HFTeacher.from_pretrained(path, name=name, **kwargs)
    if backend == "vllm":
        from distillkit.teachers.vllm import VLLMTeacher

        return VLLMTeacher(path, name=name, **kwargs)
    raise ValueError(f"backend={backend!r}: expected 'hf' or 'vllm'")
