"""Datasets shared by the training methods: JSONL reasoning traces and their tokenisation.

Two record formats are read:
  - CoRD output records: {id, question, answer, prompt, trajectory, correct, ...}
  - plain JSONL: {id, question, answer, response}
Each becomes an ``Example(id, prompt, response, answer, correct)``: the student learns ``response``
given ``prompt``; the loss covers response tokens only.
"""
from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distillkit._errors import InputError

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "{question}\n<think> ### Step"
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_prompt(template: str, **fields: Any) -> str:
    """``template`` with every ``{name}`` whose name is one of ``fields`` replaced by ``str(value)``, in one
    pass: other braces (``\\boxed{}``, a ``{name}`` not given) and braces inside the values stay as they are
    (``str.format`` raises IndexError on ``\\boxed{}``)."""
    return _FIELD.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    response: str
    answer: str
    correct: bool | None = None  # None when the record does not say


def read_jsonl_lines(path: str) -> list[tuple[int, dict]]:
    """(line number, JSON object) for every record of a JSONL file; blank lines are skipped. A line
    that is not a JSON object raises InputError naming it, except an unterminated last line that does
    not parse (a write still in progress or torn by a crash): it is left out, with a warning. The file
    is only read."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # unterminated last line: a write that did not finish
                log.warning("%s:%d: leaving out an unterminated last line that is not valid JSON", path, i + 1)
                break
            raise InputError(f"{path}:{i + 1}: not valid JSON") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        rows.append((i + 1, rec))
    return rows


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file (see :func:`read_jsonl_lines`)."""
    return [rec for _, rec in read_jsonl_lines(path)]


def check_reference_answer(rec: dict, where: str) -> None:
    """Refuses a record whose "answer" is missing, null or empty (InputError naming ``where`` and the
    record's id): it could not be scored (compared as text it would read "None")."""
    answer = rec.get("answer")
    if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
            or not str(answer).strip():
        rid = f" (id {rec['id']!r})" if "id" in rec else ""
        raise InputError(f"{where}{rid}: answer={answer!r}: expected the reference answer (a non-empty string "
                         "or a number)")


def read_questions_for_eval(path: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of an evaluation JSONL, each checked to hold a "question" (text) and
    a reference "answer" (InputError naming the line and id otherwise); "id" is optional."""
    rows = read_jsonl_lines(path)
    rows = rows if limit is None else rows[:limit]
    for lineno, rec in rows:
        where = f"{path}:{lineno}"
        if not isinstance(rec.get("question"), str) or not rec["question"].strip():
            rid = f" (id {rec['id']!r})" if "id" in rec else ""
            raise InputError(f"{where}{rid}: question={rec.get('question')!r}: expected a non-empty string")
        check_reference_answer(rec, where)
    return [rec for _, rec in rows]


def to_example(rec: dict, *, prompt_template: str = DEFAULT_PROMPT, where: str = "record") -> Example:
    for key in ("question", "answer"):
        if key not in rec:
            raise InputError(f"{where}: missing field {key!r}")
    check_reference_answer(rec, where)
    if "trajectory" in rec:
        response = rec["trajectory"]
        prompt = rec.get("prompt") or fill_prompt(prompt_template, question=rec["question"])
    elif "response" in rec:
        response = rec["response"]
        prompt = fill_prompt(prompt_template, question=rec["question"])
    else:
        raise ValueError(f"{where}: needs 'response' (plain JSONL) or 'trajectory' (CoRD records)")
    if not response:
        raise ValueError(f"{where}: empty response")
    return Example(str(rec.get("id", where)), prompt, response, str(rec["answer"]), rec.get("correct"))


def load_examples(path: str, *, prompt_template: str = DEFAULT_PROMPT, only_correct: bool = False,
                  is_correct=None) -> list[Example]:
    """Examples from a JSONL file. only_correct keeps records whose final answer is right: the record's
    'correct' field when present, else ``is_correct(response, answer)``. A record without "id" gets its
    place, ``<path>:<line>``, as id (stable while the file is unchanged; only used in messages)."""
    out = []
    for lineno, rec in read_jsonl_lines(path):
        ex = to_example(rec, prompt_template=prompt_template, where=f"{path}:{lineno}")
        if only_correct:
            ok = ex.correct if ex.correct is not None else (is_correct(ex.response, ex.answer) if is_correct else True)
            if not ok:
                continue
        out.append(ex)
    return out


def tokenize_example(tokenizer, ex: Example, max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids of prompt + response (+ eos) and labels with the prompt masked (-100)."""
    p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + p + r + eos
    labels = [-100] * (len(bos) + len(p)) + r + eos
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


class SFTCollator:
    """Right-pads tokenised examples into a batch: input_ids, attention_mask, labels ([B, T] int64)."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [tokenize_example(self.tokenizer, ex, self.max_length) for ex in examples]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model, batch: dict[str, Any]):
    """Next-token cross-entropy on response tokens; returns (loss, metrics): ``loss`` the mean over the kept
    tokens, ``metrics["num_tokens"]`` their count (the Trainer normalises over the global count with it)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    kept = int((batch["labels"][:, 1:] != -100).sum())  # the model predicts token t + 1 from t
    return out.loss, {"loss": float(out.loss.detach()), "num_tokens": kept}


def question_seed(base: int, qid: Any) -> int:
    """A per-question seed that does not depend on run order (so resumed runs reproduce)."""
    return (base * 1_000_003 + zlib.crc32(str(qid).encode("utf-8"))) % (2**31 - 1)


def read_questions(path: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (None: all) {id, question, answer} records of ``path``; raises InputError
    naming the line (and the id) of a record that is not valid JSON, not an object, lacks a field,
    has a null or empty id / question / answer, or repeats an id.

    Every record needs its own "id": ids key the resume (done records are matched by id) and each
    question's seed, so an id made up from the line number would silently change meaning when the
    file is edited. The answer is needed: the meta-prover scores steps by the answer's likelihood."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InputError(f"limit={limit!r}: expected an integer >= 0 or None")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object {{id, question, answer}}, "
                                 f"got {type(rec).__name__}")
            missing = [k for k in ("id", "question", "answer") if k not in rec]
            if missing:
                raise InputError(f"{where}: missing field(s) {missing}; expected {{id, question, answer}}"
                                 + (" (every question needs its own id: it keys the resume)" if "id" in missing
                                    else ""))
            rid = rec["id"]
            if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
                raise InputError(f"{where}: id={rid!r}: expected a non-empty string or an integer")
            question, answer = rec["question"], rec["answer"]
            if not isinstance(question, str) or not question.strip():
                raise InputError(f"{where} (id {rid!r}): question={question!r}: expected a non-empty string")
            if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
                    or not str(answer).strip():
                raise InputError(f"{where} (id {rid!r}): answer={answer!r}: expected the reference answer (a "
                                 "non-empty string or a number): CoRD's meta-prover scores steps by its likelihood")
            key = str(rid)
            if key in seen:
                raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[key]})")
            seen[key] = lineno
            rows.append(rec)
    return rows
