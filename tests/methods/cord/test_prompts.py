"""Each teacher's chat template and recommended system prompt around CoRD's reasoning prompt."""
from __future__ import annotations

import copy

import pytest

from distillkit.methods.cord.prompts import (
    BOXED_INSTRUCTION,
    apply_chat_template,
    make_teacher_prompts,
    recommended_for,
    split_reasoning_prompt,
)

# A ChatML template that opens the thinking block itself (as the R1 distills' and QwQ's do), and one that does not.
OPENS_THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
PLAIN = ("{% if messages[0]['role'] != 'system' %}[SYS]default[/SYS]{% endif %}"
         "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
         "{% if add_generation_prompt %}[assistant]{% endif %}")
PROMPT = "3+9-7*4\n<think> ### Step"


@pytest.fixture(scope="module")
def world_tokenizer():
    from distillkit.teachers.hf import load_tokenizer
    from distillkit.world.models import asset_path

    return load_tokenizer(asset_path("teacher-carry"))


def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_recommended_use_by_checkpoint_name():
    assert recommended_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B").user_instruction == BOXED_INSTRUCTION
    assert recommended_for("Qwen/QwQ-32B").system is None
    assert recommended_for("microsoft/Phi-4-reasoning-plus").user_instruction == ""
    assert recommended_for("distillkit/world/assets/teacher-carry").system is None
    assert split_reasoning_prompt(PROMPT) == ("3+9-7*4", "<think> ### Step")
    assert split_reasoning_prompt("no think") == ("no think", "")


def test_chat_template_wraps_the_question_and_keeps_one_think(world_tokenizer):
    tok = _with_template(world_tokenizer, OPENS_THINK)
    got = apply_chat_template(tok, PROMPT, system="be brief", user_instruction="Box it.")
    assert got == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n3+9-7*4\nBox it.<|im_end|>\n"
                   "<|im_start|>assistant\n<think> ### Step")
    plain = apply_chat_template(_with_template(world_tokenizer, PLAIN), PROMPT)
    assert plain == "[SYS]default[/SYS][user]3+9-7*4[assistant]<think> ### Step"  # the template's own system prompt


def test_none_keeps_the_raw_prompt_and_auto_swaps_each_teachers_head(world_tokenizer):
    names = ["org/DeepSeek-R1-Distill-Qwen-32B", "microsoft/Phi-4-reasoning-plus"]
    raw = make_teacher_prompts("none", PROMPT, names)
    beam = PROMPT + " 1: 3+9=12\n"
    assert raw.for_teacher(0, beam) == beam and raw.for_teacher(1, beam) == beam
    toks = [_with_template(world_tokenizer, OPENS_THINK), _with_template(world_tokenizer, PLAIN)]
    auto = make_teacher_prompts("auto", PROMPT, names, toks, system_prompts=[None, "mine"])
    assert auto.base == PROMPT
    assert auto.for_teacher(0, beam) == ("<|im_start|>user\n3+9-7*4\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
                                         "<|im_start|>assistant\n<think> ### Step 1: 3+9=12\n")
    assert auto.for_teacher(1, beam) == "[system]mine[user]3+9-7*4[assistant]<think> ### Step 1: 3+9=12\n"
    with pytest.raises(ValueError, match="base prompt"):
        auto.for_teacher(0, "other text")


def test_auto_without_a_template_is_refused(world_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        make_teacher_prompts("auto", PROMPT, ["t"], [world_tokenizer])
    with pytest.raises(ValueError, match="chat_template"):
        make_teacher_prompts("jinja", PROMPT, ["t"])
    with pytest.raises(ValueError, match="tokenizers"):
        make_teacher_prompts("auto", PROMPT, ["a", "b"], [world_tokenizer])


class Inner:
    """Records the prefixes it is asked to continue."""

    def __init__(self):
        self.name, self.seen = "inner", []

    def propose(self, prefixes, **kw):
        self.seen.append(list(prefixes))
        return [["ok"] for _ in prefixes]


def test_with_chat_templates_wraps_each_teacher_and_none_keeps_them(world_tokenizer):
    import asyncio

    from distillkit.methods.cord import CordConfig
    from distillkit.methods.cord.prompts import ServedTemplatedTeacher, TemplatedTeacher, with_chat_templates
    from distillkit.teachers.base import Teacher

    class Local(Teacher):
        def __init__(self):
            self.name, self.inner = "local", Inner()

        def propose(self, prefixes, **kw):
            return self.inner.propose(prefixes, **kw)

    class Served(Local):
        async def apropose(self, prefixes, **kw):
            return [["served"] for _ in prefixes]

    base = dict(meta_prover="M", input_path="i", output_path="o")
    teachers = [Local(), Served()]
    names = ["org/DeepSeek-R1-Distill-Qwen-32B", "microsoft/Phi-4-reasoning-plus"]
    none = CordConfig(teachers=names, **base)
    assert with_chat_templates(none, teachers) == teachers
    cfg = CordConfig(teachers=names, chat_template="auto", **base)
    toks = [_with_template(world_tokenizer, OPENS_THINK), _with_template(world_tokenizer, PLAIN)]
    wrapped = with_chat_templates(cfg, teachers, toks)
    assert type(wrapped[0]) is TemplatedTeacher and type(wrapped[1]) is ServedTemplatedTeacher
    assert wrapped[0].name == "local"
    beam = PROMPT + " 1: 3+9=12\n</think>"  # a finished beam before its answer
    wrapped[0].propose([beam], n=1)
    assert teachers[0].inner.seen == [["<|im_start|>user\n3+9-7*4\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
                                       "<|im_start|>assistant\n<think> ### Step 1: 3+9=12\n</think>"]]
    assert asyncio.run(wrapped[1].apropose([beam])) == [["served"]]  # served teachers stay concurrent
    assert with_chat_templates(cfg, wrapped, toks) == wrapped  # wrapping twice is wrapping once
    with pytest.raises(ValueError, match="<think>"):
        wrapped[0].propose(["no marker"])
    with pytest.raises(ValueError, match="prompt_template"):
        CordConfig(teachers=names, chat_template="auto", prompt_template="Q: {question}\nA:", **base)


def test_the_run_shows_each_teacher_its_chat_template(tmp_path, world_tokenizer, monkeypatch):
    import json

    from distillkit.methods.cord import CordConfig, load_done, prompts, run
    from distillkit.teachers.base import Proposal, Teacher

    class Seen(Teacher):
        def __init__(self):
            self.name, self.prefixes = "t", []

        def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
            self.prefixes += list(prefixes)
            return [[Proposal(" 1: 1+1=2\n</think>" if "</think>" not in p else " 2", 3, True, "end")] * n
                    for p in prefixes]

    class One:
        tokens_processed = 0

        def score(self, pairs, *, prefixes=None):
            import torch

            return torch.ones(len(pairs))

    monkeypatch.setattr(prompts, "load_tokenizer", lambda path: _with_template(world_tokenizer, OPENS_THINK))
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "q0", "question": "1+1", "answer": "2"}) + "\n")
    teacher = Seen()
    cfg = CordConfig(teachers=["Qwen/QwQ-32B"], meta_prover="m", input_path=str(path), chat_template="auto",
                     output_path=str(tmp_path / "o.jsonl"), beam_size=1, temperature=0.0, progress=False)
    run(cfg, teachers=[teacher], meta_prover=One())
    assert teacher.prefixes[0] == ("<|im_start|>user\n1+1\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
                                   "<|im_start|>assistant\n<think> ### Step")
    (rec,) = load_done(cfg.output_path)
    assert rec["prompt"] == "1+1\n<think> ### Step"  # the record keeps the raw prompt
