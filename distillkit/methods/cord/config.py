"""CoRD's config: ``CordConfig`` (``distillkit cord --config configs/cord.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass

from distillkit._errors import InputError
from distillkit.methods.cord.meta_prover import DEFAULT_TEMPLATE
from distillkit.methods.cord.segmentation import SEGMENTATIONS, Segmentation, make_segmentation
from distillkit.pipeline.config import config_field as _help

METHODS = ("cord", "greedy", "curation", "random")
SCORING_BACKENDS = ("cuda", "triton", "cpu", "reference")


@dataclass
class CordConfig:
    """Everything one CoRD run needs. Paths are used as given (relative to the working directory)."""

    teachers: list[str] = _help("teacher checkpoints (local paths or Hub ids), K >= 1", default_factory=list)
    meta_prover: str = _help("meta-prover checkpoint (local path or Hub id)", default="")
    input_path: str = _help("input JSONL, one {id, question, answer} per line", default="")
    output_path: str = _help("output JSONL, one record per question; rerunning resumes it", default="")
    method: str = _help("cord | greedy (cord with beam_size 1) | curation | random", default="cord")
    beam_size: int = _help("beams B kept per step (greedy forces 1)", default=4)
    segmentation: str = _help("prompt-guided | line-break | prefix-based", default="prompt-guided")
    prefix_phrases: list[str] | None = _help(
        "prefix-based segmentation: phrases opening a new step (default: the seed's list)", default=None)
    max_steps: int = _help("steps per trace at most; then '</think>' is appended", default=16)
    token_budget: int = _help("teacher tokens per trace at most (the reasoning); then '</think>' is appended",
                              default=1024)
    max_step_tokens: int = _help("tokens one proposed step may take at most", default=256)
    max_answer_tokens: int = _help("tokens the final answer after '</think>' may take", default=32)
    answer_prompt: str = _help("text put after '</think>' before the teacher writes the final answer", default="")
    n_curation: int = _help("curation: complete traces per teacher (1 when temperature is 0: greedy "
                            "traces are identical)", default=4)
    temperature: float = _help("teacher sampling temperature; 0 is greedy", default=0.0)
    seed: int = _help("base seed; each question's seed derives from it and the question id", default=0)
    template: str = _help("meta-prover template with {context} and {answer}", default=DEFAULT_TEMPLATE)
    prompt_template: str | None = _help(
        "reasoning prompt with {question} (default: the segmentation's, e.g. '{question}\\n<think> ### Step')",
        default=None)
    teacher_names: list[str] | None = _help("names for the teachers in records and plots (default: paths)",
                                            default=None)
    teacher_backend: str = _help("hf | vllm", default="hf")
    teacher_kwargs: dict | None = _help(
        "extra keyword arguments for every teacher (vllm: gpu_memory_utilization, tensor_parallel_size, ...); "
        "YAML only", default=None)
    scoring_backend: str | None = _help("kernel backend for the meta-prover: cuda | triton | cpu | reference "
                                        "(default: automatic)", default=None)
    reuse_prefix_cache: bool = _help("meta-prover: run each beam prefix once and reuse its KV cache",
                                     default=True)
    dtype: str = _help("model dtype: float32 | bfloat16 | float16 | auto", default="float32")
    device: str = _help("device for the Hugging Face models: cpu | cuda | cuda:N", default="cpu")
    batch_size: int = _help("rows per generate / scoring forward", default=16)
    limit: int | None = _help("process at most this many input questions (None: all)", default=None)
    summary_path: str | None = _help("summary JSON (default: <output>.summary.json)", default=None)
    plot_path: str | None = _help("teacher hit-rate plot PNG (default: <output>.hit_rates.png)", default=None)
    progress: bool = _help("show a progress bar", default=True)
    overwrite: bool = _help("when output_path holds a run made with a different config: move its files aside "
                            "(<path>.replaced-<time>) and start afresh instead of refusing", default=False)

    def __post_init__(self):
        if isinstance(self.teachers, str):
            self.teachers = [self.teachers]
        if not self.teachers or not all(isinstance(t, str) and t for t in self.teachers):
            raise ValueError(f"teachers: expected a non-empty list of checkpoint paths, got {self.teachers!r}")
        if not isinstance(self.meta_prover, str) or not self.meta_prover:
            raise ValueError("meta_prover: expected a checkpoint path")
        for name in ("input_path", "output_path"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected a file path")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        if self.method == "greedy":
            self.beam_size = 1  # greedy is CoRD with one beam
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation={self.segmentation!r}: expected one of {sorted(SEGMENTATIONS)}")
        if self.prefix_phrases is not None and self.segmentation != "prefix-based":
            raise ValueError("prefix_phrases: only used with segmentation='prefix-based'")
        for name in ("beam_size", "max_steps", "token_budget", "max_step_tokens", "max_answer_tokens",
                     "n_curation", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature={self.temperature!r}: expected a number in [0, 100] (0 is greedy)")
        if "{context}" not in self.template or "{answer}" not in self.template:
            raise ValueError(f"template: must contain {{context}} and {{answer}}, got {self.template!r}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template: must contain {{question}}, got {self.prompt_template!r}")
        if self.teacher_names is not None and len(self.teacher_names) != len(self.teachers):
            raise ValueError(f"teacher_names: expected {len(self.teachers)} names (one per teacher), "
                             f"got {len(self.teacher_names)}")
        if self.teacher_backend not in ("hf", "vllm"):
            raise ValueError(f"teacher_backend={self.teacher_backend!r}: expected 'hf' or 'vllm'")
        if self.scoring_backend is not None and self.scoring_backend not in SCORING_BACKENDS:
            raise ValueError(f"scoring_backend={self.scoring_backend!r}: expected one of {SCORING_BACKENDS} or None")
        if self.teacher_kwargs is not None and not isinstance(self.teacher_kwargs, dict):
            raise ValueError(f"teacher_kwargs: expected a mapping, got {type(self.teacher_kwargs).__name__}")
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
        return make_segmentation(self.segmentation, phrases=self.prefix_phrases)

    def names(self) -> list[str]:
        return list(self.teacher_names) if self.teacher_names else list(self.teachers)
