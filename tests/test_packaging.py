"""Packaging: one version, the license file, a light core, and ruff's verdict on the tree.

The light-core checks run in a fresh interpreter (this one has imported everything already) and count
only what distillkit adds on top of ``import torch``: torch itself loads tqdm (torch.hub).
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distillkit

REPO = Path(__file__).resolve().parents[1]
# what the kernels and losses must work without: the CLIs, methods and demo need these, the core must not
HEAVY = ("transformers", "matplotlib", "yaml", "tqdm", "triton")
LIGHT = ("distillkit", "distillkit.ops", "distillkit.losses", "distillkit.reference", "distillkit.merge",
         "distillkit.validity", "distillkit.scoring")


def _heavy_loaded_by(steps: dict[str, str]) -> dict[str, list[str]]:
    """Runs each step's code in turn in one fresh interpreter after ``import torch``; returns, per step, the
    HEAVY top-level packages that first appeared in sys.modules during it (sys.modules only grows, so an
    empty answer for every step means that none of them loads any). CUDA is hidden and TRITON_INTERPRET
    unset, so that Triton cannot run and nothing has a reason to import it."""
    lines = ["import json, sys, torch", "before, found = set(sys.modules), {}"]
    for name, code in steps.items():
        lines += [code, f"found[{name!r}] = sorted({{m.split('.')[0] for m in set(sys.modules) - before}}"
                        f" & set({HEAVY!r}))", "before = set(sys.modules)"]
    lines.append("print(json.dumps(found))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_light_core_imports_nothing_heavy():
    found = _heavy_loaded_by({module: f"import {module}" for module in LIGHT})
    assert found == {module: [] for module in LIGHT}, "`import <module>` loads these first"


# one call per op family through its public path, on CPU tensors with the backend chosen automatically
_CPU_CALLS = {
    "inputs": "g = torch.Generator().manual_seed(0)\n"
              "s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)\n"
              "labels = torch.tensor([1, 2, -100, 3])",
    "distillkit.skew_kl": "import distillkit\ndistillkit.skew_kl(s, t, labels)",
    "distillkit.losses.SkewKLLoss": "from distillkit.losses import SkewKLLoss\nSkewKLLoss()(s, t, labels)",
    "distillkit.fused_linear_skew_kl": "distillkit.fused_linear_skew_kl(torch.randn(4, 5, generator=g), "
                                      "torch.randn(9, 5, generator=g), torch.randn(4, 5, generator=g), "
                                      "torch.randn(9, 5, generator=g), labels)",
    "distillkit.answer_logprobs": "distillkit.answer_logprobs(torch.randn(3, 5, generator=g), "
                                  "torch.randn(9, 5, generator=g), torch.tensor([1, 2, 3]))",
    "distillkit.validity.teacher_likelihood_validity":
        "import distillkit.validity\ndistillkit.validity.teacher_likelihood_validity(t, s, top_k=4)",
    "distillkit.merge.average_":
        "import distillkit.merge\ndistillkit.merge.average_([torch.zeros(3)], [[torch.ones(3)], [torch.ones(3)]])",
}


# Known, in files under the ops refactor: ops/skew_kl.py and ops/fused_linear.py decorate _pick_backend with
# torch.compiler.assume_constant_result at import; that imports torch._dynamo, which imports triton
# (torch.utils._triton.has_triton_package). Delete this entry once they no longer do.
_KNOWN = {"distillkit.skew_kl": ["triton"]}


def test_cpu_ops_do_not_load_triton_or_heavy_packages():
    found = _heavy_loaded_by(_CPU_CALLS)
    expected = {step: [] for step in _CPU_CALLS}
    if found == {**expected, **_KNOWN}:
        pytest.xfail(f"known: {_KNOWN} (see the comment above _KNOWN)")
    assert found == expected, "these steps load these first"


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10 has no tomllib
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"], "pyproject.toml must not hold its own copy of the version"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "distillkit.__version__"}
    # the installed metadata was built from it (a stale editable install shows here: reinstall)
    assert importlib.metadata.version("distillkit") == distillkit.__version__


def test_license_file_is_apache_2_and_shipped():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert "LICENSE" in project["license-files"]
    assert "LICENSE" in (REPO / "MANIFEST.in").read_text().split()


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
