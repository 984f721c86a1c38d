"""QR-Distill inputs: questions, paths and eval questions from a Hugging Face dataset folder with other column names
(fields, split) read as the JSONL files do; chat_template auto puts each prompt in the student tokenizer's chat
template for training and for the evaluation; bad values are named."""
import json
import os
import shutil

import pytest

from distillkit._errors import InputError
from distillkit.methods.qr_distill import QRDistillConfig, run
from distillkit.methods.qr_distill.paths import expected_path_ids, imported_records
from distillkit.methods.qr_distill.training import PathItem, QRCollator
from distillkit.pipeline.data import Example, tokenize_example
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
RENAME = {"question": "problem", "answer": "solution", "response": "trace"}


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _folder(path, rows, split="train"):
    datasets = pytest.importorskip("datasets")
    renamed = [{RENAME.get(k, k): v for k, v in r.items()} for r in rows]
    datasets.DatasetDict({split: datasets.Dataset.from_list(renamed)}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qr_inputs")
    tok = build_tokenizer()
    small = dict(num_layers=1, num_heads=2)
    students = [save_tiny_checkpoint(root / "llama32", arch="llama", tokenizer=tok, hidden_size=32, seed=1, **small),
                save_tiny_checkpoint(root / "qwen48", arch="qwen2", tokenizer=tok, hidden_size=48, seed=2, **small)]
    templated = []
    for s in students:  # the same students with a chat template in their tokenizer
        dst = str(root / (os.path.basename(str(s)) + "-chat"))
        shutil.copytree(s, dst)
        t = build_tokenizer()
        t.chat_template = TEMPLATE
        t.save_pretrained(dst)
        templated.append(dst)
    paths = [{"id": f"p{i}", "question": f"{i} + 1", "answer": str(i + 1), "style": ("a", "b")[i % 2],
              "response": f" {i} + 1 = {i + 1}. The final answer is {i + 1}."} for i in range(6)]
    questions = [{"id": f"q{i}", "question": f"{i} + 2", "answer": str(i + 2)} for i in range(3)]
    return {"root": root, "students": students, "templated": templated, "paths": paths, "questions": questions}


def _cfg(setup, out, **kw):
    base = dict(teachers=[], output_dir=str(out), students=setup["templated"], routing="random",
                router_encoder=None, max_steps=2, batch_size=2, lr=1e-3, progress=False, device="cpu")
    return QRDistillConfig(**{**base, **kw})


def test_dataset_folders_with_a_field_mapping_read_as_the_jsonl(setup, tmp_path):
    plain = _cfg(setup, tmp_path / "a", paths_input=_write(tmp_path / "paths.jsonl", setup["paths"]))
    mapped = _cfg(setup, tmp_path / "b", paths_input=_folder(tmp_path / "paths_ds", setup["paths"], "test"),
                  fields=RENAME, split="test")
    assert len(imported_records(plain)) == 6
    assert imported_records(mapped) == imported_records(plain)
    q_plain = _cfg(setup, tmp_path / "c", input_path=_write(tmp_path / "q.jsonl", setup["questions"]),
                   teachers=["scripted"])
    q_mapped = _cfg(setup, tmp_path / "d", input_path=_folder(tmp_path / "q_ds", setup["questions"]),
                    teachers=["scripted"], fields={"question": "problem", "answer": "solution"})
    assert expected_path_ids(q_mapped) == expected_path_ids(q_plain) and len(expected_path_ids(q_plain)) > 0
    with pytest.raises(InputError, match="fields"):
        _cfg(setup, tmp_path / "e", paths_input=plain.paths_input, fields={"question": 3})
    with pytest.raises(InputError, match="chat_template='chatml'"):
        _cfg(setup, tmp_path / "e", paths_input=plain.paths_input, chat_template="chatml")
    with pytest.raises(InputError, match="response"):  # the mapping is needed to find the columns
        imported_records(_cfg(setup, tmp_path / "f", paths_input=mapped.paths_input, split="test"))


def test_the_collator_puts_each_prompt_in_the_students_chat_template():
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    ex = Example("p0", "Question: 1 + 1\n", " 2", "2", True)
    batch = QRCollator([tok, tok], 64, chat_template="auto", system_prompt="Be brief.")(
        [PathItem(ex, "a", 0)])
    want = tokenize_example(tok, ex, 64, chat_template="auto", system_prompt="Be brief.")
    ids = batch["student0"]["input_ids"][0].tolist()
    assert ids[:len(want["input_ids"])] == want["input_ids"]
    assert tok.decode(ids).count("<system>Be brief.<user>Question: 1 + 1") == 1
    raw = QRCollator([tok, tok], 64)([PathItem(ex, "a", 0)])["student0"]["input_ids"][0].tolist()
    assert "<system>" not in tok.decode(raw)


def test_a_run_trains_and_evaluates_on_the_templated_prompt(setup, tmp_path, monkeypatch):
    """paths and eval questions from dataset folders with other column names; with chat_template auto the students
    train on, and are evaluated on, each prompt in their tokenizer's template (system prompt first)."""
    import distillkit.pipeline.data as data
    import distillkit.pipeline.evaluate as evaluate

    trained, asked = [], []
    real_tokenize = data.tokenize_example

    def tokenize(tokenizer, ex, *a, **kw):
        out = real_tokenize(tokenizer, ex, *a, **kw)
        trained.append(tokenizer.decode([i for i, lab in zip(out["input_ids"], out["labels"]) if lab == -100]))
        return out

    def generate(model, tokenizer, prompts, **kw):
        asked.extend(prompts)
        return [" The final answer is 2."] * len(prompts)

    monkeypatch.setattr(data, "tokenize_example", tokenize)
    monkeypatch.setattr(evaluate, "generate", generate)
    cfg = _cfg(setup, tmp_path / "run", paths_input=_folder(tmp_path / "paths_ds", setup["paths"]),
               eval_data=_folder(tmp_path / "eval_ds", setup["questions"]), fields=RENAME, split="train",
               chat_template="auto", system_prompt="Be brief.")
    summary = run(cfg)
    assert summary["paths"]["kept"] == 6 and len(summary["eval"]) == 2
    assert trained and all(t.count("<system>Be brief.<user>") == 1 and t.endswith("<assistant>") for t in trained)
    assert len(asked) == 2 * 3  # every student on every eval question
    assert all(p.startswith("<system>Be brief.<user>") and p.endswith("<assistant>") for p in asked)
    assert summary["eval"] == {name: pytest.approx(1 / 3) for name in summary["eval"]}  # only "0 + 2" answers 2


def test_teachers_with_a_tokenizer_write_paths_from_their_chat_template(setup, tmp_path):
    """chat_template auto: a teacher with a tokenizer (the hf backend) is given each style prompt in its tokenizer's
    template (system prompt first, no second BOS); the path records keep the raw prompt (each student templates it);
    a teacher without a tokenizer gets the raw prompt, and so does every teacher with chat_template none."""
    from distillkit.methods.qr_distill.paths import propose_paths, teacher_prompts
    from distillkit.teachers.base import Proposal, Teacher

    class Recording(Teacher):
        def __init__(self, tokenizer=None):
            self.tokenizer, self.seen = tokenizer, []

        def propose(self, prefixes, *, n=1, **kw):
            self.seen += list(prefixes)
            return [[Proposal(" The final answer is 3.", 5, True, "eos")] * n for _ in prefixes]

    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    q = {"id": "q0", "question": "1 + 2", "answer": "3"}
    cfg = _cfg(setup, tmp_path / "t", input_path=_write(tmp_path / "q.jsonl", [q]), teachers=["a", "b"],
               chat_template="auto", system_prompt="Be brief.", styles=["vanilla"])
    templated, bare = Recording(tok), Recording()
    keys = set(expected_path_ids(cfg))
    records = propose_paths(q, [templated, bare], cfg, keys)
    raw = [r["prompt"] for r in records]
    assert len(records) == 2 and raw[0] == raw[1] and "<user>" not in raw[0]
    assert templated.seen == [f"<system>Be brief.<user>{raw[0]}<assistant>"] and bare.seen == [raw[0]]
    plain = _cfg(setup, tmp_path / "u", input_path=cfg.input_path, teachers=["a", "b"], styles=["vanilla"])
    assert teacher_prompts(templated, raw[:1], plain) == raw[:1]
