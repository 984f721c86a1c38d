"""CoRD's config: ``CordConfig`` (``distillkit cord --config configs/cord.yaml``).

Defaults are the paper's: 16,384 reasoning tokens and 4,096 answer tokens per trace, no cap on the number
of steps or on one step's length (``max_steps`` / ``max_step_tokens`` are opt-in safety caps), teachers
sampled at temperature 0.6, B = 4 beams, prompt-guided segmentation, raw prompts (``chat_template: none``).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from distillkit._errors import InputError
from distillkit.methods.cord.meta_prover import DEFAULT_TEMPLATE
from distillkit.methods.cord.segmentation import SEGMENTATIONS, Segmentation, make_segmentation
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.generation import TeacherOptions

log = logging.getLogger(__name__)

METHODS = ("cord", "greedy", "curation", "random", "integration", "mcts")
BASELINE_COSTS = ("equal", "single")
RANDOM_SELECTIONS = ("trajectory", "step")
SCORING_BACKENDS = ("cuda", "triton", "cpu", "reference")
SELECTORS = ("perplexity", "prm", "binary", "max_length")
CHAT_TEMPLATES = ("none", "auto")


@dataclass
class CordConfig(TeacherOptions):
    """Everything one CoRD run needs. Paths are used as given (relative to the working directory)."""

    teachers: list[str] = _help("teacher checkpoints (local paths or Hub ids), K >= 1", default_factory=list)
    meta_prover: str = _help("meta-prover checkpoint (local path or Hub id)", default="")
    input_path: str = _help("input JSONL, one {id, question, answer} per line", default="")
    output_path: str = _help("output JSONL, one record per question; rerunning resumes it", default="")
    method: str = _help("cord | greedy (one beam, run as beam_size trajectories: baseline_cost) | curation | "
                        "random | integration (a teacher merges "
                        "the K traces) | mcts (UCT over the same step proposals)", default="cord")
    beam_size: int = _help("beams B kept per step (greedy: one beam, and B trajectories at baseline_cost equal)",
                           default=4)
    baseline_cost: str = _help(
        "equal (the paper's Section 5 / G.4.2): greedy decodes beam_size independent one-beam trajectories (own "
        "seeds) and keeps the meta-prover's best, the trajectories CoRD's beam spends; at temperature 0 for every "
        "teacher they would be identical, so one is decoded (records say trajectories: 1) | single: one greedy "
        "trajectory", default="equal")
    random_selection: str = _help(
        "random baseline: trajectory (Table 5: each teacher writes n_curation complete traces, one is picked "
        "uniformly at random) | step (every step all K teachers propose and one proposal is picked at random)",
        default="trajectory")
    segmentation: str = _help("prompt-guided | line-break | prefix-based", default="prompt-guided")
    segmentation_prefixes: list[str] | None = _help(
        "prefix-based segmentation: phrases opening a new step (default: the paper's Appendix G.1 list, "
        "segmentation.PAPER_PREFIX_PHRASES)", default=None)
    max_steps: int | None = _help("opt-in cap on the steps of a trace (then '</think>' is appended); None (the "
                                  "paper): no cap, the token budget ends a trace", default=None)
    token_budget: int = _help("teacher tokens per trace at most (the reasoning); then '</think>' is appended",
                              default=16384)
    max_step_tokens: int | None = _help("opt-in cap on the tokens of one proposed step; None (the paper): a step "
                                        "may take what is left of the budget", default=None)
    max_answer_tokens: int = _help("tokens the final answer after '</think>' may take", default=4096)
    answer_prompt: str = _help("text put after '</think>' before the teacher writes the final answer", default="")
    n_curation: int = _help("curation (and random at random_selection trajectory): complete traces per teacher "
                            "(the paper: 4, sampled; at temperature 0 they would be identical, so curation's "
                            "n_curation > 1 needs temperature > 0, and random takes one from such a teacher)",
                            default=4)
    temperature: list[float] | float = _help(
        "teacher sampling temperature (the paper: 0.6); 0 is greedy"
        "; one number, or a list of one per teacher (e.g. [0.5, 0.6, 0.7])", default=0.6)
    seed: int = _help("base seed; each question's seed derives from it and the question id", default=0)
    template: str = _help("meta-prover template with {context} and {answer}", default=DEFAULT_TEMPLATE)
    prompt_template: str | None = _help(
        "reasoning prompt with {question} (default: the segmentation's, e.g. '{question}\\n<think> ### Step')",
        default=None)
    teacher_names: list[str] | None = _help("names for the teachers in records and plots (default: paths)",
                                            default=None)
    chat_template: str = _help("none: the raw prompt (the world's models have no chat template) | auto: each "
                               "teacher's chat template and recommended system prompt around it "
                               "(distillkit.methods.cord.prompts)", default="none")
    selector: str = _help("step selector: perplexity (the meta-prover's predictive perplexity, the paper's) | prm "
                          "(a process reward model's step score) | binary (an LLM's yes/no probability that the "
                          "step is correct) | max_length (the longest step)", default="perplexity")
    selector_model: str | None = _help("prm / binary: the PRM or judge checkpoint (local path or Hub id)",
                                       default=None)
    integrator: str | None = _help("method integration: the teacher (a name from teacher_names, or its path) that "
                                   "merges the K traces (default: the first teacher)", default=None)
    mcts_exploration: float = _help("method mcts: UCT's exploration constant c", default=1.0)
    mcts_token_budget: int | None = _help("method mcts: teacher tokens the search may generate per question "
                                          "(default: CoRD's bound, beam_size x K x token_budget)", default=None)
    teacher_backend: str = _help("hf | vllm (in-process) | openai (served: teacher_base_urls; README: "
                                 "Served teachers)", default="hf")
    scoring_backend: str | None = _help("kernel backend for the meta-prover: cuda | triton | cpu | reference "
                                        "(default: automatic)", default=None)
    reuse_prefix_cache: bool = _help("meta-prover: run each beam prefix once and reuse its KV cache",
                                     default=True)
    meta_prover_kv_cache_bytes: int = _help("meta-prover: bytes of KV kept across steps, so that the next step "
                                            "runs only a surviving beam's new tokens (0: none kept)",
                                            default=1 << 30)
    dtype: str = _help("model dtype: float32 | bfloat16 | float16 | auto", default="float32")
    device: str = _help("device for the Hugging Face models: cpu | cuda | cuda:N", default="cpu")
    batch_size: int = _help("rows per generate / scoring forward", default=16)
    limit: int | None = _help("process at most this many input questions (None: all)", default=None)
    questions_in_flight: int = _help(
        "questions decoded at once: each round, one batched teacher call per teacher and one meta-prover call "
        "serve all of them (greedy traces are those of one at a time)", default=16)
    num_shards: int = _help("split the questions into this many shards (by a stable hash of the id); this run "
                            "decodes shard shard_index; merge with `distillkit cord --merge-shards`", default=1)
    shard_index: int = _help("which shard this run decodes: 0 .. num_shards - 1", default=0)
    summary_path: str | None = _help("summary JSON (default: <output>.summary.json)", default=None)
    plot_path: str | None = _help("teacher hit-rate plot PNG (default: <output>.hit_rates.png)", default=None)
    progress: bool = _help("show a progress bar", default=True)
    overwrite: bool = _help("when output_path holds a run made with a different config: move its files aside "
                            "(<path>.replaced-<time>) and start afresh instead of refusing", default=False)

    # accepted for this release under its old name (distillkit.pipeline.config reads this)
    __renamed_options__ = {"prefix_phrases": "segmentation_prefixes"}

    def __post_init__(self):
        if isinstance(self.teachers, str):
            self.teachers = [self.teachers]
        if not self.teachers or not all(isinstance(t, str) and t for t in self.teachers):
            raise ValueError(f"teachers: expected a non-empty list of checkpoint paths, got {self.teachers!r}")
        if not isinstance(self.meta_prover, str) or not self.meta_prover:
            raise ValueError("meta_prover: expected a checkpoint path")
        if self.meta_prover_kv_cache_bytes < 0:
            raise ValueError(f"meta_prover_kv_cache_bytes={self.meta_prover_kv_cache_bytes}: expected >= 0")
        for name in ("input_path", "output_path"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected a file path")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.baseline_cost not in BASELINE_COSTS:
            raise InputError(f"baseline_cost={self.baseline_cost!r}: expected one of {BASELINE_COSTS}")
        if self.random_selection not in RANDOM_SELECTIONS:
            raise InputError(f"random_selection={self.random_selection!r}: expected one of {RANDOM_SELECTIONS}")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation={self.segmentation!r}: expected one of {sorted(SEGMENTATIONS)}")
        if self.segmentation_prefixes is not None:
            if self.segmentation != "prefix-based":
                name = "prefix_phrases" if self._old_prefix_name else "segmentation_prefixes"
                raise InputError(f"{name}: only used with segmentation='prefix-based'")
            if isinstance(self.segmentation_prefixes, str):
                self.segmentation_prefixes = [self.segmentation_prefixes]
            if not self.segmentation_prefixes or not all(isinstance(p, str) and p.strip()
                                                         for p in self.segmentation_prefixes):
                raise InputError(f"segmentation_prefixes: expected a non-empty list of non-empty phrases, got "
                                 f"{self.segmentation_prefixes!r}")
        for name in ("beam_size", "token_budget", "max_answer_tokens", "n_curation", "batch_size",
                     "max_steps", "max_step_tokens"):
            value = getattr(self, name)
            if value is None and name in ("max_steps", "max_step_tokens"):
                continue  # no cap (the paper)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hint = " or None (no cap)" if name in ("max_steps", "max_step_tokens") else ""
                raise ValueError(f"{name}={value!r}: expected an integer >= 1{hint}")
        self.check_teacher_options(len(self.teachers))  # backend, per-teacher sampling, servers
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if self.method == "curation" and self.n_curation > 1 and any(t == 0 for t in temps):
            # greedy traces of one teacher are identical: n of them would silently be 1 trace each
            which = "" if len(temps) == 1 else f" for teacher(s) {[k for k, t in enumerate(temps) if t == 0]}"
            raise InputError(f"n_curation={self.n_curation} with temperature=0{which}: the {self.n_curation} greedy "
                             "traces of a teacher would be identical (1 trace instead of n per teacher); set "
                             "temperature > 0 (the paper samples at 0.6) or n_curation: 1")
        if self.integrator is not None and self.integrator not in self.names() + list(self.teachers):
            raise InputError(f"integrator={self.integrator!r}: expected one of the teachers {self.names()}")
        if not (isinstance(self.mcts_exploration, (int, float)) and not isinstance(self.mcts_exploration, bool)
                and 0 <= self.mcts_exploration < math.inf):
            raise InputError(f"mcts_exploration={self.mcts_exploration!r}: expected a finite number >= 0")
        if self.mcts_token_budget is not None and (not isinstance(self.mcts_token_budget, int)
                                                   or isinstance(self.mcts_token_budget, bool)
                                                   or self.mcts_token_budget < 1):
            raise InputError(f"mcts_token_budget={self.mcts_token_budget!r}: expected an integer >= 1 or None")
        if self.chat_template not in CHAT_TEMPLATES:
            raise InputError(f"chat_template={self.chat_template!r}: expected one of {CHAT_TEMPLATES}")
        if self.chat_template == "auto" and self.prompt_template is not None and "<think>" not in self.prompt_template:
            raise InputError("prompt_template: chat_template='auto' needs a '<think>' in it (the question before "
                             "it is the user turn, the reasoning after it the assistant's)")
        if self.selector not in SELECTORS:
            raise InputError(f"selector={self.selector!r}: expected one of {SELECTORS}")
        if self.selector in ("prm", "binary") and not (isinstance(self.selector_model, str) and self.selector_model):
            raise InputError(f"selector_model: selector={self.selector!r} needs a checkpoint (the PRM or the "
                             "judge LLM)")
        if self.selector_model is not None and self.selector not in ("prm", "binary"):
            raise InputError(f"selector_model: only used with selector 'prm' or 'binary', not {self.selector!r}")
        if "{context}" not in self.template or "{answer}" not in self.template:
            raise ValueError(f"template: must contain {{context}} and {{answer}}, got {self.template!r}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template: must contain {{question}}, got {self.prompt_template!r}")
        if self.teacher_names is not None and len(self.teacher_names) != len(self.teachers):
            raise ValueError(f"teacher_names: expected {len(self.teachers)} names (one per teacher), "
                             f"got {len(self.teacher_names)}")
        if self.scoring_backend is not None and self.scoring_backend not in SCORING_BACKENDS:
            raise ValueError(f"scoring_backend={self.scoring_backend!r}: expected one of {SCORING_BACKENDS} or None")
        for name in ("questions_in_flight", "num_shards"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name}={value!r}: expected an integer >= 1")
        if not isinstance(self.shard_index, int) or isinstance(self.shard_index, bool) \
                or not 0 <= self.shard_index < self.num_shards:
            raise InputError(f"shard_index={self.shard_index!r}: expected an integer in [0, num_shards="
                             f"{self.num_shards})")
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 0):
            raise InputError(f"limit={self.limit!r}: expected an integer >= 0 (0: no question) or None (all)")

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> CordConfig:
        from distillkit.pipeline.config import load_config  # values coerced to the field types (lr: 1e-4 is a float)

        return load_config(cls, path, **{k: v for k, v in overrides.items() if v is not None})

    # Derived paths and objects
    def summary_file(self) -> str:
        return self.summary_path or self.output_path + ".summary.json"

    def plot_file(self) -> str:
        return self.plot_path or self.output_path + ".hit_rates.png"

    def make_segmentation(self) -> Segmentation:
        return make_segmentation(self.segmentation, phrases=self.segmentation_prefixes)

    def step_limit(self) -> int:
        """How many steps a trace may take: ``max_steps``, or without that cap the token budget (every
        step costs at least one token, so the budget ends a trace first; the bound also ends a loop over
        a backend that would report steps of 0 tokens)."""
        return self.max_steps if self.max_steps is not None else self.token_budget

    def step_token_limit(self, tokens_used: int) -> int:
        """Tokens the next step of a trace that has spent ``tokens_used`` may generate: what is left of
        the budget, capped by ``max_step_tokens`` when set."""
        left = self.token_budget - tokens_used
        return left if self.max_step_tokens is None else min(self.max_step_tokens, left)

    def names(self) -> list[str]:
        return list(self.teacher_names) if self.teacher_names else list(self.teachers)


def _accept_renamed(init):
    """CordConfig(prefix_phrases=...) still works, with a deprecation message naming the new field."""

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        old = False
        for before, after in CordConfig.__renamed_options__.items():
            if before in kw:
                log.warning("CordConfig: %r is deprecated, use %r (the old name is accepted for this release only)",
                            before, after)
                if after in kw:
                    raise InputError(f"{before} and {after}: the same option given twice ({before} is its old name)")
                kw[after] = kw.pop(before)
                old = True
        self._old_prefix_name = old
        init(self, *args, **kw)

    return __init__


CordConfig.__init__ = _accept_renamed(CordConfig.__init__)
