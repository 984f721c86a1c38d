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
    evaluate_students,
    load_encoder,
    load_students,
    loss_settings,
    make_trainer,
    route_features,
    routing_summary,
    save_students,
)
from distillkit.pipeline.data import fill_prompt as fill  # noqa: F401 (the old name of fill_prompt)
