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
