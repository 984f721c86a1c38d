"""The integrations against the same trainer with its own loss: time and peak memory per training step.

Run: pytest bench/bench_integrations.py -q -s      (writes bench/results/integrations-<device>.json)

One row per trainer and loss, each in a fresh interpreter (bench/_util.child_peak_rss), the same models, data
and optimizer (SGD) in every pair, measured in one run:
  hf        transformers.Trainer with the usual hand-written glue: both models' full [B, T, V] logits and TRL's
            generalised JSD at beta = 0 (a plain forward KL)          vs  distillkit.integrations.hf.SkewKLTrainer
  trl-gkd   trl.experimental.gkd.GKDTrainer, beta = 0 (forward KL), lmbda = 0 (the dataset's completions)
                                                                     vs  distillkit.integrations.trl.SkewKLGKDTrainer
  trl-distillation  trl.DistillationTrainer, beta = 1 (reverse KL; TRL's own chunked loss from hidden states),
            on-policy generation in every step                       vs  SkewKLDistillationTrainer (reverse=True)
  liger     Liger-Kernel's fused-linear JSD inside the HF glue, where liger_kernel imports (else the row says why)
Per step: the median wall time of the steps after the first; peak memory: the high-water resident set during
training above the resident set when training starts (/proc/self/clear_refs resets the high-water mark there),
on a GPU the allocator's peak. The ratio column is time (and memory) of distillkit's trainer / the baseline's.
Shapes: CPU students and teachers are Llama bodies (hidden 256, 2 layers) with a 32000-token vocabulary, batch 4
x 512 tokens (the vocabulary dominates the loss, as in real models); the tiny profile shrinks everything.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

import _util
import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SHAPE = dict(vocab=32000, hidden=256, layers=2, batch=4, seq=512, steps=4, completion=64)
TINY_SHAPE = dict(vocab=1000, hidden=32, layers=1, batch=2, seq=32, steps=2, completion=8)
GPU_SHAPE = dict(vocab=128256, hidden=1024, layers=4, batch=4, seq=2048, steps=6, completion=256)
PAIRS = [("hf", "hf-glue-kl", "hf-skewkl"), ("trl-gkd", "gkd-jsd-beta0", "gkd-skewkl"),
         ("trl-distillation", "distillation-jsd-beta1", "distillation-skew-rkl"),
         ("liger", "hf-glue-kl", "hf-liger-jsd")]


def _shape() -> dict:
    if shapes.profile() == "tiny":
        return dict(TINY_SHAPE)
    return dict(GPU_SHAPE if torch.cuda.is_available() else CPU_SHAPE)


# ---- what runs in each child ----------------------------------------------------------------------------------

def _models(shape, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed, hidden):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=shape["layers"], num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=4 * shape["seq"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).to(dev)
    return build(0, shape["hidden"]), build(1, shape["hidden"] * 2).eval()


def _tokenizer(shape):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # one token per whitespace-separated word "w<id>": any id sequence round-trips, the vocabulary is exact
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, shape["vocab"])}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return tok


def _words(g, n, vocab):
    return " ".join(f"w{i}" for i in torch.randint(4, vocab, (n,), generator=g).tolist())


def _data(kind, shape):
    g = torch.Generator().manual_seed(0)
    n = shape["batch"] * shape["steps"]
    seq, vocab = shape["seq"], shape["vocab"]
    if kind == "tokens":
        rows = []
        for _ in range(n):
            ids = torch.randint(4, vocab, (seq,), generator=g)
            labels = ids.clone()
            labels[: seq // 4] = -100  # a prompt
            rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels})
        return rows
    from datasets import Dataset

    if kind == "chat":
        half = seq // 2 - 1
        return Dataset.from_list([{"messages": [{"role": "user", "content": _words(g, half, vocab)},
                                                {"role": "assistant", "content": _words(g, half, vocab)}]}
                                  for _ in range(n)])
    return Dataset.from_list([{"prompt": _words(g, seq - shape["completion"], vocab)} for _ in range(n)])


class _StepClock:
    """TrainerCallback: wall time of each optimizer step; resets the RSS high-water mark as training starts."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.times, self.base_rss, self._t0 = [], 0, 0.0

            def on_train_begin(self, args, state, control, **kw):
                import gc

                gc.collect()
                _util._trim()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                    self.base_rss = torch.cuda.memory_allocated()
                else:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # resets VmHWM to the current resident set
                    self.base_rss = _util._rss_bytes()

            def on_step_begin(self, args, state, control, **kw):
                _util.sync(_util.device())
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _util.sync(_util.device())
                self.times.append(time.perf_counter() - self._t0)
        return Clock()


def _peak_since(clock) -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() - clock.base_rss
    with open("/proc/self/status") as f:
        hwm_kb = int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
    return hwm_kb * 1024 - clock.base_rss


def _hf_glue_trainer(loss_kind):
    """transformers.Trainer with the glue users write: full logits, shifted, masked, divided by the count."""
    from transformers import Trainer

    class GlueTrainer(Trainer):
        loss_is_scaled_for_ga = True

        def __init__(self, *a, teacher_model, **kw):
            super().__init__(*a, **kw)
            self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
            if loss_kind == "liger":
                from liger_kernel.transformers import LigerFusedLinearJSD

                self.jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            if loss_kind == "liger":
                h_s = model(**fwd, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
                with torch.no_grad():
                    h_t = self.teacher_model(**fwd, output_hidden_states=True,
                                             logits_to_keep=1).hidden_states[-1][:, :-1]
                return self.jsd(h_s.reshape(-1, h_s.shape[-1]), model.lm_head.weight,
                                h_t.reshape(-1, h_t.shape[-1]), self.teacher_model.lm_head.weight, labels.reshape(-1))
            from trl.experimental.gkd import GKDTrainer

            z_s = model(**fwd).logits[:, :-1]
            with torch.no_grad():
                z_t = self.teacher_model(**fwd).logits[:, :-1]
            return GKDTrainer.generalized_jsd_loss(z_s, z_t, labels, beta=0.0)
    return GlueTrainer


def child_main(provider: str) -> None:
    """One provider's run (in a fresh interpreter): prints one JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    shape = _shape()
    dev = _util.device()
    student, teacher = _models(shape, dev)
    tok = _tokenizer(shape)
    common = dict(output_dir=os.path.join("/tmp", f"bench_integrations_{provider}"), per_device_train_batch_size=
                  shape["batch"], max_steps=shape["steps"], learning_rate=1e-4, optim="sgd", report_to=[],
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, use_cpu=dev.type == "cpu",
                  dataloader_num_workers=0)
    clock = _StepClock()
    if provider.startswith("hf-"):
        from transformers import TrainingArguments

        args = TrainingArguments(**common)
        if provider == "hf-skewkl":
            from distillkit.integrations.hf import SkewKLTrainer

            trainer = SkewKLTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_data("tokens",
                                    shape), alpha=0.1, callbacks=[clock])
        else:
            cls = _hf_glue_trainer("liger" if provider == "hf-liger-jsd" else "kl")
            trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=_data("tokens", shape),
                          callbacks=[clock])
    elif provider.startswith("gkd-"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        from distillkit.integrations.trl import SkewKLGKDTrainer

        args = GKDConfig(**common, lmbda=0.0, seq_kd=False, beta=0.0, max_length=shape["seq"])
        cls = SkewKLGKDTrainer if provider == "gkd-skewkl" else GKDTrainer
        kw = {"alpha": 0.1, "reverse": False} if provider == "gkd-skewkl" else {}
        trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=_data("chat", shape),
                      processing_class=tok, callbacks=[clock], **kw)
    else:
        from trl import DistillationConfig, DistillationTrainer

        from distillkit.integrations.trl import SkewKLDistillationTrainer

        args = DistillationConfig(**common, beta=1.0, max_completion_length=shape["completion"], temperature=1.0,
                                  generation_kwargs={"min_new_tokens": shape["completion"]})
        cls = SkewKLDistillationTrainer if provider == "distillation-skew-rkl" else DistillationTrainer
        kw = {"alpha": 0.1, "reverse": True} if cls is SkewKLDistillationTrainer else {}
        trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=_data("prompts", shape),
                      processing_class=tok, callbacks=[clock], **kw)
    trainer.train()
    times = sorted(clock.times[1:] or clock.times)
    print(json.dumps({"provider": provider, "step_s": times[len(times) // 2], "peak_bytes": _peak_since(clock),
                      "steps": len(clock.times)}))


# ---- the suite -------------------------------------------------------------------------------------------------

def _run_child(provider: str) -> dict:
    code = f"import sys; sys.path.insert(0, {HERE!r}); import bench_integrations as b; b.child_main({provider!r})"
    out = _util.child_peak_rss(code, timeout_s=1800)
    return json.loads(out["stdout"].strip().splitlines()[-1])


def _liger_reason() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional provider, reason printed
        return f"liger_kernel does not import ({exc.__class__.__name__}: {exc})"
    return None


@pytest.mark.timeout(3600)  # six to eight trainer runs, each in a fresh interpreter
def test_integrations():
    shape = _shape()
    load_start = os.getloadavg()[0]  # a shared machine shows here: every ratio is within one run, all the same
    print(f"\nshape: {shape}; 1-minute load average {load_start:.1f} on {os.cpu_count()} CPUs")
    rows, measured = [], {}
    liger_why = _liger_reason()
    for integration, baseline, ours in PAIRS:
        if integration == "liger" and liger_why:
            print(f"skipped {integration}: {liger_why}")
            continue
        for provider in (baseline, ours):
            if provider not in measured:
                measured[provider] = _run_child(provider)
        base, mine = measured[baseline], measured[ours]
        case = f"{integration} V{shape['vocab']} {shape['batch']}x{shape['seq']}"
        for provider, m in ((baseline, base), (ours, mine)):
            ratio = m["step_s"] / base["step_s"]
            extra = {"peak_vs_baseline": m["peak_bytes"] / max(base["peak_bytes"], 1), "shape": shape,
                     "loadavg_1m": [load_start, os.getloadavg()[0]]}
            row = _util.Row("integrations", case, provider, "trainer", m["step_s"], m["peak_bytes"],
                            ratio_to_eager=ratio, extra=extra)
            rows.append(row)
            print(row.line() + f"  peak/baseline {row.extra['peak_vs_baseline']:6.1%}")
    _util.report(rows, "integrations")
    assert all(r.time_s > 0 for r in rows)


if __name__ == "__main__":
    sys.exit(__import__("pytest").main([__file__, "-q", "-s"]))
