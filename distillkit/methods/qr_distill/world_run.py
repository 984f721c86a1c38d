"""QR-Distill on the synthetic world: does the router keep both students in training, and does learned routing
still beat random routing?

Two copies of the world's student (``student-base``) are trained by QR-Distill on the three world teachers'
greedy traces (the style of a path is the teacher that wrote it), once per routing variant, with the
meta-prover as the router's frozen encoder; each student is then evaluated on held-out problems. Reported per
variant: both students' accuracies, their mean and best, and the split of the routes over the last tenth of
training (the share each student actually trained on, capacity limit included).

    python -m distillkit.methods.qr_distill.world_run --out /tmp/qr-world      # or world_check(...) in Python
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

# name -> QRDistillConfig overrides; "learned" is the default configuration (Bernoulli routing, capacity 1.25)
VARIANTS: dict[str, dict] = {
    "learned": {},
    "learned-no-capacity": {"router_capacity_factor": None},
    "gumbel": {"routing": "gumbel_top1"},
    "learned-no-mutual": {"mutual": False},
    "random": {"routing": "random"},
}


def _write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def world_paths(out_dir: str, n_distill: int) -> tuple[str, str, list]:
    """(paths JSONL, questions JSONL, held-out evaluation problems after the distillation ones): the three
    teachers' greedy traces of the first ``n_distill`` held-out world problems."""
    from distillkit.pipeline.data import fill_prompt
    from distillkit.pipeline.evaluate import generate
    from distillkit.world import models as M
    from distillkit.world import problems as W

    info = M.manifest()["eval"]
    held = W.generate_problems(info["n"], seed=info["seed"], num_ops=info["num_ops"])
    distill = held[:n_distill]
    rows = []
    for name in M.TEACHERS:
        model, tok = M.load_model(name)
        texts = generate(model, tok, [p.prompt for p in distill], max_new_tokens=M.max_new_tokens(), batch_size=128)
        rows += [{"id": f"{name}|{i}", "qid": str(i), "question": p.question, "answer": p.answer, "response": t,
                  "teacher": name, "style": name, "prompt": fill_prompt(W.PROMPT_TEMPLATE, question=p.question)}
                 for i, (p, t) in enumerate(zip(distill, texts))]
    questions = [{"id": str(i), "question": p.question, "answer": p.answer} for i, p in enumerate(distill)]
    return (_write_jsonl(os.path.join(out_dir, "paths.jsonl"), rows),
            _write_jsonl(os.path.join(out_dir, "questions.jsonl"), questions), held[n_distill:])


def run_variant(out_dir: str, name: str, overrides: dict, paths: str, questions: str, eval_probs, *, steps: int,
                batch_size: int, lr: float, seed: int) -> dict:
    """One QR-Distill run on two copies of the world student; its students' accuracies and routing split."""
    from distillkit.methods.qr_distill import QRDistillConfig
    from distillkit.methods.qr_distill import run as qr_run
    from distillkit.teachers.hf import load_causal_lm
    from distillkit.world import models as M
    from distillkit.world import problems as W

    run_dir = os.path.join(out_dir, f"{name}-seed{seed}")
    init_dir = os.path.join(out_dir, "init", f"{name}-seed{seed}")
    for d in (run_dir, init_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)
    students = []
    for i in range(2):  # two copies of the student: the router decides which sees which path
        d = os.path.join(init_dir, f"student{i}")
        shutil.copytree(M.asset_path(M.STUDENT), d)
        students.append(d)
    kw = dict(input_path=questions, output_dir=run_dir, paths_input=paths, students=students,
              student_names=["s0", "s1"], router_encoder=M.asset_path(M.META_PROVER), max_steps=steps,
              batch_size=batch_size, lr=lr, seed=seed, device="cpu", save_every=0, progress=False, max_length=64,
              prompt_template=W.PROMPT_TEMPLATE, log_every=1)
    kw.update(overrides)
    cfg = QRDistillConfig(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        summary = qr_run(cfg)
    accs = {}
    for student in ("s0", "s1"):
        model, tok = load_causal_lm(os.path.join(run_dir, "students", student))
        accs[student] = M.evaluate_traces(model, tok, eval_probs)["accuracy"]
    split = summary.get("routing_split") or {}
    return {"variant": name, "seed": seed, "students": accs, "mean_accuracy": sum(accs.values()) / len(accs),
            "best_accuracy": max(accs.values()), "split": split,
            "split_in_0.3_0.7": bool(split) and all(0.3 <= v <= 0.7 for v in split.values()),
            "kept_paths": summary["paths"]["kept"]}


def world_check(out_dir: str, *, variants: Sequence[str] = ("learned", "random"), seeds: Sequence[int] = (0,),
                n_distill: int = 160, n_eval: int = 192, steps: int = 120, batch_size: int = 16,
                lr: float = 2e-3) -> dict:
    """Runs QR-Distill on the world under each routing variant (names of ``VARIANTS``) and seed; returns
    {"runs": [...], "means": {variant: {mean_accuracy, best_accuracy, split}}, "base_accuracy",
    "learned_beats_random" (mean over seeds of the students' mean accuracy), "learned_split_ok"} and writes it to
    out_dir/world_check.json. Defaults follow the demo (160 distillation questions, 192 held out, 120 steps of 16
    paths at lr 2e-3)."""
    from distillkit.world import models as M

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {sorted(VARIANTS)}")
    os.makedirs(out_dir, exist_ok=True)
    paths, questions, rest = world_paths(out_dir, n_distill)
    eval_probs = rest[:n_eval]
    base_model, base_tok = M.load_model(M.STUDENT)
    base = M.evaluate_traces(base_model, base_tok, eval_probs)["accuracy"]
    runs = [run_variant(out_dir, v, VARIANTS[v], paths, questions, eval_probs, steps=steps, batch_size=batch_size,
                        lr=lr, seed=s) for v in variants for s in seeds]
    means = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        means[v] = {"mean_accuracy": sum(r["mean_accuracy"] for r in rs) / len(rs),
                    "best_accuracy": sum(r["best_accuracy"] for r in rs) / len(rs),
                    "split": {k: sum(r["split"].get(k, 0.0) for r in rs) / len(rs) for k in ("s0", "s1")}}
    out = {"base_accuracy": base, "runs": runs, "means": means,
           "settings": dict(n_distill=n_distill, n_eval=n_eval, steps=steps, batch_size=batch_size, lr=lr,
                            seeds=list(seeds))}
    if "learned" in means and "random" in means:
        out["learned_beats_random"] = means["learned"]["mean_accuracy"] > means["random"]["mean_accuracy"]
        out["learned_split_ok"] = all(r["split_in_0.3_0.7"] for r in runs if r["variant"] == "learned")
    from distillkit.pipeline.runs import write_json_atomic

    write_json_atomic(os.path.join(out_dir, "world_check.json"), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distillkit.methods.qr_distill.world_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variants", nargs="+", default=["learned", "random"], choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--n-distill", type=int, default=160)
    p.add_argument("--n-eval", type=int, default=192)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    result = world_check(args.out, variants=args.variants, seeds=args.seeds, steps=args.steps,
                         n_distill=args.n_distill, n_eval=args.n_eval)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
