"""QR-Distill steps 3-4: students, router features, the routed multi-student trainer, and its outputs."""
from __future__ import annotations

import dataclasses
import logging
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
    """A training path: the student's example, its style, and its row in the router features."""
    example: Example
    style: str
    index: int


def build_items(records: Sequence[dict], cfg: QRDistillConfig) -> list[PathItem]:
    items = []
    for i, r in enumerate(records):
        prompt = r["prompt"] if cfg.use_style_prompt and r.get("prompt") else fill_prompt(cfg.prompt_template,
                                                                                    question=r["question"])
        items.append(PathItem(Example(str(r["id"]), prompt, r["response"], str(r["answer"]), True), r["style"], i))
    return items


class QRCollator:
    """Tokenises each path once per distinct student tokenizer; adds the router features.

    Returns {"student{s}": {input_ids, attention_mask, labels} [B, T_s] int64,
    "route_features": [B, d_enc] float32 (when features are given)}."""

    def __init__(self, tokenizers: Sequence, max_length: int, features: torch.Tensor | None = None):
        from distillkit.pipeline.data import SFTCollator

        self.tokenizers = list(tokenizers)
        self.collators = {id(t): SFTCollator(t, max_length) for t in self.tokenizers}
        self.features = features

    def __call__(self, items: Sequence[PathItem]) -> dict:
        examples = [it.example for it in items]
        made = {key: col(examples) for key, col in self.collators.items()}
        batch: dict[str, Any] = {f"student{s}": made[id(t)] for s, t in enumerate(self.tokenizers)}
        if self.features is not None:
            batch["route_features"] = self.features[torch.tensor([it.index for it in items])]
        return batch


def load_students(cfg: QRDistillConfig, device) -> tuple[list, list]:
    """(students, tokenizers), LoRA-wrapped when lora_r > 0."""
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import load_tokenizer

    students, tokenizers = [], []
    for path in cfg.students:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = load_tokenizer(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if cfg.lora_r > 0:
            model = apply_lora(model, cfg)
        students.append(model.to(device))
        tokenizers.append(tok)
    return students, tokenizers


def apply_lora(model, cfg: QRDistillConfig):
    """``model`` wrapped by peft with LoRA adapters (rank lora_r) on ``lora_targets``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(f"lora_r={cfg.lora_r} needs peft: pip install peft (or set lora_r: 0 for full "
                          f"fine-tuning); import failed: {exc}") from exc
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
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

    return LossSettings(routing=cfg.routing, gumbel_tau=cfg.gumbel_tau, top_k=cfg.route_top_k, mutual=cfg.mutual,
                        entropy_reg=cfg.entropy_reg, lambda_1=cfg.lambda_1, lambda_2=cfg.lambda_2,
                        normalize_shared=cfg.normalize_shared, competence_tau=cfg.competence_tau)


def build_model(cfg: QRDistillConfig, students: Sequence, router_in_dim: int | None):
    from distillkit.methods.qr_distill.router import QRDistillModel, student_hidden_size

    sizes = [student_hidden_size(m) for m in students]
    return QRDistillModel(students, shared_dim=cfg.shared_dim or max(sizes), router_in_dim=router_in_dim,
                          router_hidden=cfg.router_hidden, hidden_sizes=sizes)


def make_trainer(model, cfg: QRDistillConfig, items: Sequence[PathItem], collate):
    """The shared Trainer over the container (students + router + projections + regressor)."""
    from distillkit.methods.qr_distill.router import qr_loss
    from distillkit.pipeline.train import Trainer

    tcfg = dataclasses.replace(cfg.train, output_dir=cfg.output_dir)
    settings = loss_settings(cfg)
    params = None
    if cfg.router_lr is not None and model.router is not None:  # the router learns at its own rate
        router_ids = {id(p) for p in model.router.parameters()}
        params = [{"params": [p for p in model.parameters() if id(p) not in router_ids]},
                  {"params": list(model.router.parameters()), "lr": cfg.router_lr}]
    trainer = Trainer(model, tcfg, items, collate, lambda m, b: qr_loss(m, b, settings), params=params)
    return trainer


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


def routing_summary(model, features: torch.Tensor | None, items: Sequence[PathItem], names: Sequence[str]) -> dict:
    """Per style: the router's mean probability of each student and the share of paths whose
    most likely student it is (noise-free), over the training paths."""
    from distillkit.methods.qr_distill.router import routing_probabilities

    if model.router is None or features is None:
        return {}
    probs = routing_probabilities(model.router, features)
    out = {}
    for style in sorted({it.style for it in items}):
        rows = torch.tensor([it.index for it in items if it.style == style])
        p = probs[rows]
        top = torch.bincount(p.argmax(-1), minlength=len(names)).float() / len(rows)
        out[style] = {"mean_prob": {n: float(v) for n, v in zip(names, p.mean(0))},
                      "top_share": {n: float(v) for n, v in zip(names, top)}, "paths": len(rows)}
    return out


def evaluate_students(model, tokenizers, cfg: QRDistillConfig) -> dict:
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.evaluate import answer_accuracy

    questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit)
    return {name: answer_accuracy(student, tok, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.eval_max_new_tokens)["accuracy"]
            for student, tok, name in zip(model.students, tokenizers, cfg.student_labels())}
