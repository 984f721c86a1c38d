"""Tiny real Hugging Face models and a tokenizer, built offline (nothing is downloaded).

The tests and the demo need genuine ``transformers`` models (generate, KV cache, save/load with
``from_pretrained``) that are small enough to run on two CPU cores. Weights are random under a
seed; the tokenizer is character-level with a few multi-character pieces (``"### Step"``,
``"<think>"``, ``"</think>"``, ``"The final answer is"``) so that decoding round-trips text exactly,
whitespace included, and so that tokenizing ``a + b`` gives the tokens of ``a`` followed by those
of ``b`` except where a multi-character piece straddles the join.

    tok = build_tokenizer()
    model = tiny_causal_lm(len(tok), arch="llama", seed=0)
    path = save_tiny_checkpoint("/tmp/teacher", arch="qwen2", seed=1, tokenizer=tok)
"""
from __future__ import annotations

import os
import re
import string
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported on first use (`import distillkit` stays light)
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Multi-character pieces kept whole: the markers CoRD's prompts, steps and answer template use.
PIECES = ("### Step", "<think>", "</think>", "The final answer is", "\\boxed")
# Single characters: everything the world's questions, steps and answers are written with.
CHARACTERS = tuple(string.digits + string.ascii_letters + string.punctuation + " \n\t")
ARCHS = ("llama", "qwen2")


def _split_pattern(pieces: list[str]) -> str:
    # Longest pieces first so that "</think>" wins over "<" and "The final answer is" over "T".
    ordered = sorted(set(pieces), key=len, reverse=True)
    return "|".join(re.escape(p) for p in ordered) + r"|[\s\S]"


def build_tokenizer(extra_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with CoRD's marker pieces and pad/bos/eos/unk specials.

    ``extra_tokens`` adds more multi-character pieces (kept whole when they occur in text).
    Encoding prepends ``<s>`` (``add_special_tokens=False`` leaves it out); decoding concatenates
    tokens with nothing in between, so ``decode(encode(text, add_special_tokens=False)) == text``
    for any text written with the covered characters (others map to ``<unk>``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    extra = list(extra_tokens or [])
    for t in extra:
        if not isinstance(t, str) or not t:
            raise ValueError(f"extra_tokens: expected non-empty strings, got {t!r}")
    pieces = list(PIECES) + [t for t in extra if len(t) > 1]
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *CHARACTERS, *PIECES, *extra]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "isolated": every match is its own pre-token and nothing between matches is lost.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(_split_pattern(pieces)), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate, no spaces inserted between tokens
    bos_id = vocab[BOS]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False, padding_side="left", model_max_length=1 << 20)


def tiny_causal_lm(vocab_size: int, *, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, intermediate_size: int | None = None, seed: int = 0,
                   tie_word_embeddings: bool = False, max_position_embeddings: int = 4096,
                   pad_token_id: int | None = 0, bos_token_id: int | None = 1,
                   eos_token_id: int | None = 2) -> PreTrainedModel:
    """A randomly initialised (under ``seed``) float32 causal LM in eval mode.

    arch: "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM; has q/k/v biases). The default
    special ids match :func:`build_tokenizer` (pad 0, bos 1, eos 2).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 1")
    if hidden_size < 1 or num_layers < 1 or num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_layers={num_layers}: "
                         "need positive sizes with hidden_size divisible by num_heads")
    import transformers

    cls_config = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    config = cls_config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    # Fork the RNG so that building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = pad_token_id
        model.generation_config.bos_token_id = bos_token_id
        model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def save_tiny_checkpoint(path: str | os.PathLike, *, arch: str = "llama", seed: int = 0,
                         tokenizer: PreTrainedTokenizerFast | None = None, **model_kwargs) -> str:
    """Builds a tiny model (and a tokenizer unless given) and saves both to ``path``.

    The model is written as safetensors with ``save_pretrained``; reload with
    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    Returns ``str(path)``.
    """
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    model = tiny_causal_lm(len(tok), arch=arch, seed=seed, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **model_kwargs)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
