"""The demo's report: the table, the paper orderings checked on this run's numbers, plots, timings.

Split from :mod:`distillkit.world.demo` (which runs the jobs); everything here reads a finished result.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Ordering:
    """An ordering a paper reports: row ``order[0]`` > ``order[1]`` > ... on the rows' ``key``."""
    method: str            # CoRD, MoT, VCRD, QR-Distill
    table: str             # where the paper reports it ("" when the method's paper has no table for it)
    metric: str            # what is compared, in words
    order: tuple[str, ...]
    key: str = "accuracy"  # the row field compared

    @property
    def label(self) -> str:
        return f"{self.table} ({self.method})" if self.table else self.method


# The orderings the papers report; the demo checks each one on its own numbers.
PAPER_ORDERINGS = [
    Ordering("CoRD", "Table 2", "trace accuracy", ("cord", "greedy", "curation")),
    Ordering("CoRD", "Table 2", "trace accuracy", ("greedy", "random")),
    Ordering("CoRD", "Table 2", "trace accuracy", ("cord", "integration")),
    Ordering("CoRD", "Table 5", "trace accuracy (steps chosen by the meta-prover vs a trace picked at random)",
             ("cord", "random")),
    Ordering("CoRD", "Table 6", "trace accuracy at CoRD's teacher-token budget", ("cord", "mcts")),
    Ordering("CoRD", "Table 3", "student accuracy", ("sft: cord", "sft: curation")),
    Ordering("MoT", "Table 4", "student accuracy", ("mot", "sft: best single teacher")),
    Ordering("MoT", "Table 4", "student accuracy", ("mot", "sft: union of teachers")),
    Ordering("VCRD", "Table 5", "student accuracy", ("vcrd: clamped_ratio", "vcrd: uniform")),
    Ordering("VCRD", "Table 5", "student accuracy", ("vcrd: clamped_ratio", "vcrd: start")),
    Ordering("QR-Distill", "", "best student accuracy", ("qr: learned routing", "qr: random routing")),
    Ordering("QR-Distill", "", "mean student accuracy (both students)", ("qr: learned routing", "qr: random routing"),
             key="mean_accuracy"),
]
METHODS = ("CoRD", "MoT", "VCRD", "QR-Distill")


def ordering_results(rows: dict[str, dict], orderings=PAPER_ORDERINGS) -> list[dict]:
    """Each ordering whose rows this run has -> {"ordering", "values": [row[key] in order], "holds": every value
    strictly above the next, "tie": some neighbours equal to three decimals}."""
    out = []
    for o in orderings:
        if not all(k in rows and rows[k].get(o.key) is not None for k in o.order):
            continue
        vals = [float(rows[k][o.key]) for k in o.order]
        out.append({"ordering": o, "values": vals, "holds": all(a > b for a, b in zip(vals, vals[1:])),
                    "tie": any(round(a, 3) == round(b, 3) for a, b in zip(vals, vals[1:]))})
    return out


def _numbers(r: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in zip(r["ordering"].order, r["values"]))


def check_orderings(rows: dict[str, dict], orderings=PAPER_ORDERINGS) -> list[str]:
    """One line per ordering this run can check: the paper's claim, this run's numbers, holds / does not hold."""
    lines = []
    for r in ordering_results(rows, orderings):
        o = r["ordering"]
        verdict = ("**holds**." if r["holds"] else
                   "**does not hold** (a tie)." if r["tie"] else "**does not hold**.")
        lines.append(f"- {o.label}, {o.metric}: paper {' > '.join(o.order)}; here {_numbers(r)}: {verdict}")
    return lines


def method_verdicts(rows: dict[str, dict], orderings=PAPER_ORDERINGS) -> list[str]:
    """Per method, which of its paper's orderings hold on this run and which do not, with the numbers."""
    lines = []
    for method in METHODS:
        results = [r for r in ordering_results(rows, orderings) if r["ordering"].method == method]
        if not results:
            continue
        held = [r for r in results if r["holds"]]
        text = "; ".join(f"{' > '.join(r['ordering'].order)} ({r['ordering'].key.replace('_', ' ')}: "
                         f"{_numbers(r)}) {'holds' if r['holds'] else 'does not hold'}" for r in results)
        lines.append(f"- **{method}**: {len(held)} of {len(results)} of its paper's orderings hold here: {text}.")
    return lines


def _acc(rows: dict, name: str, key: str = "accuracy"):
    return rows.get(name, {}).get(key)


def explain(rows: dict[str, dict]) -> list[str]:
    """Plain-words reasons for the differences this world is known to produce, each given only when this run's
    numbers show the difference, and with them."""
    out = []
    if all(k in rows for k in ("cord", "greedy", "curation")) \
            and rows["greedy"]["accuracy"] < rows["curation"]["accuracy"]:
        out.append("- Greedy CoRD (one beam) commits to the meta-prover's first choice; early in a trace the "
                   "meta-prover must finish the remaining operations in its head and is often unsure "
                   "(recorded in assets/manifest.json: answer accuracy by steps written), while curation "
                   "compares complete traces, which it reads almost perfectly.")
    singles = [r["accuracy"] for k, r in rows.items() if k.startswith("trace: ")]
    integ = rows.get("integration")
    if integ is not None and singles and integ["accuracy"] < min(singles):
        out.append(f"- Integration ({integ['accuracy']:.3f}) is below every teacher's own traces "
                   f"({min(singles):.3f}-{max(singles):.3f}): the integrator is a world teacher, trained on the "
                   "reasoning prompt alone, and the integration prompt (the task in words and K traces) is "
                   f"nothing it has seen; {integ.get('well_formed', 0):.1%} of its merged traces are in the "
                   "world's step format. The paper's integrator is a general LLM that can read such a prompt, so "
                   "here the ordering against CoRD holds for another reason than the paper's.")
    mcts, cord = rows.get("mcts"), rows.get("cord")
    if mcts is not None and cord is not None and not mcts["accuracy"] < cord["accuracy"]:
        wrong = cord.get("score_wrong")
        out.append(f"- MCTS reaches {mcts['accuracy']:.3f} with {mcts.get('teacher_tokens', 0):.0f} teacher and "
                   f"{mcts.get('meta_prover_tokens', 0):.0f} meta-prover tokens per question, CoRD "
                   f"{cord['accuracy']:.3f} with {cord.get('teacher_tokens', 0):.0f} and "
                   f"{cord.get('meta_prover_tokens', 0):.0f}. On 3-step problems with three teachers that err on "
                   "different kinds of step, some teacher writes each step right, and the meta-prover tells a "
                   f"right complete trace from a wrong one almost perfectly (CoRD's traces: mean score "
                   f"{cord.get('score_correct') or 0:.3f} on right answers, "
                   + (f"{wrong:.3f} on wrong ones" if wrong is not None else "no wrong one") +
                   "), so both searches find a right trace within the budget; the paper's gap needs long traces "
                   "and sampled proposals, where a search that spreads its budget over many shallow branches "
                   "finishes fewer good traces than a beam.")
    if all(k in rows for k in ("cord", "curation", "sft: cord", "sft: curation")) and \
            rows["sft: cord"]["accuracy"] < rows["sft: curation"]["accuracy"]:
        out.append(f"- CoRD's score is the likelihood of the right *answer*, so it also picks wrong steps that "
                   f"happen to reach it: {rows['cord']['lucky']} of its answer-correct traces contain a wrong "
                   f"step (curation: {rows['curation']['lucky']}). The student learns those wrong steps. The "
                   "paper's CoRD advantage in Table 3 assumes such lucky traces are rare.")
    base = _acc(rows, "student-base (no distillation)")
    start = _acc(rows, "vcrd: start")
    vcrd = [r["accuracy"] for k, r in rows.items() if k in ("vcrd: clamped_ratio", "vcrd: uniform")]
    if start is not None and vcrd and max(vcrd) <= start:
        out.append(f"- No VCRD run improved on its starting student ({start:.3f}) at these step counts, so its "
                   "ordering above compares two runs that did not learn.")
    out += _seed_spread(rows, "vcrd: clamped_ratio", "vcrd: uniform", "VCRD's validity weights")
    out += _seed_spread(rows, "mot", "sft: best single teacher", "MoT's merge")
    out += _qr_lines(rows)
    qr = [r["accuracy"] for k, r in rows.items() if k.startswith("qr: ")]
    if base is not None and qr and max(qr) <= base:
        out.append(f"- No QR-Distill run beat the undistilled student ({base:.3f}) at these step counts, so its "
                   "ordering above compares two runs that did not learn the third step; SFT on correct "
                   "traces needed a few hundred steps for that here.")
    return out


def _seed_spread(rows: dict, first: str, second: str, what: str) -> list[str]:
    """When ``first`` does not beat ``second`` and the gap is inside the spread of their seeds: say so."""
    a, b = rows.get(first), rows.get(second)
    if a is None or b is None or a["accuracy"] > b["accuracy"]:
        return []
    seeds = [x for r in (a, b) for x in (r.get("per_seed") or [])]
    if len(seeds) < 3:
        return []
    spread = max(seeds) - min(seeds)
    gap = b["accuracy"] - a["accuracy"]
    if gap > spread:
        return []
    return [f"- {what}: {first} {a['accuracy']:.3f} vs {second} {b['accuracy']:.3f}, a gap of {gap:.3f} inside the "
            f"spread of their seeds ({min(seeds):.3f}-{max(seeds):.3f}): at these step counts this run cannot rank "
            "them."]


def _qr_lines(rows: dict) -> list[str]:
    """QR-Distill: the routing's split and, when learned routing does not beat random, why."""
    learned, rand = rows.get("qr: learned routing"), rows.get("qr: random routing")
    if learned is None:
        return []
    out = []
    split = learned.get("split") or {}
    if split:
        inside = all(0.3 <= v <= 0.7 for v in split.values())
        out.append(f"- QR-Distill's learned routing split the routes {_split_text(split)} over the last tenth of "
                   f"its steps: {'within' if inside else 'outside'} [0.3, 0.7]"
                   + (" (the capacity limit keeps one student from taking every path)." if inside else "."))
    shares = learned.get("shares") or {}
    if shares and max(shares.values()) > 0.9:
        out.append(f"- The learned router's first choice is one student for {max(shares.values()):.0%} of the "
                   "paths; the capacity limit moves the overflow to the other student, so the split trained on "
                   "is that above.")
    if rand is not None:
        lm, rm = learned.get("mean_accuracy"), rand.get("mean_accuracy")
        if lm is not None and rm is not None and not lm > rm:
            out.append(f"- Random routing (students' mean {rm:.3f}, best {rand['accuracy']:.3f}) does at least as "
                       f"well as learned routing (mean {lm:.3f}, best {learned['accuracy']:.3f}), against the "
                       "paper: the two students are copies of one model and every path has one style (the "
                       "teachers' greedy reasoning), so the router has nothing to specialise on, and random "
                       "routing spreads the paths evenly while the learned one adds its noise to who sees what.")
        students = list((rand.get("students") or {}).values())
        if lm is not None and rm is not None and lm > rm and len(students) >= 2 \
                and lm - rm <= max(students) - min(students):
            out.append(f"- Learned routing's lead on the students' mean ({lm - rm:.3f}) is no larger than the gap "
                       f"between the two random-routing students ({max(students) - min(students):.3f}), copies of "
                       "one model trained on random halves of the same paths: one seed cannot rank the routings.")
    return out


def _split_text(split: dict) -> str:
    return " / ".join(f"{k} {v:.2f}" for k, v in split.items())


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
    cord = cord_table(rows, result.get("cord") or {})
    if cord:
        lines += ["", "## CoRD and its baselines at equal budget", "",
                  "Teacher tokens: everything the teachers generated per question (all proposals, curation's and "
                  "integration's complete traces, the answer); meta-prover tokens: what the meta-prover ran "
                  "(shared prefixes once). MCTS's budget is CoRD's mean teacher tokens per question (its last "
                  "expansion, one step from each teacher, may go past it). The score is "
                  "the meta-prover's predictive perplexity of the right answer after the chosen trace: its mean "
                  "over all traces equals the accuracy to three decimals on this world, so it is shown apart on "
                  "the traces with a right and with a wrong answer.", "", *cord]
    lines += ["", "## Orderings against the papers", "", *method_verdicts(rows), "", *check_orderings(rows), "",
              *explain(rows)]
    plot = plot_rows(rows, os.path.join(cfg.out, "accuracy.png"))
    if plot:
        lines += ["", "![accuracy](accuracy.png)"]
    for method in ("cord", "greedy", "curation", "mcts"):
        png = os.path.join(cfg.out, f"cord_{method}_hit_rates.png")
        if os.path.exists(png):
            lines += ["", f"Teacher hit rates ({method}):", "", f"![{method}]({os.path.basename(png)})"]
    path = os.path.join(cfg.out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def cord_table(rows: dict[str, dict], cord: dict[str, dict]) -> list[str]:
    """The CoRD rows side by side: accuracy, step truth, tokens per question, the score on right and wrong
    traces, CPU seconds (``cord``: the run's CoRD summaries by method)."""
    fmt = lambda x, spec=".3f": "-" if x is None else format(x, spec)  # noqa: E731
    out = ["| row | trace accuracy | well-formed | every step right | right after a wrong step | teacher tokens / q "
           "| meta-prover tokens / q | score, right answers | score, wrong answers (n) | CPU s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in cord.items():
        out.append(f"| {name} | {c['accuracy']:.3f} | {fmt(c.get('well_formed'))} | {fmt(c.get('all_steps_ok'))} | "
                   f"{rows.get(name, {}).get('lucky', '-')} | {fmt(c.get('mean_tokens_generated'), '.0f')} | "
                   f"{fmt(c.get('mean_meta_prover_tokens'), '.0f')} | {fmt(c.get('score_correct'))} | "
                   f"{fmt(c.get('score_wrong'))} ({c.get('wrong', '-')}) | {fmt(c.get('cpu_s'), '.1f')} |")
    return out if cord else []


def format_table(rows: dict[str, dict]) -> str:
    width = max(len(k) for k in rows) + 2
    out = [f"{'row':<{width}} {'accuracy':>8}  detail"]
    out += [f"{k:<{width}} {v['accuracy']:8.3f}  {v.get('detail', '')}" for k, v in rows.items()]
    return "\n".join(out)
