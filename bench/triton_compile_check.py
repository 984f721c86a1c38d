"""Compiles distillkit's Triton skew-KL kernel for a CUDA target without a GPU, and reports ptxas's resource use.

    python bench/triton_compile_check.py [--arch 90] [--json PATH]

Launch configurations the launcher can pick (one-tile and streaming, skew KL and skew reverse KL; with --full also
without the gradient and for fp32 / fp16 / fp64 rows) go through triton.compile for GPUTarget("cuda", arch, 32),
so a typo or a type error in a branch the CPU interpreter never took fails here, not on the lent GPU. With the
cuobjdump that Triton ships, each cubin's registers and stack frame (spills) are printed: what decides how wide a
row the one-tile path may hold. Needs TRITON_INTERPRET unset (the interpreter's kernels do not compile).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


def _cuobjdump() -> str | None:
    """The cuobjdump Triton ships (next to its ptxas), else one on the PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict:
    """Registers and stack frame (spills land there) of the cubin Triton built, from cuobjdump -res-usage."""
    tool = _cuobjdump()
    if tool is None or not cubin:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=False).stdout
    res = {}
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("shared", r"SHARED:(\d+)")):
        m = re.search(pattern, text)
        if m:
            res[key] = int(m.group(1))
    return res


def configurations(full: bool):
    """(name, vocab for launch_config, dtype name, reverse, with_grad): one per distinct compile. Without
    `full`, the bf16 gradient kernels of each path (what training and the bench launch), a few seconds each."""
    for vocab, path in ((128256, "stream"), (8192, "one-tile-8k"), (1271, "one-tile-2k")):
        dtypes = ("bf16", "fp32") if path != "one-tile-2k" else ("bf16", "fp16", "fp32", "fp64")
        for dtype in dtypes if full else ("bf16",):
            for reverse in (False, True):
                for with_grad in (False, True) if full else (True,):
                    yield f"{path} {dtype} {'srkl' if reverse else 'skl'}{' +grad' if with_grad else ''}", \
                        vocab, dtype, reverse, with_grad


def compile_all(arch: int = 90, only: str | None = None, full: bool = False) -> list[dict]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distillkit.kernels import skew_kl as k

    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
    rows = []
    target = GPUTarget("cuda", arch, 32)
    for name, vocab, dtype, reverse, with_grad in configurations(full):
        if only and only not in name:
            continue
        one_tile, block, num_warps = k.launch_config(vocab, k.ONE_TILE_MAX_COLUMNS)
        acc = "fp64" if dtype == "fp64" else "fp32"
        signature = {"s_ptr": ptr[dtype], "t_ptr": ptr[dtype], "scale_ptr": f"*{acc}", "loss_ptr": f"*{acc}",
                     "grad_ptr": ptr[dtype], "V": "i32", "alpha": "fp32", "inv_t": "fp32", "alpha_in_grad": "fp32",
                     "log_alpha": "fp32", "log_beta": "fp32", "params_ptr": f"*{acc}",
                     "REVERSE": "constexpr", "WITH_GRAD": "constexpr", "BLOCK": "constexpr", "ACC": "constexpr",
                     "PARAMS_IN_MEMORY": "constexpr", "ONE_TILE": "constexpr"}
        constexprs = {"REVERSE": reverse, "WITH_GRAD": with_grad, "BLOCK": block,
                      "ACC": tl.float64 if dtype == "fp64" else tl.float32, "PARAMS_IN_MEMORY": dtype == "fp64",
                      "ONE_TILE": one_tile}
        t0 = time.perf_counter()
        row = {"config": name, "BLOCK": block, "num_warps": num_warps, "one_tile": one_tile}
        try:
            src = ASTSource(fn=k._skew_kl_fwd_kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            row.update(ok=True, **_resources(compiled.asm.get("cubin", b"")))
        except Exception as exc:  # noqa: BLE001 - reported per configuration
            row.update(ok=False, error=f"{exc.__class__.__name__}: {str(exc)[:400]}")
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        extra = " ".join(f"{key}={row[key]}" for key in ("registers", "stack", "shared")
                         if key in row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} sm_{arch} {name:<28} BLOCK={block:<6} warps={num_warps:<3} "
              f"{row['compile_s']:5.1f} s {extra}{'' if row['ok'] else ' ' + row['error']}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (90 = Hopper)")
    p.add_argument("--only", help="only configurations whose name contains this")
    p.add_argument("--full", action="store_true", help="every dtype, with and without the gradient (32 compiles)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the interpreter's kernels do not compile; unset it", file=sys.stderr)
        return 2
    rows = compile_all(args.arch, args.only, args.full)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r["config"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} configurations compiled for sm_{args.arch}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
