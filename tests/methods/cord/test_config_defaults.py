"""CoRD's config defaults are the paper's (budgets, sampling, segmentation, selectors); the world's config and
the demo keep the world's small values explicitly; the defaults survive a YAML round trip."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from distillkit.methods.cord import CordConfig
from distillkit.pipeline.runs import config_values

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
REQUIRED = dict(teachers=["A", "B"], meta_prover="M", input_path="in.jsonl", output_path="out.jsonl")


def test_defaults_are_the_papers():
    cfg = CordConfig(**REQUIRED)
    assert (cfg.token_budget, cfg.max_answer_tokens) == (16384, 4096)
    assert cfg.max_steps is None and cfg.max_step_tokens is None  # caps are opt-in
    assert cfg.temperature == 0.6 and cfg.beam_size == 4 and cfg.n_curation == 4
    assert cfg.segmentation == "prompt-guided" and cfg.chat_template == "none" and cfg.selector == "perplexity"


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = CordConfig(**REQUIRED)
    path = tmp_path / "cord.yaml"
    path.write_text(yaml.safe_dump(config_values(cfg)))
    back = CordConfig.from_yaml(str(path))
    assert back == cfg and config_values(back) == config_values(cfg)
    # an explicit null is "no cap"; a number is a cap
    path.write_text(yaml.safe_dump({**REQUIRED, "max_steps": None, "max_step_tokens": 64}))
    capped = CordConfig.from_yaml(str(path))
    assert capped.max_steps is None and capped.max_step_tokens == 64


def test_step_limits_without_and_with_caps():
    cfg = CordConfig(**REQUIRED, token_budget=100)
    assert cfg.step_limit() == 100  # no step cap: each step costs >= 1 token, the budget ends the trace
    assert cfg.step_token_limit(0) == 100 and cfg.step_token_limit(97) == 3
    capped = dataclasses.replace(cfg, max_steps=5, max_step_tokens=10)
    assert capped.step_limit() == 5 and capped.step_token_limit(0) == 10 and capped.step_token_limit(95) == 5
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_steps"):
            CordConfig(**REQUIRED, max_steps=bad)
        with pytest.raises(ValueError, match="max_step_tokens"):
            CordConfig(**REQUIRED, max_step_tokens=bad)


def test_curation_at_temperature_zero_is_refused_not_silently_k_traces():
    with pytest.raises(ValueError, match=r"n_curation=4 with temperature=0.*identical"):
        CordConfig(**REQUIRED, method="curation", temperature=0.0)
    assert CordConfig(**REQUIRED, method="curation").n_curation == 4  # sampled at 0.6: 4 traces per teacher
    assert CordConfig(**REQUIRED, method="curation", temperature=0.0, n_curation=1).n_curation == 1
    assert CordConfig(**REQUIRED, method="cord", temperature=0.0).temperature == 0.0  # only curation samples n
    with pytest.raises(ValueError, match=r"temperature=0 for teacher\(s\) \[1\]"):  # per-teacher temperatures
        CordConfig(**REQUIRED, method="curation", temperature=[0.6, 0.0])
    assert CordConfig(**REQUIRED, method="curation", temperature=[0.5, 0.7]).temperature == [0.5, 0.7]


def test_selector_and_chat_template_checks():
    with pytest.raises(ValueError, match="selector"):
        CordConfig(**REQUIRED, selector="coin")
    with pytest.raises(ValueError, match="selector_model"):
        CordConfig(**REQUIRED, selector="prm")
    with pytest.raises(ValueError, match="selector_model"):
        CordConfig(**REQUIRED, selector_model="some/prm")
    with pytest.raises(ValueError, match="chat_template"):
        CordConfig(**REQUIRED, chat_template="chatml")
    assert CordConfig(**REQUIRED, selector="binary", selector_model="judge").selector == "binary"


def test_world_config_keeps_the_worlds_small_values():
    cfg = CordConfig.from_yaml(os.path.join(ROOT, "configs", "world", "cord.yaml"))
    assert (cfg.max_steps, cfg.token_budget, cfg.max_step_tokens, cfg.max_answer_tokens) == (4, 64, 16, 8)
    assert cfg.temperature == 0.0 and cfg.n_curation == 1 and cfg.chat_template == "none"
    # the curation baseline of the world's config runs (greedy, one trace per teacher) instead of being refused
    assert dataclasses.replace(cfg, method="curation").n_curation == 1


def test_demo_sets_every_moved_default_explicitly(tmp_path, monkeypatch):
    """The demo's CoRD configs give every value whose default moved to the paper's: its rows do not change."""
    from distillkit.methods import cord
    from distillkit.world import demo

    made = []

    class Stop(Exception):
        pass

    def record(c, **kw):
        made.append(c)
        raise Stop

    monkeypatch.setattr(cord, "run", record)
    cfg = demo.DemoConfig(out=str(tmp_path))
    for method in ("cord", "curation"):
        with pytest.raises(Stop):
            demo.cord_shard(cfg, method, [{"id": "0", "question": "1+2", "answer": "3"}], 0)
    for c in made:
        assert c.temperature == 0.0 and c.max_steps is not None and c.max_step_tokens == 16
        assert c.max_answer_tokens == 8 and c.token_budget < 100
    assert made[1].method == "curation" and made[1].n_curation == 1
