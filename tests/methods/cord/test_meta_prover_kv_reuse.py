"""MetaProver KV reuse across steps (paper Section 4.4): each scored candidate's context KV is kept and the
next step's prefix (the surviving beam) extends it, so the meta-prover's token count falls while its scores
stay those of a full recompute (the suite's tolerance rule: against float64, no worse than twice the plain
float32 full recompute + 4 ulp). On the shipped world's meta-prover (Llama, rotary embeddings), several
questions of different prompt lengths in one call, small batches so kept and fresh rows share a forward."""
from __future__ import annotations

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit._errors import InputError
from distillkit.methods.cord.meta_prover import MetaProver

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Prompts of different lengths (batched prefixes need different padding and position ids).
PROMPTS = {"a": "Q: 6*0-5+4\n<think>\n", "b": "Question: work out 9-2-1-4 step by step.\n<think>\n",
           "c": "Compute 8*2*8+5. Show each step and then give the result at the end.\n<think>\n"}
ANSWERS = {"a": "9", "b": "2", "c": "3"}
STEPS = [" 6 * 0 = 0,", " 0 - 5 = -5,", " 9 - 2 = 7,", " 7 - 1 = 6,", " 8 * 2 = 16,", " 16 * 8 = 128,"]
K, B = 3, 2


@pytest.fixture(scope="module")
def path():
    from distillkit.world import models as M

    return M.asset_path(M.META_PROVER)


@pytest.fixture(scope="module")
def refs(path):
    """(float32 full recompute, float64 full recompute): the tolerance rule's eager and truth."""
    return (MetaProver.from_pretrained(path, backend="reference", reuse_prefix_cache=False),
            MetaProver.from_pretrained(path, dtype=torch.float64, backend="reference", reuse_prefix_cache=False))


def _beam_search(prover: MetaProver, *, steps: int = 3, late: str | None = "c"):
    """A B-beam, K-candidate search over STEPS for every question (``late`` joins at the second step, as a
    question entering the in-flight set does) -> per call (pairs, prefixes, scores, tokens it cost)."""
    beams = {q: [p] for q, p in PROMPTS.items() if q != late}
    calls = []
    for step in range(steps):
        if step == 1 and late is not None:
            beams[late] = [PROMPTS[late]]
        pairs, prefixes, owner = [], [], []
        for q, qb in beams.items():
            for b, beam in enumerate(qb):
                for k in range(K):
                    pairs.append((beam + STEPS[(step * 2 + b + k) % len(STEPS)], ANSWERS[q]))
                    prefixes.append(beam)
                    owner.append(q)
        before = prover.tokens_processed
        scores = prover.score(pairs, prefixes=prefixes)
        cost = prover.tokens_processed - before
        assert sum(prover.last_pair_tokens) == cost
        calls.append((pairs, prefixes, scores, cost))
        # survivors: the B best distinct candidates of each question (ties: earlier first)
        for q in beams:
            mine = sorted((i for i in range(len(pairs)) if owner[i] == q), key=lambda i: (-float(scores[i]), i))
            beams[q] = list(dict.fromkeys(pairs[i][0] for i in mine))[:B]
    return calls


@pytest.mark.parametrize("batch_size", [2, 16])
def test_kept_kv_cuts_tokens_and_keeps_scores(path, refs, batch_size):
    eager_prover, truth_prover = refs
    kept = MetaProver.from_pretrained(path, backend="reference", batch_size=batch_size)
    plain = MetaProver.from_pretrained(path, backend="reference", batch_size=batch_size, kv_cache_bytes=0)
    with_kept, without = _beam_search(kept), _beam_search(plain)
    # the same searches (the same candidates were scored at each step)
    assert [c[0] for c in with_kept] == [c[0] for c in without]
    # the first call has nothing kept; every later one runs fewer tokens
    assert with_kept[0][3] == without[0][3]
    for step in (1, 2):
        assert with_kept[step][3] < without[step][3], step
    assert kept.stats.prefix_tokens_kept > 0 and plain.stats.prefix_tokens_kept == 0
    assert kept.tokens_processed < plain.tokens_processed
    # scores: the kept path vs a float64 full recompute, within twice the float32 full recompute's error
    for pairs, _, got, _ in with_kept:
        eager = eager_prover.score(pairs)
        truth = truth_prover.score(pairs).double()
        assert_eager_budget(got, eager, truth, out_dtype=torch.float32, scale="element", what="kept-KV scores")


def test_kept_prefix_runs_only_its_new_tokens(path):
    """The second step's prefix is a scored candidate's context: it costs nothing to rebuild, so each
    candidate costs only its own suffix."""
    prover = MetaProver.from_pretrained(path, backend="reference")
    beam = PROMPTS["b"]
    first = [(beam + s, "2") for s in STEPS[:K]]
    prover.score(first, prefixes=[beam] * K)
    survivor = first[1][0]
    second = [(survivor + s, "2") for s in STEPS[K:2 * K]]
    before = prover.tokens_processed
    prover.score(second, prefixes=[survivor] * K)
    p_len = len(prover.tokenizer(survivor)["input_ids"])
    suffixes = sum(len(prover.encode(c, a)[0]) - p_len for c, a in second)
    assert prover.tokens_processed - before == suffixes
    assert prover.stats.prefix_tokens_kept == p_len


def test_extended_family_is_dropped_and_memory_stays_under_the_cap(path, refs):
    prover = MetaProver.from_pretrained(path, backend="reference")
    beam = PROMPTS["a"]
    prover.score([(beam + s, "9") for s in STEPS[:K]], prefixes=[beam] * K)
    assert len(prover._kept) == K and prover.kept_kv_bytes > 0
    survivor = beam + STEPS[0]
    prover.score([(survivor + s, "9") for s in STEPS[K:2 * K]], prefixes=[survivor] * K)
    # the survivor and its K-1 siblings are gone (no surviving beam extends them); the new step's K remain
    assert len(prover._kept) == K and all(len(k) > len(prover.tokenizer(survivor)["input_ids"]) for k in prover._kept)
    # a cap of about one entry: never above it, and scores still right
    one = max(v.nbytes for v in prover._kept.values())
    small = MetaProver.from_pretrained(path, backend="reference", kv_cache_bytes=one + one // 2)
    calls = _beam_search(small)
    assert 0 < small.kept_kv_bytes <= small.kv_cache_bytes
    eager_prover, truth_prover = refs
    pairs, _, got, _ = calls[-1]
    assert_eager_budget(got, eager_prover.score(pairs), truth_prover.score(pairs).double(), out_dtype=torch.float32,
                        scale="element", what="scores under a small cap")
    small.clear_kv_cache()
    assert small.kept_kv_bytes == 0 and not small._kept


def test_without_prefixes_nothing_is_kept_and_bad_cap_is_refused(path):
    prover = MetaProver.from_pretrained(path, backend="reference")
    prover.score([(PROMPTS["a"] + STEPS[0], "9")])
    assert prover.kept_kv_bytes == 0
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(InputError, match="kv_cache_bytes"):
            MetaProver.from_pretrained(path, kv_cache_bytes=bad)


def test_decode_many_spends_fewer_meta_prover_tokens_for_the_same_traces(path):
    """Through CoRD's own search on the world's teachers (several questions in flight, one scoring call per
    round): the same traces, and each question's meta-prover tokens fall."""
    from distillkit.methods.cord import CordConfig
    from distillkit.methods.cord.decode import decode_many
    from distillkit.teachers.hf import HFTeacher
    from distillkit.world import models as M
    from distillkit.world import problems as W

    info = M.manifest()["eval"]
    probs = W.generate_problems(4, seed=info["seed"], num_ops=info["num_ops"])
    teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n, batch_size=7) for n in M.TEACHERS]
    cfg = CordConfig(teachers=[M.asset_path(n) for n in M.TEACHERS], teacher_names=list(M.TEACHERS), meta_prover=path,
                     input_path="unused.jsonl", output_path="unused.jsonl", method="cord", beam_size=3,
                     max_steps=W.NUM_OPS + 1, token_budget=M.max_new_tokens(), max_step_tokens=16,
                     max_answer_tokens=8, temperature=0.0, n_curation=1, scoring_backend="reference", progress=False)
    items = [(p.question, p.answer, i) for i, p in enumerate(probs)]
    got = {}
    for cap in (1 << 30, 0):
        prover = MetaProver.from_pretrained(path, backend="reference", batch_size=5, kv_cache_bytes=cap)
        got[cap] = dict(decode_many(items, teachers, prover, cfg, in_flight=3))
    kept, plain = got[1 << 30], got[0]
    assert sorted(kept) == sorted(plain) == list(range(len(items)))
    assert [kept[i].beam.text for i in kept] == [plain[i].beam.text for i in kept]
    assert all(kept[i].meta_prover_tokens <= plain[i].meta_prover_tokens for i in kept)
    assert sum(r.meta_prover_tokens for r in kept.values()) < sum(r.meta_prover_tokens for r in plain.values())


def test_cord_config_sets_the_kept_kv_cap(path):
    from distillkit.methods.cord.config import CordConfig
    from distillkit.methods.cord.runner import load_meta_prover

    cfg = dict(teachers=[path], meta_prover=path, input_path="in.jsonl", output_path="out.jsonl")
    assert load_meta_prover(CordConfig(**cfg)).kv_cache_bytes == 1 << 30
    assert load_meta_prover(CordConfig(**cfg, meta_prover_kv_cache_bytes=0)).kv_cache_bytes == 0
    with pytest.raises(ValueError, match="meta_prover_kv_cache_bytes"):
        CordConfig(**cfg, meta_prover_kv_cache_bytes=-1)
