"""One interface for proposing the next reasoning step(s) of many prefixes.

A teacher continues each prefix ``n`` times and stops each continuation at the next step
boundary. What a boundary is comes from a :class:`StepBoundary` (the segmentations in
``distillkit.methods.cord.segmentation`` implement it) or a plain list of stop strings. Backends:
``hf`` (Hugging Face ``generate``, the default, runs on CPU) and ``vllm`` (optional extra).

    teacher = HFTeacher.from_pretrained("path/or/hub-id")
    props = teacher.propose(["Q: 2+3?\\n<think>\\n"], n=2, max_new_tokens=64, stop=LineBreak())
    props[0][1].text, props[0][1].num_tokens, props[0][1].finished

``apropose`` is the same call as a coroutine, so that a driver can keep many proposals in flight:
served teachers (``openai``) send their requests concurrently; in-process engines (``hf``, ``vllm``)
run ``propose`` in a worker thread, one generation at a time per process (they share its random
state and devices), without blocking the event loop.
"""
from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

STOP_REASONS = ("boundary", "end", "stop", "eos", "length")


@dataclass(frozen=True)
class Proposal:
    """One continuation of a prefix.

    text:        the generated step, cut where the next step begins (or after the end marker);
                 text generated past the cut is dropped but still counted in ``num_tokens``.
    num_tokens:  tokens the teacher generated for it (its cost, EOS included when emitted).
    finished:    the continuation ends the reasoning (end marker or stop string reached, or EOS).
    stop_reason: "boundary" (next step begins), "end" (end marker such as "</think>"),
                 "stop" (a plain stop string), "eos" (the model's EOS) or "length" (max_new_tokens).
    """
    text: str
    num_tokens: int
    finished: bool
    stop_reason: str = "boundary"


@runtime_checkable
class StepBoundary(Protocol):
    """Where a generated continuation's first step ends."""

    def cut(self, text: str, *, final: bool = False) -> tuple[int, bool] | None:
        """(index where the step ends in ``text``, whether it ends the reasoning), or None if no
        boundary is in ``text`` yet. ``final`` says generation has stopped (no more text is coming),
        so a boundary that needs one more character to be confirmed may be accepted."""

    def stop_strings(self) -> list[str]:
        """Strings that approximate the boundary for engines that only take stop strings (vLLM);
        ``cut`` stays authoritative and is applied to their output."""


class StringStop:
    """A :class:`StepBoundary` made of plain stop strings: the text ends right after the first one."""

    def __init__(self, strings: Sequence[str]):
        strings = list(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop: expected a non-empty list of non-empty strings, got {strings!r}")
        self.strings = strings

    def cut(self, text: str, *, final: bool = False) -> tuple[int, bool] | None:
        ends = [i + len(s) for s in self.strings if (i := text.find(s)) >= 0]
        return (min(ends), True) if ends else None

    def stop_strings(self) -> list[str]:
        return list(self.strings)

    def __repr__(self) -> str:
        return f"StringStop({self.strings!r})"


class NoStop:
    """Generate until EOS or max_new_tokens."""

    def cut(self, text: str, *, final: bool = False) -> None:
        return None

    def stop_strings(self) -> list[str]:
        return []


def as_boundary(stop: StepBoundary | Sequence[str] | str | None) -> StepBoundary:
    """Accepts a StepBoundary, a stop string, a list of stop strings, or None (no stop)."""
    if stop is None:
        return NoStop()
    if isinstance(stop, str):
        return StringStop([stop])
    if isinstance(stop, StepBoundary):
        return stop
    if isinstance(stop, (list, tuple)):
        return StringStop(stop)
    raise TypeError(f"stop: expected a StepBoundary, a string, a list of strings or None, got {type(stop).__name__}")


def finish(text: str, boundary: StepBoundary, *, num_tokens: int, hit_eos: bool) -> Proposal:
    """Cuts a finished generation at its boundary and classifies why it stopped."""
    found = boundary.cut(text, final=True)
    if found is not None:
        idx, ends = found
        reason = ("stop" if isinstance(boundary, StringStop) else "end") if ends else "boundary"
        return Proposal(text[:idx], num_tokens, ends, reason)
    if hit_eos:
        return Proposal(text, num_tokens, True, "eos")
    return Proposal(text, num_tokens, False, "length")


def check_propose_args(prefixes, n: int, max_new_tokens: int, temperature: float,
                       top_p: float = 1.0) -> list[str]:
    if isinstance(prefixes, str):
        raise TypeError("prefixes: expected a list of strings, got a single string")
    prefixes = list(prefixes)
    if not all(isinstance(p, str) for p in prefixes):
        raise TypeError("prefixes: expected a list of strings")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}: expected >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1] (1 keeps the whole distribution)")
    return prefixes


# In-process engines share the process's random state (seeded sampling forks it) and its devices: one
# in-process generation runs at a time, whichever thread or task asks.
_IN_PROCESS_LOCK = threading.Lock()


class Teacher(abc.ABC):
    """A model that proposes continuations. ``name`` identifies it in traces and statistics."""

    name: str

    @abc.abstractmethod
    def propose(self, prefixes: Sequence[str], *, n: int = 1, max_new_tokens: int = 128,
                stop: StepBoundary | Sequence[str] | str | None = None, temperature: float = 0.0,
                seed: int | None = None, top_p: float = 1.0) -> list[list[Proposal]]:
        """Continues every prefix ``n`` times; returns ``[len(prefixes)][n]`` proposals.

        Each continuation stops at the first boundary of ``stop`` (see :class:`StepBoundary`), at
        EOS, or after ``max_new_tokens`` tokens. ``temperature`` 0 is greedy (then the n proposals of
        one prefix are identical); ``top_p`` keeps the smallest set of tokens whose probability
        reaches it (nucleus sampling; 1 keeps all); ``seed`` makes sampling reproducible for the same
        inputs.
        """

    async def apropose(self, prefixes: Sequence[str], **kwargs) -> list[list[Proposal]]:
        """``propose`` as a coroutine (same arguments, same result), for drivers that keep many
        proposals in flight with asyncio.

        This default runs ``propose`` in a worker thread under a process-wide lock: in-process
        engines generate one call at a time (they share the process's random state and devices),
        and the event loop stays free for other tasks meanwhile. Served teachers override it with
        natively concurrent requests.
        """
        prefixes = list(prefixes)

        def call():
            with _IN_PROCESS_LOCK:
                return self.propose(prefixes, **kwargs)

        return await asyncio.to_thread(call)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
