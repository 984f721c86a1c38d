"""Method configs: a dataclass per method whose fields carry ``help`` metadata and whose
``__post_init__`` checks ranges; YAML files supply the fields and command-line flags override them.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def config_field(text: str, **kw) -> Any:
    """A dataclass field with help text (shown by ``--help``)."""
    return dataclasses.field(metadata={"help": text}, **kw)


def _kind(type_str: str) -> str:
    # annotations are strings under `from __future__ import annotations`, classes otherwise
    t = (type_str.__name__ if isinstance(type_str, type) else str(type_str)).replace(" ", "")
    if t.startswith(("list[", "tuple[")) or t.startswith(("list", "tuple")):
        return "list-float" if "float" in t else ("list-int" if "int" in t else "list")
    for kind in ("bool", "int", "float"):
        if t in (kind, f"{kind}|None", f"None|{kind}"):
            return kind
    return "str"


def field_help(f: dataclasses.Field) -> str:
    """A field's help text for argparse, with the dataclass default (flags themselves default to None,
    meaning "not given": the YAML value stands)."""
    text = f.metadata.get("help", "")
    if "default" not in text and f.default is not dataclasses.MISSING and f.default not in ("", None):
        text = f"{text} (default: {f.default})"
    return text.replace("%", "%%")


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description + " Flags override the YAML file.")
    p.add_argument("--config", help="YAML file of the config's fields")
    for f in dataclasses.fields(cls):
        flag, help_ = "--" + f.name.replace("_", "-"), field_help(f)
        kind = _kind(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        elif kind.startswith("list"):
            elem = {"list-float": float, "list-int": int}.get(kind, str)
            p.add_argument(flag, dest=f.name, default=None, nargs="+", type=elem, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=None, type={"int": int, "float": float}.get(kind, str), help=help_)
    return p


def load_config(cls: type[T], path: str | None = None, **overrides) -> T:
    """Builds ``cls`` from a YAML file (optional) and keyword overrides; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields")
        values.update(loaded)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**values)


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
    """``--config file.yaml`` plus per-field flags -> a checked config; exits 2 with the reason on bad input."""
    args = vars(build_parser(cls, prog, description).parse_args(list(sys.argv[1:] if argv is None else argv)))
    path = args.pop("config")
    try:
        return load_config(cls, path, **{k: v for k, v in args.items() if v is not None})
    except (ValueError, TypeError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
