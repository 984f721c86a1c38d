"""Markdown table of recorded benchmark runs: ``python bench/summarize.py [results-dir] [--device SUBSTR]``.

Reads every ``<suite>-<device>.json`` that bench/_util.report wrote and prints, per suite and case, each
provider's median time, peak extra memory, roofline fraction and ratio to eager measured in the same
run, under a heading naming the device and versions.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _is_table_run(run) -> bool:
    # bench/_util.report's schema: {"environment": {...}, "rows": [{"suite", "case", "provider", ...}, ...]}; some
    # suites also keep a record of their own shape (meta_prover_across_steps, teachers, integrations): not rows here
    rows = run.get("rows") if isinstance(run, dict) else None
    return isinstance(rows, list) and all(isinstance(r, dict) and {"suite", "case", "time_s"} <= r.keys() for r in rows)


def load(results_dir: str, device: str | None = None) -> list[dict]:
    """The runs in ``results_dir`` written by bench/_util.report (other JSON records there are left out)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if not _is_table_run(run):
            continue
        env = run.get("environment", {})
        name = env.get("device") or env.get("gpu") or f"CPU {env.get('machine', '?')}"
        if device and device.lower() not in name.lower():
            continue
        run["device"], run["file"] = name, os.path.basename(path)
        runs.append(run)
    return runs


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def _fmt_mem(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def table(runs: list[dict]) -> str:
    out = []
    by_device: dict[str, list[dict]] = {}
    for run in runs:
        by_device.setdefault(run["device"], []).append(run)
    for device, dev_runs in by_device.items():
        env = dev_runs[0]["environment"]
        versions = ", ".join(f"{k} {env[k]}" for k in ("distillkit", "torch", "triton", "cuda", "driver") if env.get(k))
        out += [f"**{device}** ({versions}; {env.get('date', 'date not recorded')})", "",
                "| suite | case | provider | backend | time | peak extra memory | roofline | time / eager |",
                "|---|---|---|---|---:|---:|---:|---:|"]
        for run in dev_runs:
            for r in run["rows"]:
                roof = f"{r['roofline_fraction']:.0%}" if r.get("roofline_fraction") is not None else "n/a"
                ratio = f"{r['ratio_to_eager']:.2f}x" if r.get("ratio_to_eager") is not None else "n/a"
                out.append(f"| {r['suite']} | {r['case']} | {r['provider']} | {r['backend']} | "
                           f"{_fmt_time(r['time_s'])} | {_fmt_mem(r['peak_bytes'])} | {roof} | {ratio} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--device", help="only runs whose device name contains this")
    args = p.parse_args(argv)
    runs = load(args.results_dir, args.device)
    if not runs:
        print(f"no results under {args.results_dir}", file=sys.stderr)
        return 1
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
