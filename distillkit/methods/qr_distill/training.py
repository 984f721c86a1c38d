"""QR-Distill steps 3-4: students, router features, the routed multi-student trainer, and its outputs."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distillkit.methods.qr_distill.config import (
    QRDistillConfig,
)
from distillkit.pipeline.data import Example, fill_prompt

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# 3-4. Students, router features, training
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathItem:
    """A training path: the student's example, its style, its row in the router features, and (set by the
    trainer's batches, -1 elsewhere) its position in the run's stream of paths, which seeds its routing noise."""
    example: Example
    style: str
    index: int
    position: int = -1


def build_items(records: Sequence[dict], cfg: QRDistillConfig) -> list[PathItem]:
    items = []
    for i, r in enumerate(records):
        prompt = r["prompt"] if cfg.use_style_prompt and r.get("prompt") else fill_prompt(cfg.prompt_template,
                                                                                    question=r["question"])
        items.append(PathItem(Example(str(r["id"]), prompt, r["response"], str(r["answer"]), True), r["style"], i))
    return items


class QRCollator:
    """Tokenises each path once per distinct student tokenizer (its prompt in that tokenizer's chat template with
    ``chat_template`` auto, ``system_prompt`` first); adds the router features.

    Returns {"student{s}": {input_ids, attention_mask, labels} [B, T_s] int64,
    "route_features": [B, d_enc] float32 (when features are given), "route_keys": [B] int64 the paths' stream
    positions (when every item has one: the batches of ``make_trainer``'s trainer)}."""

    def __init__(self, tokenizers: Sequence, max_length: int, features: torch.Tensor | None = None, *,
                 chat_template: str = "none", system_prompt: str | None = None):
        from distillkit.pipeline.data import SFTCollator

        self.tokenizers = list(tokenizers)
        self.collators = {id(t): SFTCollator(t, max_length, chat_template=chat_template, system_prompt=system_prompt)
                          for t in self.tokenizers}
        self.features = features

    def __call__(self, items: Sequence[PathItem]) -> dict:
        examples = [it.example for it in items]
        made = {key: col(examples) for key, col in self.collators.items()}
        batch: dict[str, Any] = {f"student{s}": made[id(t)] for s, t in enumerate(self.tokenizers)}
        if self.features is not None:
            batch["route_features"] = self.features[torch.tensor([it.index for it in items])]
        if items and all(getattr(it, "position", -1) >= 0 for it in items):
            batch["route_keys"] = torch.tensor([it.position for it in items], dtype=torch.long)
        return batch


def load_students(cfg: QRDistillConfig, device) -> tuple[list, list]:
    """(students, tokenizers), each LoRA-wrapped when its rank (student_lora_r, else lora_r) is > 0 and loaded in
    4-bit NF4 under its adapters when ``qlora``."""
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import load_tokenizer

    quant = qlora_settings(device) if cfg.qlora else None
    students, tokenizers = [], []
    for path, rank in zip(cfg.students, cfg.lora_ranks()):
        if quant is not None and rank > 0:
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                         device_map={"": device})
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = load_tokenizer(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if rank > 0:
            model = apply_lora(model, cfg, rank=rank)
        students.append(model if quant is not None and rank > 0 else model.to(device))
        tokenizers.append(tok)
    return students, tokenizers


def qlora_settings(device):
    """The 4-bit NF4 quantisation of QLoRA (double quantisation, bf16 compute); InputError naming ``qlora`` when
    this machine cannot run it (no CUDA device, no bitsandbytes, no peft)."""
    from distillkit._errors import InputError

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError(f"qlora: 4-bit students need a CUDA device (device is {device}, CUDA available: "
                         f"{torch.cuda.is_available()}); set qlora: false to train LoRA over full-precision weights")
    for module, how in (("bitsandbytes", "pip install bitsandbytes"), ("peft", "pip install 'distillkit[lora]'")):
        try:
            __import__(module)
        except ImportError as exc:
            raise InputError(f"qlora: needs {module} ({how}; keep torch pinned on the same line); import failed: "
                             f"{exc}") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model, cfg: QRDistillConfig, *, rank: int | None = None):
    """``model`` wrapped by peft with LoRA adapters (rank ``rank``, default lora_r) on ``lora_targets``."""
    rank = cfg.lora_r if rank is None else rank
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(f"lora_r={rank} needs peft: pip install peft (or set lora_r: 0 for full "
                          f"fine-tuning); import failed: {exc}") from exc
    lcfg = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def load_encoder(path: str, device):
    """(frozen encoder, its tokenizer)."""
    from transformers import AutoModel

    from distillkit.teachers.hf import load_tokenizer

    encoder = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    encoder.requires_grad_(False)
    return encoder, load_tokenizer(path)


def route_features(cfg: QRDistillConfig, records: Sequence[dict], device, encoder=None) -> torch.Tensor:
    """Frozen-encoder features of every path's text (computed once: the encoder never changes)."""
    from distillkit.methods.qr_distill.router import encode_texts

    if isinstance(encoder, tuple):
        enc, tok = encoder
    else:
        enc, tok = load_encoder(cfg.router_encoder, device)
    max_len = min(cfg.encoder_max_length, getattr(enc.config, "max_position_embeddings", cfg.encoder_max_length))
    return encode_texts(enc, tok, [r["response"] for r in records], batch_size=max(1, cfg.train.batch_size * 4),
                        max_length=max_len)


def loss_settings(cfg: QRDistillConfig):
    from distillkit.methods.qr_distill.router import LossSettings

    return LossSettings(routing=cfg.canonical_routing(), gumbel_tau=cfg.gumbel_tau, top_k=cfg.route_top_k,
                        capacity_factor=cfg.router_capacity_factor, mutual=cfg.mutual, mutual_form=cfg.mutual_form,
                        mutual_scope=cfg.mutual_scope, competence=cfg.competence, entropy_reg=cfg.entropy_reg,
                        regularizer=cfg.router_regularizer, lambda_1=cfg.lambda_1, lambda_2=cfg.lambda_2,
                        normalize_shared=cfg.normalize_shared, competence_tau=cfg.competence_tau,
                        noise_seed=cfg.train.seed)


def default_shared_dim(hidden_sizes: Sequence[int]) -> int:
    """D of Eq. 5 when shared_dim is not set: half the narrowest student's width (a lower-dimensional space)."""
    return max(1, min(hidden_sizes) // 2)


def build_model(cfg: QRDistillConfig, students: Sequence, router_in_dim: int | None):
    from distillkit.methods.qr_distill.router import QRDistillModel, student_hidden_size

    sizes = [student_hidden_size(m) for m in students]
    return QRDistillModel(students, shared_dim=cfg.shared_dim or default_shared_dim(sizes),
                          router_in_dim=router_in_dim, router_hidden=cfg.router_hidden, hidden_sizes=sizes)


def steps_for(cfg: QRDistillConfig, num_paths: int) -> int:
    """The optimizer steps of the run: ceil(epochs * paths / (batch_size * grad_accum)) when ``epochs`` is set,
    else max_steps."""
    if cfg.epochs is None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.epochs * num_paths / (cfg.train.batch_size * cfg.train.grad_accum) - 1e-9))


def param_groups(model, cfg: QRDistillConfig) -> list[dict]:
    """AdamW groups: each student at its own rate (student_lrs; default lr), the router at router_lr (default
    lr), the projections and competence scores at lr."""
    groups, taken = [], set()
    lrs = cfg.student_lrs or [cfg.train.lr] * model.num_students
    for student, lr in zip(model.students, lrs):
        params = [p for p in student.parameters() if p.requires_grad]
        taken |= {id(p) for p in student.parameters()}
        groups.append({"params": params, "lr": float(lr)})
    if model.router is not None:
        taken |= {id(p) for p in model.router.parameters()}
        groups.append({"params": list(model.router.parameters()), "lr": float(cfg.router_lr or cfg.train.lr)})
    groups.append({"params": [p for p in model.parameters() if id(p) not in taken], "lr": float(cfg.train.lr)})
    return [g for g in groups if g["params"]]


def stream_positions(trainer, step: int, micro: int) -> range:
    """The stream positions of this rank's rows of micro-batch ``micro`` of step ``step`` (the Trainer's data
    order: global micro-batch ``step * grad_accum + micro`` of ``world_size * batch_size`` paths, rank r its r-th
    slice): step x global batch + the row's index in the global batch, the same for a path whatever the split
    into ranks and micro-batches (world_size x grad_accum fixed)."""
    b, w = trainer.cfg.batch_size, trainer.dist.world_size
    start = (step * trainer.cfg.grad_accum + micro) * b * w + trainer.dist.rank * b
    return range(start, start + b)


def make_trainer(model, cfg: QRDistillConfig, items: Sequence[PathItem], collate):
    """The shared Trainer over the container (students + router + projections + competence), one AdamW group per
    student (its own rate), for ``steps_for(cfg, len(items))`` steps; its batches' paths carry their stream
    positions (``stream_positions``), which seed their routing noise."""
    from distillkit.pipeline.train import Trainer

    class _QRTrainer(Trainer):
        def batch_examples(self, step: int, micro: int) -> list:
            got = super().batch_examples(step, micro)
            return [dataclasses.replace(it, position=p) if isinstance(it, PathItem) else it
                    for it, p in zip(got, stream_positions(self, step, micro), strict=True)]

    tcfg = dataclasses.replace(cfg.train, output_dir=cfg.output_dir, max_steps=steps_for(cfg, len(items)))
    settings = loss_settings(cfg)
    # the container's own forward (qr_loss): under torchrun the DDP wrapper's hooks run
    return _QRTrainer(model, tcfg, items, collate, lambda m, b: m(b, settings), params=param_groups(model, cfg))


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def save_students(model, tokenizers, cfg: QRDistillConfig) -> list[str]:
    """Each student as a Hugging Face checkpoint in students/<name> (LoRA merged into the weights)."""
    from distillkit.pipeline.train import save_pretrained_atomic

    out = []
    for student, tok, name in zip(model.students, tokenizers, cfg.student_labels()):
        path = os.path.join(cfg.output_dir, "students", name)
        to_save = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
        save_pretrained_atomic(to_save, tok, path)
        out.append(path)
    return out


def routing_summary(model, features: torch.Tensor | None, items: Sequence[PathItem], names: Sequence[str], *,
                    routing: str = "gumbel_top1") -> dict:
    """Per style: the router's mean probability of each student (``routing_probabilities``) and the share of
    paths whose most likely student it is (noise-free, before any capacity limit), over the training paths."""
    from distillkit.methods.qr_distill.router import routing_probabilities

    if model.router is None or features is None:
        return {}
    probs = routing_probabilities(model.router, features, routing=routing)
    out = {}
    for style in sorted({it.style for it in items}):
        rows = torch.tensor([it.index for it in items if it.style == style])
        p = probs[rows]
        top = torch.bincount(p.argmax(-1), minlength=len(names)).float() / len(rows)
        out[style] = {"mean_prob": {n: float(v) for n, v in zip(names, p.mean(0))},
                      "top_share": {n: float(v) for n, v in zip(names, top)}, "paths": len(rows)}
    return out


def routing_split(output_dir: str, names: Sequence[str], last_fraction: float = 0.1) -> dict:
    """Each student's share of the routes over the last ``last_fraction`` of the logged training steps (the split
    the students actually trained on, capacity limit included), from metrics.jsonl; {} when nothing was logged."""
    from distillkit.pipeline.runs import read_records
    from distillkit.pipeline.train import METRICS_NAME

    path = os.path.join(output_dir, METRICS_NAME)
    recs = [r for r in read_records(path) if "share_s0" in r] if os.path.exists(path) else []
    if not recs:
        return {}
    tail = recs[-max(1, math.ceil(len(recs) * last_fraction)):]
    return {n: sum(r.get(f"share_s{s}", 0.0) for r in tail) / len(tail) for s, n in enumerate(names)}


def evaluate_students(model, tokenizers, cfg: QRDistillConfig) -> dict:
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.evaluate import answer_accuracy

    questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit, fields=cfg.question_fields(),
                                        split=cfg.split)
    return {name: answer_accuracy(student, tok, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.eval_max_new_tokens, chat_template=cfg.chat_template,
                                  system_prompt=cfg.system_prompt)["accuracy"]
            for student, tok, name in zip(model.students, tokenizers, cfg.student_labels())}
