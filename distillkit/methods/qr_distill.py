"""QR-Distill: quality-filtered routing of diverse reasoning paths with mutual-student distillation.

After the seed "Learning from Diverse Reasoning Paths with Routing and Collaboration":

1. **Paths.** Teachers answer every question in several styles (vanilla, chain-of-thought,
   tree-of-thought, program-based, backward, fact-retrieval; the prompt templates are configurable)
   through any teacher backend (``hf`` or ``vllm``). Alternatively ``paths_input`` supplies paths
   written elsewhere. Every path is one JSONL record in ``<output_dir>/paths.jsonl``, appended whole,
   so an interrupted run resumes where it stopped.
2. **Quality filter.** (a) the final answer, read with the robust extractor shared with CoRD
   ("The final answer is", \\boxed{}, last number), must match the ground truth; (b) an LLM judge (any
   teacher backend, configurable prompt, yes/no or score verdict) must accept the reasoning. Both
   verdicts are recorded per path; ``filter_answer`` / ``filter_judge`` switch them off (ablations).
3. **Routing.** A frozen Hugging Face encoder mean-pools each path's text; an MLP and a
   straight-through Gumbel-softmax assign it to one (top-k) of S students; the assignment multiplies
   each student's per-path loss, so the router learns from the students' losses; an entropy term on
   the mean assignment keeps students evenly used. ``routing`` = random | all are the ablations.
4. **Mutual distillation.** Per-student projections of the last hidden states into a shared space,
   competence scores, a soft ensemble and an MSE alignment (``mutual``: off is the ablation).

The exact formulas are in :mod:`distillkit.methods.qr_router`. Students may differ in architecture,
size and tokenizer; LoRA through ``peft`` with ``lora_r > 0``.

    distillkit qr-distill --config configs/qr_distill.yaml

Outputs in ``output_dir``: paths.jsonl, trainer_state.pt + metrics.jsonl (the shared trainer: a
rerun resumes), students/<name>/ (Hugging Face checkpoints), router.pt, qr_summary.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from distillkit._errors import InputError
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.data import DEFAULT_PROMPT, Example, fill_prompt
from distillkit.methods.qr_router import ROUTINGS
from distillkit.pipeline.runs import begin_dir_run, config_values, write_json_atomic
from distillkit.pipeline.train import TrainConfig, torch_device, train_field, with_train_options
from distillkit.teachers.base import Teacher

log = logging.getLogger(__name__)

_FINAL = 'End with "The final answer is X." where X is the answer.'
STYLE_TEMPLATES: dict[str, str] = {
    "vanilla": "Question: {question}\nAnswer the question. " + _FINAL + "\n",
    "chain-of-thought": "Question: {question}\nThink step by step and write out each step of your reasoning. "
                        + _FINAL + "\n",
    "tree-of-thought": "Question: {question}\nPropose a few different ways to approach the problem, judge briefly "
                       "which one is most promising, follow it to the end, and check the result. " + _FINAL + "\n",
    "program-based": "Question: {question}\nWrite a short Python program whose output is the answer, then state "
                     "what the program prints. " + _FINAL + "\n",
    "backward": "Question: {question}\nReason backwards: start from what is asked, work out what is needed to "
                "obtain it, and continue until you reach the given facts; then compute forwards. " + _FINAL + "\n",
    "fact-retrieval": "Question: {question}\nFirst list the facts, definitions and formulas that the question "
                      "needs, then use them to reach the answer. " + _FINAL + "\n",
}
DEFAULT_STYLES = list(STYLE_TEMPLATES)
DEFAULT_JUDGE_PROMPT = (
    "You are grading a worked solution.\nQuestion: {question}\nReference answer: {answer}\n"
    "Solution:\n{response}\n\nIs the reasoning sound, with every step correct and leading to the final answer "
    "(not reaching it by luck or by a wrong argument)? Reply with yes or no.\nVerdict:")
JUDGE_MODES = ("yes_no", "score")
BACKENDS = ("hf", "vllm")
PATHS_NAME = "paths.jsonl"
SUMMARY_NAME = "qr_summary.json"
ROUTER_NAME = "router.pt"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@with_train_options
@dataclass
class QRDistillConfig:
    # data
    input_path: str = _help("questions JSONL, one {id, question, answer} per line", default="")
    output_dir: str = _help("run directory: paths.jsonl, checkpoint, metrics, students/, summary", default="qr-run")
    paths_input: str | None = _help("paths written elsewhere, JSONL {question, answer, response[, id, style, "
                                    "teacher]}: used instead of generating with teachers", default=None)
    limit: int | None = _help("use at most this many input questions (or paths_input records; None: all)",
                              default=None)
    # path generation
    teachers: list[str] = _help("teacher checkpoints (paths or Hub ids) that write the paths", default_factory=list)
    teacher_names: list[str] | None = _help("names of the teachers in records (default: paths)", default=None)
    teacher_backend: str = _help("hf | vllm", default="hf")
    styles: list[str] = _help("prompt styles, each a key of the built-in or style_templates templates",
                              default_factory=lambda: list(DEFAULT_STYLES))
    style_templates: dict[str, str] | None = _help("extra or replacement style templates (YAML mapping name -> "
                                                   "template with {question})", default=None)
    paths_per_style: int = _help("paths per (question, style, teacher)", default=1)
    max_new_tokens: int = _help("teacher tokens per path", default=1024)
    temperature: float = _help("teacher sampling temperature (0: greedy)", default=0.7)
    stop: list[str] | None = _help("stop strings for path generation (default: EOS only)", default=None)
    gen_dtype: str = _help("dtype of the teachers and the judge (hf): float32 | bfloat16 | float16 | auto",
                           default="float32")
    gen_batch_size: int = _help("rows per generate call (hf teachers and judge)", default=16)
    # quality filtering
    judge: str | None = _help("LLM-as-judge checkpoint (any teacher backend); None: no judge pass", default=None)
    judge_backend: str = _help("hf | vllm", default="hf")
    judge_prompt: str = _help("judge prompt with {question}, {answer}, {response}", default=DEFAULT_JUDGE_PROMPT)
    judge_mode: str = _help("yes_no (first yes/no word) | score (first number, kept if >= judge_threshold)",
                            default="yes_no")
    judge_threshold: float = _help("score mode: lowest accepted score", default=7.0)
    judge_max_new_tokens: int = _help("tokens of the judge's verdict", default=16)
    filter_answer: bool = _help("keep only paths whose final answer matches the ground truth", default=True)
    filter_judge: bool = _help("keep only paths the judge accepts (when a judge is set)", default=True)
    # students
    students: list[str] = _help("S >= 2 student checkpoints (any architectures / sizes / tokenizers)",
                                default_factory=list)
    student_names: list[str] | None = _help("names of the students (default: directory names)", default=None)
    prompt_template: str = _help("student prompt with {question}", default=DEFAULT_PROMPT)
    use_style_prompt: bool = _help("train students on the style prompt the path was written for instead",
                                   default=False)
    max_length: int = _help("truncate a student's prompt + path to this many tokens", default=1024)
    lora_r: int = _help("LoRA rank through peft (0: full fine-tuning)", default=0)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_targets: list[str] = _help("module names LoRA adapts", default_factory=lambda: ["q_proj", "v_proj"])
    # routing
    routing: str = _help("learned (router) | random (uniform top-k) | all (every student, every path)",
                         default="learned")
    router_encoder: str | None = _help("frozen Hugging Face encoder checkpoint for routing='learned'", default=None)
    encoder_max_length: int = _help("encoder tokens per path", default=512)
    router_hidden: int = _help("hidden width of the router MLP", default=256)
    route_top_k: int = _help("students each path is routed to", default=1)
    gumbel_tau: float = _help("Gumbel-softmax temperature", default=1.0)
    router_lr: float | None = _help("router learning rate (default: lr)", default=None)
    # losses
    mutual: bool = _help("mutual-student distillation (off: ablation)", default=True)
    entropy_reg: bool = _help("entropy regularisation of the mean assignment (off: ablation)", default=True)
    lambda_1: float = _help("weight of the mutual loss (eq. 9)", default=0.1)
    lambda_2: float = _help("weight of the balance (entropy) loss (eq. 9)", default=0.01)
    shared_dim: int | None = _help("D, the shared space of the mutual loss (default: largest student hidden size)",
                                   default=None)
    normalize_shared: bool = _help("rescale shared representations to norm sqrt(D) (avoids collapse to 0)",
                                   default=True)
    competence_tau: float = _help("temperature of the competence target softmax(-ce / tau)", default=1.0)
    # the shared trainer's options (flat in YAML and flags; batch_size = paths per micro-batch, lr = the students',
    # projections' and competence regressor's rate; seed also drives routing noise and generation seeds)
    train: TrainConfig = train_field(max_steps=1000, lr=1e-5, save_every=100)
    device: str = _help("auto | cpu | cuda | cuda:N", default="auto")
    # evaluation
    eval_data: str | None = _help("JSONL {id, question, answer}: each student's answer accuracy after training",
                                  default=None)
    eval_limit: int = _help("at most this many eval questions", default=200)
    eval_max_new_tokens: int = _help("generation budget per eval answer", default=512)
    overwrite: bool = _help("when output_dir holds a run started with a different config: move it aside "
                            "(<output_dir>.replaced-<time>) and start afresh instead of refusing", default=False)

    def __post_init__(self):
        for name in ("teachers", "students", "styles", "lora_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name}: expected a list of non-empty strings, got {value!r}")
            else:
                setattr(self, name, list(value))
        if not self.output_dir:
            raise ValueError("output_dir: expected a directory path")
        if not self.input_path and not self.paths_input:
            raise ValueError("input_path: a questions JSONL is required (or paths_input with ready paths)")
        if not self.teachers and not self.paths_input:
            raise ValueError("teachers: at least one teacher is required to generate paths (or give paths_input)")
        if self.teacher_names is not None and len(self.teacher_names) != len(self.teachers):
            raise ValueError(f"teacher_names: expected {len(self.teachers)} names (one per teacher), "
                             f"got {len(self.teacher_names)}")
        for name in ("teacher_backend", "judge_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {BACKENDS}")
        if self.style_templates is not None:
            if not isinstance(self.style_templates, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.style_templates.items()):
                raise TypeError(f"style_templates: expected a mapping of style name -> template, "
                                f"got {type(self.style_templates).__name__}")
            for k, v in self.style_templates.items():
                if "{question}" not in v:
                    raise ValueError(f"style_templates[{k!r}]: the template must contain {{question}}")
        if not self.styles:
            raise ValueError("styles: expected at least one style")
        known = self.templates()
        unknown = [s for s in self.styles if s not in known]
        if unknown:
            raise ValueError(f"styles: unknown style(s) {unknown}; known: {sorted(known)} "
                             "(add templates with style_templates)")
        if len(set(self.styles)) != len(self.styles):
            raise ValueError(f"styles: duplicates in {self.styles}")
        for name in ("paths_per_style", "max_new_tokens", "gen_batch_size", "judge_max_new_tokens", "max_length",
                     "encoder_max_length", "router_hidden", "route_top_k", "eval_limit", "eval_max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        for name in ("lora_r",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: expected an integer >= 0")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ValueError(f"limit={self.limit!r}: expected an integer >= 0 or None")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature={self.temperature!r}: expected a number in [0, 100] (0 is greedy)")
        if self.judge_mode not in JUDGE_MODES:
            raise ValueError(f"judge_mode={self.judge_mode!r}: expected one of {JUDGE_MODES}")
        if "{response}" not in self.judge_prompt:
            raise ValueError("judge_prompt: must contain {response} (and usually {question}, {answer})")
        if not math.isfinite(self.judge_threshold):
            raise ValueError(f"judge_threshold={self.judge_threshold!r}: expected a finite number")
        if len(self.students) < 2:
            raise ValueError(f"students: QR-Distill needs at least 2 students, got {len(self.students)}")
        if self.student_names is not None:
            if len(self.student_names) != len(self.students):
                raise ValueError(f"student_names: expected {len(self.students)} names, got {len(self.student_names)}")
            if len(set(self.student_names)) != len(self.student_names):
                raise ValueError(f"student_names: names must be distinct, got {self.student_names}")
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template: must contain {question}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r}: expected one of {ROUTINGS}")
        if self.routing == "learned" and not self.router_encoder:
            raise ValueError("router_encoder: routing='learned' needs a frozen encoder checkpoint "
                             "(or choose routing='random' / 'all')")
        if self.route_top_k > len(self.students):
            raise ValueError(f"route_top_k={self.route_top_k}: at most the number of students ({len(self.students)})")
        for name in ("gumbel_tau", "competence_tau", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r}: expected a positive number")
        if self.router_lr is not None and not (self.router_lr > 0 and math.isfinite(self.router_lr)):
            raise ValueError(f"router_lr={self.router_lr!r}: expected a positive number or None")
        for name in ("lambda_1", "lambda_2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r}: expected a number >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: expected a number in [0, 1)")
        if self.shared_dim is not None and (not isinstance(self.shared_dim, int) or self.shared_dim < 1):
            raise ValueError(f"shared_dim={self.shared_dim!r}: expected an integer >= 1 or None")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")

    def templates(self) -> dict[str, str]:
        return {**STYLE_TEMPLATES, **(self.style_templates or {})}

    def names(self) -> list[str]:
        return list(self.teacher_names) if self.teacher_names else list(self.teachers)

    def student_labels(self) -> list[str]:
        if self.student_names:
            return list(self.student_names)
        base = [os.path.basename(os.path.normpath(p)) or f"student{i}" for i, p in enumerate(self.students)]
        return base if len(set(base)) == len(base) else [f"s{i}-{b}" for i, b in enumerate(base)]

    def paths_file(self) -> str:
        return os.path.join(self.output_dir, PATHS_NAME)

    def judging(self) -> bool:
        return bool(self.judge)


# ----------------------------------------------------------------------------------------------
# 1. Paths
# ----------------------------------------------------------------------------------------------
def path_key(qid: Any, style: str, teacher: str, sample: int) -> str:
    return f"{qid}|{style}|{teacher}|{sample}"


def make_path_record(q: dict, *, style: str, teacher: str, sample: int, prompt: str, response: str,
                     key: str | None = None) -> dict:
    """One path record with its final-answer verdict (the judge's fields are added by judge_paths)."""
    from distillkit.methods.cord import answers_match, extract_answer

    final = extract_answer(response)
    return {"id": key or path_key(q["id"], style, teacher, sample), "qid": q["id"], "question": q["question"],
            "answer": q["answer"], "style": style, "teacher": teacher, "sample": sample, "prompt": prompt,
            "response": response, "final_answer": final, "answer_correct": answers_match(final, q["answer"])}


def propose_paths(q: dict, teachers: Sequence[Teacher], cfg: QRDistillConfig, pending: set[str]) -> list[dict]:
    """Every teacher writes ``paths_per_style`` paths of question ``q`` in every style; returns the
    records whose key is in ``pending`` (seeds depend only on the question and teacher, so a resumed
    run regenerates exactly the missing ones)."""
    from distillkit.methods.cord import question_seed

    templates, names, out = cfg.templates(), cfg.names(), []
    for t, teacher in enumerate(teachers):
        styles = [s for s in cfg.styles
                  if any(path_key(q["id"], s, names[t], j) in pending for j in range(cfg.paths_per_style))]
        if not styles:
            continue
        prompts = [fill_prompt(templates[s], question=q["question"]) for s in styles]
        props = teacher.propose(prompts, n=cfg.paths_per_style, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop,
                                temperature=cfg.temperature, seed=question_seed(cfg.train.seed, q["id"]) + 7919 * t)
        for style, prompt, row in zip(styles, prompts, props):
            for j, prop in enumerate(row):
                key = path_key(q["id"], style, names[t], j)
                if key in pending:
                    out.append(make_path_record(q, style=style, teacher=names[t], sample=j, prompt=prompt,
                                                response=prop.text))
    return out


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_SCORE = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_judgement(text: str, *, mode: str = "yes_no", threshold: float = 7.0) -> tuple[bool | None, float | None]:
    """(verdict, score) from a judge's output; (None, None) when it cannot be read.

    yes_no: the first standalone "yes" / "no" (any case) gives score 1 / 0.
    score: the first number is the score; the verdict is score >= threshold."""
    if mode == "yes_no":
        m = _YES_NO.search(text)
        if m is None:
            return None, None
        yes = m.group(1).lower() == "yes"
        return yes, float(yes)
    if mode == "score":
        m = _SCORE.search(text)
        if m is None:
            return None, None
        score = float(m.group(0))
        return score >= threshold, score
    raise ValueError(f"mode={mode!r}: expected one of {JUDGE_MODES}")


def judge_paths(judge: Teacher, records: list[dict], cfg: QRDistillConfig) -> list[dict]:
    """Adds judge_output, judge_score and judge_valid (None: unreadable verdict) to every record."""
    if not records:
        return records
    prompts = [fill_prompt(cfg.judge_prompt, question=r["question"], answer=r["answer"], response=r["response"])
               for r in records]
    outs = judge.propose(prompts, n=1, max_new_tokens=cfg.judge_max_new_tokens, stop=None, temperature=0.0)
    for rec, (prop,) in zip(records, outs):
        valid, score = parse_judgement(prop.text, mode=cfg.judge_mode, threshold=cfg.judge_threshold)
        rec.update(judge_output=prop.text, judge_score=score, judge_valid=valid)
    return records


def imported_records(cfg: QRDistillConfig) -> list[dict]:
    """Path records built from ``paths_input`` (answer verdicts recomputed, judge fields not yet set).
    A record without "id" is keyed ``path<i>`` (its index among the file's records); one without a
    reference answer raises InputError naming its line."""
    from distillkit.pipeline.data import check_reference_answer, read_jsonl_lines

    out, seen = [], set()
    for i, (lineno, rec) in enumerate(read_jsonl_lines(cfg.paths_input)):
        where = f"{cfg.paths_input}:{lineno}"
        missing = [k for k in ("question", "answer", "response") if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field(s) {missing}; expected {{question, answer, response}}")
        check_reference_answer(rec, where)
        style = str(rec.get("style", "given"))
        key = str(rec.get("id", f"path{i}"))
        if key in seen:
            raise InputError(f"{where}: duplicate id {key!r}")
        seen.add(key)
        q = {"id": rec.get("qid", key), "question": rec["question"], "answer": rec["answer"]}
        prompt = rec.get("prompt") or (fill_prompt(cfg.templates()[style], question=rec["question"])
                                       if style in cfg.templates() else "")
        out.append(make_path_record(q, style=style, teacher=str(rec.get("teacher", "given")), sample=0,
                                    prompt=prompt, response=str(rec["response"]), key=key))
    if cfg.limit is not None:
        out = out[:cfg.limit]
    return out


def _load_generators(cfg: QRDistillConfig, need_teachers: bool, need_judge: bool):
    from distillkit.teachers import load_teacher

    def kw(backend):
        if backend == "hf":
            return dict(dtype=cfg.gen_dtype, device=str(torch_device(cfg.device)), batch_size=cfg.gen_batch_size)
        return {} if cfg.gen_dtype == "float32" else dict(dtype=cfg.gen_dtype)

    teachers = [load_teacher(p, backend=cfg.teacher_backend, name=n, **kw(cfg.teacher_backend))
                for p, n in zip(cfg.teachers, cfg.names())] if need_teachers else []
    judge = load_teacher(cfg.judge, backend=cfg.judge_backend, name="judge", **kw(cfg.judge_backend)) \
        if need_judge else None
    return teachers, judge


def collect_paths(cfg: QRDistillConfig, *, teachers: Sequence[Teacher] | None = None,
                  judge: Teacher | None = None) -> list[dict]:
    """All path records of the run, generating (and judging) the missing ones into paths.jsonl.

    Records of one question are appended together after they are judged, each as one whole line,
    so an interrupted run loses at most the question it was on."""
    from tqdm.auto import tqdm

    from distillkit.methods.cord import read_questions
    from distillkit.pipeline.runs import append_record, read_records

    path = cfg.paths_file()
    os.makedirs(cfg.output_dir, exist_ok=True)
    done = read_records(path, key="id")
    if cfg.judging() and any("judge_valid" not in r for r in done):
        raise ValueError(f"{path}: holds paths without a judge verdict but judge={cfg.judge!r} is set; "
                         "use another output_dir (or judge=None)")
    done_keys = {r["id"] for r in done}
    wanted: set[str] = set()
    if cfg.paths_input:
        groups: dict[Any, list[dict]] = {}
        for rec in imported_records(cfg):
            wanted.add(rec["id"])
            if rec["id"] not in done_keys:
                groups.setdefault(rec["qid"], []).append(rec)
        work = [(qid, recs) for qid, recs in groups.items()]
    else:
        names = cfg.names()
        questions = read_questions(cfg.input_path, cfg.limit)
        work = []
        for q in questions:
            keys = {path_key(q["id"], s, n, j) for s in cfg.styles for n in names for j in range(cfg.paths_per_style)}
            wanted |= keys
            if keys - done_keys:
                work.append((q, keys - done_keys))
    log.info("qr-distill: %d path records on disk, %d question(s) to do", len(done), len(work))
    if work:
        need_judge = cfg.judging() and judge is None
        need_teachers = not cfg.paths_input and teachers is None
        if need_judge or need_teachers:
            loaded_t, loaded_j = _load_generators(cfg, need_teachers, need_judge)
            teachers = teachers if teachers is not None else loaded_t
            judge = judge if judge is not None else loaded_j
        if not cfg.paths_input and len(teachers) != len(cfg.teachers):
            raise ValueError(f"teachers: {len(teachers)} given but the config lists {len(cfg.teachers)}")
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(work), desc="qr-distill paths", unit="q", disable=not cfg.train.progress) as bar:
            for item, todo in work:  # (question, missing keys) or, for paths_input, (qid, records)
                recs = todo if cfg.paths_input else propose_paths(item, teachers, cfg, todo)
                if cfg.judging():
                    judge_paths(judge, recs, cfg)
                for rec in recs:
                    append_record(f, rec)
                bar.update(1)
    # Only this configuration's paths: records of styles or questions dropped since stay on disk, unused.
    return [r for r in read_records(path, key="id") if r["id"] in wanted]


# ----------------------------------------------------------------------------------------------
# 2. Quality filter
# ----------------------------------------------------------------------------------------------
def keep_path(rec: dict, cfg: QRDistillConfig) -> bool:
    """The filter: a correct final answer (filter_answer) and the judge's acceptance (filter_judge,
    when a judge is set; an unreadable verdict counts as rejection)."""
    if cfg.filter_answer and not rec.get("answer_correct", False):
        return False
    if cfg.filter_judge and cfg.judging() and rec.get("judge_valid") is not True:
        return False
    return True


def filter_paths(records: Sequence[dict], cfg: QRDistillConfig) -> tuple[list[dict], dict]:
    """(kept records, counts overall and per style)."""
    kept = [r for r in records if keep_path(r, cfg)]
    styles = sorted({r["style"] for r in records})
    stats = {"total": len(records), "answer_correct": sum(bool(r.get("answer_correct")) for r in records),
             "judge_valid": sum(r.get("judge_valid") is True for r in records) if cfg.judging() else None,
             "kept": len(kept),
             "kept_per_style": {s: sum(r["style"] == s for r in kept) for s in styles}}
    return kept, stats


# ----------------------------------------------------------------------------------------------
# 3-4. Students, router features, training
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathItem:
    """A training path: the student's example, its style, and its row in the router features."""
    example: Example
    style: str
    index: int


def build_items(records: Sequence[dict], cfg: QRDistillConfig) -> list[PathItem]:
    items = []
    for i, r in enumerate(records):
        prompt = r["prompt"] if cfg.use_style_prompt and r.get("prompt") else fill_prompt(cfg.prompt_template,
                                                                                    question=r["question"])
        items.append(PathItem(Example(str(r["id"]), prompt, r["response"], str(r["answer"]), True), r["style"], i))
    return items


class QRCollator:
    """Tokenises each path once per distinct student tokenizer; adds the router features.

    Returns {"student{s}": {input_ids, attention_mask, labels} [B, T_s] int64,
    "route_features": [B, d_enc] float32 (when features are given)}."""

    def __init__(self, tokenizers: Sequence, max_length: int, features: torch.Tensor | None = None):
        from distillkit.pipeline.data import SFTCollator

        self.tokenizers = list(tokenizers)
        self.collators = {id(t): SFTCollator(t, max_length) for t in self.tokenizers}
        self.features = features

    def __call__(self, items: Sequence[PathItem]) -> dict:
        examples = [it.example for it in items]
        made = {key: col(examples) for key, col in self.collators.items()}
        batch: dict[str, Any] = {f"student{s}": made[id(t)] for s, t in enumerate(self.tokenizers)}
        if self.features is not None:
            batch["route_features"] = self.features[torch.tensor([it.index for it in items])]
        return batch


def load_students(cfg: QRDistillConfig, device) -> tuple[list, list]:
    """(students, tokenizers), LoRA-wrapped when lora_r > 0."""
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import load_tokenizer

    students, tokenizers = [], []
    for path in cfg.students:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = load_tokenizer(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if cfg.lora_r > 0:
            model = apply_lora(model, cfg)
        students.append(model.to(device))
        tokenizers.append(tok)
    return students, tokenizers


def apply_lora(model, cfg: QRDistillConfig):
    """``model`` wrapped by peft with LoRA adapters (rank lora_r) on ``lora_targets``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(f"lora_r={cfg.lora_r} needs peft: pip install peft (or set lora_r: 0 for full "
                          f"fine-tuning); import failed: {exc}") from exc
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def load_encoder(path: str, device):
    """(frozen encoder, its tokenizer)."""
    from transformers import AutoModel

    from distillkit.teachers.hf import load_tokenizer

    encoder = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    encoder.requires_grad_(False)
    return encoder, load_tokenizer(path)


def route_features(cfg: QRDistillConfig, records: Sequence[dict], device, encoder=None) -> torch.Tensor:
    """Frozen-encoder features of every path's text (computed once: the encoder never changes)."""
    from distillkit.methods.qr_router import encode_texts

    if isinstance(encoder, tuple):
        enc, tok = encoder
    else:
        enc, tok = load_encoder(cfg.router_encoder, device)
    max_len = min(cfg.encoder_max_length, getattr(enc.config, "max_position_embeddings", cfg.encoder_max_length))
    return encode_texts(enc, tok, [r["response"] for r in records], batch_size=max(1, cfg.train.batch_size * 4),
                        max_length=max_len)


def loss_settings(cfg: QRDistillConfig):
    from distillkit.methods.qr_router import LossSettings

    return LossSettings(routing=cfg.routing, gumbel_tau=cfg.gumbel_tau, top_k=cfg.route_top_k, mutual=cfg.mutual,
                        entropy_reg=cfg.entropy_reg, lambda_1=cfg.lambda_1, lambda_2=cfg.lambda_2,
                        normalize_shared=cfg.normalize_shared, competence_tau=cfg.competence_tau)


def build_model(cfg: QRDistillConfig, students: Sequence, router_in_dim: int | None):
    from distillkit.methods.qr_router import QRDistillModel, student_hidden_size

    sizes = [student_hidden_size(m) for m in students]
    return QRDistillModel(students, shared_dim=cfg.shared_dim or max(sizes), router_in_dim=router_in_dim,
                          router_hidden=cfg.router_hidden, hidden_sizes=sizes)


def make_trainer(model, cfg: QRDistillConfig, items: Sequence[PathItem], collate):
    """The shared Trainer over the container (students + router + projections + regressor)."""
    from distillkit.methods.qr_router import qr_loss
    from distillkit.pipeline.train import Trainer

    tcfg = dataclasses.replace(cfg.train, output_dir=cfg.output_dir)
    settings = loss_settings(cfg)
    params = None
    if cfg.router_lr is not None and model.router is not None:  # the router learns at its own rate
        router_ids = {id(p) for p in model.router.parameters()}
        params = [{"params": [p for p in model.parameters() if id(p) not in router_ids]},
                  {"params": list(model.router.parameters()), "lr": cfg.router_lr}]
    trainer = Trainer(model, tcfg, items, collate, lambda m, b: qr_loss(m, b, settings), params=params)
    return trainer


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def save_students(model, tokenizers, cfg: QRDistillConfig) -> list[str]:
    """Each student as a Hugging Face checkpoint in students/<name> (LoRA merged into the weights)."""
    out = []
    for student, tok, name in zip(model.students, tokenizers, cfg.student_labels()):
        path = os.path.join(cfg.output_dir, "students", name)
        to_save = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
        tmp = path + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        to_save.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        out.append(path)
    return out


def routing_summary(model, features: torch.Tensor | None, items: Sequence[PathItem], names: Sequence[str]) -> dict:
    """Per style: the router's mean probability of each student and the share of paths whose
    most likely student it is (noise-free), over the training paths."""
    from distillkit.methods.qr_router import routing_probabilities

    if model.router is None or features is None:
        return {}
    probs = routing_probabilities(model.router, features)
    out = {}
    for style in sorted({it.style for it in items}):
        rows = torch.tensor([it.index for it in items if it.style == style])
        p = probs[rows]
        top = torch.bincount(p.argmax(-1), minlength=len(names)).float() / len(rows)
        out[style] = {"mean_prob": {n: float(v) for n, v in zip(names, p.mean(0))},
                      "top_share": {n: float(v) for n, v in zip(names, top)}, "paths": len(rows)}
    return out


def evaluate_students(model, tokenizers, cfg: QRDistillConfig) -> dict:
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.evaluate import answer_accuracy

    questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit)
    return {name: answer_accuracy(student, tok, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.eval_max_new_tokens)["accuracy"]
            for student, tok, name in zip(model.students, tokenizers, cfg.student_labels())}


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
# may differ between a run and its resume: how often a checkpoint / metrics line is written (the trainer
# resumes exactly from any checkpoint); overwrite and progress always may (distillkit.pipeline.runs)
RESUME_FREE_FIELDS = ("save_every", "log_every")


def check_inputs(cfg: QRDistillConfig) -> None:
    """Reads the questions (or paths_input) and eval_data, raising InputError naming the line of a bad
    record, before any model is loaded."""
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.methods.cord import read_questions

    if cfg.paths_input:
        imported_records(cfg)
    else:
        read_questions(cfg.input_path, cfg.limit)
    if cfg.eval_data:
        read_questions_for_eval(cfg.eval_data, cfg.eval_limit)


def run(cfg: QRDistillConfig, *, teachers: Sequence[Teacher] | None = None, judge: Teacher | None = None,
        encoder=None) -> dict:
    """Paths -> filter -> routed multi-student training -> saved students and summary.

    teachers / judge: ready Teacher objects instead of loading cfg.teachers / cfg.judge;
    encoder: a ready (encoder, tokenizer) pair instead of loading cfg.router_encoder.
    Returns the summary written to qr_summary.json.

    A rerun must use the config the run was started with (recorded in output_dir/run_config.json; see
    :mod:`distillkit.pipeline.runs`): another raises InputError naming the fields, unless ``overwrite`` (then the
    old output_dir is moved aside and the run starts afresh)."""
    device = torch_device(cfg.device)
    check_inputs(cfg)
    begin_dir_run(cfg, cfg.output_dir, free=RESUME_FREE_FIELDS, previous_from=SUMMARY_NAME)
    records = collect_paths(cfg, teachers=teachers, judge=judge)
    kept, path_stats = filter_paths(records, cfg)
    log.info("qr-distill: kept %d of %d paths", len(kept), len(records))
    if not kept:
        raise ValueError(f"no path passed the filter ({path_stats}); check {cfg.paths_file()} or relax "
                         "filter_answer / filter_judge")
    items = build_items(kept, cfg)
    features = route_features(cfg, kept, device, encoder) if cfg.routing == "learned" else None
    students, tokenizers = load_students(cfg, device)
    model = build_model(cfg, students, features.shape[1] if features is not None else None).to(device)
    if model.router is not None:
        model.router.fit_feature_scale(features.to(device))
    trainer = make_trainer(model, cfg, items, QRCollator(tokenizers, cfg.max_length, features))
    last = trainer.train()
    names = cfg.student_labels()
    summary = {"paths": path_stats, "train": last, "students": save_students(model, tokenizers, cfg),
               "routing": routing_summary(model, features, items, names)}
    if model.router is not None:
        torch.save({"router": model.router.state_dict(), "in_dim": features.shape[1], "hidden": cfg.router_hidden,
                    "students": names, "encoder": cfg.router_encoder}, os.path.join(cfg.output_dir, ROUTER_NAME))
    if cfg.eval_data:
        summary["eval"] = evaluate_students(model, tokenizers, cfg)
    summary["config"] = config_values(cfg)
    write_json_atomic(os.path.join(cfg.output_dir, SUMMARY_NAME), summary)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(QRDistillConfig, argv, "distillkit qr-distill",
                       "QR-Distill: quality-filtered routing of reasoning paths with mutual-student distillation.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    print(f"summary: {os.path.join(cfg.output_dir, SUMMARY_NAME)}")
    return 0
