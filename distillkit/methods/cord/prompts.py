"""The prompt each teacher sees: its chat template and recommended system prompt around CoRD's reasoning prompt.

CoRD's reasoning prompt is ``"{question}\\n<think> ### Step"`` (prompt-guided segmentation, the paper's
Appendix A). Chat models expect their own template around a question, so with ``chat_template: auto`` each
teacher k sees::

    <its template: system prompt (if any), user turn = question (+ its recommended instruction), assistant turn>
    <think> ### Step ...the beam's steps...

while the beams themselves, the meta-prover and the records keep the raw prompt: only the head of a beam's
text is swapped for teacher k's (:meth:`TeacherPrompts.for_teacher`). ``chat_template: none`` (the world's
default: its models have no template) leaves every prompt as it is.

The run applies it by wrapping each teacher once (:func:`with_chat_templates`): every prefix a teacher is
asked to continue (a beam, or a finished beam before its answer) is rewritten on the way in, so the decode
loop itself is unchanged::

    teachers = with_chat_templates(cfg, teachers)     # chat_template "none": the same teachers

or, per question, :func:`make_teacher_prompts` and ``prompts.for_teacher(k, beam.text)``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from distillkit._errors import InputError
from distillkit.teachers.base import Teacher

THINK = "<think>"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Recommended:
    """A model family's recommended use: a system prompt (None: none, or the one its template adds itself)
    and an instruction appended to the user turn."""
    system: str | None = None
    user_instruction: str = ""


# Model-id substrings (lower case) -> recommended use, from the model cards: the DeepSeek-R1 distills ask
# for no system prompt and the instruction in the user turn; QwQ asks for the same instruction; the
# Phi-4-reasoning chat template adds Microsoft's recommended reasoning system prompt when none is given.
RECOMMENDED: dict[str, Recommended] = {
    "deepseek-r1-distill": Recommended(None, BOXED_INSTRUCTION),
    "deepseek-r1": Recommended(None, BOXED_INSTRUCTION),
    "qwq": Recommended(None, BOXED_INSTRUCTION),
    "phi-4-reasoning": Recommended(None, ""),
}


def recommended_for(model_id: str) -> Recommended:
    """The recommended use of a teacher by its checkpoint name (longest matching key; none: no system
    prompt, no instruction)."""
    name = str(model_id).lower()
    keys = sorted((k for k in RECOMMENDED if k in name), key=len, reverse=True)
    return RECOMMENDED[keys[0]] if keys else Recommended()


def split_reasoning_prompt(prompt: str) -> tuple[str, str]:
    """(the user's text, the assistant's opening) of a reasoning prompt: the opening starts at the first
    ``"<think>"`` (e.g. ``"<think> ### Step"``); a prompt without one is all user text."""
    i = prompt.find(THINK)
    if i < 0:
        return prompt, ""
    return prompt[:i].rstrip("\n"), prompt[i:]


def apply_chat_template(tokenizer, prompt: str, *, system: str | None = None, user_instruction: str = "") -> str:
    """``prompt`` (a reasoning prompt such as ``"Q\\n<think> ### Step"``) inside ``tokenizer``'s chat template:
    the system turn (if ``system``), the user turn (the question, then ``user_instruction`` on its own line),
    the assistant's generation prompt, then the prompt's assistant opening. A template that opens the
    thinking block itself (R1 distills, QwQ: ``...assistant\\n<think>\\n``) keeps one ``"<think>"``."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"chat_template='auto': the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                         "template; use chat_template: none (the raw prompt)")
    user, opening = split_reasoning_prompt(prompt)
    content = f"{user}\n{user_instruction}" if user_instruction else user
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise TypeError(f"tokenizer.apply_chat_template returned {type(rendered).__name__}, expected the text")
    tail = rendered.rstrip()
    if opening.startswith(THINK) and tail.endswith(THINK):
        rendered = tail[:-len(THINK)]
    return rendered + opening


@dataclass(frozen=True)
class TeacherPrompts:
    """``base``: the raw reasoning prompt every beam starts with (what the meta-prover and the records see);
    ``per_teacher[k]``: what teacher k sees in its place."""
    base: str
    per_teacher: tuple[str, ...]

    def for_teacher(self, k: int, text: str) -> str:
        """``text`` (a beam: the base prompt + steps, possibly + the end marker and an answer prompt) as
        teacher ``k`` must see it: its own prompt in place of the base one."""
        if not text.startswith(self.base):
            raise ValueError("text: does not start with the question's base prompt")
        return self.per_teacher[k] + text[len(self.base):]


def make_teacher_prompts(chat_template: str, prompt: str, teachers: Sequence[str],
                         tokenizers: Sequence | None = None, *,
                         system_prompts: Sequence[str | None] | None = None) -> TeacherPrompts:
    """Each teacher's prompt for the reasoning prompt ``prompt``.

    chat_template: "none" (every teacher sees ``prompt``) or "auto" (each teacher's tokenizer's template, with
        the system prompt and instruction :func:`recommended_for` its checkpoint name ``teachers[k]``).
    tokenizers: one per teacher ("auto" only; None: loaded by :func:`load_tokenizer` from ``teachers``).
    system_prompts: one per teacher, overriding the recommended system prompt where not None.
    """
    if chat_template == "none":
        return TeacherPrompts(prompt, tuple(prompt for _ in teachers))
    if chat_template != "auto":
        raise InputError(f"chat_template={chat_template!r}: expected 'none' or 'auto'")
    if tokenizers is None:
        tokenizers = [load_tokenizer(t) for t in teachers]
    if len(tokenizers) != len(teachers):
        raise InputError(f"tokenizers: expected {len(teachers)} (one per teacher), got {len(tokenizers)}")
    if system_prompts is not None and len(system_prompts) != len(teachers):
        raise InputError(f"system_prompts: expected {len(teachers)} (one per teacher), got {len(system_prompts)}")
    out = []
    for k, (name, tok) in enumerate(zip(teachers, tokenizers)):
        rec = recommended_for(name)
        system = system_prompts[k] if system_prompts is not None and system_prompts[k] is not None else rec.system
        out.append(apply_chat_template(tok, prompt, system=system, user_instruction=rec.user_instruction))
    return TeacherPrompts(prompt, tuple(out))


@functools.lru_cache(maxsize=16)
def load_tokenizer(path: str):
    """A teacher's tokenizer (cached: one load per checkpoint and process)."""
    from distillkit.teachers.hf import load_tokenizer as _load

    return _load(path)


def _recommended_kwargs(name: str, system_prompt: str | None) -> dict:
    rec = recommended_for(name)
    return dict(system=system_prompt if system_prompt is not None else rec.system,
                user_instruction=rec.user_instruction)


class TemplatedTeacher(Teacher):
    """A teacher that sees every prefix inside its chat template: ``apply_chat_template(tokenizer, prefix)``
    (the text before the first ``"<think>"`` is the user turn, the rest the assistant's reasoning so far).
    Token counts, stops and sampling are the wrapped teacher's."""

    def __init__(self, inner: Teacher, tokenizer, *, system: str | None = None, user_instruction: str = ""):
        self.inner, self.tokenizer = inner, tokenizer
        self.system, self.user_instruction = system, user_instruction
        self.name = getattr(inner, "name", "teacher")

    def view(self, prefix: str) -> str:
        """The text the wrapped teacher continues for ``prefix``."""
        if THINK not in prefix:
            raise InputError("chat_template='auto': a teacher's prefix has no '<think>' to tell the question "
                             "from the reasoning; use a reasoning prompt with '<think>' or chat_template: none")
        return apply_chat_template(self.tokenizer, prefix, system=self.system, user_instruction=self.user_instruction)

    def propose(self, prefixes, **kwargs):
        if isinstance(prefixes, str):
            raise TypeError("prefixes: expected a list of strings, got a single string")
        return self.inner.propose([self.view(p) for p in prefixes], **kwargs)


class ServedTemplatedTeacher(TemplatedTeacher):
    """:class:`TemplatedTeacher` over a served teacher: ``apropose`` stays natively concurrent."""

    async def apropose(self, prefixes, **kwargs):
        return await self.inner.apropose([self.view(p) for p in prefixes], **kwargs)


def with_chat_templates(cfg, teachers: Sequence[Teacher], tokenizers: Sequence | None = None, *,
                        system_prompts: Sequence[str | None] | None = None) -> list[Teacher]:
    """``teachers`` as the run uses them: unchanged with ``cfg.chat_template == "none"``; with "auto" each
    wrapped in its chat template with the system prompt and instruction recommended for its checkpoint
    (``cfg.teachers[k]``). tokenizers: one per teacher (None: loaded from ``cfg.teachers``)."""
    teachers = list(teachers)
    if cfg.chat_template == "none":
        return teachers
    if cfg.chat_template != "auto":
        raise InputError(f"chat_template={cfg.chat_template!r}: expected 'none' or 'auto'")
    if len(teachers) != len(cfg.teachers):
        raise InputError(f"teachers: {len(teachers)} given but the config lists {len(cfg.teachers)}")
    tokenizers = list(tokenizers) if tokenizers is not None else [load_tokenizer(t) for t in cfg.teachers]
    if system_prompts is not None and len(system_prompts) != len(teachers):
        raise InputError(f"system_prompts: expected {len(teachers)} (one per teacher), got {len(system_prompts)}")
    out = []
    for k, (teacher, tok) in enumerate(zip(teachers, tokenizers)):
        if isinstance(teacher, TemplatedTeacher):
            out.append(teacher)  # already wrapped
            continue
        served = getattr(type(teacher), "apropose", None) is not Teacher.apropose
        cls = ServedTemplatedTeacher if served else TemplatedTeacher
        kw = _recommended_kwargs(cfg.teachers[k], system_prompts[k] if system_prompts is not None else None)
        out.append(cls(teacher, tok, **kw))
    return out
