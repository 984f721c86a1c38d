"""`distillkit demo`: the four methods end to end on the tiny reasoning world, on a laptop CPU.

Everything runs on the models shipped in distillkit/world/assets (three teachers that each err on
one kind of step, a meta-prover, a small student that has only seen 2-step problems) and on 3-step
problems none of them was trained on:

1. CoRD (beam) vs greedy vs curation vs random step choice at the same per-trace token budget:
   trace answer accuracy and mean predictive perplexity (the CoRD seed's Table 2 in miniature);
2. SFT of the student on each method's correct traces -> student accuracy (Table 3);
3. MoT rounds vs SFT on the best single teacher's data and on the union of all teachers' data
   (MoT Table 4);
4. VCRD with validity weights (clamped ratio) vs uniform weights, both from the student after a short
   SFT (VCRD Table 5);
5. QR-Distill with learned routing vs without (random routing).

It prints one table, writes report.md (+ plots) under the output folder, and says where an ordering
differs from the paper's. Seeds are fixed; with one thread a second run gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from distillkit.world import models as M
from distillkit.world import problems as W

log = logging.getLogger(__name__)
SECTIONS = ("cord", "sft", "mot", "vcrd", "qr")


@dataclass
class DemoConfig:
    out: str = field(default="distillkit-demo", metadata={"help": "output folder (data, runs, report.md)"})
    n_distill: int = field(default=160, metadata={"help": "questions the methods write traces for"})
    n_eval: int = field(default=192, metadata={"help": "held-out questions the students are evaluated on"})
    beam_size: int = field(default=4, metadata={"help": "CoRD beams"})
    sft_steps: int = field(default=320, metadata={"help": "optimizer steps of every student SFT run"})
    sft_seeds: int = field(default=3, metadata={"help": "SFT runs (data orders) averaged per row"})
    batch_size: int = field(default=16, metadata={"help": "examples per SFT step"})
    lr: float = field(default=2e-3, metadata={"help": "student learning rate"})
    mot_rounds: int = field(default=3, metadata={"help": "MoT rounds (branch steps = sft_steps / rounds)"})
    vcrd_steps: int = field(default=60, metadata={"help": "VCRD optimizer steps per weighting"})
    vcrd_sft_steps: int = field(default=160, metadata={"help": "SFT steps of the student VCRD starts from (0: the base "
                                                                "student; see run_vcrd_section)"})
    vcrd_lr: float = field(default=5e-4, metadata={"help": "VCRD learning rate (distillation on rollouts: lower than SFT)"})
    vcrd_temperature: float = field(default=0.7, metadata={"help": "VCRD rollout sampling temperature"})
    qr_steps: int = field(default=120, metadata={"help": "QR-Distill optimizer steps per routing"})
    sections: tuple = field(default=SECTIONS, metadata={"help": "which parts to run"})
    seed: int = field(default=0, metadata={"help": "every seed derives from it"})
    threads: int = field(default=1, metadata={"help": "torch threads (1: reproducible, tiny models gain little)"})

    def __post_init__(self):
        for name in ("n_distill", "n_eval", "beam_size", "sft_steps", "sft_seeds", "batch_size", "mot_rounds", "vcrd_steps",
                     "qr_steps", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        if not isinstance(self.vcrd_sft_steps, int) or self.vcrd_sft_steps < 0:
            raise ValueError(f"vcrd_sft_steps={self.vcrd_sft_steps!r}: expected an integer >= 0")
        if self.n_distill + self.n_eval > M.manifest()["eval"]["n"]:
            raise ValueError(f"n_distill + n_eval: at most {M.manifest()['eval']['n']} held-out problems")
        bad = set(self.sections) - set(SECTIONS)
        if bad:
            raise ValueError(f"sections: unknown {sorted(bad)}; expected a subset of {SECTIONS}")
        if "sft" in self.sections and "cord" not in self.sections:
            raise ValueError("sections: 'sft' needs 'cord' (it trains on the CoRD runs' traces)")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _write_jsonl(path: str, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def split_questions(cfg: DemoConfig) -> tuple[list[W.Problem], list[W.Problem]]:
    """Distillation and evaluation problems: disjoint slices of the held-out set no model saw."""
    info = M.manifest()["eval"]
    held = W.generate_problems(info["n"], seed=info["seed"], num_ops=info["num_ops"])
    return held[:cfg.n_distill], held[cfg.n_distill:cfg.n_distill + cfg.n_eval]


def question_rows(probs) -> list[dict]:
    return [{"id": str(i), "question": p.question, "answer": p.answer} for i, p in enumerate(probs)]


# ----------------------------------------------------------------------------------------------
# 1. CoRD vs greedy vs curation vs random
# ----------------------------------------------------------------------------------------------
def run_cord_methods(cfg: DemoConfig, questions_path: str) -> dict[str, dict]:
    from distillkit.methods import cord
    from distillkit.methods.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher

    teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n) for n in M.TEACHERS]
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference")
    out = {}
    for method in ("cord", "greedy", "curation", "random"):
        path = os.path.join(cfg.out, "traces", f"{method}.jsonl")
        if os.path.exists(path):
            os.remove(path)  # every number comes from this run
        c = cord.CordConfig(
            teachers=[M.asset_path(n) for n in M.TEACHERS], teacher_names=list(M.TEACHERS),
            meta_prover=M.asset_path(M.META_PROVER), input_path=questions_path, output_path=path,
            method=method, beam_size=cfg.beam_size, max_steps=W.NUM_OPS + 1,
            token_budget=M.max_new_tokens(), max_step_tokens=16, max_answer_tokens=8, seed=cfg.seed,
            scoring_backend="reference", progress=False, plot_path=os.path.join(cfg.out, f"cord_{method}_hit_rates.png"))
        t0 = time.perf_counter()
        summary = cord.run(c, teachers=teachers, meta_prover=prover)
        summary["elapsed_s"] = round(time.perf_counter() - t0, 1)
        summary["path"] = path
        out[method] = summary
        log.info("cord[%s]: accuracy %.3f, perplexity score %.3f (%.0f s)", method, summary["accuracy"],
                 summary["mean_predictive_perplexity"], summary["elapsed_s"])
    return out


def step_check(path: str) -> dict:
    """Step-level truth of a CoRD output: {"all_steps_ok": fraction of traces whose every step is right,
    "lucky": traces with the right final answer reached through a wrong step}.

    Mod-10 products collapse (x * 0, even * 5), so a wrong running value can still end on the right
    answer; an answer-only score (the meta-prover's, the answer filter) cannot tell those traces apart.
    """
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    checks = [W.check_trace(r["question"], r["trajectory"]) for r in recs]
    return {"all_steps_ok": sum(c["all_steps_ok"] for c in checks) / max(1, len(checks)),
            "lucky": sum(c["answer_ok"] and not c["all_steps_ok"] for c in checks)}


def single_teacher_traces(cfg: DemoConfig, probs) -> dict[str, dict]:
    """Each teacher's greedy traces of the distillation questions (its own dataset, for MoT/union)."""
    from distillkit.evaluate import generate

    out = {}
    for name in M.TEACHERS:
        model, tok = M.load_model(name)
        texts = generate(model, tok, [p.prompt for p in probs], max_new_tokens=M.max_new_tokens(), batch_size=128)
        rows = [{"id": str(i), "question": p.question, "answer": p.answer, "response": t}
                for i, (p, t) in enumerate(zip(probs, texts))]
        correct = [W.check_trace(p.question, t)["answer_ok"] for p, t in zip(probs, texts)]
        path = _write_jsonl(os.path.join(cfg.out, "traces", f"{name}.jsonl"), rows)
        out[name] = {"path": path, "accuracy": sum(correct) / len(correct)}
    return out


# ----------------------------------------------------------------------------------------------
# 2./3. student SFT and MoT
# ----------------------------------------------------------------------------------------------
def correct_examples(paths: list[str]):
    from distillkit.answers import answers_match, extract_answer
    from distillkit.data import load_examples

    ok = lambda resp, ans: answers_match(extract_answer(resp), ans)  # noqa: E731
    return [ex for p in paths for ex in load_examples(p, only_correct=True, is_correct=ok)]


def sft_student(cfg: DemoConfig, name: str, examples, eval_probs) -> dict:
    """Fine-tunes student-base on ``examples`` (sft_steps steps), once per seed in
    seed .. seed + sft_seeds - 1 -> {"accuracy": mean over seeds, "per_seed": [...], "examples"}.

    Several seeds because a 0.1M-parameter student's accuracy after a few hundred steps moves by
    several points with the data order alone; one seed would rank equal data at random.
    """
    from distillkit.data import SFTCollator, sft_loss
    from distillkit.train import TrainConfig, Trainer

    if not examples:
        model, tok = M.load_model(M.STUDENT)
        acc = M.evaluate_traces(model, tok, eval_probs)["accuracy"]
        return {"examples": 0, "accuracy": acc, "per_seed": [acc]}
    accs = []
    for seed in range(cfg.seed, cfg.seed + cfg.sft_seeds):
        model, tok = M.load_model(M.STUDENT)
        tc = TrainConfig(output_dir=os.path.join(cfg.out, "runs", f"{name}-seed{seed}"), max_steps=cfg.sft_steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=10, min_lr_ratio=0.1, seed=seed,
                         progress=False, resume=False, log_every=max(1, cfg.sft_steps // 4))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            Trainer(model, tc, examples, SFTCollator(tok), sft_loss).train()
        model.eval()
        accs.append(M.evaluate_traces(model, tok, eval_probs)["accuracy"])
    return {"examples": len(examples), "accuracy": sum(accs) / len(accs), "per_seed": accs}


def _sft_detail(r: dict) -> str:
    return f"{r['examples']} correct traces; mean of seeds " + " ".join(f"{a:.3f}" for a in r["per_seed"])


def run_mot(cfg: DemoConfig, teacher_paths: list[str], eval_probs) -> dict:
    from distillkit.methods.mot import MotConfig
    from distillkit.methods.mot import run as mot_run

    out_dir = os.path.join(cfg.out, "runs", "mot")
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    mc = MotConfig(student=M.asset_path(M.STUDENT), teacher_data=teacher_paths, output_dir=out_dir,
                   rounds=cfg.mot_rounds, steps_per_round=max(1, cfg.sft_steps // cfg.mot_rounds),
                   merge="average", batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device="cpu",
                   progress=False, max_new_tokens=M.max_new_tokens())
    with torch.random.fork_rng(devices=[]):
        history = mot_run(mc)
    from distillkit.teachers.hf import load_causal_lm

    model, tok = load_causal_lm(os.path.join(out_dir, "final"))
    return {"rounds": history, **M.evaluate_traces(model, tok, eval_probs)}


# ----------------------------------------------------------------------------------------------
# 4./5. VCRD and QR-Distill
# ----------------------------------------------------------------------------------------------
def run_vcrd(cfg: DemoConfig, weighting: str, teacher: str, prompts_path: str, eval_probs, *, student: str,
             seed: int) -> dict:
    from distillkit.methods.vcrd import VcrdConfig
    from distillkit.methods.vcrd import run as vcrd_run
    from distillkit.teachers.hf import load_causal_lm

    out_dir = os.path.join(cfg.out, "runs", f"vcrd-{weighting}-seed{seed}")
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    vc = VcrdConfig(student=student, teacher=M.asset_path(teacher), prompts=prompts_path,
                    output_dir=out_dir, steps=cfg.vcrd_steps, batch_size=cfg.batch_size, lr=cfg.vcrd_lr, warmup=5,
                    rollout_tokens=M.max_new_tokens(), temperature=cfg.vcrd_temperature, weighting=weighting, seed=seed,
                    device="cpu", save_every=0, log_every=10, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        summary = vcrd_run(vc)
    model, tok = load_causal_lm(summary["final_model"])
    return M.evaluate_traces(model, tok, eval_probs)


def run_vcrd_section(cfg: DemoConfig, teacher: str, teacher_traces: str, prompts_path: str, eval_probs) -> dict:
    """VCRD with validity weights and with uniform weights, from one starting student, averaged over
    sft_seeds seeds -> {"start": accuracy of the starting student, weighting: {"accuracy", "per_seed"}}.

    The start is the student after vcrd_sft_steps of SFT on the teacher's correct traces (SFT, then
    on-policy distillation). From the base student VCRD barely moves: on 3-step prefixes the base student
    puts q < 1e-3 on the teacher's next token, and there the skew KL KL(p || alpha p + (1 - alpha) q)
    sits at its ceiling -log(alpha) with a gradient proportional to q (it vanishes), so the confidently
    wrong tokens are exactly the ones it cannot correct.
    """
    from distillkit.data import SFTCollator, sft_loss
    from distillkit.train import TrainConfig, Trainer, save_pretrained_atomic

    model, tok = M.load_model(M.STUDENT)
    start = M.asset_path(M.STUDENT)
    if cfg.vcrd_sft_steps > 0:
        tc = TrainConfig(output_dir=os.path.join(cfg.out, "runs", "vcrd-sft-start"), max_steps=cfg.vcrd_sft_steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=10, min_lr_ratio=0.1, seed=cfg.seed,
                         progress=False, resume=False, log_every=max(1, cfg.vcrd_sft_steps // 4))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            Trainer(model, tc, correct_examples([teacher_traces]), SFTCollator(tok), sft_loss).train()
        model.eval()
        start = os.path.join(cfg.out, "runs", "vcrd-sft-start", "model")
        save_pretrained_atomic(model, tok, start)
    out = {"start": M.evaluate_traces(model, tok, eval_probs)["accuracy"]}
    for weighting in ("clamped_ratio", "uniform"):
        accs = [run_vcrd(cfg, weighting, teacher, prompts_path, eval_probs, student=start, seed=seed)["accuracy"]
                for seed in range(cfg.seed, cfg.seed + cfg.sft_seeds)]
        out[weighting] = {"accuracy": sum(accs) / len(accs), "per_seed": accs}
    return out


def run_qr(cfg: DemoConfig, routing: str, questions_path: str, teacher_paths: list[str], eval_probs) -> dict:
    import shutil

    from distillkit.methods.qr_distill import QRDistillConfig
    from distillkit.methods.qr_distill import run as qr_run
    from distillkit.teachers.hf import load_causal_lm

    out_dir = os.path.join(cfg.out, "runs", f"qr-{routing}")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    # Paths: every teacher's greedy traces, written above (one style); the answer filter applies.
    rows = []
    for t, p in zip(M.TEACHERS, teacher_paths):
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    rows.append({**rec, "id": f"{t}|{rec['id']}", "qid": rec["id"], "teacher": t, "style": "cot",
                                 "prompt": W.PROMPT_TEMPLATE.format(question=rec["question"])})
    paths_file = _write_jsonl(os.path.join(cfg.out, "traces", "qr_paths.jsonl"), rows)
    student_dirs = []
    for i in range(2):  # two copies of the student; the router decides which sees which path
        d = os.path.join(out_dir, "init", f"student{i}")
        shutil.copytree(M.asset_path(M.STUDENT), d)
        student_dirs.append(d)
    qc = QRDistillConfig(input_path=questions_path, output_dir=out_dir, paths_input=paths_file,
                         students=student_dirs, student_names=["s0", "s1"], routing=routing,
                         router_encoder=M.asset_path(M.META_PROVER) if routing == "learned" else None,
                         max_steps=cfg.qr_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                         device="cpu", save_every=0, progress=False, max_length=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        summary = qr_run(qc)
    accs = {}
    for name in ("s0", "s1"):
        model, tok = load_causal_lm(os.path.join(out_dir, "students", name))
        accs[name] = M.evaluate_traces(model, tok, eval_probs)["accuracy"]
    # share of the paths each student was routed at the end (learned routing only)
    shares = {name: round(v, 3) for style in (summary.get("routing") or {}).values()
              for name, v in style.get("top_share", {}).items()}
    return {"students": accs, "accuracy": max(accs.values()), "mean_accuracy": sum(accs.values()) / len(accs),
            "shares": shares}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
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
    if all(k in rows for k in ("cord", "greedy", "curation")) and rows["greedy"]["accuracy"] < rows["curation"]["accuracy"]:
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


def write_report(cfg: DemoConfig, result: dict) -> str:
    rows = result["rows"]
    lines = ["# distillkit demo: the four methods on the tiny reasoning world", "",
             f"Seeds and sizes: `{json.dumps(asdict(cfg))}`; torch threads {cfg.threads}; "
             f"run time {result['elapsed_s']:.0f} s. Every number below comes from this run.", "",
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


def run(cfg: DemoConfig) -> dict:
    """Runs the selected sections; returns {"rows": {name: {"accuracy", "detail", ...}}, "report", ...}."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        os.makedirs(os.path.join(cfg.out, "traces"), exist_ok=True)
        distill, evals = split_questions(cfg)
        q_distill = _write_jsonl(os.path.join(cfg.out, "distill_questions.jsonl"), question_rows(distill))
        _write_jsonl(os.path.join(cfg.out, "eval_questions.jsonl"), question_rows(evals))
        rows: dict[str, dict] = {}
        singles = single_teacher_traces(cfg, distill)
        for name, s in singles.items():
            rows[f"trace: {name}"] = {"accuracy": s["accuracy"], "detail": "its own greedy traces"}
        cord_runs = {}
        if "cord" in cfg.sections:
            cord_runs = run_cord_methods(cfg, q_distill)
            for method, s in cord_runs.items():
                s.update(step_check(s["path"]))
                rows[method] = {"accuracy": s["accuracy"], "lucky": s["lucky"],
                                "detail": f"trace accuracy; every step right {s['all_steps_ok']:.3f}; "
                                          f"{s['lucky']} right answers after a wrong step; mean predictive "
                                          f"perplexity score {s['mean_predictive_perplexity']:.3f}; "
                                          f"{s['mean_tokens_generated']:.0f} teacher tokens/question; "
                                          f"{s['elapsed_s']:.0f} s"}
        teacher_paths = [singles[n]["path"] for n in M.TEACHERS]
        if "sft" in cfg.sections or "mot" in cfg.sections:
            base, tok = M.load_model(M.STUDENT)
            r = M.evaluate_traces(base, tok, evals)
            rows["student-base (no distillation)"] = {"accuracy": r["accuracy"], "detail": "trained on 2-step problems"}
        if "sft" in cfg.sections:
            for method in ("cord", "greedy", "curation", "random"):
                r = sft_student(cfg, f"sft-{method}", correct_examples([cord_runs[method]["path"]]), evals)
                rows[f"sft: {method}"] = {"accuracy": r["accuracy"], "detail": _sft_detail(r)}
        if "mot" in cfg.sections:
            best = max(M.TEACHERS, key=lambda n: singles[n]["accuracy"])
            r = sft_student(cfg, "sft-best-teacher", correct_examples([singles[best]["path"]]), evals)
            rows["sft: best single teacher"] = {"accuracy": r["accuracy"],
                                                "detail": f"{best}: " + _sft_detail(r)}
            r = sft_student(cfg, "sft-union", correct_examples(teacher_paths), evals)
            rows["sft: union of teachers"] = {"accuracy": r["accuracy"], "detail": _sft_detail(r)}
            r = run_mot(cfg, teacher_paths, evals)
            rows["mot"] = {"accuracy": r["accuracy"],
                           "detail": f"{cfg.mot_rounds} rounds x {len(M.TEACHERS)} branches x "
                                     f"{max(1, cfg.sft_steps // cfg.mot_rounds)} steps, average merge; one seed"}
        if "vcrd" in cfg.sections:
            best = max(M.TEACHERS, key=lambda n: singles[n]["accuracy"])
            r = run_vcrd_section(cfg, best, singles[best]["path"], q_distill, evals)
            start = (f"the student after {cfg.vcrd_sft_steps} SFT steps on {best}'s correct traces"
                     if cfg.vcrd_sft_steps else "student-base")
            rows["vcrd: start"] = {"accuracy": r["start"], "detail": start}
            for weighting in ("clamped_ratio", "uniform"):
                detail = (f"from vcrd: start; teacher {best}, {cfg.vcrd_steps} steps, PRM-free validity; mean of "
                          "seeds " + " ".join(f"{a:.3f}" for a in r[weighting]["per_seed"]))
                rows[f"vcrd: {weighting}"] = {"accuracy": r[weighting]["accuracy"], "detail": detail}
        if "qr" in cfg.sections:
            for routing in ("learned", "random"):
                r = run_qr(cfg, routing, q_distill, teacher_paths, evals)
                detail = f"best of 2 students ({r['students']})"
                if r["shares"]:
                    detail += f"; paths routed at the end: {r['shares']}"
                rows[f"qr: {routing} routing"] = {"accuracy": r["accuracy"], "detail": detail,
                                                  "shares": r["shares"]}
        result = {"rows": rows, "cord": {k: {kk: v[kk] for kk in ("accuracy", "mean_predictive_perplexity",
                                                                 "mean_tokens_generated", "teacher_share")}
                                         for k, v in cord_runs.items()},
                  "config": asdict(cfg), "elapsed_s": time.perf_counter() - t0}
        result["report"] = write_report(cfg, result)
        with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        return result
    finally:
        torch.set_num_threads(threads)


def format_table(rows: dict[str, dict]) -> str:
    width = max(len(k) for k in rows) + 2
    out = [f"{'row':<{width}} {'accuracy':>8}  detail"]
    out += [f"{k:<{width}} {v['accuracy']:8.3f}  {v.get('detail', '')}" for k, v in rows.items()]
    return "\n".join(out)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="distillkit demo", description=__doc__.split("\n\n")[0])
    defaults = DemoConfig.__dataclass_fields__
    for name in ("out", "n_distill", "n_eval", "beam_size", "sft_steps", "sft_seeds", "batch_size", "lr", "mot_rounds",
                 "vcrd_steps", "vcrd_sft_steps", "vcrd_lr", "vcrd_temperature", "qr_steps", "seed", "threads"):
        f = defaults[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="which parts to run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would drown the log
    hf_logging.set_verbosity_error()   # the meta-prover loaded as QR's encoder reports its unused lm_head
    cfg = DemoConfig(**{k: (tuple(v) if k == "sections" else v) for k, v in vars(args).items()})
    result = run(cfg)
    print(format_table(result["rows"]))
    print()
    print("\n".join(check_orderings(result["rows"])))
    print(f"\nreport: {result['report']} ({result['elapsed_s']:.0f} s)")
    return 0
