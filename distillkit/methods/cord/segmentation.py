"""Step segmentations from the CoRD seed: where one reasoning step ends and the next begins.

Three strategies (each a :class:`distillkit.teachers.base.StepBoundary`, so teachers stop at them):

* ``prompt-guided``: the prompt ends with ``"<think> ### Step"``; a step ends where the next
  ``"### Step"`` begins (a ``"### Step"`` at the very start of a step is its own header).
* ``line-break``: a step ends after a blank line (``"\\n\\n"``; the newlines stay with the step).
* ``prefix-based``: a step ends where a sentence or line begins with one of the paper's transition
  phrases (Appendix G.1: :data:`PAPER_PREFIX_PHRASES`, "Wait", "Alternatively", "Going back to", ...;
  the list is configurable, ``segmentation_prefixes:`` in the config).

In all three, a step also ends right after the end marker ``"</think>"`` (the reasoning is over).
Steps are cut so that concatenating them gives back the generated text exactly.
"""
from __future__ import annotations

import abc
import re
from collections.abc import Sequence

END_MARKER = "</think>"
STEP_MARKER = "### Step"

# The paper's 15 phrases that open a new step in prefix-based segmentation (Appendix G.1), matched
# case-insensitively, only at the start of a sentence or a line. Known verbatim: "going back to", "another way",
# "let's try a different approach", "using another method", "we can also verify". Not checked against the paper's
# text (its appendix could not be read here): "wait", "alternatively", "let me check", "let me verify",
# "let me double-check" (this project's earlier list, taken to be the paper's five it held) and the five
# self-correction phrases "but wait", "i made a mistake", "that's not right", "let me correct", "let me reconsider"
# (none of them in the earlier list, which lacked all five). Pass segmentation_prefixes to use another list.
PAPER_PREFIX_PHRASES = (
    "wait", "alternatively", "let me check", "let me verify", "let me double-check",
    "going back to", "another way", "let's try a different approach", "using another method",
    "we can also verify",
    "but wait", "i made a mistake", "that's not right", "let me correct", "let me reconsider",
)
# The phrases this project used before it took the paper's list (25: the paper's five and twenty more);
# pass them as segmentation_prefixes to reproduce older runs.
LEGACY_PREFIX_PHRASES = (
    "wait", "let me check", "let me verify", "let me double-check", "let me re-examine",
    "let me think", "alternatively", "hmm", "but", "so", "therefore", "thus", "however",
    "actually", "now", "next", "then", "first", "second", "finally", "okay", "oh",
    "on second thought", "double-check", "hold on",
)
DEFAULT_PREFIX_PHRASES = PAPER_PREFIX_PHRASES

class Segmentation(abc.ABC):
    """A step segmentation: where the first step of a continuation ends, and the prompt it expects."""

    name: str = ""

    def __init__(self, end_marker: str = END_MARKER):
        if not end_marker:
            raise ValueError("end_marker: expected a non-empty string")
        self.end_marker = end_marker

    @abc.abstractmethod
    def _next_step_start(self, text: str, start: int, final: bool) -> int | None:
        """Index in ``text`` where the step that begins at ``start`` ends (the next step begins)."""

    def prompt(self, question: str) -> str:
        """The reasoning prompt for a question (what every beam starts from)."""
        return f"{question}\n<think>\n"

    def stop_strings(self) -> list[str]:
        return [self.end_marker]

    def cut(self, text: str, *, final: bool = False) -> tuple[int, bool] | None:
        """(end of the first step of ``text``, whether it ends the reasoning) or None if not yet known.

        The end marker wins when it comes before the next step's start; the marker stays in the step.
        """
        lead = len(text) - len(text.lstrip())  # leading whitespace belongs to this step
        nxt = self._next_step_start(text, lead, final)
        end = text.find(self.end_marker)
        if end >= 0 and (nxt is None or end < nxt):
            return end + len(self.end_marker), True
        if nxt is not None:
            return nxt, False
        return None

    def split(self, trace: str) -> list[str]:
        """Segments a complete trace into steps; ``"".join(split(t)) == t``. Text after the end
        marker is not reasoning and is left out."""
        steps, rest = [], trace
        while rest:
            found = self.cut(rest, final=True)
            if found is None:
                steps.append(rest)
                break
            idx, ends = found
            if idx <= 0:  # a boundary must make progress; treat the remainder as one step
                steps.append(rest)
                break
            steps.append(rest[:idx])
            if ends:
                break
            rest = rest[idx:]
        return steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PromptGuided(Segmentation):
    """Steps are headed by ``"### Step"``; the prompt ends with ``"<think> ### Step"``."""

    name = "prompt-guided"

    def __init__(self, marker: str = STEP_MARKER, end_marker: str = END_MARKER):
        super().__init__(end_marker)
        if not marker:
            raise ValueError("marker: expected a non-empty string")
        self.marker = marker

    def prompt(self, question: str) -> str:
        return f"{question}\n<think> {self.marker}"

    def _next_step_start(self, text: str, start: int, final: bool) -> int | None:
        # Skip the step's own header, then the next header starts the next step.
        own = start + len(self.marker) if text.startswith(self.marker, start) else start
        i = text.find(self.marker, max(own, start + 1))
        return i if i >= 0 else None

    def stop_strings(self) -> list[str]:
        # A header inside the generated text is preceded by a newline; the step's own header
        # (at the very start of the generation) is not, so the stop string does not fire on it.
        return ["\n" + self.marker, self.end_marker]


class LineBreak(Segmentation):
    """A step ends after a blank line (``separator``, default ``"\\n\\n"``)."""

    name = "line-break"

    def __init__(self, separator: str = "\n\n", end_marker: str = END_MARKER):
        super().__init__(end_marker)
        if not separator:
            raise ValueError("separator: expected a non-empty string")
        self.separator = separator

    def _next_step_start(self, text: str, start: int, final: bool) -> int | None:
        i = text.find(self.separator, start)
        if i < 0:
            return None
        end = i + len(self.separator)
        # Further newlines of the same blank run stay with this step.
        while end < len(text) and text[end] == "\n":
            end += 1
        return end

    def stop_strings(self) -> list[str]:
        return [self.separator, self.end_marker]


class PrefixBased(Segmentation):
    """A step ends where a sentence or line starts with one of ``phrases`` (case-insensitive)."""

    name = "prefix-based"

    def __init__(self, phrases: Sequence[str] = DEFAULT_PREFIX_PHRASES, end_marker: str = END_MARKER):
        super().__init__(end_marker)
        phrases = [p.strip() for p in phrases]
        if not phrases or not all(phrases):
            raise ValueError(f"phrases: expected a non-empty list of non-empty strings, got {phrases!r}")
        self.phrases = phrases
        alt = "|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True))
        # A phrase counts at the start of a line, or after a sentence end and whitespace; it must be a
        # whole word: while streaming, one more non-letter must have arrived to confirm that.
        head = r"(?:^[ \t]*|(?<=[.!?])[ \t]+)"
        self._streaming = re.compile(head + rf"(?P<p>{alt})(?=[^\w])", re.IGNORECASE | re.MULTILINE)
        self._final = re.compile(head + rf"(?P<p>{alt})(?![\w])", re.IGNORECASE | re.MULTILINE)

    def _next_step_start(self, text: str, start: int, final: bool) -> int | None:
        pattern = self._final if final else self._streaming
        for m in pattern.finditer(text):
            if m.start("p") > start:  # a phrase opening this very step is not a boundary
                return m.start("p")
        return None

    def stop_strings(self) -> list[str]:
        """The phrase as written and capitalised, after a newline or a sentence end (".", "?", "!") and
        followed by a space or a comma; ``cut`` stays authoritative (other spacing is cut afterwards)."""
        out = []
        for p in self.phrases:
            for form in dict.fromkeys([p, p[:1].upper() + p[1:]]):
                for head in ("\n", ". ", "? ", "! "):
                    out += [f"{head}{form} ", f"{head}{form},"]
        return out + [self.end_marker]


SEGMENTATIONS = {"prompt-guided": PromptGuided, "line-break": LineBreak, "prefix-based": PrefixBased}


def make_segmentation(name: str, *, phrases: Sequence[str] | None = None,
                      end_marker: str = END_MARKER) -> Segmentation:
    """The segmentation called ``name`` ("prompt-guided", "line-break", "prefix-based")."""
    if name not in SEGMENTATIONS:
        raise ValueError(f"segmentation={name!r}: expected one of {sorted(SEGMENTATIONS)}")
    if name == "prefix-based":
        return PrefixBased(phrases if phrases is not None else DEFAULT_PREFIX_PHRASES, end_marker=end_marker)
    if phrases is not None:
        raise ValueError(f"phrases: only used by segmentation='prefix-based', not {name!r}")
    return SEGMENTATIONS[name](end_marker=end_marker)
