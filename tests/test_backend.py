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


def test_op_declares_limits_and_dtypes(monkeypatch):
    """A size limit refuses a named backend with the reason, and moves the automatic choice (and the
    DISTILLKIT_BACKEND default) on; an unsupported dtype is a reason too; no fit lists every candidate."""
    monkeypatch.delenv("DISTILLKIT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = _backend.Op("toy", [_backend.Backend("triton", limits=(_backend.Limit("top_k", 8, "on-chip buffer"),)),
                             _backend.Backend("reference", dtypes=(torch.float32,))], register=False)
    assert op.select(CPU, torch.float32, "triton", top_k=8).name == "triton"
    with pytest.raises(BackendUnavailable, match=r"toy: backend='triton' cannot run: top_k=9 exceeds .*top_k <= 8"):
        op.select(CPU, torch.float32, "triton", top_k=9)
    monkeypatch.setenv("DISTILLKIT_BACKEND", "triton")
    assert op.select(CPU, torch.float32, top_k=9).name == "reference"  # the variable is a preference
    monkeypatch.delenv("DISTILLKIT_BACKEND")
    with pytest.raises(BackendUnavailable, match=r"no backend runs on cpu: cpu: toy has no cpu implementation; "
                                                 r"reference: dtype float16 not supported"):
        _backend.dispatch(op, [torch.zeros(2, dtype=torch.float16)])
    rows = {name: (ok, supports) for name, ok, _, supports in op.table()}
    assert rows["cuda"] == (False, "") and "top_k <= 8" in rows["triton"][1] and rows["reference"][0]


def test_validity_top_k_beyond_a_kernel_limit(monkeypatch):
    from distillkit.ops.validity import VALIDITY, resolve_backend

    monkeypatch.delenv("DISTILLKIT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU, "triton", top_k=1024) == "triton"
    with pytest.raises(BackendUnavailable, match="top_k=1025 exceeds"):
        resolve_backend(CPU, "triton", top_k=1025)
    cuda = torch.device("cuda")  # only the declaration is read: which limit each fast kernel keeps
    assert VALIDITY.backends["cuda"].limits[0].problem({"top_k": 2049}) and not \
        VALIDITY.backends["cuda"].limits[0].problem({"top_k": 2048})
    assert "cannot run" in str(pytest.raises(BackendUnavailable, resolve_backend, cuda, "cpu").value)


def test_info_prints_every_op_with_reasons():
    from distillkit.info import info_text

    text = info_text()
    for op in ("skew_kl", "fused_linear_skew_kl", "teacher_likelihood_validity", "answer_logprobs", "merge.average_"):
        assert f"op {op}\n" in text
    assert "top_k <= 1024" in text and "top_k <= 2048" in text
