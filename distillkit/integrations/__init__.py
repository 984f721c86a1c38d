"""The fused skew KL / SRKL losses inside the trainers users already have.

    distillkit.integrations.hf.SkewKLTrainer                 a transformers.Trainer subclass
    distillkit.integrations.trl.SkewKLDistillationTrainer   trl.DistillationTrainer with the fused loss
    distillkit.integrations.trl.SkewKLGKDTrainer            TRL's GKDTrainer (lmbda, seq_kd) with the fused loss

Each needs the ``trl`` extra (``pip install "distillkit[trl]"``: trl, accelerate, peft); the modules import
transformers / trl on first use, so ``import distillkit.integrations`` stays light.
"""
from __future__ import annotations

import importlib

__all__ = ["hf", "trl"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"distillkit.integrations.{name}")
    raise AttributeError(f"module 'distillkit.integrations' has no attribute {name!r}")
