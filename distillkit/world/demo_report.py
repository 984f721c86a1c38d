"""The demo's report: the table, the paper orderings checked on this run's numbers, plots, timings.

Split from :mod:`distillkit.world.demo` (which runs the jobs); everything here reads a finished result.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

# The orderings the papers report; the demo checks each one on its own numbers.
PAPER_ORDERINGS = [
    ("Table 2 (CoRD)", "trace accuracy", ["cord", "greedy", "curation"]),
    ("Table 2 (CoRD)", "trace accuracy", ["greedy", "random"]),
    ("Table 3 (CoRD)", "student accuracy", ["sft: cord", "sft: curation"]),
    ("Table 4 (MoT)", "student accuracy", ["mot", "sft: best single teacher"]),
    ("Table 4 (MoT)", "student accuracy", ["mot", "sft: union of teachers"]),
    ("Table 5 (VCRD)", "student accuracy", ["vcrd: clamped_ratio", "vcrd: uniform"]),
    ("Table 5 (VCRD)", "student accuracy", ["vcrd: clamped_ratio", "vcrd: start"]),
    ("QR-Distill", "student accuracy", ["qr: learned routing", "qr: random routing"]),
]


def check_orderings(rows: dict[str, dict]) -> list[str]:
    lines = []
    for table, metric, order in PAPER_ORDERINGS:
        if not all(k in rows for k in order):
            continue
        vals = [rows[k]["accuracy"] for k in order]
        claim = " > ".join(order)
        got = ", ".join(f"{k} {v:.3f}" for k, v in zip(order, vals))
        holds = all(a > b for a, b in zip(vals, vals[1:]))
        lines.append(f"- {table}, {metric}: paper {claim}; here {got}: "
                     + ("**holds**." if holds else "**differs from the paper** (here the ordering does not hold)."))
    return lines


def explain(rows: dict[str, dict]) -> list[str]:
    """Plain-words reasons for the differences this world is known to produce, from this run's numbers."""
    out = []
    if all(k in rows for k in ("cord", "greedy", "curation")) \
            and rows["greedy"]["accuracy"] < rows["curation"]["accuracy"]:
        out.append("- Greedy CoRD (one beam) commits to the meta-prover's first choice; early in a trace the "
                   "meta-prover must finish the remaining operations in its head and is often unsure "
                   "(recorded in assets/manifest.json: answer accuracy by steps written), while curation "
                   "compares complete traces, which it reads almost perfectly.")
    if all(k in rows for k in ("cord", "curation", "sft: cord", "sft: curation")) and \
            rows["sft: cord"]["accuracy"] < rows["sft: curation"]["accuracy"]:
        out.append(f"- CoRD's score is the likelihood of the right *answer*, so it also picks wrong steps that "
                   f"happen to reach it: {rows['cord']['lucky']} of its answer-correct traces contain a wrong "
                   f"step (curation: {rows['curation']['lucky']}). The student learns those wrong steps. The "
                   "paper's CoRD advantage in Table 3 assumes such lucky traces are rare.")
    base = rows.get("student-base (no distillation)", {}).get("accuracy")
    start = rows.get("vcrd: start", {}).get("accuracy")
    vcrd = [r["accuracy"] for k, r in rows.items() if k in ("vcrd: clamped_ratio", "vcrd: uniform")]
    if start is not None and vcrd and max(vcrd) <= start:
        out.append(f"- No VCRD run improved on its starting student ({start:.3f}) at these step counts, so its "
                   "ordering above compares two runs that did not learn.")
    shares = rows.get("qr: learned routing", {}).get("shares") or {}
    if shares and max(shares.values()) > 0.9:
        out.append(f"- The learned router ended up sending {max(shares.values()):.0%} of the paths to one student. "
                   "Here the two students are copies of one model and every path has one style, so there is nothing "
                   "to route on: the student that gets ahead is given more paths, and the balance term (lambda_2) is "
                   "too weak to stop that. Its best student simply trained on more paths than either random-routing "
                   "student, so this ordering says little about routing.")
    qr = [r["accuracy"] for k, r in rows.items() if k.startswith("qr: ")]
    if base is not None and qr and max(qr) <= base:
        out.append(f"- No QR-Distill run beat the undistilled student ({base:.3f}) at these step counts, so its "
                   "ordering above compares two runs that did not learn the third step; SFT on correct "
                   "traces needed a few hundred steps for that here.")
    return out


def plot_rows(rows: dict[str, dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the table carries every number
        return None
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    ax.barh(names[::-1], [rows[n]["accuracy"] for n in names][::-1], color="tab:blue")
    ax.set_xlabel("answer accuracy (held-out 3-step problems)")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timing_lines(timing: dict) -> list[str]:
    """The header's time table: per section, the jobs' summed CPU seconds and the wall-clock span from its
    first job's start to its last job's end (sections run side by side, so spans overlap)."""
    where = ("one after another in this process" if timing["workers"] == 1 else
             f"side by side in {timing['workers']} worker processes")
    busy = timing["cpu_s"] / timing["wall_s"] if timing["wall_s"] else 0.0
    # cores busy on average below the worker count: other programs shared the cores, or jobs waited on others
    lines = [f"Time: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU in all (this process and its "
             f"workers; {busy:.2f} cores busy on average); jobs ran {where}, each on one torch thread; "
             f"{timing['cpu_count']} cores usable here.", "",
             "| section | jobs | CPU s | wall span s |", "|---|---:|---:|---:|"]
    for name, s in timing["sections"].items():
        lines.append(f"| {name} | {s['jobs']} | {s['cpu_s']:.1f} | {s['wall_s']:.1f} |")
    lines.append(f"| overhead (worker start-up, imports, scheduling) | | {timing['overhead_cpu_s']:.1f} | |")
    return lines


def write_report(cfg, result: dict) -> str:
    """Writes ``cfg.out``/report.md (+ accuracy.png) from a finished :func:`distillkit.world.demo.run` result."""
    rows = result["rows"]
    lines = ["# distillkit demo: the four methods on the tiny reasoning world", "",
             f"Seeds and sizes: `{json.dumps(asdict(cfg))}`. Every number below comes from this run; every job "
             "runs on one torch thread, so `--threads` changes the time, not the numbers.", "",
             *timing_lines(result["timing"]), "",
             "Problems: 3-step chains of one-digit operations mod 10 (distillkit.world.problems), "
             f"{cfg.n_distill} for distillation and {cfg.n_eval} for evaluation, none seen in training. "
             "Teachers err on carry / borrow / overflow steps respectively; the student has seen 2-step problems only.",
             "", "| row | accuracy | detail |", "|---|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r.get('detail', '')} |")
    lines += ["", "## Orderings against the papers", "", *check_orderings(rows), *explain(rows)]
    plot = plot_rows(rows, os.path.join(cfg.out, "accuracy.png"))
    if plot:
        lines += ["", "![accuracy](accuracy.png)"]
    for method in ("cord", "greedy", "curation"):
        png = os.path.join(cfg.out, f"cord_{method}_hit_rates.png")
        if os.path.exists(png):
            lines += ["", f"Teacher hit rates ({method}):", "", f"![{method}]({os.path.basename(png)})"]
    path = os.path.join(cfg.out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def format_table(rows: dict[str, dict]) -> str:
    width = max(len(k) for k in rows) + 2
    out = [f"{'row':<{width}} {'accuracy':>8}  detail"]
    out += [f"{k:<{width}} {v['accuracy']:8.3f}  {v.get('detail', '')}" for k, v in rows.items()]
    return "\n".join(out)
