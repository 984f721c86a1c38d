"""`distillkit merge CKPT [CKPT ...] -o OUT [--method average|ties|dare|dare_ties] ...`"""
from __future__ import annotations

import argparse
import logging

from distillkit.merge.checkpoint import METHODS, merge_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distillkit merge",
        description="Merge Hugging Face safetensors checkpoints one tensor at a time (peak memory ~ K copies of "
                    "the largest tensor). Output is written beside OUT and renamed into place when complete.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories to merge")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--method", choices=METHODS, default="average")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (default equal)")
    p.add_argument("--no-normalize", action="store_true", help="use --weights as given (average only)")
    p.add_argument("--base", default=None, help="base checkpoint for ties / dare / dare_ties")
    p.add_argument("--density", type=float, default=None, help="fraction of each task vector kept, in (0, 1]")
    p.add_argument("--lam", type=float, default=1.0, help="scale of the merged task vector")
    p.add_argument("--seed", type=int, default=0, help="DARE's random seed")
    p.add_argument("--max-shard-size", default="2GB", help="bytes per output shard, e.g. 2GB or 500MB")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "cpu", "reference"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new merge is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = merge_checkpoints(
        args.checkpoints, args.out, method=args.method, base=args.base, weights=args.weights,
        density=args.density, lam=args.lam, seed=args.seed, normalize=not args.no_normalize,
        max_shard_size=args.max_shard_size, backend=args.backend, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"merged {len(args.checkpoints)} checkpoints ({args.method}) into {out}")
    return 0
