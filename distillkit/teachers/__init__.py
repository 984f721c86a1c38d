"""Generation backends behind one interface (:class:`Teacher.propose` / ``apropose``): ``hf`` (default),
``vllm`` (both in-process) and ``openai`` (a model served behind an OpenAI-compatible HTTP API).

Backends load lazily: ``import distillkit.teachers`` does not import transformers, vllm or httpx.
"""
from __future__ import annotations

from distillkit.teachers.base import Proposal, StepBoundary, StringStop, Teacher, as_boundary

__all__ = ["BACKENDS", "Proposal", "StepBoundary", "StringStop", "Teacher", "as_boundary", "load_teacher"]

BACKENDS = ("hf", "vllm", "openai")


def load_teacher(path: str, *, backend: str = "hf", name: str | None = None, **kwargs) -> Teacher:
    """A teacher with the named backend: "hf" or "vllm" load the checkpoint ``path`` (local path or Hub id)
    in this process; "openai" calls the model served under the name ``path`` at ``base_url`` (a keyword
    argument; see :class:`distillkit.teachers.openai.OpenAITeacher` for the others)."""
    if backend == "hf":
        from distillkit.teachers.hf import HFTeacher

        return HFTeacher.from_pretrained(path, name=name, **kwargs)
    if backend == "vllm":
        from distillkit.teachers.vllm import VLLMTeacher

        return VLLMTeacher(path, name=name, **kwargs)
    if backend == "openai":
        from distillkit.teachers.openai import OpenAITeacher

        return OpenAITeacher(path, name=name, **kwargs)
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
