"""Hugging Face teacher backend: batched ``generate`` with a KV cache, left padding, and a
stopping criterion that ends each row at the next step boundary of its decoded text."""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence

import torch

from distillkit.teachers.base import (
    Proposal,
    StepBoundary,
    Teacher,
    as_boundary,
    check_propose_args,
    finish,
)

log = logging.getLogger(__name__)

_RAW_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def cache_kwargs(model, cache) -> dict:
    """The keyword that passes a KV cache to ``model.forward``: ``cache`` in recent transformers (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class) -> str:
    # per class, not per call: scoring calls this for every batch
    import inspect

    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """``AutoTokenizer.from_pretrained``, except that a checkpoint whose tokenizer_config.json names
    the raw fast tokenizer class is loaded exactly as its tokenizer.json describes it.

    Why: transformers 5 maps some model types (qwen2, phi3, ...) to their own tokenizer class even
    when the checkpoint says ``TokenizersBackend``, which rebuilds the tokenizer and drops a custom
    pre-tokenizer (the tiny world's character-level tokenizer would no longer round-trip text).
    """
    from transformers import AutoTokenizer

    cfg_file = os.path.join(os.fspath(path), "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            cls_name = json.load(f).get("tokenizer_class")
        if cls_name in _RAW_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(table)} or 'auto'")
    return table[dtype]


def load_causal_lm(path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                   device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, tokenizer) from a local directory or a Hub id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    return model.to(device).eval(), load_tokenizer(path)


class _BoundaryCriterion:
    """Per-row stopping: a row is done once its decoded continuation holds a step boundary or it
    emitted EOS. Records at which generated token each row stopped (its token count)."""

    def __init__(self, tokenizer, boundary: StepBoundary, prompt_len: int, eos_ids: set[int]):
        self.tokenizer, self.boundary, self.prompt_len, self.eos_ids = tokenizer, boundary, prompt_len, eos_ids
        self.stopped_at: dict[int, int] = {}  # row -> number of generated tokens when it stopped
        self.eos_rows: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_gen = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for row in range(input_ids.shape[0]):
            if row in self.stopped_at:
                done[row] = True
                continue
            if last[row] in self.eos_ids:
                self.stopped_at[row] = n_gen
                self.eos_rows.add(row)
                done[row] = True
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            if self.boundary.cut(text, final=False) is not None:
                self.stopped_at[row] = n_gen
                done[row] = True
        return done


class HFTeacher(Teacher):
    """Proposes steps with ``model.generate`` (KV cache on, left padding, batched over prefixes).

    model: a ``transformers`` causal LM; tokenizer: its tokenizer (left padding is applied here).
    batch_size: rows (prefixes x n) per ``generate`` call.
    """

    def __init__(self, model, tokenizer, *, name: str | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        if tokenizer.pad_token_id is None:
            # Left padding needs a pad id; the attention mask hides it, so EOS serves.
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, name: str | None = None,
                        dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                        batch_size: int = 16) -> HFTeacher:
        model, tok = load_causal_lm(path, dtype=dtype, device=device)
        return cls(model, tok, name=name or os.fspath(path), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def propose(self, prefixes: Sequence[str], *, n: int = 1, max_new_tokens: int = 128,
                stop: StepBoundary | Sequence[str] | str | None = None, temperature: float = 0.0,
                seed: int | None = None, top_p: float = 1.0) -> list[list[Proposal]]:
        prefixes = check_propose_args(prefixes, n, max_new_tokens, temperature, top_p)
        boundary = as_boundary(stop)
        greedy = temperature == 0
        # Greedy continuations of one prefix are identical: generate once, repeat.
        reps = 1 if greedy else n
        per_call = max(1, self.batch_size // reps)
        out: list[list[Proposal]] = []
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prefixes), per_call):
                chunk = prefixes[start:start + per_call]
                rows = self._generate(chunk, reps, max_new_tokens, boundary, temperature, top_p)
                for i in range(len(chunk)):
                    got = rows[i * reps:(i + 1) * reps]
                    out.append(got * n if greedy else got)
        return out

    def _generate(self, prefixes: list[str], reps: int, max_new_tokens: int, boundary: StepBoundary,
                  temperature: float, top_p: float = 1.0) -> list[Proposal]:
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right: pad on the left
        try:
            enc = tok(prefixes, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        prompt_len = input_ids.shape[1]
        crit = _BoundaryCriterion(tok, boundary, prompt_len, self.eos_ids)
        sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=float(top_p)) \
            if temperature > 0 else dict(do_sample=False)
        seqs = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            num_return_sequences=reps, stopping_criteria=StoppingCriteriaList([crit]),
            pad_token_id=tok.pad_token_id, use_cache=True, **sampling)
        results = []
        for row in range(seqs.shape[0]):
            n_gen = crit.stopped_at.get(row, seqs.shape[1] - prompt_len)
            prompt = input_ids[row // reps][attention_mask[row // reps].bool()]
            text = self._decode_continuation(prompt, seqs[row, prompt_len:prompt_len + n_gen])
            results.append(finish(text, boundary, num_tokens=int(n_gen), hit_eos=row in crit.eos_rows))
        return results

    def _decode_continuation(self, prompt: torch.Tensor, gen: torch.Tensor) -> str:
        # Decoding the new tokens alone can drop a leading space (SentencePiece "▁" tokens):
        # decode prompt + continuation and remove the prompt's text when it is a prefix of it.
        tok = self.tokenizer
        head = tok.decode(prompt, skip_special_tokens=True)
        full = tok.decode(torch.cat([prompt, gen]), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
        return tok.decode(gen, skip_special_tokens=True)
