"""Judges: the PRM adapter equals a direct per-position computation (ids route with and without KV
reuse, text route); CallableJudge checks and masks; bad inputs name the argument."""
import copy

import pytest
import torch

from _tolerance import assert_eager_budget
from distillkit.methods.vcrd.judges import CallableJudge, HFProcessRewardJudge, Judge
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def prm():
    tok = build_tokenizer()
    model = tiny_causal_lm(len(tok), arch="llama", hidden_size=32, num_layers=2, num_heads=2, seed=11)
    with torch.no_grad():  # peaky next-token distributions, so that scores spread over (0, 1)
        model.lm_head.weight.mul_(6)
    return tok, model


def _batch(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tok), (3, 10), generator=g)  # no specials (unk is dropped by decode)
    ids[:, 0] = tok.bos_token_id  # as a policy tokenizer frames a prompt
    cand = torch.randint(4, len(tok), (3, 10), generator=g)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 1:7] = True  # row 1 is "right-padded" after position 6
    mask[2, 9] = True
    return ids, cand, mask


def _direct(model, tok, ids, cand, mask, tag_ids):
    """score[b, t] = softmax(logits[good, bad])[0] after ids[b, :t+1] + cand[b, t] + tag, one sequence each."""
    good, bad = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    want = torch.zeros(ids.shape, dtype=torch.float64)
    with torch.no_grad():
        for b, t in mask.nonzero().tolist():
            seq = torch.tensor(ids[b, :t + 1].tolist() + [int(cand[b, t])] + tag_ids)[None]
            z = model(input_ids=seq).logits[0, -1].double()
            want[b, t] = torch.softmax(z[[good, bad]], 0)[0]
    return want


class _TokenCounter:
    """Counts the token positions the model embeds (its compute, up to attention)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module, args, out):
        self.n += args[0].numel()


@pytest.mark.parametrize("step_tag", [None, "###"])
def test_prm_judge_equals_direct_per_position_scores(prm, step_tag):
    tok, model = prm
    ids, cand, mask = _batch(tok)
    tag_ids = tok.encode(step_tag, add_special_tokens=False) if step_tag else []
    want = _direct(model, tok, ids, cand, mask, tag_ids)  # plain PyTorch, float32 model: the error budget
    truth = _direct(copy.deepcopy(model).double(), tok, ids, cand, mask, tag_ids)
    assert want[mask].std() > 0.01 and 0 < want[mask].min() and want[mask].max() < 1  # scores that differ
    counts = {}
    for name, kw in [("cached", dict(reuse_prefix_cache=True, batch_size=4)),
                     ("direct", dict(reuse_prefix_cache=False, batch_size=5)),
                     ("text", dict(policy_tokenizer=tok))]:
        judge = HFProcessRewardJudge(model, tok, good_token="+", bad_token="-", step_tag=step_tag, **kw)
        assert isinstance(judge, Judge)
        counter = _TokenCounter(model)
        got = judge(ids, cand, mask)
        counter.handle.remove()
        counts[name] = counter.n
        assert got.dtype == torch.float32 and got.shape == ids.shape
        # scores in (0, 1), each its own softmax: relative per element
        assert_eager_budget(got[mask], want[mask], truth[mask], out_dtype=torch.float32, scale="element", what=name)
        assert (got[~mask] == 0).all()
    # KV reuse: each row's prefix once plus 1 + len(tag) tokens per candidate, not one prefix per candidate
    k = 1 + len(tag_ids)
    assert counts["cached"] == sum(int(mask[b].nonzero().max()) + 1 for b in range(3)) + int(mask.sum()) * k
    assert counts["cached"] < counts["direct"]


def test_prm_judge_without_mask_scores_every_position(prm):
    tok, model = prm
    ids, cand, _ = _batch(tok, seed=1)
    ids, cand = ids[:1, :5], cand[:1, :5]
    want = _direct(model, tok, ids, cand, torch.ones_like(ids, dtype=torch.bool), [])
    truth = _direct(copy.deepcopy(model).double(), tok, ids, cand, torch.ones_like(ids, dtype=torch.bool), [])
    got = HFProcessRewardJudge(model, tok)(ids, cand)
    assert_eager_budget(got, want, truth, out_dtype=torch.float32, scale="element")


def test_prm_judge_rejects_bad_tokens_and_inputs(prm):
    tok, model = prm
    with pytest.raises(ValueError, match="good_token"):
        HFProcessRewardJudge(model, tok, good_token="++")
    with pytest.raises(ValueError, match="bad_token"):
        HFProcessRewardJudge(model, tok, good_token="+", bad_token="+")
    judge = HFProcessRewardJudge(model, tok)
    ids, cand, mask = _batch(tok)
    with pytest.raises(TypeError, match="prefix_ids"):
        judge(ids.float(), cand, mask)
    with pytest.raises(ValueError, match="token_ids"):
        judge(ids, cand[:, :5], mask)
    with pytest.raises(ValueError, match="mask"):
        judge(ids, cand, mask.long())
    with pytest.raises(ValueError, match="token_ids"):
        judge(ids, cand + 1000, mask)


def test_callable_judge_checks_and_masks():
    ids = torch.arange(12).reshape(2, 6)
    mask = ids % 2 == 0
    judge = CallableJudge(lambda p, t: (t % 5).float() / 4)
    got = judge(ids, ids, mask)
    torch.testing.assert_close(got, torch.where(mask, (ids % 5).float() / 4, torch.zeros(())))
    with pytest.raises(ValueError, match="outside"):
        CallableJudge(lambda p, t: t.float())(ids, ids)
    with pytest.raises(ValueError, match="shape"):
        CallableJudge(lambda p, t: torch.zeros(3))(ids, ids)
    with pytest.raises(ValueError, match="NaN"):
        CallableJudge(lambda p, t: torch.full(t.shape, float("nan")))(ids, ids)
    with pytest.raises(TypeError, match="fn"):
        CallableJudge(3)


def _direct_value(model, head, ids, cand, mask, tag_ids):
    """score[b, t] = sigmoid(head(last hidden state)) after ids[b, :t+1] + cand[b, t] + tag, one sequence each."""
    want = torch.zeros(ids.shape, dtype=torch.float64)
    with torch.no_grad():
        for b, t in mask.nonzero().tolist():
            seq = torch.tensor(ids[b, :t + 1].tolist() + [int(cand[b, t])] + tag_ids)[None]
            h = model(input_ids=seq, output_hidden_states=True).hidden_states[-1][0, -1]
            want[b, t] = torch.sigmoid(head(h.to(head.weight.dtype))).double()
    return want


def test_value_head_judge_reads_the_step_separator_and_loads_from_a_checkpoint(prm, tmp_path):
    from safetensors.torch import save_file

    from distillkit.methods.vcrd.judges import HFValueHeadJudge

    tok, _ = prm
    model = tiny_causal_lm(len(tok), arch="llama", hidden_size=32, num_layers=2, num_heads=2, seed=12)
    head = torch.nn.Linear(32, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))  # the normed state is ~sqrt(32) long
        head.bias.zero_()
    ids, cand, mask = _batch(tok, seed=2)
    tag = "###"
    tag_ids = tok.encode(tag, add_special_tokens=False)
    want = _direct_value(model, head, ids, cand, mask, tag_ids)
    truth = _direct_value(copy.deepcopy(model).double(), copy.deepcopy(head).double(), ids, cand, mask, tag_ids)
    assert want[mask].std() > 0.01  # scores that differ: the head reads a position-dependent state
    for kw in (dict(reuse_prefix_cache=True, batch_size=3), dict(reuse_prefix_cache=False), dict(policy_tokenizer=tok)):
        got = HFValueHeadJudge(model, tok, head, step_tag=tag, **kw)(ids, cand, mask)
        assert_eager_budget(got[mask], want[mask], truth[mask], out_dtype=torch.float32, scale="element",
                            what=str(kw))
        assert (got[~mask] == 0).all()
    # the separator matters: read at the candidate itself the scores differ
    at_candidate = HFValueHeadJudge(model, tok, head, step_tag=None)(ids, cand, mask)
    assert not torch.allclose(at_candidate[mask], want[mask].float(), atol=1e-3)
    # a checkpoint with the head inside it (v_head.summary.*, as Skywork-o1-Open-PRM stores it)
    ckpt = tmp_path / "vprm"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    state.update({"v_head.summary.weight": head.weight.detach().clone(),
                  "v_head.summary.bias": head.bias.detach().clone()})
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    loaded = HFValueHeadJudge.from_pretrained(ckpt, step_tag=tag, policy_tokenizer=tok)
    assert loaded.policy_tokenizer is None  # same vocabulary: the ids route
    got = loaded(ids, cand, mask)
    assert_eager_budget(got[mask], want[mask], truth[mask], out_dtype=torch.float32, scale="element", what="loaded")
    empty = tmp_path / "no_head"
    model.save_pretrained(empty)
    with pytest.raises(ValueError, match="no value head"):
        HFValueHeadJudge.from_pretrained(empty)
