import pytest

from distillkit.pipeline.data import fill_prompt, to_example
from distillkit.pipeline.evaluate import answer_accuracy


def test_fill_prompt_leaves_other_braces():
    """One pass: only the given fields are replaced; \\boxed{}, unknown names and braces in values stay."""
    template = "Q: {question}\nPut the answer in \\boxed{} ({note} stays), as {answer}."
    assert fill_prompt(template, question="x = {y}?", answer="\\boxed{3}") == \
        "Q: x = {y}?\nPut the answer in \\boxed{} ({note} stays), as \\boxed{3}."
    assert fill_prompt("{question}{question}", question=1) == "11"


def test_boxed_template_in_data_and_evaluate():
    """A prompt template holding \\boxed{} fills (str.format raised IndexError on it)."""
    template = "{question}\nAnswer in \\boxed{}."
    ex = to_example({"question": "1+1", "answer": "2", "response": "2"}, prompt_template=template)
    assert ex.prompt == "1+1\nAnswer in \\boxed{}."
    # answer_accuracy fills every prompt before it generates: a model that is never called is enough to fail there
    with pytest.raises(AttributeError):
        answer_accuracy(None, None, [{"question": "1+1", "answer": "2"}], prompt_template=template)


def test_boxed_template_in_vcrd_prompts(tmp_path):
    from distillkit.methods.vcrd import VcrdConfig, load_prompts

    (tmp_path / "q.jsonl").write_text('{"id": 1, "question": "1+1", "answer": "2"}\n')
    cfg = VcrdConfig(student="s", teacher="t", prompts=str(tmp_path / "q.jsonl"),
                     prompt_template="{question} \\boxed{}")
    assert load_prompts(cfg) == ["1+1 \\boxed{}"]


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"id": i, "problem": f"{i} + 1", "solution": str(i + 1), "trace": f"{i} + 1 = {i + 1}"} for i in range(5)]
FIELDS = {"question": "problem", "answer": "solution"}


def test_fields_mapping_jsonl(tmp_path):
    from distillkit._errors import InputError
    from distillkit.pipeline.data import load_examples, read_questions, read_questions_for_eval

    path = _write_jsonl(tmp_path / "q.jsonl", ROWS)
    qs = read_questions(path, fields=FIELDS)
    assert [(q["id"], q["question"], q["answer"]) for q in qs] == [(r["id"], r["problem"], r["solution"]) for r in ROWS]
    assert read_questions_for_eval(path, 2, fields=FIELDS)[1]["question"] == "1 + 1"
    exs = load_examples(path, fields={**FIELDS, "response": "trace"}, prompt_template="Q: {question}")
    assert [(e.prompt, e.response, e.answer) for e in exs[:1]] == [("Q: 0 + 1", "0 + 1 = 1", "1")]
    with pytest.raises(InputError, match=r"q.jsonl:1: fields maps 'question' to 'prompt_text'"):
        read_questions(path, fields={"question": "prompt_text"})
    with pytest.raises(InputError, match="fields="):
        read_questions(path, fields=["question"])
    with pytest.raises(InputError, match="missing field"):  # without the mapping the names do not fit
        read_questions(path)


def test_hf_dataset_on_disk(tmp_path):
    """A datasets folder (save_to_disk) reads like the JSONL, a DatasetDict by split."""
    datasets = pytest.importorskip("datasets")
    from distillkit._errors import InputError
    from distillkit.pipeline.data import load_examples, read_questions

    jsonl = read_questions(_write_jsonl(tmp_path / "q.jsonl", ROWS), fields=FIELDS)
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "flat"))
    assert read_questions(str(tmp_path / "flat"), fields=FIELDS) == jsonl
    assert read_questions(str(tmp_path / "flat"), 2, fields=FIELDS) == jsonl[:2]
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert read_questions(str(tmp_path / "dict"), fields=FIELDS, split="test") == jsonl[:1]
    with pytest.raises(InputError, match=r"split='validation'.*\['test', 'train'\]"):
        read_questions(str(tmp_path / "dict"), fields=FIELDS, split="validation")
    exs = load_examples(str(tmp_path / "flat"), fields={**FIELDS, "response": "trace"})
    assert len(exs) == 5 and exs[2].response == "2 + 1 = 3"
    with pytest.raises(InputError, match=r"flat\[0\]: fields maps"):
        read_questions(str(tmp_path / "flat"), fields={"question": "nope"})


def test_chat_template(caplog):
    from distillkit._errors import InputError
    from distillkit.pipeline.data import Example, SFTCollator, render_prompt
    from distillkit.world.tiny import build_tokenizer

    tok = build_tokenizer()
    assert render_prompt(tok, "1 + 1 =", "auto") == "1 + 1 ="  # no template: the raw prompt, with a warning
    assert "no chat template" in caplog.text
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    assert render_prompt(tok, "1 + 1 =", "none") == "1 + 1 ="
    assert render_prompt(tok, "1 + 1 =", "auto") == "user: 1 + 1 =\nassistant:"
    assert render_prompt(tok, "1 + 1 =", "auto", system_prompt="be brief") == \
        "system: be brief\nuser: 1 + 1 =\nassistant:"
    with pytest.raises(InputError, match="chat_template"):
        render_prompt(tok, "x", "chatml")
    ex = Example("0", "1 + 1 =", " 2.", "2")
    raw, chat = SFTCollator(tok)([ex]), SFTCollator(tok, chat_template="auto")([ex])
    rendered = tok("user: 1 + 1 =\nassistant:", add_special_tokens=False)["input_ids"]
    n = chat["input_ids"].shape[1]
    assert chat["input_ids"][0, 1:1 + len(rendered)].tolist() == rendered  # after bos: the rendered prompt
    kept = lambda b: b["labels"][b["labels"] != -100].tolist()  # noqa: E731
    assert kept(chat) == kept(raw) and n > raw["input_ids"].shape[1]  # the same response tokens learned


def test_question_readers_use_only_the_question_entries_of_fields(tmp_path):
    # a method's one `fields` mapping renames its training traces too (response: trace); its question and eval
    # sets have no such column and must still read
    import json

    from distillkit.pipeline.data import read_questions, read_questions_for_eval

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"uid": "a", "problem": "1+1?", "solution": "2"}) + "\n")
    fields = {"id": "uid", "question": "problem", "answer": "solution", "response": "trace"}
    assert read_questions_for_eval(str(path), fields=fields)[0]["question"] == "1+1?"
    assert read_questions(str(path), fields=fields)[0]["id"] == "a"
