"""`distillkit merge CKPT [CKPT ...] -o OUT [--method average|ties|dare|dare_ties] ...`"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distillkit._errors import InputError
from distillkit.merge.checkpoint import METHODS, check_method_options, merge_checkpoints, parse_size

# the CLI spelling of each merge_checkpoints option that only some methods take
_FLAGS = {"base": "--base", "density": "--density", "lam": "--lam", "seed": "--seed", "normalize": "--no-normalize",
          "backend": "--backend"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distillkit merge",
        description="Merge Hugging Face safetensors checkpoints one tensor at a time (peak memory ~ K + 2 copies of "
                    "the largest tensor). Output is written beside OUT and renamed into place when complete. "
                    "An option that does not apply to the chosen --method is an error.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories to merge")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--method", choices=METHODS, default="average")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (default equal)")
    p.add_argument("--no-normalize", action="store_true", help="average only: use --weights as given")
    p.add_argument("--base", default=None, help="ties / dare / dare_ties: the base checkpoint")
    p.add_argument("--density", type=float, default=None,
                   help="ties / dare / dare_ties: fraction of each task vector kept, in (0, 1] (default 1)")
    p.add_argument("--lam", type=float, default=None, help="ties / dare / dare_ties: scale of the merged task "
                                                           "vector (default 1)")
    p.add_argument("--seed", type=int, default=None, help="dare / dare_ties: random seed (default 0)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="bytes per output shard (default 2GB). Case-insensitive units: K/KB, M/MB, G/GB, T/TB are "
                        "powers of 1000 (as in Hugging Face); KiB, MiB, GiB, TiB (or Ki, Mi, Gi, Ti) powers of 1024; "
                        "no unit: bytes. E.g. 500MB, 2GiB, 500M, 4096")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "cpu", "reference"],
                   help="average only: kernel backend (default automatic)")
    p.add_argument("--overwrite", action="store_true", help="replace the OUT directory once the new merge is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    given = {"base": args.base, "density": args.density, "lam": args.lam, "seed": args.seed,
             "normalize": False if args.no_normalize else None, "backend": args.backend}
    check_method_options(args.method, {k: _FLAGS[k] for k, v in given.items() if v is not None})
    shard_bytes = parse_size(args.max_shard_size, "--max-shard-size")
    out = Path(args.out)
    if args.overwrite and out.exists() and not out.is_dir():
        raise InputError(f"--out: {args.out!r} is a file, not a directory; --overwrite replaces only a directory "
                         "(an earlier merge): remove the file or choose another --out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = merge_checkpoints(
        args.checkpoints, out, method=args.method, base=args.base, weights=args.weights, density=args.density,
        lam=args.lam, seed=args.seed, normalize=False if args.no_normalize else None, max_shard_size=shard_bytes,
        backend=args.backend, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"merged {len(args.checkpoints)} checkpoints ({args.method}) into {out}")
    return 0
