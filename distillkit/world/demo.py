"""`distillkit demo`: the four methods end to end on the tiny reasoning world, on a laptop CPU.

Everything runs on the models shipped in distillkit/world/assets (three teachers that each err on
one kind of step, a meta-prover, a small student that has only seen 2-step problems) and on 3-step
problems none of them was trained on:

1. CoRD (beam) vs greedy vs curation vs random step choice at the same per-trace token budget, and the
   Integration and MCTS baselines (MCTS at CoRD's teacher tokens per question): trace answer accuracy,
   teacher and meta-prover tokens per question, the meta-prover's mean score on right and on wrong traces
   (the CoRD paper's Tables 2, 5 and 6 in miniature);
2. SFT of the student on each method's correct traces -> student accuracy (Table 3);
3. MoT rounds vs SFT on the best single teacher's data and on the union of all teachers' data
   (MoT Table 4);
4. VCRD with validity weights (clamped ratio) vs uniform weights, both from the student after a short
   SFT (VCRD Table 5);
5. QR-Distill with learned routing vs without (random routing).

It prints one table, writes report.md (+ plots) under the output folder, and says for each method which of
its paper's orderings hold on this run's numbers and, where one does not, why. Seeds are fixed and a second
run gives the same numbers.

The independent runs (each CoRD method, each teacher's traces, every SFT seed, MoT, each VCRD weighting
and seed, each QR routing) are jobs run side by side in ``threads`` worker processes, a job starting as
soon as the jobs it reads from are done. Every job runs on one torch thread, in the worker or (threads=1)
in this process, so the numbers do not depend on ``threads``: torch's intra-op threads would change
the last bits of reductions, and models this small gain little from them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from distillkit.pipeline.data import fill_prompt
from distillkit.world import models as M
from distillkit.world import problems as W
from distillkit.world.demo_jobs import Job, _children_cpu_s, job_times, run_jobs, section_times  # noqa: F401
from distillkit.world.demo_report import (  # noqa: F401
    PAPER_ORDERINGS,
    check_orderings,
    cord_table,
    explain,
    format_table,
    method_verdicts,
    ordering_results,
    plot_rows,
    write_report,
)

log = logging.getLogger(__name__)
SECTIONS = ("cord", "sft", "mot", "vcrd", "qr")
CORD_METHODS = ("cord", "greedy", "curation", "random")  # the CoRD runner's methods; students train on each
CORD_SEARCHES = ("integration", "mcts")  # the paper's other baselines (Tables 2 and 6): trace rows only
VCRD_WEIGHTINGS = ("clamped_ratio", "uniform")
QR_ROUTINGS = ("learned", "random")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on macOS / Windows
        return os.cpu_count() or 1


@dataclass
class DemoConfig:
    out: str = field(default="distillkit-demo", metadata={"help": "output folder (data, runs, report.md)",
                                                          "role": "output_dir"})
    n_distill: int = field(default=160, metadata={"help": "questions the methods write traces for"})
    n_eval: int = field(default=192, metadata={"help": "held-out questions the students are evaluated on"})
    beam_size: int = field(default=4, metadata={"help": "CoRD beams"})
    sft_steps: int = field(default=320, metadata={"help": "optimizer steps of every student SFT run"})
    sft_seeds: int = field(default=3, metadata={"help": "SFT runs (data orders) averaged per row"})
    batch_size: int = field(default=16, metadata={"help": "examples per SFT step"})
    lr: float = field(default=2e-3, metadata={"help": "student learning rate"})
    mot_rounds: int = field(default=3, metadata={"help": "MoT rounds (branch steps = sft_steps / rounds)"})
    vcrd_steps: int = field(default=60, metadata={"help": "VCRD optimizer steps per run (weighting x seed)"})
    vcrd_sft_steps: int = field(default=160, metadata={"help": "SFT steps of the student VCRD starts from (0: the base "
                                                                "student, on which VCRD barely moves)"})
    vcrd_lr: float = field(default=5e-4, metadata={
        "help": "VCRD learning rate (distillation on rollouts: lower than SFT)"})
    vcrd_temperature: float = field(default=0.7, metadata={"help": "VCRD rollout sampling temperature"})
    qr_steps: int = field(default=120, metadata={"help": "QR-Distill optimizer steps per routing"})
    cord_shard: int = field(default=40, metadata={
        "help": "questions per CoRD job (a method's jobs run side by side; each question is decoded under a seed "
                "of its own, so the split does not change the traces)"})
    cord_in_flight: int = field(default=40, metadata={
        "help": "questions a CoRD job decodes at once (one batched generate per teacher and step; the traces are "
                "those of one at a time)"})
    cord_score_batch: int = field(default=16, metadata={"help": "candidates per meta-prover forward in CoRD"})
    sections: list[str] = field(default_factory=lambda: list(SECTIONS), metadata={
        "help": f"which parts to run: some of {' '.join(SECTIONS)}", "show_default": True})
    seed: int = field(default=0, metadata={"help": "every seed derives from it"})
    threads: int = field(default_factory=lambda: usable_cores(), metadata={
        "help": "jobs run side by side, each in a worker process on one torch thread; the default is every "
                "core this process may use, and the numbers do not depend on it", "show_default": True})

    def __post_init__(self):
        for name in ("n_distill", "n_eval", "beam_size", "sft_steps", "sft_seeds", "batch_size", "mot_rounds",
                     "vcrd_steps",
                     "qr_steps", "cord_shard", "cord_in_flight", "cord_score_batch", "threads"):
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
def cord_settings(cfg: DemoConfig) -> dict:
    """The CoRD settings every CoRD row shares: the world's budgets, greedy teachers (not the paper's 0.6 / 4)."""
    return dict(teachers=[M.asset_path(n) for n in M.TEACHERS], teacher_names=list(M.TEACHERS),
                meta_prover=M.asset_path(M.META_PROVER), beam_size=cfg.beam_size, max_steps=W.NUM_OPS + 1,
                token_budget=M.max_new_tokens(), max_step_tokens=16, max_answer_tokens=8, seed=cfg.seed,
                temperature=0.0, n_curation=1, scoring_backend="reference", progress=False,
                questions_in_flight=cfg.cord_in_flight)


def cord_shard(cfg: DemoConfig, method: str, questions: list[dict], shard: int, mcts_budget: int | None = None
               ) -> dict:
    """One CoRD run (``method``: cord, greedy, curation, random, integration or mcts) over a slice of the
    distillation questions -> {"path": its records, "elapsed_s"}.

    CoRD decodes every question on its own, under a seed of its id (cord.question_seed), so the slices'
    records concatenated in order are those of one run over all the questions. Integration and MCTS run
    through the same runner (MCTS: at most ``mcts_budget`` teacher tokens per question, CoRD's mean in the
    demo; Integration: the first teacher merges the K traces).
    """
    from distillkit.methods import cord
    from distillkit.methods.cord.meta_prover import MetaProver
    from distillkit.teachers.hf import HFTeacher

    # one generate call per teacher and step serves every question in flight (beam_size rows each)
    rows = cfg.beam_size * cfg.cord_in_flight
    teachers = [HFTeacher.from_pretrained(M.asset_path(n), name=n, batch_size=rows) for n in M.TEACHERS]
    prover = MetaProver.from_pretrained(M.asset_path(M.META_PROVER), backend="reference",
                                        batch_size=cfg.cord_score_batch)
    stem = os.path.join(cfg.out, "traces", "shards", f"{method}-{shard}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    for old in (stem + ".jsonl", stem + ".jsonl.run_config.json"):
        if os.path.exists(old):
            os.remove(old)  # every number comes from this run
    c = cord.CordConfig(input_path=_write_jsonl(stem + ".questions.jsonl", questions), output_path=stem + ".jsonl",
                        method=method, mcts_token_budget=mcts_budget,
                        **cord_settings(cfg))
    t0 = time.perf_counter()
    cord.run(c, teachers=teachers, meta_prover=prover)
    return {"path": c.output_path, "elapsed_s": time.perf_counter() - t0}


def cord_merge(cfg: DemoConfig, method: str, shards: list[dict]) -> dict:
    """The records of a method's slices, in order, as traces/<method>.jsonl -> cord's summary of them +
    {"path", "elapsed_s": summed over the slices} + :func:`step_check` + :func:`score_by_outcome`; writes the
    hit-rate plot."""
    from distillkit.methods import cord
    from distillkit.pipeline.runs import merge_shard_records

    # in question order (a slice writes its records as its questions finish)
    records = merge_shard_records([s["path"] for s in shards], [str(i) for i in range(cfg.n_distill)])
    path = _write_jsonl(os.path.join(cfg.out, "traces", f"{method}.jsonl"), records)
    summary = cord.summarize(records, list(M.TEACHERS))
    summary["method"] = method
    cord.write_summary(summary, path + ".summary.json", os.path.join(cfg.out, f"cord_{method}_hit_rates.png"))
    summary.update(path=path, elapsed_s=round(sum(s["elapsed_s"] for s in shards), 1), **step_check(path),
                   **score_by_outcome(records))
    log.info("cord[%s]: accuracy %.3f, %.0f teacher / %.0f meta-prover tokens per question (%.0f s)", method,
             summary["accuracy"], summary["mean_tokens_generated"], summary["mean_meta_prover_tokens"],
             summary["elapsed_s"])
    return summary


def score_by_outcome(records: list[dict]) -> dict:
    """{"score_correct", "score_wrong": the mean meta-prover score (predictive perplexity of the right answer) of
    the traces whose final answer is right / wrong (None where there is none), "wrong": how many are wrong}.

    The mean over all traces says little here: the world's meta-prover gives a complete trace ~1 when it reaches
    the right answer and ~0 when not, so that mean equals the accuracy to three decimals; the two means apart
    show how well the score separates the traces."""
    def mean(xs):
        xs = [x for x in xs if isinstance(x, (int, float)) and x == x]
        return sum(xs) / len(xs) if xs else None

    right = [r.get("predictive_perplexity") for r in records if r.get("correct")]
    wrong = [r.get("predictive_perplexity") for r in records if not r.get("correct")]
    return {"score_correct": mean(right), "score_wrong": mean(wrong), "wrong": len(wrong)}


def step_check(path: str) -> dict:
    """Step-level truth of a CoRD output: {"all_steps_ok": fraction of traces whose every step is right,
    "well_formed": fraction of traces written in the world's step format, "lucky": traces with the right final
    answer reached through a wrong step}.

    Mod-10 products collapse (x * 0, even * 5), so a wrong running value can still end on the right
    answer; an answer-only score (the meta-prover's, the answer filter) cannot tell those traces apart.
    """
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    checks = [W.check_trace(r["question"], r["trajectory"]) for r in recs]
    return {"all_steps_ok": sum(c["all_steps_ok"] for c in checks) / max(1, len(checks)),
            "well_formed": sum(c["well_formed"] for c in checks) / max(1, len(checks)),
            "lucky": sum(c["answer_ok"] and not c["all_steps_ok"] for c in checks)}


def teacher_traces(cfg: DemoConfig, name: str, probs) -> dict:
    """One teacher's greedy traces of the distillation questions (its own dataset, for MoT/union) ->
    {"path", "accuracy"}."""
    from distillkit.pipeline.evaluate import generate

    model, tok = M.load_model(name)
    texts = generate(model, tok, [p.prompt for p in probs], max_new_tokens=M.max_new_tokens(), batch_size=128)
    rows = [{"id": str(i), "question": p.question, "answer": p.answer, "response": t}
            for i, (p, t) in enumerate(zip(probs, texts))]
    correct = [W.check_trace(p.question, t)["answer_ok"] for p, t in zip(probs, texts)]
    path = _write_jsonl(os.path.join(cfg.out, "traces", f"{name}.jsonl"), rows)
    return {"path": path, "accuracy": sum(correct) / len(correct)}


# ----------------------------------------------------------------------------------------------
# 2./3. student SFT and MoT
# ----------------------------------------------------------------------------------------------
def correct_examples(paths: list[str]):
    from distillkit.pipeline.answers import answers_match, extract_answer
    from distillkit.pipeline.data import load_examples

    ok = lambda resp, ans: answers_match(extract_answer(resp), ans)  # noqa: E731
    return [ex for p in paths for ex in load_examples(p, only_correct=True, is_correct=ok)]


def evaluate_student(cfg: DemoConfig, eval_probs) -> float:
    """Accuracy of student-base itself (no distillation)."""
    model, tok = M.load_model(M.STUDENT)
    return M.evaluate_traces(model, tok, eval_probs)["accuracy"]


def sft_seed(cfg: DemoConfig, name: str, trace_paths: list[str], seed: int, eval_probs) -> dict:
    """Fine-tunes student-base on the correct traces in ``trace_paths`` for sft_steps steps with data
    order ``seed`` -> {"examples", "accuracy"} (no correct trace: student-base's own accuracy)."""
    from distillkit.pipeline.data import SFTCollator, sft_loss
    from distillkit.pipeline.train import TrainConfig, Trainer

    examples = correct_examples(trace_paths)
    if not examples:
        return {"examples": 0, "accuracy": evaluate_student(cfg, eval_probs)}
    model, tok = M.load_model(M.STUDENT)
    tc = TrainConfig(output_dir=os.path.join(cfg.out, "runs", f"{name}-seed{seed}"), max_steps=cfg.sft_steps,
                     batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=10, min_lr_ratio=0.1, seed=seed,
                     progress=False, resume=False, log_every=max(1, cfg.sft_steps // 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Trainer(model, tc, examples, SFTCollator(tok), sft_loss).train()
    model.eval()
    return {"examples": len(examples), "accuracy": M.evaluate_traces(model, tok, eval_probs)["accuracy"]}


def sft_seeds(cfg: DemoConfig) -> range:
    """The SFT (and VCRD) seeds averaged per row: seed .. seed + sft_seeds - 1.

    Several seeds because a 0.1M-parameter student's accuracy after a few hundred steps moves by
    several points with the data order alone; one seed would rank equal data at random.
    """
    return range(cfg.seed, cfg.seed + cfg.sft_seeds)


def mean_of_seeds(per_seed: list[dict]) -> dict:
    """{"examples", "accuracy": mean over seeds, "per_seed": [accuracy, ...]} of sft_seed results."""
    accs = [r["accuracy"] for r in per_seed]
    return {"examples": per_seed[0]["examples"], "accuracy": sum(accs) / len(accs), "per_seed": accs}


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
             seed: int) -> float:
    """One VCRD run (``weighting``: clamped_ratio or uniform) from the model in ``student`` -> accuracy."""
    from distillkit.methods.vcrd import VcrdConfig
    from distillkit.methods.vcrd import run as vcrd_run
    from distillkit.teachers.hf import load_causal_lm

    out_dir = os.path.join(cfg.out, "runs", f"vcrd-{weighting}-seed{seed}")
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    vc = VcrdConfig(student=student, teacher=M.asset_path(teacher), prompts=prompts_path,
                    output_dir=out_dir, max_steps=cfg.vcrd_steps, batch_size=cfg.batch_size, lr=cfg.vcrd_lr,
                    warmup_steps=5,
                    rollout_tokens=M.max_new_tokens(), temperature=cfg.vcrd_temperature, weighting=weighting, seed=seed,
                    device="cpu", save_every=0, log_every=10, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        summary = vcrd_run(vc)
    model, tok = load_causal_lm(summary["final_model"])
    return M.evaluate_traces(model, tok, eval_probs)["accuracy"]


def vcrd_start(cfg: DemoConfig, teacher: str, teacher_traces: str, eval_probs) -> dict:
    """The student VCRD starts from -> {"model": its folder, "accuracy"}.

    The start is the student after vcrd_sft_steps of SFT on the teacher's correct traces (SFT, then
    on-policy distillation). From the base student VCRD barely moves: on 3-step prefixes the base student
    puts q < 1e-3 on the teacher's next token, and there the skew KL KL(p || alpha p + (1 - alpha) q)
    sits at its ceiling -log(alpha) with a gradient proportional to q (it vanishes), so the confidently
    wrong tokens are exactly the ones it cannot correct.
    """
    from distillkit.pipeline.data import SFTCollator, sft_loss
    from distillkit.pipeline.train import TrainConfig, Trainer, save_pretrained_atomic

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
    return {"model": start, "accuracy": M.evaluate_traces(model, tok, eval_probs)["accuracy"]}


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
                                 "prompt": fill_prompt(W.PROMPT_TEMPLATE, question=rec["question"])})
    # one file per routing: the two routings may run side by side
    paths_file = _write_jsonl(os.path.join(cfg.out, "traces", f"qr_paths-{routing}.jsonl"), rows)
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
    # the split the students trained on over the last tenth of the steps (capacity limit included)
    split = {name: round(v, 3) for name, v in (summary.get("routing_split") or {}).items()}
    return {"students": accs, "accuracy": max(accs.values()), "mean_accuracy": sum(accs.values()) / len(accs),
            "shares": shares, "split": split}




def mcts_budget(cord_summary: dict) -> int:
    """MCTS's teacher-token budget per question at equal cost: CoRD's mean teacher tokens per question (its
    reasoning and answer), rounded; the search's last expansion may overshoot it by up to K steps."""
    return max(1, round(cord_summary["mean_tokens_generated"]))


def _trace_path(cfg: DemoConfig, name: str) -> str:
    return os.path.join(cfg.out, "traces", f"{name}.jsonl")


def plan_jobs(cfg: DemoConfig, distill, evals, q_distill: str) -> list[Job]:
    """Every run of the selected sections as a Job, in the order the single-worker run takes them."""
    traces = tuple(f"trace: {n}" for n in M.TEACHERS)
    teacher_paths = [_trace_path(cfg, n) for n in M.TEACHERS]

    def best(done: dict) -> str:  # the teacher whose own traces are most often right (first on a tie)
        return max(M.TEACHERS, key=lambda n: done[f"trace: {n}"][0]["accuracy"])

    # Costs: rough CPU seconds per unit of work on one thread, only to order the jobs.
    sft_cost = 0.04 * cfg.sft_steps * cfg.batch_size / 16 + 0.02 * cfg.n_eval
    jobs = [Job(k, "teacher traces", teacher_traces, dict(cfg=cfg, name=n, probs=distill), cost=0.02 * cfg.n_distill)
            for k, n in zip(traces, M.TEACHERS)]
    if "cord" in cfg.sections:
        rows = question_rows(distill)
        slices = [rows[i:i + cfg.cord_shard] for i in range(0, len(rows), cfg.cord_shard)]
        for m in CORD_METHODS + CORD_SEARCHES:
            shards = tuple(f"cord: {m} shard{i}" for i in range(len(slices)))
            if m == "mcts":  # equal cost: the search may spend what CoRD spent per question on average
                jobs += [Job(k, "cord", cord_shard,
                             lambda done, qs=qs, i=i: dict(cfg=cfg, method="mcts", questions=qs, shard=i,
                                                           mcts_budget=mcts_budget(done["cord: cord"][0])),
                             deps=("cord: cord",), cost=0.6 * len(qs))
                         for i, (k, qs) in enumerate(zip(shards, slices))]
            else:
                jobs += [Job(k, "cord", cord_shard, dict(cfg=cfg, method=m, questions=qs, shard=i),
                             cost=0.6 * len(qs))  # measured: the beam costs little more than greedy
                         for i, (k, qs) in enumerate(zip(shards, slices))]
            jobs.append(Job(f"cord: {m}", "cord", cord_merge,
                            lambda done, m=m, shards=shards: dict(cfg=cfg, method=m,
                                                                  shards=[done[k][0] for k in shards]),
                            deps=shards, cost=1.0))
    if "sft" in cfg.sections or "mot" in cfg.sections:
        jobs.append(Job("student-base", "sft", evaluate_student, dict(cfg=cfg, eval_probs=evals),
                        cost=0.02 * cfg.n_eval))
    if "sft" in cfg.sections:
        jobs += [Job(f"sft: {m} seed{seed}", "sft", sft_seed,
                     dict(cfg=cfg, name=f"sft-{m}", trace_paths=[_trace_path(cfg, m)], seed=seed, eval_probs=evals),
                     deps=(f"cord: {m}",), cost=sft_cost)
                 for m in CORD_METHODS for seed in sft_seeds(cfg)]
    if "mot" in cfg.sections:
        jobs += [Job(f"sft: best single teacher seed{seed}", "mot", sft_seed,
                     lambda done, seed=seed: dict(cfg=cfg, name="sft-best-teacher", seed=seed, eval_probs=evals,
                                                  trace_paths=[_trace_path(cfg, best(done))]),
                     deps=traces, cost=sft_cost)
                 for seed in sft_seeds(cfg)]
        jobs += [Job(f"sft: union of teachers seed{seed}", "mot", sft_seed,
                     dict(cfg=cfg, name="sft-union", trace_paths=teacher_paths, seed=seed, eval_probs=evals),
                     deps=traces, cost=sft_cost)
                 for seed in sft_seeds(cfg)]
        jobs.append(Job("mot", "mot", run_mot, dict(cfg=cfg, teacher_paths=teacher_paths, eval_probs=evals),
                        deps=traces, cost=(len(M.TEACHERS) + 1) * sft_cost))
    if "vcrd" in cfg.sections:
        jobs.append(Job("vcrd: start", "vcrd", vcrd_start,
                        lambda done: dict(cfg=cfg, teacher=best(done), teacher_traces=_trace_path(cfg, best(done)),
                                          eval_probs=evals),
                        deps=traces, cost=0.5 * sft_cost))
        jobs += [Job(f"vcrd: {w} seed{seed}", "vcrd", run_vcrd,
                     lambda done, w=w, seed=seed: dict(cfg=cfg, weighting=w, teacher=best(done), prompts_path=q_distill,
                                                       eval_probs=evals, student=done["vcrd: start"][0]["model"],
                                                       seed=seed),
                     deps=(*traces, "vcrd: start"), cost=0.5 * cfg.vcrd_steps * cfg.batch_size / 16 + 0.02 * cfg.n_eval)
                 for w in VCRD_WEIGHTINGS for seed in sft_seeds(cfg)]
    if "qr" in cfg.sections:
        jobs += [Job(f"qr: {routing}", "qr", run_qr,
                     dict(cfg=cfg, routing=routing, questions_path=q_distill, teacher_paths=teacher_paths,
                          eval_probs=evals),
                     deps=traces, cost=0.1 * cfg.qr_steps * cfg.batch_size / 16 + 0.04 * cfg.n_eval)
                 for routing in QR_ROUTINGS]
    return jobs


CORD_ROW_WHAT = {"cord": "trace accuracy",
                 "greedy": "trace accuracy; B one-beam searches at equal cost, which at temperature 0 are one",
                 "curation": "trace accuracy",
                 "random": "trace accuracy; one of the teachers' complete traces, picked at random",
                 "integration": "trace accuracy; the first teacher merges the K greedy traces",
                 "mcts": "trace accuracy; UCT search with CoRD's mean teacher tokens per question as budget"}


def _score_text(s: dict) -> str:
    right = "no right answer" if s["score_correct"] is None else f"{s['score_correct']:.3f} on right answers"
    wrong = "no wrong one" if s["score_wrong"] is None else f"{s['score_wrong']:.3f} on the {s['wrong']} wrong"
    return f"{right}, {wrong}"


def collect_rows(cfg: DemoConfig, done: dict[str, tuple]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The report's rows (in the report's order) and the CoRD summaries from the finished jobs."""
    value = {k: v[0] for k, v in done.items()}
    rows: dict[str, dict] = {}
    for name in M.TEACHERS:
        rows[f"trace: {name}"] = {"accuracy": value[f"trace: {name}"]["accuracy"], "detail": "its own greedy traces"}
    cord_runs = {m: value[f"cord: {m}"] for m in CORD_METHODS + CORD_SEARCHES if f"cord: {m}" in value}
    for method, s in cord_runs.items():
        s["cpu_s"] = round(sum(v[3] for k, v in done.items() if k.startswith(f"cord: {method} shard")), 1)
        rows[method] = {"accuracy": s["accuracy"], "lucky": s["lucky"], "well_formed": s["well_formed"],
                        "teacher_tokens": s["mean_tokens_generated"],
                        "meta_prover_tokens": s["mean_meta_prover_tokens"],
                        "score_correct": s["score_correct"], "score_wrong": s["score_wrong"],
                        "detail": f"{CORD_ROW_WHAT[method]}; every step right {s['all_steps_ok']:.3f}; "
                                  f"{s['lucky']} right answers after a wrong step; meta-prover score "
                                  f"{_score_text(s)}; {s['mean_tokens_generated']:.0f} teacher / "
                                  f"{s['mean_meta_prover_tokens']:.0f} meta-prover tokens per question; "
                                  f"{s['elapsed_s']:.0f} s"}
    if "student-base" in value:
        rows["student-base (no distillation)"] = {"accuracy": value["student-base"],
                                                  "detail": "trained on 2-step problems"}
    seeds = sft_seeds(cfg)
    if "sft" in cfg.sections:
        for m in CORD_METHODS:
            r = mean_of_seeds([value[f"sft: {m} seed{seed}"] for seed in seeds])
            rows[f"sft: {m}"] = {"accuracy": r["accuracy"], "per_seed": r["per_seed"], "detail": _sft_detail(r)}
    best = max(M.TEACHERS, key=lambda n: value[f"trace: {n}"]["accuracy"])
    if "mot" in cfg.sections:
        r = mean_of_seeds([value[f"sft: best single teacher seed{seed}"] for seed in seeds])
        rows["sft: best single teacher"] = {"accuracy": r["accuracy"], "per_seed": r["per_seed"],
                                            "detail": f"{best}: " + _sft_detail(r)}
        r = mean_of_seeds([value[f"sft: union of teachers seed{seed}"] for seed in seeds])
        rows["sft: union of teachers"] = {"accuracy": r["accuracy"], "per_seed": r["per_seed"],
                                          "detail": _sft_detail(r)}
        rows["mot"] = {"accuracy": value["mot"]["accuracy"],
                       "detail": f"{cfg.mot_rounds} rounds x {len(M.TEACHERS)} branches x "
                                 f"{max(1, cfg.sft_steps // cfg.mot_rounds)} steps, average merge; one seed"}
    if "vcrd" in cfg.sections:
        start = (f"the student after {cfg.vcrd_sft_steps} SFT steps on {best}'s correct traces"
                 if cfg.vcrd_sft_steps else "student-base")
        rows["vcrd: start"] = {"accuracy": value["vcrd: start"]["accuracy"], "detail": start}
        for w in VCRD_WEIGHTINGS:
            accs = [value[f"vcrd: {w} seed{seed}"] for seed in seeds]
            detail = (f"from vcrd: start; teacher {best}, {cfg.vcrd_steps} steps, PRM-free validity; mean of "
                      "seeds " + " ".join(f"{a:.3f}" for a in accs))
            rows[f"vcrd: {w}"] = {"accuracy": sum(accs) / len(accs), "per_seed": accs, "detail": detail}
    if "qr" in cfg.sections:
        for routing in QR_ROUTINGS:
            r = value[f"qr: {routing}"]
            detail = f"best of 2 students ({r['students']}; mean {r['mean_accuracy']:.3f})"
            if r["shares"]:
                detail += f"; the router's first choice at the end: {r['shares']}"
            if r.get("split"):
                detail += f"; routes trained on over the last tenth of the steps: {r['split']}"
            rows[f"qr: {routing} routing"] = {"accuracy": r["accuracy"], "mean_accuracy": r["mean_accuracy"],
                                              "students": r["students"],
                                              "detail": detail, "shares": r["shares"], "split": r.get("split") or {}}
    return rows, cord_runs


def run(cfg: DemoConfig) -> dict:
    """Runs the selected sections -> {"rows": {name: {"accuracy", "detail", ...}}, "cord", "config",
    "timing": {"wall_s", "cpu_s", "workers", "cpu_count", "sections": {name: {"jobs", "cpu_s", "wall_s"}},
    "overhead_cpu_s", "jobs": {key: {"start_s", "wall_s", "cpu_s"}}}, "elapsed_s", "report"}; writes
    report.md and results.json under cfg.out.

    With threads > 1 the jobs run in spawned worker processes, which import the caller's main module:
    a script that calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    t0, cpu0, children0 = time.monotonic(), time.process_time(), _children_cpu_s()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the jobs run here when cfg.threads == 1; in workers on one thread too
    try:
        os.makedirs(os.path.join(cfg.out, "traces"), exist_ok=True)
        distill, evals = split_questions(cfg)
        q_distill = _write_jsonl(os.path.join(cfg.out, "distill_questions.jsonl"), question_rows(distill))
        _write_jsonl(os.path.join(cfg.out, "eval_questions.jsonl"), question_rows(evals))
        jobs = plan_jobs(cfg, distill, evals, q_distill)
        done = run_jobs(jobs, min(cfg.threads, len(jobs)))
        rows, cord_runs = collect_rows(cfg, done)
        sections = section_times(jobs, done)
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0 + _children_cpu_s() - children0
        timing = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "workers": min(cfg.threads, len(jobs)),
                  "cpu_count": usable_cores(), "sections": sections,
                  "overhead_cpu_s": round(cpu - sum(s["cpu_s"] for s in sections.values()), 1),
                  "jobs": job_times(jobs, done, t0)}
        keep = ("accuracy", "mean_predictive_perplexity", "score_correct", "score_wrong", "wrong",
                "mean_tokens_generated", "mean_meta_prover_tokens", "well_formed", "all_steps_ok", "teacher_share",
                "cpu_s")
        result = {"rows": rows, "cord": {k: {kk: v[kk] for kk in keep} for k, v in cord_runs.items()},
                  "config": asdict(cfg), "timing": timing, "elapsed_s": wall}
        result["report"] = write_report(cfg, result)
        with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        return result
    finally:
        torch.set_num_threads(threads)


def cli(argv: list[str] | None = None) -> int:
    from distillkit.pipeline.config import parse_config

    cfg = parse_config(DemoConfig, argv, "distillkit demo", __doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would drown the log
    hf_logging.set_verbosity_error()   # the meta-prover loaded as QR's encoder reports its unused lm_head
    result = run(cfg)
    print(format_table(result["rows"]))
    print()
    print("\n".join(method_verdicts(result["rows"])))
    t = result["timing"]
    print(f"\nreport: {result['report']} ({t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU, {t['workers']} workers)")
    return 0
