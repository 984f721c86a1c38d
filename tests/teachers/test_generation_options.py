"""The teacher options the methods share (distillkit.pipeline.generation.TeacherOptions): per-teacher sampling
and engine arguments from YAML and flags, served model names left unchecked, and each method asking each
teacher with its own temperature / top_p."""
from __future__ import annotations

import os

import pytest

from distillkit import InputError
from distillkit.methods.cord import CordConfig
from distillkit.methods.cord.decode import decode_one
from distillkit.methods.qr_distill import QRDistillConfig
from distillkit.methods.qr_distill.paths import path_key, propose_paths
from distillkit.methods.vcrd import VcrdConfig
from distillkit.pipeline.config import load_config, parse_config
from distillkit.pipeline.generation import load_teachers
from distillkit.teachers.base import Proposal, Teacher

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "distillkit", "world", "assets")


class Recording(Teacher):
    """Answers every prefix with one finished step and records the sampling it was asked with."""

    def __init__(self, name):
        self.name, self.asked = name, []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None, top_p=1.0):
        self.asked.append((temperature, top_p))
        return [[Proposal(f" {self.name}</think>", 2, True, "end")] * n for _ in prefixes]


class ConstScorer:
    tokens_processed = 0
    last_pair_tokens = None

    def score(self, pairs, *, prefixes=None):
        return [0.0] * len(pairs)


def _cord(**kw) -> CordConfig:
    base = dict(teachers=["a", "b", "c"], meta_prover="m", input_path="q.jsonl", output_path="o.jsonl")
    return CordConfig(**{**base, **kw})


def test_flags_and_yaml_take_one_number_or_one_per_teacher(tmp_path):
    flags = ["--teachers", "a", "b", "c", "--meta-prover", "m", "--input-path", __file__,
             "--output-path", str(tmp_path / "o.jsonl")]
    cfg = parse_config(CordConfig, flags + ["--temperature", "0.5", "0.6", "0.7", "--top-p", "0.9"], "t", "")
    assert cfg.temperature == [0.5, 0.6, 0.7] and cfg.top_p == 0.9
    assert parse_config(CordConfig, flags + ["--temperature", "0.7"], "t", "").temperature == 0.7
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("teachers: [a, b]\nmeta_prover: m\ninput_path: q\noutput_path: o\n"
                         "temperature: [0.5, 0.7]\ntop_p: [1.0, 0.8]\n"
                         "teacher_kwargs: [{batch_size: 2}, {batch_size: 3}]\n")
    cfg = load_config(CordConfig, str(yaml_file))
    assert cfg.teacher_sampling(0) == {"temperature": 0.5}
    assert cfg.teacher_sampling(1) == {"temperature": 0.7, "top_p": 0.8}
    assert cfg.teacher_load_kwargs(1, dtype="float32") == {"dtype": "float32", "batch_size": 3}
    with pytest.raises(InputError, match=r"temperature: expected one number for every teacher or a list of 3"):
        _cord(temperature=[0.5, 0.6])
    with pytest.raises(InputError, match=r"temperature\[1\]=-1"):
        _cord(temperature=[0.5, -1, 0.7])
    with pytest.raises(InputError, match="teacher_base_urls: only used with teacher_backend 'openai'"):
        _cord(teacher_base_urls=["http://h:1/v1"])
    with pytest.raises(InputError, match="teacher_base_urls: expected 1 URL"):
        _cord(teacher_backend="openai", teacher_base_urls=["http://h:1/v1", "http://h:2/v1"])


def test_served_model_names_are_not_checked_as_paths(tmp_path):
    flags = ["--teachers", "/models/served-a", "--meta-prover", os.path.join(ASSETS, "meta-prover"),
             "--input-path", __file__, "--output-path", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit):  # hf: a local path that does not exist
        parse_config(CordConfig, flags, "t", "")
    cfg = parse_config(CordConfig, flags + ["--teacher-backend", "openai", "--teacher-base-urls",
                                            "http://127.0.0.1:9/v1"], "t", "")
    assert cfg.teachers == ["/models/served-a"]
    assert cfg.teacher_load_kwargs(0)["base_url"] == "http://127.0.0.1:9/v1"


def test_cord_asks_each_teacher_with_its_own_sampling():
    teachers = [Recording(n) for n in "abc"]
    cfg = _cord(temperature=[0.5, 0.6, 0.7], top_p=[1.0, 0.9, 0.8], beam_size=2, max_steps=2, token_budget=16)
    decode_one("Q", "a", teachers, ConstScorer(), cfg)
    for t, want in zip(teachers, [(0.5, 1.0), (0.6, 0.9), (0.7, 0.8)]):
        assert t.asked and set(t.asked) == {want}


def test_qr_distill_asks_each_teacher_with_its_own_sampling(tmp_path):
    cfg = QRDistillConfig(input_path="q.jsonl", output_dir=str(tmp_path), teachers=["a", "b"], students=["s", "t"],
                          routing="random", temperature=[0.3, 0.9], top_p=0.95, styles=["vanilla"])
    teachers = [Recording("a"), Recording("b")]
    q = {"id": "1", "question": "1+1?", "answer": "2"}
    pending = {path_key("1", "vanilla", n, 0) for n in ("a", "b")}
    assert len(propose_paths(q, teachers, cfg, pending)) == 2
    assert teachers[0].asked == [(0.3, 0.95)] and teachers[1].asked == [(0.9, 0.95)]


def test_per_teacher_engine_arguments_reach_the_engines():
    cfg = _cord(teachers=[os.path.join(ASSETS, "teacher-carry"), os.path.join(ASSETS, "teacher-borrow")],
                teacher_kwargs=[{"batch_size": 2}, {"batch_size": 5}])
    got = load_teachers(cfg, cfg.teachers, ["carry", "borrow"], dtype="float32", device="cpu", batch_size=16)
    assert [t.batch_size for t in got] == [2, 5] and [t.name for t in got] == ["carry", "borrow"]


def test_vcrd_refuses_served_teachers():
    with pytest.raises(ValueError, match="teacher_backend='openai'.*logits at every rollout token"):
        VcrdConfig(student="s", teacher="t", prompts="p", teacher_backend="openai")


def test_qr_distill_judge_can_be_served(tmp_path, monkeypatch):
    from distillkit.methods.qr_distill import paths

    base = dict(input_path="q.jsonl", output_dir=str(tmp_path), teachers=["t"], students=["s", "u"],
                routing="random", judge="judge-model", judge_backend="openai")
    with pytest.raises(ValueError, match="judge_base_url: judge_backend 'openai' needs"):
        QRDistillConfig(**base)
    with pytest.raises(ValueError, match="judge_base_url: only used with judge_backend 'openai'"):
        QRDistillConfig(**{**base, "judge_backend": "hf", "judge_base_url": "http://h:1/v1"})
    cfg = QRDistillConfig(**base, teacher_backend="openai", teacher_base_urls=["http://h:1/v1"], max_retries=2)
    assert cfg.served_model_fields() == ("teachers", "judge")
    built = []
    monkeypatch.setattr("distillkit.teachers.load_teacher", lambda path, **kw: built.append((path, kw)) or path)
    teachers, judge = paths._load_generators(cfg, True, True)
    assert [b[0] for b in built] == ["t", "judge-model"]
    for _, kw in built:
        assert kw["backend"] == "openai" and kw["base_url"] == "http://h:1/v1" and kw["max_retries"] == 2
    cfg = QRDistillConfig(**base, judge_base_url="http://judge:2/v1")  # in-process teachers, served judge
    built.clear()
    paths._load_generators(cfg, False, True)
    assert built[0][1]["base_url"] == "http://judge:2/v1"
