"""MetaProver: predictive perplexity equals exp(mean log p) from a plain full forward, with and
without prefix KV reuse, including tokenizers that merge across the prefix/step join."""
from __future__ import annotations

import copy

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit.methods.cord.meta_prover import MetaProver
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

BEAM = "Question: what is 3 + 4?\n<think>\nFirst, 3 + 4.\n\n"
STEPS = ["add them: 7.\n\n", "x", "so it is seven!\n\n", ""]
ANSWERS = ["7", "12", "-3.5"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def plain_score(model, ids: list[int], answer_start: int) -> float:
    """exp(mean log p(answer tokens)) from model(...).logits and log_softmax, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(answer_start - 1, len(ids) - 1)
    return float(torch.exp(lp[pos, torch.tensor(ids[answer_start:])].mean()))


def assert_scores_close(got, model, encoded):
    """got [P] within twice the error of plain_score on the float32 model, against the float64 model
    (scores are independent numbers in (0, 1]: relative per element)."""
    model64 = copy.deepcopy(model).double()

    def plain_fp32(ids, start):  # plain PyTorch in float32 throughout: forward, log_softmax, mean, exp
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        return float(torch.exp(lp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].mean()))

    eager = torch.tensor([plain_fp32(ids, start) for ids, start in encoded], dtype=torch.float64)
    truth = torch.tensor([plain_score(model64, ids, start) for ids, start in encoded], dtype=torch.float64)
    assert_eager_budget(got, eager, truth, out_dtype=torch.float32, scale="element")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("reuse", [True, False])
def test_score_equals_full_forward(tok, arch, reuse):
    model = tiny_causal_lm(len(tok), arch=arch, hidden_size=48, seed=2, tie_word_embeddings=arch == "qwen2")
    prover = MetaProver(model, tok, reuse_prefix_cache=reuse, batch_size=5)
    short = "Q: 1?\n<think>\n"
    pairs = [(BEAM + s, a) for s in STEPS for a in ANSWERS]          # 12 candidates of one beam
    pairs += [(short + s, "5") for s in STEPS[:3]]                    # 3 of a shorter beam
    pairs += [("Another beam entirely.\n", "42"), ("No prefix given", "1")]
    prefixes = [BEAM] * 12 + [short] * 3 + ["Another beam", None]
    got = prover.score(pairs, prefixes=prefixes)
    assert got.dtype == torch.float32 and got.shape == (len(pairs),)
    encoded = []
    for ctx, a in pairs:
        ids, start = prover.encode(ctx, a)
        # The token ids are exactly the template text's: head + answer, bos first.
        assert ids == tok(ctx + "</think> The final answer is " + a)["input_ids"]
        assert tok.decode(ids[start:]) == a
        encoded.append((ids, start))
    assert_scores_close(got, model, encoded)
    assert ((got > 0) & (got <= 1)).all()
    full = sum(len(prover.encode(c, a)[0]) for c, a in pairs)
    assert prover.stats.tokens_full == full
    if reuse:
        # Each prefix runs once; every candidate runs only what follows its prefix.
        saved = sum((n - 1) * len(tok(p)["input_ids"]) for p, n in ((BEAM, 12), (short, 3), ("Another beam", 1)))
        assert prover.stats.tokens_processed == full - saved
        assert prover.stats.prefix_tokens_reused == saved and prover.stats.reuse_fallbacks == 0
    else:
        assert prover.stats.tokens_processed == full and prover.stats.prefix_tokens_reused == 0


def test_reuse_with_a_tokenizer_merging_across_the_join(tok):
    # "\n\nadd" is one token: the prefix's trailing "\n\n" tokens are not a prefix of the full tokens.
    merging = build_tokenizer(extra_tokens=["\n\nadd", " 7"])
    model = tiny_causal_lm(len(merging), hidden_size=32, seed=4)
    prover = MetaProver(model, merging, batch_size=8)
    pairs = [(BEAM + s, "7") for s in ("add them: 7.\n\n", "so it is seven")]
    got = prover.score(pairs, prefixes=[BEAM, BEAM])
    assert_scores_close(got, model, [prover.encode(c, a) for c, a in pairs])
    assert prover.stats.reuse_fallbacks == 1  # the first candidate did not extend the prefix tokens
    beam_tokens = len(merging(BEAM)["input_ids"])
    assert 0 < prover.stats.prefix_tokens_reused < beam_tokens
    # " 7" straddles the head/answer join: that token counts as an answer token.
    ids, start = prover.encode("so it", "7")
    assert merging.convert_ids_to_tokens(ids[start:]) == [" 7"]
    with pytest.raises(ValueError, match="prefixes"):
        prover.score(pairs, prefixes=[BEAM])
    with pytest.raises(ValueError, match=r"prefixes\[1\]"):
        prover.score(pairs, prefixes=[BEAM, "not a prefix"])


def test_template_and_argument_checks(tok):
    model = tiny_causal_lm(len(tok), hidden_size=32, seed=0)
    prover = MetaProver(model, tok, template="{context}\nAnswer: {answer}")
    ids, start = prover.encode("ctx", "9")
    assert tok.decode(ids, skip_special_tokens=True) == "ctx\nAnswer: 9"
    assert ids[start:] == tok("9", add_special_tokens=False)["input_ids"]
    assert prover.score([]).shape == (0,)
    with pytest.raises(ValueError, match="template"):
        MetaProver(model, tok, template="{context} only")
    with pytest.raises(ValueError, match="template"):
        MetaProver(model, tok, template="{answer} before {context}")
    with pytest.raises(ValueError, match="answer"):
        prover.score([("ctx", "")])
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        prover.score([("ctx",)])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        MetaProver(model, tok)


@pytest.mark.parametrize("backend", __import__("distillkit._backend", fromlist=["x"]).runnable_backends("cpu"))
def test_every_scoring_backend_agrees(tok, backend):
    model = tiny_causal_lm(len(tok), hidden_size=32, seed=5)
    pairs = [(BEAM + s, "7") for s in STEPS[:2]]
    ref = MetaProver(model, tok, backend="reference").score(pairs, prefixes=[BEAM, BEAM])
    got = MetaProver(model, tok, backend=backend).score(pairs, prefixes=[BEAM, BEAM])
    encoded = [MetaProver(model, tok).encode(c, a) for c, a in pairs]
    for scores in (ref, got):
        assert_scores_close(scores, model, encoded)
