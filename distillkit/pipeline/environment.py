"""What a config needs from this machine: ``check_environment`` (devices, kernel and teacher backends, model,
input and output paths), run by every command before any model loads; the rules are point 3 of
:mod:`distillkit.pipeline.config`'s docstring."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from distillkit._errors import InputError

MODEL_FIELDS = frozenset({"student", "students", "teacher", "teachers", "meta_prover", "judge", "router_encoder"})
INPUT_FILE_FIELDS = frozenset({"input_path", "paths_input", "prompts"})
KERNEL_BACKEND_FIELDS = frozenset({"backend", "scoring_backend"})
TEACHER_BACKEND_FIELDS = frozenset({"teacher_backend", "judge_backend"})
ROLES = ("device", "kernel_backend", "teacher_backend", "model", "input_file", "output_dir", "output_file")


# ----------------------------------------------------------------------------------------------
# What the machine must provide
# ----------------------------------------------------------------------------------------------
def field_role(f: dataclasses.Field) -> str | None:
    """What a config field names, for ``check_environment``: ``metadata["role"]`` if given, else by name
    (see the module docstring); None for fields that name nothing on this machine."""
    role = f.metadata.get("role")
    if role is not None:
        if role not in ROLES:
            raise InputError(f"{f.name}: metadata role={role!r}: expected one of {ROLES}")
        return role
    name = f.name
    if name == "device":
        return "device"
    if name in KERNEL_BACKEND_FIELDS:
        return "kernel_backend"
    if name in TEACHER_BACKEND_FIELDS:
        return "teacher_backend"
    if name in MODEL_FIELDS or name.endswith(("_model", "_encoder", "_checkpoint")):
        return "model"
    if name in INPUT_FILE_FIELDS or name.endswith("_data"):
        return "input_file"
    if name.endswith("_dir"):
        return "output_dir"
    if name.endswith("_path"):
        return "output_file"
    return None


def looks_local(value: str) -> bool:
    """True when a model string is a local path rather than a possible Hub id ("gpt2", "org/name")."""
    return (value.startswith(("/", "~", "./", "../")) or value in (".", "..") or "\\" in value
            or (os.sep != "/" and os.sep in value) or value.count("/") >= 2)


def _cuda_problem(device: str) -> str | None:
    import torch

    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "torch.cuda.is_available() is False: no GPU visible or no driver")
        return f"no CUDA device here ({why}); use cpu or auto"
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _resolved_device(cfg) -> str:
    device = str(getattr(cfg, "device", "cpu") or "cpu")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _no_file_ancestor(path: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    return None


def _check_value(cfg, f: dataclasses.Field, role: str, value) -> tuple[str | None, Any]:
    """(problem or None, value with ~ expanded) for one value of a field of the given role."""
    if role == "device":
        if isinstance(value, str) and value.startswith("cuda"):
            return _cuda_problem(value), value
    elif role == "kernel_backend":
        from distillkit._backend import BACKENDS, backend_problem

        if value in BACKENDS:
            return backend_problem(value, _resolved_device(cfg)), value
    elif role == "teacher_backend":
        if value == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                return "vllm is not installed here (pip install 'distillkit[vllm]'), or use hf", value
    elif isinstance(value, str) and value:
        if role == "model" and not looks_local(value):
            return None, value
        path = os.path.expanduser(value)
        if role == "model":
            if not os.path.exists(path):
                return "no such directory (a local path; Hub ids look like name or org/name)", path
            if not os.path.isdir(path):
                return "is a file, expected a checkpoint directory", path
        elif role == "input_file":
            if not os.path.exists(path):
                return "no such file", path
            if os.path.isdir(path):
                return "is a directory, expected a file", path
        elif role == "output_dir":
            if os.path.exists(path) and not os.path.isdir(path):
                return "is a file, expected a directory (or a path that does not exist yet)", path
            return _no_file_ancestor(path), path
        elif role == "output_file":
            if os.path.isdir(path):
                return "is a directory, expected a file path", path
            return _no_file_ancestor(path), path
        return None, path
    return None, value


def check_environment(cfg, where: dict[str, str] | None = None) -> None:
    """Checks what ``cfg`` needs from this machine (devices, backends, model and data paths: see the
    module docstring) and expands a leading ``~`` in its path fields; raises InputError naming the field
    (``where[name]``: the YAML file or the flag it came from)."""
    served = getattr(cfg, "served_model_fields", lambda: ())()  # model names on a server, not paths here
    for f in dataclasses.fields(cfg):
        role = field_role(f)
        value = getattr(cfg, f.name)
        if role is None or value is None or (role == "model" and f.name in served):
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        checked = []
        for i, item in enumerate(items):
            problem, item = _check_value(cfg, f, role, item)
            if problem:
                src = (where or {}).get(f.name, "")
                label = src if src.startswith("--") else (f"{src}: {f.name}" if src else f.name)
                index = f"[{i}]" if isinstance(value, (list, tuple)) else ""
                shown = f" {items[i]}" if label.startswith("--") else f"{index}={items[i]!r}"
                raise InputError(f"{label}{shown}: {problem}")
            checked.append(item)
        if isinstance(value, (list, tuple)):
            setattr(cfg, f.name, type(value)(checked))
        else:
            setattr(cfg, f.name, checked[0])
