"""The evaluator renders its prompts as training does: chat_template auto puts the question in the tokenizer's chat
template (system prompt first), and the model is given the prompt token ids the SFT collator trains it on."""
import pytest
import torch

from distillkit._errors import InputError
from distillkit.pipeline.data import DEFAULT_PROMPT, Example, fill_prompt, tokenize_example
from distillkit.pipeline.evaluate import answer_accuracy, eval_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
QUESTIONS = [{"question": "3 + 4", "answer": "7"}, {"question": "12 + 30", "answer": "42"}]


@pytest.fixture()
def tok():
    from distillkit.world.tiny import build_tokenizer

    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


class Recorder(torch.nn.Module):
    """A tiny causal LM whose generate records the prompt ids it is given (padding dropped)."""

    def __init__(self, tok):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               pad_token_id=tok.pad_token_id))
        self.seen = []

    def generate(self, input_ids, attention_mask, **kw):
        self.seen += [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_chat_template_auto_gives_the_model_the_templated_prompt(tok):
    model = Recorder(tok)
    got = answer_accuracy(model, tok, QUESTIONS, chat_template="auto", system_prompt="Be brief.", max_new_tokens=2)
    assert got["n"] == 2 and len(model.seen) == 2
    texts = eval_prompts(tok, QUESTIONS, chat_template="auto", system_prompt="Be brief.")

    for q, text, ids in zip(QUESTIONS, texts, model.seen):
        raw = fill_prompt(DEFAULT_PROMPT, question=q["question"])
        assert text == f"<system>Be brief.<user>{raw}<assistant>"
        # the ids training puts before the response (one BOS: the template's)
        train = tokenize_example(tok, Example("x", raw, " 7", "7", True), chat_template="auto",
                                 system_prompt="Be brief.")
        prompt_ids = [i for i, lab in zip(train["input_ids"], train["labels"]) if lab == -100]
        assert ids == prompt_ids and ids.count(tok.bos_token_id) == 1


def test_chat_template_none_keeps_the_raw_prompt(tok):
    model = Recorder(tok)
    answer_accuracy(model, tok, QUESTIONS[:1], max_new_tokens=1)
    raw = fill_prompt(DEFAULT_PROMPT, question=QUESTIONS[0]["question"])
    assert eval_prompts(tok, QUESTIONS[:1]) == [raw]
    train = tokenize_example(tok, Example("x", raw, " 7", "7", True))
    assert model.seen[0] == [i for i, lab in zip(train["input_ids"], train["labels"]) if lab == -100]


def test_bad_chat_template_is_named(tok):
    with pytest.raises(InputError, match="chat_template='chatml'"):
        answer_accuracy(None, tok, QUESTIONS, chat_template="chatml")


@pytest.mark.parametrize("samples", [1, 2])
def test_mot_evaluates_on_the_chat_template_it_trains_with(tok, tmp_path, monkeypatch, samples):
    """MoT's round evaluation (greedy, and sampled with eval_samples > 1) builds its prompts with the run's
    chat_template and system_prompt."""
    import json

    import distillkit.pipeline.evaluate as evaluate
    from distillkit.methods.mot import MotConfig, evaluate_round
    from distillkit.world.tiny import save_tiny_checkpoint

    student = save_tiny_checkpoint(tmp_path / "student", tokenizer=tok, hidden_size=16, num_layers=1, num_heads=2,
                                   seed=3)
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"id": "a0", "question": "1 + 1", "answer": "2",
                                "response": " 1 + 1 = 2</think> The final answer is 2."}) + "\n")
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    built = []
    real = evaluate.eval_prompts

    def record(*a, **kw):
        built.extend(real(*a, **kw))
        return built[-len(a[1]):]

    monkeypatch.setattr(evaluate, "eval_prompts", record)
    cfg = MotConfig(student=student, teacher_data=[str(data)], output_dir=str(tmp_path / "run"), rounds=1,
                    steps_per_round=1, batch_size=1, eval_data=str(evals), max_new_tokens=2, progress=False,
                    eval_samples=samples, eval_temperature=1.0, chat_template="auto", system_prompt="Be brief.")
    got = evaluate_round(cfg, tok, -1, torch.device("cpu"), [])
    assert 0 <= got["accuracy"] <= 1
    raw = [fill_prompt(DEFAULT_PROMPT, question=q["question"]) for q in QUESTIONS]
    assert built == [f"<system>Be brief.<user>{r}<assistant>" for r in raw]


def test_vcrd_evaluates_on_the_chat_template_it_trains_with(tok, tmp_path, monkeypatch):
    """A VCRD run with chat_template auto evaluates its student on the templated prompt (system prompt first)."""
    import json

    import distillkit.pipeline.evaluate as evaluate
    from distillkit.methods.vcrd import VcrdConfig, run
    from distillkit.world.tiny import save_tiny_checkpoint

    student = save_tiny_checkpoint(tmp_path / "student", tokenizer=tok, hidden_size=16, num_layers=1, num_heads=2,
                                   seed=3)
    teacher = save_tiny_checkpoint(tmp_path / "teacher", tokenizer=tok, hidden_size=16, num_layers=1, num_heads=2,
                                   seed=4)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", **q}) + "\n" for i, q in enumerate(QUESTIONS)))
    built = []
    real = evaluate.eval_prompts

    def record(*a, **kw):
        built.extend(real(*a, **kw))
        return built[-len(a[1]):]

    monkeypatch.setattr(evaluate, "eval_prompts", record)
    cfg = VcrdConfig(student=str(student), teacher=str(teacher), prompts=str(prompts), output_dir=str(tmp_path / "run"),
                     steps=1, batch_size=2, lr=1e-2, rollout_tokens=4, temperature=1.0, top_k=8,
                     eval_data=str(prompts), max_new_tokens=2, progress=False, seed=5, chat_template="auto",
                     system_prompt="Be brief.")
    summary = run(cfg)
    assert summary["eval"]["n"] == 2
    raw = [fill_prompt(cfg.prompt_template, question=q["question"]) for q in QUESTIONS]
    assert built == [f"<system>Be brief.<user>{r}<assistant>" for r in raw]
