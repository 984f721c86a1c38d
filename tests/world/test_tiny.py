"""The tiny offline Hugging Face models and tokenizer used by the tests and the demo."""
from __future__ import annotations

import pytest
import torch

from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = [
    "Question: what is 17 + 25?\n<think> ### Step 1: add the tens: 10 + 20 = 30.\n\n### Step 2: "
    "units 7+5=12; total 42.</think> The final answer is 42.",
    "  leading and trailing spaces  \t\n\n",
    "Wait, let me check: \\boxed{-3.5} (x^2 * y) / {z} ~ @#$%&|<>[]_`'\"!?",
    "The final answer isThe final answer is</think><think>### Step### Ste",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text_exactly(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    with_bos = tok(text)["input_ids"]
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_tokenizer_keeps_marker_pieces_whole(tok):
    pieces = tok.convert_ids_to_tokens(tok("<think> ### Step 1</think> The final answer is 7",
                                           add_special_tokens=False)["input_ids"])
    assert pieces == ["<think>", " ", "### Step", " ", "1", "</think>", " ", "The final answer is", " ", "7"]
    # Text made only of characters concatenates token-wise (what MetaProver's KV reuse relies on).
    a, b = "so 3 + 4 = 7.\n\n", "### Step 2: done"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc(a + b) == enc(a) + enc(b)


def test_tokenizer_specials_and_unknown(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("é", add_special_tokens=False)["input_ids"]
    assert ids == [tok.unk_token_id]


def test_extra_tokens_and_save_load(tok, tmp_path):
    tok2 = build_tokenizer(extra_tokens=["Alternatively", "λ"])
    assert len(tok2) == len(tok) + 2
    ids = tok2("Alternatively, λ = 3", add_special_tokens=False)["input_ids"]
    assert tok2.convert_ids_to_tokens(ids)[:3] == ["Alternatively", ",", " "]
    tok2.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok3 = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["Alternatively, λ = 3"]:
        assert tok3(text)["input_ids"] == tok2(text)["input_ids"]
        assert tok3.decode(tok3(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(ValueError, match="extra_tokens"):
        build_tokenizer(extra_tokens=[""])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpoint_reload_gives_identical_logits(tok, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import load_tokenizer

    path = save_tiny_checkpoint(tmp_path / arch, arch=arch, seed=7, tokenizer=tok, hidden_size=32)
    model = tiny_causal_lm(len(tok), arch=arch, seed=7, hidden_size=32)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert reloaded.dtype == torch.float32
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # Same seed, same weights; a different seed, different weights.
    other = tiny_causal_lm(len(tok), arch=arch, seed=8, hidden_size=32)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, other(ids).logits)
    tok2 = load_tokenizer(path)
    assert tok2.decode(tok2(TEXTS[0], add_special_tokens=False)["input_ids"]) == TEXTS[0]


def test_tiny_causal_lm_checks_arguments():
    with pytest.raises(ValueError, match="arch"):
        tiny_causal_lm(10, arch="gpt9")
    with pytest.raises(ValueError, match="num_heads"):
        tiny_causal_lm(10, hidden_size=30, num_heads=4)
