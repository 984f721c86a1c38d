"""configs/paper/cord-hetero.yaml and cord-homo.yaml: the paper's teachers, meta-prover, budgets, sampling and
B, served through teacher_backend openai, with the `vllm serve` commands that start the servers."""
from __future__ import annotations

import os
import re

import pytest

from distillkit.methods.cord import CordConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PAPER_TEACHERS = ["deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen/QwQ-32B", "microsoft/Phi-4-reasoning-plus"]


def _load(name: str) -> tuple[CordConfig, str]:
    path = os.path.join(ROOT, "configs", "paper", name)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return CordConfig.from_yaml(path), text


def _served(header: str) -> dict[str, int]:
    """{model: port} of the `vllm serve MODEL ... --port N` commands in a YAML header."""
    joined = re.sub(r"\\\n#\s*", " ", header)
    return {m: int(p) for m, p in re.findall(r"vllm serve (\S+) --port (\d+)", joined)}


@pytest.mark.parametrize("name", ["cord-hetero.yaml", "cord-homo.yaml"])
def test_paper_preset_has_the_papers_settings(name):
    cfg, text = _load(name)
    assert cfg.meta_prover == "Qwen/QwQ-32B" and cfg.method == "cord" and cfg.beam_size == 4
    assert (cfg.token_budget, cfg.max_answer_tokens, cfg.max_steps, cfg.max_step_tokens) == (16384, 4096, None, None)
    assert cfg.segmentation == "prompt-guided" and cfg.chat_template == "auto" and cfg.selector == "perplexity"
    assert cfg.teacher_backend == "openai" and cfg.dtype == "bfloat16" and cfg.device == "cuda"
    assert f"distillkit cord --config configs/paper/{name}" in text
    served = _served(text)
    urls = cfg.teacher_base_urls if len(cfg.teacher_base_urls) == len(cfg.teachers) \
        else cfg.teacher_base_urls * len(cfg.teachers)
    for model, url in zip(cfg.teachers, urls):
        assert model in served, f"no `vllm serve {model}` in the header"
        assert url == f"http://localhost:{served[model]}/v1"  # each teacher asks the server the header starts


def test_hetero_and_homo_teachers_and_temperatures():
    hetero, _ = _load("cord-hetero.yaml")
    assert hetero.teachers == PAPER_TEACHERS and hetero.temperature == 0.6 and hetero.n_curation == 4
    homo, _ = _load("cord-homo.yaml")
    assert len(homo.teachers) == 3 and len(set(homo.teachers)) == 1 and homo.teachers[0] in PAPER_TEACHERS
    assert homo.temperature == [0.5, 0.6, 0.7] and len(set(homo.names())) == 3
