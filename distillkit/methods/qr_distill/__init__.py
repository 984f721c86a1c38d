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
3. **Routing** (Eq. 2). A frozen Hugging Face encoder mean-pools each path's text; an MLP scores each of the
   S students; ``routing`` = bernoulli (default: each student drawn independently, so a path may go to one
   or more students) | topk | gumbel_top1 (straight-through Gumbel-softmax, the old ``learned``), trained
   straight-through from the students' losses; a regulariser (balance, or the per-path entropy of Eqs. 3-4)
   and a capacity limit (``router_capacity_factor``: each student takes at most c times its fair share of
   a batch) keep students in use. ``routing`` = random | all are the ablations.
4. **Mutual distillation** (Eqs. 5-8). Per-student projections of the token-level last hidden states into
   a lower-dimensional shared space; the students a path is routed to are aligned to their ensemble,
   weighted by one competence score per student (``mutual``: off is the ablation; ``mutual_form: pooled``
   and ``competence: path`` the variants).

The exact formulas are in :mod:`distillkit.methods.qr_distill.router`. Students may differ in architecture,
size and tokenizer; LoRA through ``peft`` with ``lora_r > 0``.

    distillkit qr-distill --config configs/qr_distill.yaml

Outputs in ``output_dir``: paths.jsonl, trainer_state.pt + metrics.jsonl (the shared trainer: a
rerun resumes), students/<name>/ (Hugging Face checkpoints), router.pt, qr_summary.json.
"""
from distillkit.methods.qr_distill.config import (  # noqa: F401
    BACKENDS,
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_STYLES,
    JUDGE_MODES,
    JUDGE_PROMPTS,
    PATHS_NAME,
    ROUTER_NAME,
    STYLE_TEMPLATES,
    SUMMARY_NAME,
    QRDistillConfig,
)
from distillkit.methods.qr_distill.paths import (  # noqa: F401
    collect_paths,
    filter_paths,
    imported_records,
    judge_paths,
    keep_path,
    keep_top_rated,
    make_path_record,
    parse_judgement,
    path_key,
    propose_paths,
)
from distillkit.methods.qr_distill.runner import RESUME_FREE_FIELDS, check_inputs, cli, run  # noqa: F401
from distillkit.methods.qr_distill.training import (  # noqa: F401
    PathItem,
    QRCollator,
    apply_lora,
    build_items,
    build_model,
    default_shared_dim,
    evaluate_students,
    load_encoder,
    load_students,
    loss_settings,
    make_trainer,
    param_groups,
    qlora_settings,
    route_features,
    routing_split,
    routing_summary,
    save_students,
    steps_for,
)
from distillkit.methods.qr_distill.world_run import world_check  # noqa: F401
from distillkit.pipeline.data import fill_prompt as fill  # noqa: F401 (the old name of fill_prompt)
