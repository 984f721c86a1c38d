"""Method configs: a dataclass per method whose fields carry ``help`` metadata and whose
``__post_init__`` checks ranges; YAML files supply the fields and command-line flags override them.

Checks, in order, all before any model loads:

1. ``load_config`` (YAML + overrides): a parse error names the file, line and column; every value is
   coerced to its field's annotated type or refused with an ``InputError`` naming the field, the expected
   type and the file:
   - float fields take numbers and numeric strings (PyYAML, a YAML 1.1 reader, reads ``1e-4`` without a
     dot as the string "1e-4");
   - int fields take integers, and floats or numeric strings only when they are whole (3.0, "3", "1e3");
   - bool fields take YAML booleans only (true/false; PyYAML also reads yes/no/on/off as booleans): a
     quoted "true", or 0/1, is refused rather than guessed;
   - str fields take strings only: a number or a boolean is refused with a hint to quote it (``bf16: on``
     is the boolean True to YAML, not the string "on");
   - list fields take lists (each element coerced and named ``field[i]``); a list of strings also takes a
     single string (one teacher), any other scalar is refused (``prompts: 5``);
   - dict fields take mappings; ``X | None`` fields also take null, other fields refuse null.
2. The dataclass's ``__post_init__`` checks ranges and choices.
3. ``check_environment`` (called by ``parse_config``, i.e. by every CLI; the Python API does not call it,
   so configs with placeholder paths still load): the things the machine must provide. Fields are
   recognised by ``metadata={"role": ...}`` when a field carries it, otherwise by name:
   - ``device`` (role "device"): "cuda" / "cuda:N" needs a CUDA device (and N < the device count);
   - ``backend``, ``scoring_backend`` (role "kernel_backend"): a named kernel backend must be available
     for the configured device (see ``distillkit._backend``);
   - ``teacher_backend``, ``judge_backend`` (role "teacher_backend"): "vllm" needs vllm installed;
   - models (role "model"): ``student``, ``students``, ``teacher``, ``teachers``, ``meta_prover``,
     ``judge``, ``router_encoder`` and names ending in ``_model``/``_encoder``/``_checkpoint``. A value is a
     local path, and then must be an existing directory, when it starts with ``/``, ``~``, ``./``,
     ``../``, contains a backslash, or has two or more ``/``; anything else (``gpt2``, ``org/name``) may be a
     Hub id and is left to the loader;
   - input files (role "input_file"): ``input_path``, ``paths_input``, ``prompts`` and names ending in
     ``_data``: must be existing files;
   - output directories (role "output_dir"): names ending in ``_dir``: must not be an existing file;
   - output files (role "output_file"): names ending in ``_path`` other than the inputs above (cord's
     ``output_path``, ``summary_path``, ``plot_path``): must not be an existing directory.
   For paths, a leading ``~`` is expanded (a shell does not expand it inside YAML); no ancestor of an
   output path may be a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from distillkit._errors import InputError
from distillkit.pipeline.environment import (  # noqa: F401 (part of this module's interface)
    INPUT_FILE_FIELDS,
    KERNEL_BACKEND_FIELDS,
    MODEL_FIELDS,
    ROLES,
    TEACHER_BACKEND_FIELDS,
    check_environment,
    field_role,
    looks_local,
)

T = TypeVar("T")


def config_field(text: str, **kw) -> Any:
    """A dataclass field with help text (shown by ``--help``)."""
    return dataclasses.field(metadata={"help": text}, **kw)


def _kind(type_str: str) -> str:
    # annotations are strings under `from __future__ import annotations`, classes otherwise
    t = (type_str.__name__ if isinstance(type_str, type) else str(type_str)).replace(" ", "")
    if t.startswith("dict"):
        return "dict"
    if t.startswith(("list[", "tuple[")) or t.startswith(("list", "tuple")):
        return "list-float" if "float" in t else ("list-int" if "int" in t else "list")
    for kind in ("bool", "int", "float"):
        if t in (kind, f"{kind}|None", f"None|{kind}"):
            return kind
    return "str"


def field_help(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """A field's help text for argparse, with the dataclass default (or ``default``: a nested config's value)
    (flags themselves default to None, meaning "not given": the YAML value stands)."""
    text = f.metadata.get("help", "")
    if default is dataclasses.MISSING:
        default = f.default
        if default is dataclasses.MISSING and f.metadata.get("show_default"):  # a factory's value, when asked
            default = f.default_factory()  # type: ignore[misc]
    if "(default" not in text and default is not dataclasses.MISSING and default not in ("", None):
        text = f"{text} (default: {default})"
    return text.replace("%", "%%")


def train_options(cls) -> dict[str, dataclasses.Field]:
    """{name: TrainConfig field} of the trainer options a method config takes flat (see
    ``distillkit.pipeline.train.with_train_options``); {} for other configs."""
    return dict(getattr(cls, "__train_options__", {}))


def renamed_options(cls) -> dict[str, str]:
    """{old name: new name} of the options a config still accepts under their old name."""
    return dict(getattr(cls, "__renamed_options__", {}))


def _flag_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, default shown by --help) of every flag: the config's own fields, then the trainer's options
    (with the method's defaults); the nested ``train`` field itself has no flag."""
    nested = train_options(cls)
    own = [(f, dataclasses.MISSING) for f in dataclasses.fields(cls) if not (nested and f.name == "train")]
    if not nested:
        return own
    train = next(f for f in dataclasses.fields(cls) if f.name == "train").default_factory()
    return own + [(f, getattr(train, name)) for name, f in nested.items()]


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description + " Flags override the YAML file.")
    p.add_argument("--config", help="YAML file of the config's fields")
    fields = _flag_fields(cls)
    for old, new in renamed_options(cls).items():
        target = next(f for f, _ in fields if f.name == new)
        fields.append((_renamed_field(target, old, new), None))
    for f, default in fields:
        flag, help_ = "--" + f.name.replace("_", "-"), field_help(f, default)
        kind = _kind(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        elif kind == "dict":
            p.add_argument(flag, dest=f.name, default=None, type=_yaml_mapping, help=help_ + " (a YAML mapping)")
        elif kind.startswith("list"):
            elem = {"list-float": float, "list-int": int}.get(kind, str)
            p.add_argument(flag, dest=f.name, default=None, nargs="+", type=elem, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=None, type={"int": int, "float": float}.get(kind, str),
                           help=help_)
    return p


def _renamed_field(target: dataclasses.Field, old: str, new: str) -> dataclasses.Field:
    """A stand-in field for the flag of an old option name: the new one's type, a help that names it."""
    f = dataclasses.field(metadata={"help": f"deprecated: use --{new.replace('_', '-')}"})
    f.name, f.type = old, target.type
    return f


def _yaml_mapping(text: str) -> dict:
    """A mapping flag's value, e.g. ``--teacher-kwargs '{gpu_memory_utilization: 0.5}'``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(yaml_error_line(exc)) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{key: value}}', got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------
class _Mismatch(Exception):
    """A value that its field's type refuses; ``expected`` describes the type, ``hint`` the fix."""

    def __init__(self, expected: str, hint: str = "", where: str = ""):
        super().__init__(expected)
        self.expected, self.hint, self.where = expected, hint, where


def _field_types(cls) -> dict[str, Any]:
    """{field name: annotation as a type}; a field whose annotation does not evaluate maps to Any."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a name only the defining module knows: evaluate field by field
        module = sys.modules.get(cls.__module__)
        ns = dict(vars(module)) if module else {}
        out = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = eval(f.type, ns) if isinstance(f.type, str) else f.type  # noqa: S307 (annotations)
            except Exception:
                out[f.name] = Any
        return out


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp in (list, tuple) or origin in (list, tuple):
        elem = args[0] if args else None
        names = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {names[elem]}" if elem in names else "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (dict, list, tuple)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _number(value) -> float | None:
    """A YAML number or numeric string as a float; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _coerce(value, tp):
    """``value`` as the annotated type ``tp``; raises _Mismatch when it cannot be one."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg)
            except _Mismatch as exc:
                if len(options) == 1 and exc.where:  # an element of the one type: its own message is precise
                    raise
                hint = exc.hint if len(options) == 1 else ""
        raise _Mismatch(_describe(tp), hint)
    if value is None:
        raise _Mismatch(_describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        hint = "remove the quotes" if str(value).strip().lower() in ("true", "false") else ""
        raise _Mismatch("true or false", hint)
    if tp is int:
        x = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if x is not None and math.isfinite(x) and x.is_integer():
            return int(x)
        raise _Mismatch("an integer")
    if tp is float:
        x = _number(value)
        if x is None:
            raise _Mismatch("a number")
        return x
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):
            # YAML 1.1 reads on/off/yes/no as booleans and bare digits as numbers
            raise _Mismatch("a string", "YAML reads on/off/yes/no/true/false as booleans: quote the word, e.g. \"on\""
                           if isinstance(value, bool) else "quote it if a string is meant")
        raise _Mismatch("a string")
    if tp in (list, tuple) or origin in (list, tuple):
        container = tuple if (tp is tuple or origin is tuple) else list
        elem = args[0] if args and (container is list or (len(args) == 2 and args[1] is Ellipsis)) else Any
        if isinstance(value, str) and elem in (str, Any):
            value = [value]  # one teacher, one file: a single string stands for a list of one
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(tp))
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, elem))
            except _Mismatch as exc:
                raise _Mismatch(exc.expected, exc.hint, f"[{i}]{exc.where}") from None
        return container(out)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch("a mapping")
        if not args:
            return dict(value)
        out = {}
        for k, v in value.items():
            try:
                out[_coerce(k, args[0])] = _coerce(v, args[1])
            except _Mismatch as exc:
                raise _Mismatch(exc.expected, exc.hint, f"[{k!r}]{exc.where}") from None
        return out
    return value  # a type this module does not know: the dataclass checks it


def coerce_values(cls, values: dict[str, Any], where: dict[str, str] | None = None) -> dict[str, Any]:
    """``values`` with each coerced to its field's annotated type; raises InputError naming the field,
    the expected type and where the value came from (``where[name]``: a YAML file or a flag)."""
    hints = _field_types(cls)
    nested = train_options(cls)
    if nested:
        from distillkit.pipeline.train import TrainConfig

        train_hints = _field_types(TrainConfig)
        hints.update({name: train_hints[name] for name in nested})
        hints.update({old: train_hints[new] for old, new in renamed_options(cls).items()})
    out = {}
    for name, value in values.items():
        try:
            out[name] = _coerce(value, hints.get(name, Any))
        except _Mismatch as exc:
            src = (where or {}).get(name, "")
            label = src if src.startswith("--") else (f"{src}: {name}" if src else name)
            got = _shown(_element(value, exc.where))
            hint = f"; {exc.hint}" if exc.hint else ""
            raise InputError(f"{label}{exc.where}: expected {exc.expected}, got {got}{hint}") from None
    return out


def _element(value, path: str):
    """The nested element that ``path`` ("[2]['k']") names inside ``value``, for the error message."""
    import ast
    import re

    for key in re.findall(r"\[([^\]]+)\]", path):
        try:
            value = value[ast.literal_eval(key)]
        except Exception:
            break
    return value


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file; InputError naming the file (and line) when it is missing,
    not YAML, or not a mapping."""
    import yaml

    if os.path.isdir(path):
        raise InputError(f"--config {path}: is a directory, expected a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: {yaml_error_line(exc)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: expected a mapping of config fields (field: value per line), "
                         f"got {type(loaded).__name__}")
    return loaded


def yaml_error_line(exc) -> str:
    """A PyYAML error on one line: "line L, column C: problem" (its str() spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        context += f" started on line {start.line + 1}"
    text = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text


def load_config(cls: type[T], path: str | None = None, **overrides) -> T:
    """Builds ``cls`` from a YAML file (optional) and keyword overrides; unknown keys are an error and
    every value is coerced to its field's type (see the module docstring) or refused with InputError."""
    return _load(cls, path, overrides, flags=())[0]


def _load(cls, path: str | None, overrides: dict[str, Any], flags) -> tuple[Any, dict[str, str]]:
    """(config, {field: where its value came from: the YAML file or "--flag"}); ``flags`` names the
    overrides given as command-line flags."""
    values: dict[str, Any] = dict(read_yaml(path)) if path else {}
    nested = train_options(cls)
    if nested and isinstance(values.get("train"), dict):  # a train: mapping stands for its flat options
        mapping = values.pop("train")
        twice = sorted(set(mapping) & set(values))
        if twice:
            raise InputError(f"{path}: {twice} given both at the top level and under train:")
        unknown = sorted(set(mapping) - set(nested))
        if unknown:
            raise InputError(f"{path}: train: unknown trainer option(s) {unknown} for {cls.__name__}; "
                             f"known: {sorted(nested)}")
        values.update(mapping)
    where = {name: path for name in values}
    values.update(overrides)
    for name in overrides:
        if name in flags:
            where[name] = "--" + name.replace("_", "-")
        else:
            where.pop(name, None)
    known = {f.name for f in dataclasses.fields(cls)} | set(nested) | set(renamed_options(cls))
    unknown = sorted(set(values) - known)
    if unknown:
        src = f"{path}: " if path and set(unknown) & set(where) else ""
        raise InputError(f"{src}unknown config field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    values = coerce_values(cls, values, where)
    return cls(**values), where


def debug_enabled() -> bool:
    """True under ``distillkit --debug`` (or DISTILLKIT_DEBUG=1): errors keep their traceback."""
    return os.environ.get("DISTILLKIT_DEBUG", "0") not in ("", "0")


def checked_config(cls: type[T], path: str | None, flags: dict[str, Any]) -> T:
    """The config a CLI runs: the YAML file ``path`` (optional) overridden by ``flags`` (field name ->
    value given on the command line), coerced, range-checked and checked against this machine
    (``check_environment``); raises InputError naming the field and the file or flag it came from."""
    cfg, where = _load(cls, path, dict(flags), flags=set(flags))
    check_environment(cfg, where)
    return cfg


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """``--config file.yaml`` plus per-field flags -> a checked config (``checked_config``); on bad input
    prints one line ``prog: reason`` on stderr and exits 2 (under ``--debug`` the exception propagates,
    and ``distillkit`` prints its traceback)."""
    args = vars(build_parser(cls, prog, description).parse_args(list(sys.argv[1:] if argv is None else argv)))
    path = args.pop("config")
    try:
        return checked_config(cls, path, {k: v for k, v in args.items() if v is not None})
    except (ValueError, TypeError, OSError) as exc:
        if debug_enabled():
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print(f"{prog}: {lines[0] if lines else type(exc).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
