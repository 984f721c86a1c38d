"""Every shipped config loads as its method's config, its header names the command that runs it, and the
real-checkpoint configs fit the GPUs they name: the `vllm serve` commands in the header serve every teacher
at the URL the config gives, and on every GPU the memory shares of the servers and of the driver's
in-process engines add up to <= 1.0, each share holding its model's weights (split by tensor parallelism)."""
from __future__ import annotations

import glob
import os
import re
import shlex
from urllib.parse import urlsplit

import pytest

from distillkit.methods.cord import CordConfig
from distillkit.methods.mot import MotConfig
from distillkit.methods.qr_distill import QRDistillConfig
from distillkit.methods.vcrd import VcrdConfig
from distillkit.pipeline.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"cord": CordConfig, "mot": MotConfig, "qr-distill": QRDistillConfig, "vcrd": VcrdConfig}
REAL = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
WORLD = sorted(glob.glob(os.path.join(ROOT, "configs", "world", "*.yaml")))
PAPER = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))

# Parameters (billions) of the checkpoints the configs name; bf16 weights take 2 bytes each.
PARAMS_B = {
    "Qwen/QwQ-32B": 32.8, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32.8, "microsoft/Phi-4-reasoning-plus": 14.7,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.6, "Qwen/Qwen2.5-7B-Instruct": 7.6,
}
VLLM_DEFAULT_SHARE = 0.9
HEADROOM = 1.1  # a share must hold the weights and 10% more (activations, CUDA graphs, some KV cache)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def header(path: str) -> str:
    """The leading comment block, continuation lines ("\\" at the end) joined."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))


def command_of(path: str) -> str:
    """The distillkit command the header gives for this very file."""
    m = re.search(r"distillkit (cord|mot|qr-distill|vcrd) .*?--config (\S+)", header(path))
    assert m, f"{_rel(path)}: the header gives no `distillkit <command> --config {_rel(path)}` line"
    assert m.group(2) == _rel(path), f"{_rel(path)}: the header's command runs {m.group(2)}"
    return m.group(1)


def serve_commands(text: str) -> list[dict]:
    """The `vllm serve` commands of a header (lines ``CUDA_VISIBLE_DEVICES=... vllm serve MODEL ...``): GPUs,
    model, served name, port, tensor parallel size, memory share."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("CUDA_VISIBLE_DEVICES=") and " vllm serve " in line):
            continue  # a command to run names its GPUs; prose may mention vllm serve
        words = shlex.split(line)
        gpus = [int(g) for g in words[0].split("=", 1)[1].split(",")]
        i = words.index("serve")
        model = words[i + 1]
        flags = dict(zip(words[i + 2::2], words[i + 3::2]))
        out.append({"gpus": gpus, "model": model, "name": flags.get("--served-model-name", model),
                    "port": int(flags.get("--port", 8000)), "tp": int(flags.get("--tensor-parallel-size", 1)),
                    "share": float(flags.get("--gpu-memory-utilization", VLLM_DEFAULT_SHARE))})
    return out


def driver_gpus(text: str) -> list[int]:
    m = re.search(r"CUDA_VISIBLE_DEVICES=([\d,]+) (?:distillkit|torchrun)", text)
    return [int(g) for g in m.group(1).split(",")] if m else [0]


def in_process_engines(cfg) -> list[dict]:
    """The vLLM engines the driver itself starts: (model, tp, share)."""
    out = []
    if isinstance(cfg, (CordConfig, QRDistillConfig)) and cfg.teacher_backend == "vllm":
        for k, model in enumerate(cfg.teachers):
            kw = cfg.teacher_load_kwargs(k)
            out.append({"model": model, "tp": int(kw.get("tensor_parallel_size", 1)),
                        "share": float(kw.get("gpu_memory_utilization", VLLM_DEFAULT_SHARE))})
    if isinstance(cfg, QRDistillConfig) and cfg.judge and cfg.judge_backend == "vllm":
        out.append({"model": cfg.judge, "tp": 1, "share": VLLM_DEFAULT_SHARE})
    if isinstance(cfg, VcrdConfig) and cfg.teacher_backend == "vllm":
        out.append({"model": cfg.teacher, "tp": 1, "share": cfg.vllm_gpu_memory_utilization})
    return out


def fit_problems(path: str, cfg) -> list[str]:
    """What does not fit on the GPUs the header names (empty when everything does)."""
    text = header(path)
    m = re.search(r"GPUs: (\d+)x (\d+) GB", text)
    if not m:
        return [f"{_rel(path)}: the header does not state its GPUs ('GPUs: Nx SS GB')"]
    n_gpus, gpu_gb = int(m.group(1)), float(m.group(2))
    problems, shares = [], {}
    servers = serve_commands(text)
    engines = [dict(e, gpus=driver_gpus(text)[:e["tp"]]) for e in in_process_engines(cfg)]
    for e in servers + engines:
        if len(e["gpus"]) != e["tp"]:
            problems.append(f"{e['model']}: tensor parallel {e['tp']} on GPUs {e['gpus']}")
        weights_gb = PARAMS_B.get(e["model"], 0.0) * 2 / e["tp"]
        if e["share"] * gpu_gb < HEADROOM * weights_gb:
            problems.append(f"{e['model']}: {e['share']} x {gpu_gb:g} GB per GPU cannot hold {weights_gb:.1f} GB "
                            "of weights per GPU")
        for g in e["gpus"]:
            shares[g] = shares.get(g, 0.0) + e["share"]
            if g >= n_gpus:
                problems.append(f"{e['model']}: GPU {g}, but the header names {n_gpus}")
    problems += [f"GPU {g}: memory shares add up to {s:.2f} > 1.0" for g, s in sorted(shares.items()) if s > 1.0]
    if getattr(cfg, "teacher_backend", None) == "openai":
        by_name = {s["name"]: s for s in servers}
        urls = cfg.teacher_base_urls
        for k, name in enumerate(cfg.teachers):
            url = urls[k] if len(urls) > 1 else urls[0]
            if name not in by_name:
                problems.append(f"teacher {name!r}: no `vllm serve` command in the header serves it")
            elif urlsplit(url).port != by_name[name]["port"]:
                problems.append(f"teacher {name!r}: served on port {by_name[name]['port']}, the config calls {url}")
    return problems


@pytest.mark.parametrize("path", REAL + WORLD + PAPER, ids=_rel)
def test_config_loads_as_its_method_config(path):
    cls = CLASSES[command_of(path)]
    cfg = load_config(cls, path)  # types coerced and ranges checked (__post_init__)
    assert isinstance(cfg, cls)
    if path in WORLD:
        assert "CPU" in header(path)
        assert getattr(cfg, "device", "cpu") in ("cpu", "auto")


@pytest.mark.parametrize("path", REAL, ids=_rel)
def test_real_config_fits_the_gpus_it_names(path):
    cfg = load_config(CLASSES[command_of(path)], path)
    assert fit_problems(path, cfg) == []


@pytest.mark.parametrize("path", [p for p in PAPER if serve_commands(header(p))], ids=_rel)
def test_served_teachers_of_paper_configs_are_served(path):
    cfg = load_config(CLASSES[command_of(path)], path)
    names = {s["name"] for s in serve_commands(header(path))}
    assert set(cfg.teachers) <= names


def test_the_checks_catch_configs_that_do_not_fit(tmp_path):
    """The shipped configs before they were fixed: QwQ-32B in an in-process engine at a 0.35 share of one
    80 GB GPU (28 GB for 65 GB of weights); two vLLM engines at the default 0.9 share on one GPU; a served
    teacher without its server."""
    head = "# GPUs: 1x 80 GB\n#   distillkit {cmd} --config {path}\n"
    cord = tmp_path / "cord.yaml"
    cord.write_text(head.format(cmd="cord", path=_rel(str(cord))) +
                    "teachers: [deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, Qwen/QwQ-32B]\nmeta_prover: m\n"
                    "input_path: q\noutput_path: o\nteacher_backend: vllm\n"
                    "teacher_kwargs: {gpu_memory_utilization: 0.35, tensor_parallel_size: 1}\n")
    problems = fit_problems(str(cord), load_config(CordConfig, str(cord)))
    assert any("Qwen/QwQ-32B: 0.35 x 80 GB" in p for p in problems)
    qr = tmp_path / "qr.yaml"
    qr.write_text(head.format(cmd="qr-distill", path=_rel(str(qr))) +
                  "input_path: q\nteachers: [Qwen/Qwen2.5-7B-Instruct]\nteacher_backend: vllm\n"
                  "judge: Qwen/Qwen2.5-7B-Instruct\njudge_backend: vllm\nstudents: [a, b]\nrouting: random\n")
    problems = fit_problems(str(qr), load_config(QRDistillConfig, str(qr)))
    assert "GPU 0: memory shares add up to 1.80 > 1.0" in problems
    served = tmp_path / "served.yaml"
    served.write_text(head.format(cmd="cord", path=_rel(str(served))) +
                      "#   CUDA_VISIBLE_DEVICES=0 vllm serve Qwen/QwQ-32B --port 8001 --tensor-parallel-size 2\n"
                      "teachers: [Qwen/QwQ-32B, other]\nmeta_prover: m\ninput_path: q\noutput_path: o\n"
                      "teacher_backend: openai\nteacher_base_urls: [http://127.0.0.1:8000/v1]\n")
    problems = fit_problems(str(served), load_config(CordConfig, str(served)))
    assert "Qwen/QwQ-32B: tensor parallel 2 on GPUs [0]" in problems
    assert "teacher 'other': no `vllm serve` command in the header serves it" in problems
    assert any("served on port 8001, the config calls http://127.0.0.1:8000/v1" in p for p in problems)
