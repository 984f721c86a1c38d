"""QR-Distill's config (``QRDistillConfig``), its prompt styles and file names."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from distillkit.methods.qr_distill.router import (
    COMPETENCE_KINDS,
    LEARNED_ROUTINGS,
    MUTUAL_FORMS,
    MUTUAL_SCOPES,
    REGULARIZERS,
    ROUTINGS,
    canonical_routing,
)
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.data import DEFAULT_PROMPT
from distillkit.pipeline.generation import TeacherOptions
from distillkit.pipeline.train import TrainConfig, train_field, with_train_options

_FINAL = 'End with "The final answer is X." where X is the answer.'
# The six styles of the seed's Figure 2, worded here after its description (the figure's exact text was not
# available): each names the structure of the path it asks for; the backward style reasons forward to a
# candidate answer, then backward from it to verify it.
STYLE_TEMPLATES: dict[str, str] = {
    "vanilla": "Question: {question}\nReason about the problem and solve it. " + _FINAL + "\n",
    "chain-of-thought": "Question: {question}\nReason step by step, writing each step of the reasoning clearly before "
                        "the final answer. " + _FINAL + "\n",
    "tree-of-thought": "Question: {question}\nThink in a tree of thoughts: sketch several ways of solving the "
                       "problem, choose the most promising one, and follow it to the answer. " + _FINAL + "\n",
    "program-based": "Question: {question}\nSolve the problem with code: write a short program that prints the "
                     "answer, then state what it prints. " + _FINAL + "\n",
    "backward": "Question: {question}\nFirst reason forward from the given facts to a candidate answer. Then reason "
                "backward from that candidate answer to the given facts to verify it, and give the verified "
                "answer. " + _FINAL + "\n",
    "fact-retrieval": "Question: {question}\nFirst recall the facts from your knowledge that the question needs, "
                      "then reason from those facts to the answer. " + _FINAL + "\n",
}
DEFAULT_STYLES = list(STYLE_TEMPLATES)
# Section 2.3: the judge checks every step, flags hallucinated or spurious ones, and rates the path; paths
# with a flagged step or a low rating are dropped, and judge_keep_top keeps only the highest-rated ones.
RATING_JUDGE_PROMPT = (
    "You are grading a worked solution step by step.\nQuestion: {question}\nReference answer: {answer}\n"
    "Solution:\n{response}\n\nCheck every step. A step is hallucinated when it uses a fact, number or result that "
    "is neither given nor derived; it is spurious when it does not follow from the steps before it or does not "
    "lead toward the answer (a correct answer reached by luck or by a wrong argument). Reply with two lines:\n"
    "Flagged: <the numbers of the hallucinated or spurious steps, or none>\n"
    "Rating: <an integer from 1 (unsound) to 10 (every step sound)>\n")
YES_NO_JUDGE_PROMPT = (
    "You are grading a worked solution.\nQuestion: {question}\nReference answer: {answer}\n"
    "Solution:\n{response}\n\nIs the reasoning sound, with every step correct and leading to the final answer "
    "(not reaching it by luck or by a wrong argument)? Reply with yes or no.\nVerdict:")
DEFAULT_JUDGE_PROMPT = RATING_JUDGE_PROMPT
JUDGE_PROMPTS = {"rating": RATING_JUDGE_PROMPT, "score": RATING_JUDGE_PROMPT, "yes_no": YES_NO_JUDGE_PROMPT}
JUDGE_MODES = ("rating", "yes_no", "score")
BACKENDS = ("hf", "vllm")
PATHS_NAME = "paths.jsonl"
SUMMARY_NAME = "qr_summary.json"
ROUTER_NAME = "router.pt"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@with_train_options
@dataclass
class QRDistillConfig(TeacherOptions):
    # data
    input_path: str = _help("questions JSONL, one {id, question, answer} per line, or a Hugging Face dataset folder",
                            default="")
    output_dir: str = _help("run directory: paths.jsonl, checkpoint, metrics, students/, summary", default="qr-run")
    paths_input: str | None = _help("paths written elsewhere, JSONL (or a Hugging Face dataset folder) {question, "
                                    "answer, response[, id, style, teacher]}: used instead of generating with "
                                    "teachers", default=None)
    limit: int | None = _help("use at most this many input questions (or paths_input records; None: all)",
                              default=None)
    fields: dict[str, str] | None = _help("column names of the inputs (input_path, paths_input and eval_data: JSONL "
                                          "files or Hugging Face dataset folders), e.g. {question: problem, answer: "
                                          "solution, response: trace}; None: the names as they are", default=None)
    split: str | None = _help("the split to read from a Hugging Face DatasetDict input", default=None)
    chat_template: str = _help("none: teachers, students and evaluation see the raw prompt | auto: each model's "
                               "tokenizer chat template around it (system_prompt first when set): the teachers' "
                               "(hf backend) when they write the paths, each student's for training and evaluation",
                               default="none")
    system_prompt: str | None = _help("system turn of chat_template auto", default=None)
    num_shards: int = _help("path generation in shards: this run writes the paths of the questions whose stable id "
                            "hash mod num_shards is shard_index, then stops (no training); merge with "
                            "`distillkit qr-distill --merge-shards OUT_DIR SHARD_DIR...` and run on OUT_DIR",
                            default=1)
    shard_index: int = _help("which shard of the questions this run writes paths for: 0 .. num_shards - 1",
                             default=0)
    # path generation
    teachers: list[str] = _help("teacher checkpoints (paths or Hub ids) that write the paths", default_factory=list)
    teacher_names: list[str] | None = _help("names of the teachers in records (default: paths)", default=None)
    teacher_backend: str = _help("hf | vllm (in-process) | openai (served: teacher_base_urls)", default="hf")
    styles: list[str] = _help("prompt styles, each a key of the built-in or style_templates templates",
                              default_factory=lambda: list(DEFAULT_STYLES))
    style_templates: dict[str, str] | None = _help("extra or replacement style templates (YAML mapping name -> "
                                                   "template with {question})", default=None)
    paths_per_style: int = _help("paths per (question, style, teacher)", default=1)
    max_new_tokens: int = _help("teacher tokens per path", default=1024)
    temperature: list[float] | float = _help("teacher sampling temperature (0: greedy); one number, or a list "
                                             "of one per teacher", default=0.7)
    stop: list[str] | None = _help("stop strings for path generation (default: EOS only)", default=None)
    gen_dtype: str = _help("dtype of the teachers and the judge (hf): float32 | bfloat16 | float16 | auto",
                           default="float32")
    gen_batch_size: int = _help("rows per generate call (hf teachers and judge)", default=16)
    # quality filtering
    judge: str | None = _help("LLM-as-judge checkpoint (any teacher backend); None: no judge pass", default=None)
    judge_backend: str = _help("hf | vllm (in-process) | openai (served at judge_base_url)", default="hf")
    judge_base_url: str | None = _help("judge_backend openai: the judge's server (http://host:port/v1); judge is then "
                                       "its served model name (default: the first of teacher_base_urls)", default=None)
    judge_prompt: str | None = _help("judge prompt with {question}, {answer}, {response} (default: the one of "
                                     "judge_mode)", default=None)
    judge_mode: str = _help("rating (Section 2.3: 'Flagged: <steps|none>' and 'Rating: N'; kept when nothing is "
                            "flagged and N >= judge_threshold) | yes_no (first yes/no word) | score (first number, "
                            "kept if >= judge_threshold)", default="rating")
    judge_threshold: float = _help("rating / score mode: lowest accepted rating", default=7.0)
    judge_keep_top: int | None = _help("keep only the N highest-rated accepted paths of each question (ties kept; "
                                       "None: every accepted path)", default=None)
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
    student_lora_r: list[int] | None = _help("LoRA rank per student, one per student (overrides lora_r; 0: that "
                                             "student fully fine-tuned)", default=None)
    qlora: bool = _help("load the students in 4-bit NF4 (bitsandbytes) under their LoRA adapters: QLoRA; needs "
                        "CUDA, bitsandbytes and LoRA", default=False)
    student_lrs: list[float] | None = _help("learning rate per student, one per student (default: lr for every "
                                            "student; lr stays the projections' and competence scores' rate)",
                                            default=None)
    epochs: float | None = _help("passes over the kept paths; when set it decides the number of optimizer steps "
                                 "(ceil(epochs * paths / (batch_size * grad_accum))) instead of max_steps",
                                 default=None)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_targets: list[str] = _help("module names LoRA adapts", default_factory=lambda: ["q_proj", "v_proj"])
    # routing
    routing: str = _help("bernoulli (Eq. 2: per-student Bernoulli, a path may go to several students) | topk "
                         "(the route_top_k best students) | gumbel_top1 (straight-through Gumbel-softmax; the old "
                         "'learned') | random (uniform top-k, no router) | all (every student, every path)",
                         default="bernoulli")
    router_encoder: str | None = _help("frozen Hugging Face encoder checkpoint for the learned routings", default=None)
    router_capacity_factor: float | None = _help(
        "each student takes at most ceil(c * routes / S) of a batch's routes, as in mixture-of-experts routing "
        "(keeps the router from sending every path to one student); None: no limit", default=1.25)
    router_regularizer: str = _help("balance (entropy of the batch's mean assignment) | entropy (Eqs. 3-4: each "
                                    "path's routing entropy)", default="balance")
    encoder_max_length: int = _help("encoder tokens per path", default=512)
    router_hidden: int = _help("hidden width of the router MLP", default=256)
    route_top_k: int = _help("students each path is routed to", default=1)
    gumbel_tau: float = _help("Gumbel-softmax temperature", default=1.0)
    router_lr: float | None = _help("router learning rate (default: lr)", default=None)
    # losses
    mutual: bool = _help("mutual-student distillation (off: ablation)", default=True)
    mutual_form: str = _help("token (Eq. 8: token-level states) | pooled (one mean state per path and student)",
                             default="token")
    mutual_scope: str = _help("routed (Eq. 7: align the students a path is routed to, on paths routed to two or "
                              "more) | all (every student on every path)", default="routed")
    competence: str = _help("student (Eq. 6: one competence score w_s per student) | path (a regressor scoring "
                            "each student on each path)", default="student")
    entropy_reg: bool = _help("the router regulariser (router_regularizer; off: ablation)", default=True)
    lambda_1: float = _help("Eq. 9: weight of the mutual loss (alignment + competence)", default=0.1)
    lambda_2: float = _help("Eq. 9: weight of the router regulariser", default=0.01)
    shared_dim: int | None = _help("D, the shared space of the mutual loss (Eq. 5; default: half the narrowest "
                                   "student's hidden size)", default=None)
    normalize_shared: bool = _help("rescale shared representations to norm sqrt(D) (avoids collapse to 0)",
                                   default=True)
    competence_tau: float = _help("temperature of the competence target softmax(-ce / tau)", default=1.0)
    # the shared trainer's options (flat in YAML and flags; batch_size = paths per micro-batch, lr = the students',
    # projections' and competence regressor's rate; seed also drives routing noise and generation seeds)
    train: TrainConfig = train_field(max_steps=1000, lr=1e-5, save_every=100)
    device: str = _help("auto | cpu | cuda | cuda:N", default="auto")
    # evaluation
    eval_data: str | None = _help("JSONL (or dataset folder) {id, question, answer}: each student's answer accuracy "
                                  "after training",
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
        if self.judge_backend not in BACKENDS + ("openai",):
            raise ValueError(f"judge_backend={self.judge_backend!r}: expected one of {BACKENDS + ('openai',)}")
        if self.judge_backend == "openai" and self.judge and not (self.judge_base_url or self.teacher_base_urls):
            raise ValueError("judge_base_url: judge_backend 'openai' needs the judge's server URL "
                             "(or teacher_base_urls, whose first URL it then uses)")
        if self.judge_base_url is not None and self.judge_backend != "openai":
            raise ValueError(f"judge_base_url: only used with judge_backend 'openai', not {self.judge_backend!r}")
        self.check_teacher_options(len(self.teachers))  # backend, per-teacher sampling, servers
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
        from distillkit.pipeline.runs import check_shard_args

        check_shard_args(self.num_shards, self.shard_index)
        if self.judge_mode not in JUDGE_MODES:
            raise ValueError(f"judge_mode={self.judge_mode!r}: expected one of {JUDGE_MODES}")
        if self.judge_prompt is None:
            self.judge_prompt = JUDGE_PROMPTS[self.judge_mode]
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
        from distillkit._errors import InputError
        from distillkit.pipeline.data import CHAT_TEMPLATES, check_fields

        self.fields = check_fields(self.fields)
        if self.chat_template not in CHAT_TEMPLATES:
            raise InputError(f"chat_template={self.chat_template!r}: expected one of {CHAT_TEMPLATES}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InputError(f"system_prompt={self.system_prompt!r}: expected a string or None")
        if self.routing not in ROUTINGS and self.routing not in ("learned",):
            raise ValueError(f"routing={self.routing!r}: expected one of {ROUTINGS}")
        if self.learned_routing() and not self.router_encoder:
            raise ValueError(f"router_encoder: routing={self.routing!r} needs a frozen encoder checkpoint "
                             "(or choose routing='random' / 'all')")
        if self.router_capacity_factor is not None and not (
                isinstance(self.router_capacity_factor, (int, float)) and self.router_capacity_factor >= 1
                and math.isfinite(self.router_capacity_factor)):
            raise ValueError(f"router_capacity_factor={self.router_capacity_factor!r}: expected a number >= 1 "
                             "(each student's share of a batch at most c times its fair share) or None")
        for name, allowed in (("router_regularizer", REGULARIZERS), ("mutual_form", MUTUAL_FORMS),
                              ("mutual_scope", MUTUAL_SCOPES), ("competence", COMPETENCE_KINDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        S = len(self.students)
        if self.student_lora_r is not None:
            if len(self.student_lora_r) != S or not all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in self.student_lora_r):
                raise ValueError(f"student_lora_r={self.student_lora_r!r}: expected {S} integers >= 0 (one per "
                                 "student)")
        if self.student_lrs is not None:
            if len(self.student_lrs) != S or not all(
                    isinstance(x, (int, float)) and x > 0 and math.isfinite(x) for x in self.student_lrs):
                raise ValueError(f"student_lrs={self.student_lrs!r}: expected {S} positive numbers (one per student)")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0
                                            and math.isfinite(self.epochs)):
            raise ValueError(f"epochs={self.epochs!r}: expected a positive number or None")
        if self.qlora:
            if not any(r > 0 for r in self.lora_ranks()):
                raise ValueError("qlora: QLoRA trains LoRA adapters over 4-bit weights; set lora_r (or "
                                 "student_lora_r) > 0")
            if str(self.device) == "cpu":
                raise ValueError("qlora: 4-bit (bitsandbytes) students need a CUDA device; device='cpu' "
                                 "(set qlora: false)")
        if self.judge_keep_top is not None and (not isinstance(self.judge_keep_top, int) or self.judge_keep_top < 1):
            raise ValueError(f"judge_keep_top={self.judge_keep_top!r}: expected an integer >= 1 or None")
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

    def question_fields(self) -> dict[str, str] | None:
        """``fields`` for the question readers (input_path, eval_data): the names they read (id, question, answer);
        a mapping of ``response`` is for paths_input, whose column an eval set need not have."""
        from distillkit.pipeline.data import question_fields

        return question_fields(self.fields)

    def canonical_routing(self) -> str:
        return canonical_routing(self.routing)

    def learned_routing(self) -> bool:
        return canonical_routing(self.routing) in LEARNED_ROUTINGS

    def lora_ranks(self) -> list[int]:
        """The LoRA rank of each student (0: full fine-tuning)."""
        return list(self.student_lora_r) if self.student_lora_r is not None else [self.lora_r] * len(self.students)

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
