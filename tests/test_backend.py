"""Backend table and dispatch rules."""
import subprocess
import sys

import pytest
import torch

import distillkit
from distillkit import _backend
from distillkit._backend import BackendUnavailable, select_backend

CPU = torch.device("cpu")


def test_table_has_every_backend_with_reasons():
    table = distillkit.backends()
    assert list(table) == ["cuda", "triton", "cpu", "reference"]
    assert all(isinstance(ok, bool) and why for ok, why in table.values())
    assert table["reference"][0]
    if not torch.cuda.is_available():
        assert not table["cuda"][0]


def test_auto_choice_on_cpu_prefers_the_extension(monkeypatch):
    monkeypatch.delenv("DISTILLKIT_BACKEND", raising=False)
    assert select_backend("op", CPU) == ("cpu" if distillkit.backends()["cpu"][0] else "reference")
    assert select_backend("op", CPU, implemented=("reference", "triton")) == "reference"  # never the interpreter


def test_explicit_and_env(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_BACKEND", "reference")
    assert select_backend("op", CPU) == "reference"
    assert select_backend("op", CPU, "cpu") == "cpu"  # the argument wins over the variable
    with pytest.raises(BackendUnavailable, match=r"op: backend='cuda' cannot run: .*needs CUDA tensors"):
        select_backend("op", CPU, "cuda")
    with pytest.raises(BackendUnavailable, match="has no cpu implementation"):
        select_backend("op", CPU, "cpu", implemented=("reference",))
    monkeypatch.setenv("DISTILLKIT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="DISTILLKIT_BACKEND='cuda'"):
        select_backend("op", CPU)


def test_triton_needs_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        ok, why = _backend.backends()["triton"]
        assert not ok and "TRITON_INTERPRET" in why
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            select_backend("op", CPU, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", CPU, "triton") == "triton"


def test_missing_extension_is_reported_on_use_not_import(monkeypatch):
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "distillkit._C is not built (test); build it"))
    assert _backend.backends()["cpu"] == (False, "distillkit._C is not built (test); build it")
    with pytest.raises(BackendUnavailable, match="not built"):
        select_backend("op", CPU, "cpu")
    assert select_backend("op", CPU) == "reference"


def test_import_is_light():
    code = ("import sys, distillkit; heavy = [m for m in ('triton', 'transformers', 'matplotlib', 'safetensors') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
