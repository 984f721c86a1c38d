"""Teacher backends: the Hugging Face one on tiny models; vLLM skipped where it is missing."""
from __future__ import annotations

import pytest
import torch

from distillkit.teachers import load_teacher
from distillkit.teachers.base import Proposal, StringStop
from distillkit.teachers.hf import HFTeacher
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class AfterChars:
    """A boundary that ends the step once ``k`` characters exist (a random model never writes
    real step markers, so the test defines its own)."""

    def __init__(self, k: int):
        self.k = k

    def cut(self, text, *, final=False):
        return (self.k, False) if len(text) > self.k else None

    def stop_strings(self):
        return []


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    return HFTeacher(tiny_causal_lm(len(tok), hidden_size=32, seed=3), tok, name="t0", batch_size=8)


PREFIXES = ["Q: 1+1?\n<think>\n", "A much longer question: what is 12 * 3 + 7?\n<think>\n", "x"]


def _greedy_reference(teacher, prefix, max_new_tokens):
    ids = torch.tensor([teacher.tokenizer(prefix)["input_ids"]])
    out = teacher.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_batched_matches_single_and_stops_at_boundary(teacher, tok):
    props = teacher.propose(PREFIXES, n=2, max_new_tokens=12, stop=AfterChars(5), temperature=0)
    assert len(props) == 3 and all(len(p) == 2 for p in props)
    for prefix, (a, b) in zip(PREFIXES, props):
        assert a == b  # greedy: the n continuations are identical
        gen = _greedy_reference(teacher, prefix, 12)
        full = tok.decode(gen, skip_special_tokens=True)
        if tok.eos_token_id in gen[:a.num_tokens]:
            assert a.stop_reason == "eos" and a.finished
            continue
        # Left-padded batched generation equals the prefix alone; it stopped as soon as the boundary
        # (6 characters) was there: one token per character here, so 6 tokens, cut to 5 characters.
        assert a.num_tokens == 6
        assert a.text == full[:5] and a.stop_reason == "boundary" and not a.finished


def test_length_and_string_stop(teacher, tok):
    (p,), = teacher.propose([PREFIXES[1]], n=1, max_new_tokens=4, stop=None)
    assert p.num_tokens == 4 and p.stop_reason == "length" and not p.finished
    gen = _greedy_reference(teacher, PREFIXES[1], 8)
    text = tok.decode(gen)
    ch = text[2]  # a stop string the model is known to emit at its third character
    (q,), = teacher.propose([PREFIXES[1]], n=1, max_new_tokens=8, stop=[ch])
    assert q.text == text[:text.index(ch) + 1] and q.finished and q.stop_reason == "stop"
    assert q.num_tokens == text.index(ch) + 1


def test_sampling_is_seeded(teacher):
    kw = dict(n=3, max_new_tokens=6, stop=None, temperature=1.0)
    a = teacher.propose(PREFIXES[:2], seed=11, **kw)
    b = teacher.propose(PREFIXES[:2], seed=11, **kw)
    c = teacher.propose(PREFIXES[:2], seed=12, **kw)
    assert a == b and a != c
    assert all(isinstance(p, Proposal) and p.num_tokens == 6 for row in a for p in row)
    assert len({p.text for p in a[0]}) > 1  # sampled continuations differ


def test_checks_and_load_teacher(teacher, tok, tmp_path):
    with pytest.raises(TypeError, match="prefixes"):
        teacher.propose("one string", n=1)
    with pytest.raises(ValueError, match="n="):
        teacher.propose(["a"], n=0)
    with pytest.raises(ValueError, match="temperature"):
        teacher.propose(["a"], temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        StringStop([])
    path = save_tiny_checkpoint(tmp_path / "t", arch="qwen2", seed=3, tokenizer=tok, hidden_size=32)
    loaded = load_teacher(path, name="qwen")
    assert loaded.name == "qwen"
    (p,), = loaded.propose(["Q\n"], max_new_tokens=3)
    assert p.num_tokens <= 3
    with pytest.raises(ValueError, match="backend"):
        load_teacher(path, backend="tgi")


def test_vllm_backend():
    from distillkit.teachers.vllm import vllm_available

    ok, why = vllm_available()
    if not ok:
        pytest.skip(f"vLLM backend not testable here: {why}")
    if not torch.cuda.is_available():
        pytest.skip("vLLM backend not testable here: vllm is installed but no CUDA device is present")
    import tempfile

    from distillkit.methods.cord.segmentation import LineBreak
    from distillkit.teachers.vllm import VLLMTeacher

    with tempfile.TemporaryDirectory() as d:
        path = save_tiny_checkpoint(d, hidden_size=64, seed=0)
        t = VLLMTeacher(path, gpu_memory_utilization=0.2, enforce_eager=True)
        props = t.propose(["Q: 1+1?\n<think>\n"] * 2, n=2, max_new_tokens=8, stop=LineBreak())
        assert len(props) == 2 and all(len(p) == 2 for p in props)
        assert all(0 < p.num_tokens <= 8 for row in props for p in row)


def test_top_p_narrows_sampling(teacher):
    kw = dict(n=4, max_new_tokens=6, stop=None, temperature=1.0, seed=5)
    wide = teacher.propose(PREFIXES[:1], **kw)
    narrow = teacher.propose(PREFIXES[:1], top_p=1e-6, **kw)  # only the most likely token survives: greedy
    (greedy,), = teacher.propose(PREFIXES[:1], n=1, max_new_tokens=6, stop=None, temperature=0)
    assert all(p.text == greedy.text for p in narrow[0])
    assert len({p.text for p in wide[0]}) > 1
    with pytest.raises(ValueError, match="top_p"):
        teacher.propose(["a"], top_p=0)


def test_apropose_runs_concurrently_and_matches_propose(teacher):
    """Many apropose calls in flight on one in-process teacher give what propose gives, seed for seed
    (the calls are serialized, so seeded sampling does not interleave)."""
    import asyncio

    kw = dict(n=2, max_new_tokens=5, stop=None, temperature=1.0)
    want = [teacher.propose(PREFIXES[:2], seed=s, **kw) for s in range(4)]

    async def main():
        return await asyncio.gather(*(teacher.apropose(PREFIXES[:2], seed=s, **kw) for s in range(4)))

    assert asyncio.run(main()) == want
