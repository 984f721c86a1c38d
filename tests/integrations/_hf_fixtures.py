"""Tiny students, teachers and batches for the integration tests (built offline from config classes)."""
from __future__ import annotations

import torch

from distillkit.reference.skew_kl import skew_kl, skew_reverse_kl
from distillkit.world.tiny import build_tokenizer, tiny_causal_lm

SEQ = 12


def tokenizer():
    return build_tokenizer()


def llama(vocab: int, seed: int, hidden: int = 32, layers: int = 2):
    model = tiny_causal_lm(vocab, arch="llama", hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed)
    model.train()
    return model


def gemma2(vocab: int, seed: int, softcap: float = 5.0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=softcap,
                       attn_logit_softcapping=None, sliding_window=8, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits far beyond the softcap, so the cap changes the loss a lot
        model.lm_head.weight.mul_(20.0)
    return model.train()


def cohere(vocab: int, seed: int, logit_scale: float = 0.25):
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(seed)
    cfg = CohereConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, logit_scale=logit_scale,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    return CohereForCausalLM(cfg).train()


def examples(vocab: int, n: int = 8, seed: int = 0, padding: bool = True) -> list[dict]:
    """n fixed-length examples with different numbers of kept targets: left padding (attention 0, label -100)
    and a prompt whose labels are -100, so per-micro-batch means differ from the global mean. padding=False for
    models whose float64 eager attention turns a fully masked row into NaN (Gemma-2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, vocab, (SEQ,), generator=g)
        pad = i % 4 if padding else 0
        prompt = 1 + i % 3
        mask = torch.ones(SEQ, dtype=torch.long)
        mask[:pad] = 0
        ids[:pad] = 0
        labels = ids.clone()
        labels[:pad + prompt] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def batch(vocab: int, n: int = 4, seed: int = 0, padding: bool = True) -> dict:
    rows = examples(vocab, n, seed, padding)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def eager_loss(student, teacher, inputs, *, alpha, reverse, temperature=1.0, vocab=None, weights=None,
               dtype=torch.float32):
    """The skew (reverse) KL of the models' real logits (their own forward: softcap, logit scale and all),
    shifted as causal LM training does, sum over kept tokens / their count; in ``dtype`` (float64 copies of
    the models give the truth)."""
    s, t = student.to(dtype), teacher.to(dtype)
    fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    z_s = s(**fwd).logits[:, :-1]
    with torch.no_grad():
        z_t = t(**fwd).logits[:, :-1]
    if vocab is not None:
        z_s, z_t = z_s[..., :vocab], z_t[..., :vocab]
    labels = inputs["labels"][:, 1:]
    w = None if weights is None else weights[:, 1:].to(dtype)
    fn = skew_reverse_kl if reverse else skew_kl
    total = fn(z_s, z_t, labels, w, alpha=alpha, temperature=temperature, reduction="sum", upcast=False)
    return total / (labels != -100).sum()


def cancelling_scale(student, teacher, inputs, *, reverse, temperature=1.0, vocab=None) -> float:
    """The magnitude of the terms that cancel in the loss: the mean entropy, over kept targets, of the
    distribution that weights the sum (p for SKL, q for SRKL); a near-0 divergence is judged on this scale."""
    fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        z = (student if reverse else teacher).double()(**fwd).logits[:, :-1]
    z = z if vocab is None else z[..., :vocab]
    logp = torch.log_softmax(z / temperature, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy[inputs["labels"][:, 1:] != -100].mean().item()
