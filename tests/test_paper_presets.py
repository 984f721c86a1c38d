"""Every paper preset under configs/paper/ loads and validates as its method's config, and its header gives the
command that runs it and says where its numbers come from."""
from __future__ import annotations

import glob
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "paper", "*.yaml")))
# method (the preset's file name up to its first "-": cord-homo.yaml is a CoRD preset) -> (the config class, the
# distillkit command that runs it)
METHODS = {
    "cord": ("distillkit.methods.cord.config:CordConfig", "cord"),
    "qr_distill": ("distillkit.methods.qr_distill.config:QRDistillConfig", "qr-distill"),
    "vcrd": ("distillkit.methods.vcrd.config:VcrdConfig", "vcrd"),
    "mot": ("distillkit.methods.mot:MotConfig", "mot"),
}


def _config_class(name: str):
    module, cls = METHODS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def test_there_are_presets():
    assert PRESETS, "configs/paper/ holds no preset"


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_preset_loads_validates_and_says_where_its_numbers_come_from(path):
    from distillkit.pipeline.config import load_config

    name = os.path.splitext(os.path.basename(path))[0]
    method = name.split("-")[0]
    assert method in METHODS, f"{path}: no method is known for this preset (add it to METHODS)"
    cfg = load_config(_config_class(method), path)  # coerced and range-checked (__post_init__)
    assert cfg is not None
    text = open(path, encoding="utf-8").read()
    header = [line for line in text.splitlines() if line.startswith("#")]
    command = f"distillkit {METHODS[method][1]} --config configs/paper/{name}.yaml"
    assert any(command in line for line in header), f"{path}: the header does not give `{command}`"
    assert any(w in "\n".join(header).lower() for w in ("table", "section", "[paper]")), \
        f"{path}: the header does not say where the numbers come from"


def _preset(name: str):
    from distillkit.pipeline.config import load_config

    return load_config(_config_class(name), os.path.join(REPO, "configs", "paper", f"{name}.yaml"))


def test_vcrd_preset_holds_table_9_and_the_paper_protocol():
    cfg = _preset("vcrd")
    t = cfg.train
    assert (t.lora_r, t.lora_alpha, t.lr) == (16, 128.0, 5e-5)
    assert t.batch_size * t.grad_accum == 128 and t.warmup_steps == round(0.1 * t.max_steps)
    assert cfg.max_prompt_tokens == 512
    assert (cfg.rollouts, cfg.candidate_tokens, cfg.normalization, cfg.weighting) == \
        ("offline", "sample", "sequence", "auto")
    assert cfg.sft_steps > 0 and cfg.judge and cfg.judge_type == "value_head"


def test_mot_preset_holds_the_paper_protocol():
    cfg = _preset("mot")
    t = cfg.train
    assert (cfg.rounds, cfg.steps_per_round, cfg.select, cfg.traces_per_prompt) == (5, 50, "best", "one")
    assert (t.lr, t.adam_betas, t.weight_decay) == (1e-5, (0.9, 0.95), 0.1)
    assert t.batch_size * t.grad_accum == 64 and t.warmup_steps == 1  # 1% of 50 steps, rounded up
    assert cfg.eval_samples == 16
