"""`distillkit <command> [args]`.

Each command lives in the module that implements it and exposes ``cli(argv: list[str]) -> int``;
this file only routes, so that `distillkit info` does not pay for transformers' import.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("distillkit.info", "print the backend table with versions"),
    "merge": ("distillkit.merge.cli", "merge Hugging Face safetensors checkpoints (average, TIES, DARE)"),
    "cord": ("distillkit.methods.cord", "CoRD: collaborative step-wise multi-teacher decoding"),
    "vcrd": ("distillkit.methods.vcrd", "VCRD: validity-calibrated reasoning distillation"),
    "mot": ("distillkit.methods.mot", "MoT: merge-of-thought distillation"),
    "qr-distill": ("distillkit.methods.qr_distill", "QR-Distill: routed multi-student distillation"),
    "demo": ("distillkit.world.demo", "run every method on the tiny reasoning world"),
}


def _usage() -> str:
    lines = ["usage: distillkit <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`distillkit <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"distillkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"distillkit: command {name!r} is not available in this version", file=sys.stderr)
        return 2
    if name == "info":
        return module.main()
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
