"""VCRD's config: ``VcrdConfig`` (``distillkit vcrd --config configs/vcrd.yaml``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.train import (
    TrainConfig,
    train_field,
    with_train_options,
)

WEIGHTINGS = ("uniform", "ratio", "clamped_ratio", "r_s", "r_s_minus_r_t")
WEIGHTING_CHOICES = ("auto",) + WEIGHTINGS  # auto: ratio with a judge, clamped_ratio PRM-free
CANDIDATE_TOKENS = ("sample", "greedy")
NORMALIZATIONS = ("sequence", "token")
ROLLOUT_MODES = ("offline", "online")
JUDGE_TYPES = ("token_prob", "value_head")
_KERNEL_BACKENDS = ("cuda", "triton", "cpu", "reference")


@with_train_options(renamed={"steps": "max_steps", "warmup": "warmup_steps"})
@dataclass
class VcrdConfig:
    student: str = _help("student checkpoint to train (HF directory or Hub id)", default="")
    teacher: str = _help("teacher checkpoint (same tokenizer / vocabulary as the student)", default="")
    judge: str | None = _help("process reward model checkpoint (judge_type says which kind); "
                              "null = PRM-free teacher-likelihood validity", default=None)
    judge_type: str = _help("token_prob: a causal LM scoring P(good) / (P(good) + P(bad)) after the step "
                            "(Math-Shepherd style) | value_head: a causal LM with a scalar value head read at the "
                            "step separator, sigmoid (Skywork-o1-Open-PRM style)", default="token_prob")
    judge_good_token: str = _help("PRM token meaning 'this step is correct'", default="+")
    judge_bad_token: str = _help("PRM token meaning 'this step is wrong'", default="-")
    judge_step_tag: str | None = _help("PRM step marker appended after the candidate token (Math-Shepherd: "
                                       "'ки'; a value-head PRM's step separator, e.g. a newline); null reads the "
                                       "PRM right after the candidate", default=None)
    judge_batch_size: int = _help("PRM candidates scored per forward pass", default=64)
    prompts: str = _help("JSONL of prompts {id, question, answer}, or a Hugging Face dataset folder", default="")
    prompt_template: str = _help("prompt with {question}", default="{question}\n<think> ### Step")
    fields: dict[str, str] | None = _help("column names of the inputs (prompts and eval_data), e.g. {question: "
                                          "problem, answer: solution}; None: the names as they are", default=None)
    split: str | None = _help("the split to read from a Hugging Face DatasetDict input", default=None)
    chat_template: str = _help("none: rollouts from the raw prompt | auto: from the student tokenizer's chat "
                               "template around it (system_prompt first when set; teacher and student share the "
                               "tokenizer)", default="none")
    system_prompt: str | None = _help("system turn of chat_template auto", default=None)
    output_dir: str = _help("run directory: checkpoint, metrics.jsonl, final/ model, vcrd_summary.json",
                            default="vcrd-run")
    # the shared trainer's options (flat in YAML and flags: max_steps, batch_size = prompts per micro-batch, each
    # giving a teacher and a student rollout, lr, warmup_steps, seed = data order and rollout seeds, ...)
    train: TrainConfig = train_field(max_steps=100, lr=1e-5, save_every=10, log_every=1)
    rollouts: str = _help("offline: one teacher and one student rollout per prompt generated once before training "
                          "and kept fixed (Appendix 10.2; saved in output_dir/rollouts.jsonl) | online: new rollouts "
                          "every step, the student's with its current weights", default="offline")
    num_shards: int = _help("offline rollouts in shards: this run draws the rollouts of one shard of the prompts' "
                            "batches (of batch_size prompts, by a stable hash of their prompt texts), writes them to "
                            "output_dir/rollouts.jsonl and stops (no training); merge with `distillkit vcrd "
                            "--merge-shards OUT_DIR SHARD_DIR...` and run on OUT_DIR", default=1)
    shard_index: int = _help("which shard of the prompt batches this run draws rollouts for: 0 .. num_shards - 1",
                             default=0)
    sft_steps: int = _help("supervised fine-tuning steps on the teacher's rollouts before distillation (Appendix "
                           "10.2; 0 = none); offline student rollouts are drawn after it", default=0)
    sft_lr: float | None = _help("learning rate of the SFT stage (null = lr)", default=None)
    max_prompt_tokens: int | None = _help("prompts longer than this many tokens are left out (logged); null = no cap",
                                          default=None)
    candidate_tokens: str = _help("the candidate next tokens judged at each position: sample (a_S ~ q, a_T ~ p, "
                                  "seeded; Section 2.1) | greedy (argmax of each)", default="sample")
    normalization: str = _help("sequence: each term sums over a rollout's tokens and averages over prompts "
                               "(Algorithm 1) | token: each term is the mean over its own tokens", default="sequence")
    rollout_tokens: int = _help("max new tokens per rollout (no stop boundary; EOS ends early)", default=256)
    temperature: float = _help("rollout sampling temperature (0 = greedy)", default=1.0)
    teacher_backend: str = _help("teacher rollouts: hf | vllm (student rollouts always use hf: its weights "
                                 "change every step)", default="hf")
    vllm_gpu_memory_utilization: float = _help("vllm teacher: fraction of GPU memory for its engine",
                                               default=0.3)
    teacher_dtype: str = _help("teacher (and PRM) weights: float32 | bfloat16 | float16", default="float32")
    alpha: float = _help("skew of both divergences, in [0, 1]", default=0.1)
    lambda_t: float = _help("weight of LV-SKL on teacher-prefix tokens", default=1.0)
    lambda_s: float = _help("weight of LV-SRKL on student-prefix tokens", default=1.0)
    weighting: str = _help("auto (ratio r_s / (r_t + eps) with a judge, Eq. 1; clamped_ratio PRM-free, Appendix "
                           "10.4) | uniform | ratio | clamped_ratio | r_s | r_s_minus_r_t", default="auto")
    top_k: int = _help("PRM-free r_t: sum of the top_k largest teacher p^2 (capped at the vocabulary)",
                       default=128)
    gamma: float = _help("clamped_ratio: exponent of the validity ratio", default=0.5)
    clip: list[float] = _help("clamped_ratio: bounds (low high) of the weight", default_factory=lambda: [0.5, 2.0])
    eps: float = _help("added to r_t in the ratios", default=1e-8)
    eval_data: str | None = _help("JSONL {id, question, answer} for answer accuracy at the end", default=None)
    eval_limit: int = _help("at most this many eval questions", default=256)
    max_new_tokens: int = _help("generation budget per eval answer", default=256)
    backend: str | None = _help("kernel backend: cuda | triton | cpu | reference (null = automatic)", default=None)
    device: str = _help("auto | cpu | cuda", default="auto")
    overwrite: bool = _help("when output_dir holds a run started with a different config: move it aside "
                            "(<output_dir>.replaced-<time>) and start afresh instead of refusing", default=False)

    def __post_init__(self):
        for name in ("student", "teacher", "prompts"):
            if not getattr(self, name):
                raise ValueError(f"{name}: a path is required")
        for name in ("rollout_tokens", "eval_limit", "max_new_tokens", "top_k", "judge_batch_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.teacher_backend == "openai":  # a served teacher (CoRD, QR-Distill) cannot give what the loss reads
            raise ValueError("teacher_backend='openai': VCRD's loss reads the teacher's logits at every rollout token, "
                             "so the teacher runs in this process; its rollouts come from that copy (hf) or an "
                             "in-process vllm engine")
        if self.teacher_backend not in ("hf", "vllm"):
            raise ValueError(f"teacher_backend={self.teacher_backend!r}: expected hf or vllm")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must lie in (0, 1]")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1]")
        for name in ("lambda_t", "lambda_s"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if self.lambda_t == 0 and self.lambda_s == 0:
            raise ValueError("lambda_t and lambda_s are both 0: nothing to train")
        from distillkit._errors import InputError
        from distillkit.pipeline.data import CHAT_TEMPLATES, check_fields

        self.fields = check_fields(self.fields)
        if self.chat_template not in CHAT_TEMPLATES:
            raise InputError(f"chat_template={self.chat_template!r}: expected one of {CHAT_TEMPLATES}")
        if self.weighting not in WEIGHTING_CHOICES:
            raise ValueError(f"weighting={self.weighting!r}: expected one of {WEIGHTING_CHOICES}")
        for name, allowed in (("candidate_tokens", CANDIDATE_TOKENS), ("normalization", NORMALIZATIONS),
                              ("rollouts", ROLLOUT_MODES), ("judge_type", JUDGE_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if isinstance(self.sft_steps, bool) or not isinstance(self.sft_steps, int) or self.sft_steps < 0:
            raise ValueError(f"sft_steps={self.sft_steps!r} must be an integer >= 0 (0 = no SFT stage)")
        from distillkit.pipeline.runs import check_shard_args

        check_shard_args(self.num_shards, self.shard_index)
        if self.num_shards > 1 and self.rollouts == "online" and not self.sft_steps:
            raise InputError(f"num_shards={self.num_shards}: shards draw the offline rollouts, and rollouts='online' "
                             "with sft_steps=0 draws none before training; use rollouts: offline (or an SFT stage)")
        if self.sft_lr is not None and not (self.sft_lr > 0 and math.isfinite(self.sft_lr)):
            raise ValueError(f"sft_lr={self.sft_lr} must be a positive number or null")
        if self.max_prompt_tokens is not None and (isinstance(self.max_prompt_tokens, bool) or not isinstance(
                self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens!r} must be an integer >= 1 or null")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma={self.gamma} must be a finite number >= 0")
        clip = list(self.clip) if isinstance(self.clip, (list, tuple)) else None
        if clip is None or len(clip) != 2 or not all(isinstance(c, (int, float)) for c in clip) \
                or not 0 < clip[0] <= clip[1] < math.inf:
            raise ValueError(f"clip={self.clip!r} must be [low, high] with 0 < low <= high < inf")
        self.clip = [float(c) for c in clip]
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps={self.eps} must be a finite number >= 0")
        if self.backend is not None and self.backend not in _KERNEL_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {_KERNEL_BACKENDS} or null")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: expected float32, bfloat16 or float16")
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")
