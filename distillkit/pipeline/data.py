"""Datasets shared by the training methods: JSONL reasoning traces and their tokenisation.

Two record formats are read:
  - CoRD output records: {id, question, answer, prompt, trajectory, correct, ...}
  - plain JSONL: {id, question, answer, response}
Each becomes an ``Example(id, prompt, response, answer, correct)``: the student learns ``response``
given ``prompt``; the loss covers response tokens only.

Every reader takes a JSONL file or a Hugging Face ``datasets`` dataset on disk (a folder written by
``save_to_disk``, read with ``load_from_disk``, or a local folder of data files ``load_dataset`` reads), and a
field mapping ``fields={"question": "problem", "answer": "solution"}`` (the reader's name: the source's column).
Chat templates: ``render_prompt(tokenizer, prompt, "auto")`` applies the tokenizer's own chat template (with an
optional system prompt) to a method's prompt; "none" keeps the raw prompt.
"""
from __future__ import annotations

import json
import logging
import os
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


def _is_dataset(source: str) -> bool:
    return os.path.isdir(source)


def _dataset_rows(source: str, split: str | None):
    """The rows of a Hugging Face dataset on disk: ``load_from_disk`` for a ``save_to_disk`` folder, else
    ``load_dataset`` on the local folder's data files (nothing is downloaded); ``split`` picks from a DatasetDict
    (default "train")."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{source}: reading a Hugging Face dataset needs the datasets package: pip install "
                          f"'distillkit[data]'; import failed: {exc}") from exc
    saved = any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json"))
    ds = datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
    if isinstance(ds, (datasets.DatasetDict, dict)):
        name = split or "train"
        if name not in ds:
            raise InputError(f"{source}: split={name!r}: not in the dataset (splits: {sorted(ds)})")
        ds = ds[name]
    elif split not in (None, "train"):
        raise InputError(f"{source}: split={split!r}: the dataset on disk has no splits")
    return ds


def _mapped(rec: dict, fields: dict[str, str] | None, where: str) -> dict:
    """``rec`` with each of ``fields``' names holding its source column's value (the other columns kept)."""
    if not fields:
        return rec
    out = dict(rec)
    for ours, theirs in fields.items():
        if theirs not in rec:
            raise InputError(f"{where}: fields maps {ours!r} to {theirs!r}, which the record lacks "
                             f"(it has {sorted(rec)})")
        out[ours] = rec[theirs]
    return out


def check_fields(fields) -> dict[str, str] | None:
    """A ``fields`` mapping checked: {the reader's name: the source's column}, strings (None: no mapping)."""
    if fields is None:
        return None
    if not isinstance(fields, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                               for k, v in fields.items()):
        raise InputError(f"fields={fields!r}: expected a mapping of names to column names, e.g. "
                         "{question: problem, answer: solution}")
    return dict(fields)


def iter_rows(source: str, *, fields: dict[str, str] | None = None, split: str | None = None,
              lenient_tail: bool = True):
    """(where, record) of every record of ``source``: a JSONL file (``where`` is ``path:line``; see
    :func:`read_jsonl_lines`, or with ``lenient_tail=False`` any line that does not parse raises) or a Hugging Face
    dataset folder (``where`` is ``path[row]``), each record renamed through ``fields``."""
    fields = check_fields(fields)
    if _is_dataset(source):
        for i, rec in enumerate(_dataset_rows(source, split)):
            yield f"{source}[{i}]", _mapped(dict(rec), fields, f"{source}[{i}]")
        return
    if split is not None:
        raise InputError(f"split={split!r}: only for a Hugging Face dataset folder, {source} is a file")
    if lenient_tail:
        for lineno, rec in read_jsonl_lines(source):
            yield f"{source}:{lineno}", _mapped(rec, fields, f"{source}:{lineno}")
        return
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object {{id, question, answer}}, "
                                 f"got {type(rec).__name__}")
            yield where, _mapped(rec, fields, where)


CHAT_TEMPLATES = ("auto", "none")


def render_prompt(tokenizer, prompt: str, chat_template: str = "none", system_prompt: str | None = None) -> str:
    """The text a model is given for a method's ``prompt``: "none" the prompt itself; "auto" the tokenizer's own
    chat template applied to [system_prompt,] the prompt as the user's turn, ending with the assistant's turn
    opened (a tokenizer without a chat template keeps the raw prompt, with a warning)."""
    if chat_template not in CHAT_TEMPLATES:
        raise InputError(f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES}")
    if chat_template == "none":
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        log.warning("chat_template=auto: %s has no chat template; the raw prompt is used",
                    getattr(tokenizer, "name_or_path", "the tokenizer") or "the tokenizer")
        return prompt
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_reference_answer(rec: dict, where: str) -> None:
    """Refuses a record whose "answer" is missing, null or empty (InputError naming ``where`` and the
    record's id): it could not be scored (compared as text it would read "None")."""
    answer = rec.get("answer")
    if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
            or not str(answer).strip():
        rid = f" (id {rec['id']!r})" if "id" in rec else ""
        raise InputError(f"{where}{rid}: answer={answer!r}: expected the reference answer (a non-empty string "
                         "or a number)")


QUESTION_FIELDS = ("id", "question", "answer")


def question_fields(fields: dict[str, str] | None) -> dict[str, str] | None:
    """The entries of a method's ``fields`` mapping that the question readers use (id, question, answer): a
    mapping of another column (``response: trace`` for training traces) is not required of a question set."""
    if fields is None:
        return None
    return {k: v for k, v in check_fields(fields).items() if k in QUESTION_FIELDS} or None


def read_questions_for_eval(path: str, limit: int | None = None, *, fields: dict[str, str] | None = None,
                            split: str | None = None) -> list[dict]:
    """The first ``limit`` records of an evaluation JSONL or dataset folder (renamed through the id / question /
    answer entries of ``fields``), each checked to hold a "question" (text) and a reference "answer" (InputError
    naming the line and id otherwise); "id" is optional."""
    rows = list(iter_rows(path, fields=question_fields(fields), split=split))
    rows = rows if limit is None else rows[:limit]
    for where, rec in rows:
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
                  is_correct=None, fields: dict[str, str] | None = None, split: str | None = None) -> list[Example]:
    """Examples from a JSONL file or a Hugging Face dataset folder (records renamed through ``fields``, e.g.
    {"question": "problem", "response": "solution"}). only_correct keeps records whose final answer is right: the
    record's 'correct' field when present, else ``is_correct(response, answer)``. A record without "id" gets its
    place, ``<path>:<line>`` (``<path>[row]``), as id (stable while the source is unchanged; only used in
    messages)."""
    out = []
    for where, rec in iter_rows(path, fields=fields, split=split):
        ex = to_example(rec, prompt_template=prompt_template, where=where)
        if only_correct:
            ok = ex.correct if ex.correct is not None else (is_correct(ex.response, ex.answer) if is_correct else True)
            if not ok:
                continue
        out.append(ex)
    return out


def tokenize_example(tokenizer, ex: Example, max_length: int | None = None, *, chat_template: str = "none",
                     system_prompt: str | None = None) -> dict[str, list[int]]:
    """input_ids of prompt + response (+ eos) and labels with the prompt masked (-100); the prompt rendered by
    :func:`render_prompt` (a chat template that writes the bos token itself gets no second one)."""
    prompt = render_prompt(tokenizer, ex.prompt, chat_template, system_prompt)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if bos and p[:1] == bos:
        bos = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + p + r + eos
    labels = [-100] * (len(bos) + len(p)) + r + eos
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


class SFTCollator:
    """Right-pads tokenised examples into a batch: input_ids, attention_mask, labels ([B, T] int64); prompts
    rendered with ``chat_template`` ("none" | "auto", see :func:`render_prompt`) and ``system_prompt``."""

    def __init__(self, tokenizer, max_length: int | None = None, *, chat_template: str = "none",
                 system_prompt: str | None = None):
        if chat_template not in CHAT_TEMPLATES:
            raise InputError(f"chat_template={chat_template!r}: expected one of {CHAT_TEMPLATES}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [tokenize_example(self.tokenizer, ex, self.max_length, chat_template=self.chat_template,
                                 system_prompt=self.system_prompt) for ex in examples]
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


def read_questions(path: str, limit: int | None = None, *, fields: dict[str, str] | None = None,
                   split: str | None = None) -> list[dict]:
    """The first ``limit`` (None: all) {id, question, answer} records of ``path`` (a JSONL file or a Hugging Face
    dataset folder, records renamed through the id / question / answer entries of ``fields``); raises InputError
    naming the line (and the id) of a record that is not valid JSON, not an object, lacks a field,
    has a null or empty id / question / answer, or repeats an id.

    Every record needs its own "id": ids key the resume (done records are matched by id) and each
    question's seed, so an id made up from the line number would silently change meaning when the
    file is edited. The answer is needed: the meta-prover scores steps by the answer's likelihood."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InputError(f"limit={limit!r}: expected an integer >= 0 or None")
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for where, rec in iter_rows(path, fields=question_fields(fields), split=split, lenient_tail=False):
        if limit is not None and len(rows) >= limit:
            break
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
            raise InputError(f"{where}: duplicate id {rid!r} (first at {seen[key]})")
        seen[key] = where
        rows.append(rec)
    return rows
