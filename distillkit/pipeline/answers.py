"""Final-answer extraction and comparison, shared by every method that checks a trace's answer.

extract_answer: "The final answer is X", else the last \\boxed{X}, else the last number.
normalize_answer / answers_match: compare answers as canonical text (numbers in canonical form).
"""
from __future__ import annotations

import re
from typing import Any

from distillkit._errors import InputError

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: "The final answer is X", else the last \\boxed{X}, else the last number."""
    m = list(re.finditer(r"final answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", text, re.IGNORECASE | re.MULTILINE))
    if m:
        ans = m[-1].group(1).strip()
        boxed = _boxed(ans)
        return (boxed if boxed is not None else ans).strip().strip("$").strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = re.findall(_NUMBER, text)
    return nums[-1] if nums else None


def normalize_answer(ans: Any) -> str:
    """Canonical text of an answer: spaces, $, trailing period and thousands separators removed;
    numbers in canonical form (7.0 -> 7). None (no answer) is refused: it is no text to compare."""
    if ans is None:
        raise InputError("ans=None: no answer to normalise (a record without a reference answer?)")
    s = str(ans).strip().strip("$").strip().rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", s):
        s = s.replace(",", "")
        value = float(s)
        return str(int(value)) if value.is_integer() else repr(value)
    return s


def answers_match(predicted: str | None, truth: Any) -> bool:
    """Whether the extracted ``predicted`` answer (None: none found, never a match) equals ``truth``.
    ``truth`` None is refused (InputError): a record without a reference answer cannot be scored, and
    comparing with the text "None" would score it wrongly."""
    if truth is None:
        raise InputError("truth=None: no reference answer to compare with")
    return predicted is not None and normalize_answer(predicted) == normalize_answer(truth)
