"""CoRD's summary of a run's records: accuracy, perplexity, teacher and meta-prover tokens per question,
per-teacher hit rates on the final traces and during expansion (JSON + PNG)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence

HIT_RATE_BINS = 10


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def hit_rates(records: Sequence[dict], names: Sequence[str],
              bins: int = HIT_RATE_BINS) -> dict[str, list[float | None]]:
    """Share of steps each teacher wrote, per bin of normalised reasoning progress (step j of n sits
    at (j + 0.5) / n), as in the seed's Figure 2. None where a bin holds no step."""
    counts = [[0] * bins for _ in names]
    index = {n: i for i, n in enumerate(names)}
    for rec in records:
        steps = rec.get("steps") or []
        for j, step in enumerate(steps):
            t = index.get(step.get("teacher"))
            if t is None:
                continue
            counts[t][min(bins - 1, int((j + 0.5) / len(steps) * bins))] += 1
    totals = [sum(c[b] for c in counts) for b in range(bins)]
    return {n: [(counts[i][b] / totals[b]) if totals[b] else None for b in range(bins)] for i, n in enumerate(names)}


def expansion_hit_rates(records: Sequence[dict], names: Sequence[str],
                        bins: int = HIT_RATE_BINS) -> dict[str, list[float | None]]:
    """Share of the candidates that survived selection, among all beams at every expansion step, that each
    teacher wrote, per bin of normalised search progress (the paper's Figures 2, 4 and 5): a record's
    ``selections`` holds, per trajectory searched, per step, the teachers of the surviving candidates; step s
    of a trajectory of S steps sits at (s + 0.5) / S. None where a bin holds no selection (or no record has
    selections: curation, random at trajectory level)."""
    counts = [[0] * bins for _ in names]
    index = {n: i for i, n in enumerate(names)}
    for rec in records:
        for rounds in rec.get("selections") or []:
            for s, survivors in enumerate(rounds):
                b = min(bins - 1, int((s + 0.5) / len(rounds) * bins))
                for teacher in survivors:
                    t = index.get(teacher)
                    if t is not None:
                        counts[t][b] += 1
    totals = [sum(c[b] for c in counts) for b in range(bins)]
    return {n: [(counts[i][b] / totals[b]) if totals[b] else None for b in range(bins)] for i, n in enumerate(names)}


def summarize(records: Sequence[dict], names: Sequence[str]) -> dict:
    n = len(records)
    scores = [r["predictive_perplexity"] for r in records if isinstance(r.get("predictive_perplexity"), (int, float))
              and math.isfinite(r["predictive_perplexity"])]
    all_steps = [s for r in records for s in (r.get("steps") or [])]
    selected = [t for r in records for rounds in (r.get("selections") or []) for sv in rounds for t in sv]
    counted = [r["trajectories"] for r in records if isinstance(r.get("trajectories"), int)]
    teacher_tokens = (sum(r["tokens_generated"] for r in records) / n) if n else None
    prover_tokens = (sum(r["meta_prover_tokens"] for r in records) / n) if n else None
    return {
        "records": n,
        "accuracy": (sum(bool(r.get("correct")) for r in records) / n) if n else None,
        "mean_predictive_perplexity": (sum(scores) / len(scores)) if scores else None,
        # the cost per question: every teacher token generated (all trajectories, the answer) and every token
        # the meta-prover read (its selector calls and the record's score)
        "teacher_tokens_per_question": teacher_tokens,
        "meta_prover_tokens_per_question": prover_tokens,
        "mean_tokens_generated": teacher_tokens,
        "mean_meta_prover_tokens": prover_tokens,
        # complete trajectories generated per question, over the records whose decoder counts them
        "trajectories_per_question": (sum(counted) / len(counted)) if counted else None,
        "mean_steps": (len(all_steps) / n) if n else None,
        "teacher_share": {name: (sum(s.get("teacher") == name for s in all_steps) / len(all_steps))
                          if all_steps else None for name in names},
        "hit_rate_bins": HIT_RATE_BINS,
        "hit_rates": hit_rates(records, names),
        # during expansion: whose candidates survived selection among all beams, at every step
        "expansion_teacher_share": {name: (sum(t == name for t in selected) / len(selected)) if selected else None
                                    for name in names},
        "hit_rates_expansion": expansion_hit_rates(records, names),
    }


def _atomic_write(path: str, write) -> None:
    """Writes through a temporary file in the same folder, then renames (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_hit_rates(summary: dict, path: str) -> None:
    """Teacher hit rate per bin of progress, as PNG: on the final traces' steps (the seed's Figure 2) and
    among all beams' selections during expansion (Figures 2, 4 and 5).

    Uses a bare Agg figure, not pyplot: no global backend switch, no GUI, safe in a worker thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = summary["hit_rate_bins"]
    x = [(b + 0.5) / bins for b in range(bins)]
    panels = [("hit_rates", "final traces: whose step was kept", "normalised reasoning progress"),
              ("hit_rates_expansion", "expansion: whose candidates survived, all beams", "normalised search progress")]
    fig = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(fig)
    for p, (key, title, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        rates_by_teacher = summary.get(key) or {}
        for name, rates in rates_by_teacher.items():
            # Empty bins (no step fell there) are skipped, so the line joins the bins that have data.
            pts = [(xb, r) for xb, r in zip(x, rates) if r is not None]
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o",
                    label=os.path.basename(name.rstrip("/")) or name)
        if not any(r is not None for rates in rates_by_teacher.values() for r in rates):
            ax.text(0.5, 0.5, "no step-wise selection in this method", ha="center", va="center", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("teacher hit rate")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        if rates_by_teacher:
            ax.legend(fontsize=8)
    fig.suptitle(f"CoRD ({summary.get('method', 'cord')}), n={summary['records']}", fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def write_summary(summary: dict, json_path: str, png_path: str | None) -> None:
    def dump(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)

    _atomic_write(json_path, dump)
    if png_path:
        plot_hit_rates(summary, png_path)
