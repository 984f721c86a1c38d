"""`distillkit info` / `python -m distillkit.info`: the backend table with versions, then per op the backends it
declares (what each supports, and whether and why not it runs here)."""
from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence


def info_text() -> str:
    import torch

    import distillkit
    from distillkit._backend import _triton_import, backends

    triton_mod, _ = _triton_import()
    lines = [
        f"distillkit {distillkit.__version__}",
        f"python     {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch      {torch.__version__} (cuda {torch.version.cuda})",
        f"triton     {triton_mod.__version__ if triton_mod else 'not installed'}",
        "",
        f"{'backend':<10} {'available':<10} reason",
    ]
    for name, (ok, why) in backends().items():
        lines.append(f"{name:<10} {'yes' if ok else 'no':<10} {why}")
    for op in _ops():
        rows = op.table()
        width = max(len(r[3]) for r in rows) + 1
        lines += ["", f"op {op.name}", f"  {'backend':<10} {'runs here':<10} {'supports':<{width}} reason"]
        for name, ok, why, supports in rows:
            lines.append(f"  {name:<10} {'yes' if ok else 'no':<10} {supports or '-':<{width}} {why}")
    return "\n".join(lines)


def _ops():
    """Every op's declaration (distillkit._backend.OPS), its module imported (no kernel, no triton, loads)."""
    import importlib

    from distillkit._backend import OPS

    for module in ("skew_kl", "fused_linear", "validity", "scoring", "merge"):
        importlib.import_module(f"distillkit.ops.{module}")
    return list(OPS.values())


def cli(argv: Sequence[str] | None = None) -> int:
    """`distillkit info`: takes no options (an unknown one exits 2 with usage, as argparse does)."""
    argparse.ArgumentParser(prog="distillkit info", description="Print the kernel backends available here, "
                            "each with the reason when it is not, and the versions of python, torch and triton."
                            ).parse_args(list(sys.argv[1:] if argv is None else argv))
    print(info_text())
    return 0


def main() -> int:
    return cli()


if __name__ == "__main__":
    raise SystemExit(main())
