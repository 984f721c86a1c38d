"""CoRD: collaborative step-wise multi-teacher decoding, scored by a meta-prover.

Each step, K teachers propose the next reasoning step for each of B beams; the meta-prover scores
the B x K candidates by the predictive perplexity of the ground-truth answer (see
:mod:`distillkit.methods.meta_prover`); the best B survive. A beam ends at ``"</think>"`` or when
its token budget is spent (then ``"</think>"`` is appended); the teacher that wrote the chosen
trace's last step then writes the final answer. Baselines at equal budget: ``greedy`` (B = 1),
``curation`` (each teacher writes n complete traces, the best by the same score is kept) and
``random`` (each step, one of the K proposals is picked at random).

    distillkit cord --config configs/cord.yaml

Python:

    from distillkit.methods.cord import CordConfig, run
    summary = run(CordConfig(teachers=[...], meta_prover="...", input_path="q.jsonl", output_path="out.jsonl"))
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from distillkit._errors import InputError
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.answers import answers_match, extract_answer, normalize_answer  # noqa: F401 (re-exported)
from distillkit.methods.meta_prover import DEFAULT_TEMPLATE
from distillkit.methods.segmentation import (
    END_MARKER, SEGMENTATIONS, Segmentation, make_segmentation,
)
from distillkit.pipeline.data import fill_prompt
from distillkit.pipeline.runs import append_record, begin_run, read_records  # noqa: F401 (append_record re-exported)
from distillkit.teachers.base import Proposal, StringStop, Teacher

log = logging.getLogger(__name__)

METHODS = ("cord", "greedy", "curation", "random")
SCORING_BACKENDS = ("cuda", "triton", "cpu", "reference")
HIT_RATE_BINS = 10


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
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
    def from_yaml(cls, path: str, **overrides) -> "CordConfig":
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


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------
class Scorer(Protocol):
    """What the decoder needs from a meta-prover (MetaProver implements it)."""

    tokens_processed: int

    def score(self, pairs: Sequence[tuple[str, str]], *, prefixes: Sequence[str | None] | None = None): ...


@dataclass
class Beam:
    """A partial trace: the prompt plus the chosen steps so far."""
    text: str                                   # prompt + steps (+ end marker once finished)
    steps: list[dict] = field(default_factory=list)   # [{text, teacher, score}]
    tokens: int = 0                             # teacher tokens of the chosen steps
    finished: bool = False
    score: float = float("-inf")                # meta-prover score of this trace so far
    teacher: int | None = None                  # index of the teacher that wrote the last step
    parent: str = ""                            # the beam text this one extends (its KV-reuse prefix)


@dataclass
class DecodeResult:
    beam: Beam
    prompt: str
    answer_text: str
    tokens_generated: int
    meta_prover_tokens: int


@dataclass
class _Counters:
    tokens_generated: int = 0


def _strip_end(text: str, end_marker: str) -> str:
    return text[:-len(end_marker)] if text.endswith(end_marker) else text


def question_seed(base: int, qid: Any) -> int:
    """A per-question seed that does not depend on run order (so resumed runs reproduce)."""
    return (base * 1_000_003 + zlib.crc32(str(qid).encode("utf-8"))) % (2**31 - 1)


def extend_beam(beam: Beam, proposal: Proposal, teacher: int, names: Sequence[str], *, token_budget: int,
                end_marker: str = END_MARKER) -> Beam:
    """The beam with ``proposal`` appended as its next step (not yet scored). It finishes when the
    teacher ended the reasoning (end marker or EOS) or the budget is spent; a finish without the end
    marker gets it appended."""
    tokens = beam.tokens + proposal.num_tokens
    step_text = proposal.text
    finished = proposal.finished or tokens >= token_budget
    text = beam.text + step_text
    if finished and not text.endswith(end_marker):
        text += end_marker
    return Beam(text=text, steps=beam.steps + [{"text": step_text, "teacher": names[teacher], "score": None}],
                tokens=tokens, finished=finished, teacher=teacher, parent=beam.text)


def propose_steps(teachers: Sequence[Teacher], beams: Sequence[Beam], *, seg: Segmentation, names: Sequence[str],
                  cfg: CordConfig, seed: int, counters: _Counters) -> list[Beam]:
    """Every teacher proposes the next step of every active beam: B x K candidates, beam-major
    (candidate b * K + k extends beam b with teacher k's step)."""
    per_teacher: list[list[Proposal]] = []
    for k, teacher in enumerate(teachers):
        props: list[Proposal | None] = [None] * len(beams)
        # A beam near its budget may only generate what is left of it; group beams by that limit.
        limits: dict[int, list[int]] = {}
        for b, beam in enumerate(beams):
            limits.setdefault(min(cfg.max_step_tokens, cfg.token_budget - beam.tokens), []).append(b)
        for limit, idx in limits.items():
            got = teacher.propose([beams[b].text for b in idx], n=1, max_new_tokens=max(1, limit), stop=seg,
                                  temperature=cfg.temperature, seed=seed + 7919 * k)
            for b, row in zip(idx, got):
                props[b] = row[0]
                counters.tokens_generated += row[0].num_tokens
        per_teacher.append(props)
    return [extend_beam(beam, per_teacher[k][b], k, names, token_budget=cfg.token_budget, end_marker=seg.end_marker)
            for b, beam in enumerate(beams) for k in range(len(teachers))]


def score_candidates(scorer: Scorer, candidates: Sequence[Beam], answer: str, *,
                     end_marker: str = END_MARKER) -> list[float]:
    """Meta-prover score of each candidate trace against the ground-truth answer; candidates of
    one parent beam share its KV cache. Sets ``beam.score`` and the last step's score."""
    if not candidates:
        return []
    pairs = [(_strip_end(c.text, end_marker), answer) for c in candidates]
    prefixes = [c.parent if c.parent and _strip_end(c.text, end_marker).startswith(c.parent) else None
                for c in candidates]
    scores = [float(s) for s in scorer.score(pairs, prefixes=prefixes)]
    for c, s in zip(candidates, scores):
        c.score = s
        if c.steps:
            c.steps[-1]["score"] = s
    return scores


def select_beams(pool: Sequence[Beam], beam_size: int) -> list[Beam]:
    """The ``beam_size`` best traces of ``pool`` by score (ties: earlier in the pool first);
    identical traces are kept once."""
    order = sorted(range(len(pool)), key=lambda i: (-pool[i].score if not math.isnan(pool[i].score) else math.inf, i))
    seen, out = set(), []
    for i in order:
        if pool[i].text in seen:
            continue
        seen.add(pool[i].text)
        out.append(pool[i])
        if len(out) == beam_size:
            break
    return out


def _close(beam: Beam, end_marker: str) -> Beam:
    """Ends an unfinished beam (step limit reached) by appending the end marker."""
    if beam.finished:
        return beam
    return dataclasses.replace(beam, text=beam.text + end_marker, finished=True)


def write_answer(teachers: Sequence[Teacher], beam: Beam, *, cfg: CordConfig, seed: int, counters: _Counters) -> str:
    """The teacher that wrote the last step continues after the end marker with the final answer."""
    teacher = teachers[beam.teacher if beam.teacher is not None else 0]
    (prop,), = teacher.propose([beam.text + cfg.answer_prompt], n=1, max_new_tokens=cfg.max_answer_tokens,
                               stop=None, temperature=cfg.temperature, seed=seed + 104729)
    counters.tokens_generated += prop.num_tokens
    return cfg.answer_prompt + prop.text


def _prompt(cfg: CordConfig, seg: Segmentation, question: str) -> str:
    return fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)


def decode_one(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
               seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """CoRD beam search for one question (``cfg.method`` "cord" or "greedy"; B = cfg.beam_size)."""
    seg = seg or cfg.make_segmentation()
    names = cfg.names()
    counters = _Counters()
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    beams = [Beam(text=prompt)]
    for step in range(cfg.max_steps):
        active = [b for b in beams if not b.finished]
        if not active:
            break
        candidates = propose_steps(teachers, active, seg=seg, names=names, cfg=cfg,
                                   seed=seed + 31 * step, counters=counters)
        score_candidates(scorer, candidates, answer, end_marker=seg.end_marker)
        # Finished beams stay in the pool with their score; they compete with the new candidates.
        beams = select_beams([b for b in beams if b.finished] + candidates, cfg.beam_size)
    beams = [_close(b, seg.end_marker) for b in beams]
    best = select_beams(beams, 1)[0]
    answer_text = write_answer(teachers, best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated,
                        scorer.tokens_processed - scorer_start)


def decode_random(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                  seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Random step selection: every step all K teachers propose (the same generation cost as
    greedy CoRD) and one proposal is picked uniformly at random; the meta-prover scores only the
    final trace (for the record)."""
    seg = seg or cfg.make_segmentation()
    names, counters, rng = cfg.names(), _Counters(), random.Random(seed)
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    beam = Beam(text=prompt)
    for step in range(cfg.max_steps):
        if beam.finished:
            break
        candidates = propose_steps(teachers, [beam], seg=seg, names=names, cfg=cfg, seed=seed + 31 * step,
                                   counters=counters)
        beam = candidates[rng.randrange(len(candidates))]
    beam = _close(beam, seg.end_marker)
    (s,) = score_candidates(scorer, [dataclasses.replace(beam, parent="")], answer, end_marker=seg.end_marker)
    beam.score = s
    answer_text = write_answer(teachers, beam, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(beam, prompt, answer_text, counters.tokens_generated, scorer.tokens_processed - scorer_start)


def decode_curation(question: str, answer: str, teachers: Sequence[Teacher], scorer: Scorer, cfg: CordConfig, *,
                    seed: int = 0, seg: Segmentation | None = None) -> DecodeResult:
    """Curation: each teacher writes n complete traces (up to the token budget); the meta-prover
    keeps the best; its teacher writes the final answer."""
    seg = seg or cfg.make_segmentation()
    names, counters = cfg.names(), _Counters()
    scorer_start = scorer.tokens_processed
    prompt = _prompt(cfg, seg, question)
    n = cfg.n_curation if cfg.temperature > 0 else 1
    stop = StringStop([seg.end_marker])
    traces: list[Beam] = []
    for k, teacher in enumerate(teachers):
        (row,) = teacher.propose([prompt], n=n, max_new_tokens=cfg.token_budget, stop=stop,
                                 temperature=cfg.temperature, seed=seed + 7919 * k)
        for prop in row:
            counters.tokens_generated += prop.num_tokens
            text = prop.text if prop.text.endswith(seg.end_marker) else prop.text + seg.end_marker
            steps = [{"text": s, "teacher": names[k], "score": None} for s in seg.split(prop.text)]
            traces.append(Beam(text=prompt + text, steps=steps, tokens=prop.num_tokens, finished=True,
                               teacher=k, parent=prompt))
    score_candidates(scorer, traces, answer, end_marker=seg.end_marker)
    best = select_beams(traces, 1)[0]
    answer_text = write_answer(teachers, best, cfg=cfg, seed=seed, counters=counters)
    return DecodeResult(best, prompt, answer_text, counters.tokens_generated, scorer.tokens_processed - scorer_start)


DECODERS = {"cord": decode_one, "greedy": decode_one, "random": decode_random, "curation": decode_curation}


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Run: JSONL in, JSONL out, resumable
# ----------------------------------------------------------------------------------------------
def read_questions(path: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (None: all) {id, question, answer} records of ``path``; raises InputError
    naming the line (and the id) of a record that is not valid JSON, not an object, lacks a field,
    has a null or empty id / question / answer, or repeats an id.

    Every record needs its own "id": ids key the resume (done records are matched by id) and each
    question's seed, so an id made up from the line number would silently change meaning when the
    file is edited. The answer is needed: the meta-prover scores steps by the answer's likelihood."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InputError(f"limit={limit!r}: expected an integer >= 0 or None")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object {{id, question, answer}}, "
                                 f"got {type(rec).__name__}")
            missing = [k for k in ("id", "question", "answer") if k not in rec]
            if missing:
                raise InputError(f"{where}: missing field(s) {missing}; expected {{id, question, answer}}"
                                 + (" (every question needs its own id: it keys the resume)" if "id" in missing
                                    else ""))
            rid = rec["id"]
            if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
                raise InputError(f"{where}: id={rid!r}: expected a non-empty string or an integer")
            question, answer = rec["question"], rec["answer"]
            if not isinstance(question, str) or not question.strip():
                raise InputError(f"{where} (id {rid!r}): question={question!r}: expected a non-empty string")
            if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
                    or not str(answer).strip():
                raise InputError(f"{where} (id {rid!r}): answer={answer!r}: expected the reference answer (a "
                                 "non-empty string or a number): CoRD's meta-prover scores steps by its likelihood")
            key = str(rid)
            if key in seen:
                raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[key]})")
            seen[key] = lineno
            rows.append(rec)
    return rows


def load_done(path: str) -> list[dict]:
    """Records already written to ``path`` (see :func:`distillkit.pipeline.runs.read_records`): every complete
    record with an "id" is kept; blank lines, unparsable lines and records without an id are skipped
    and stay in the file; a torn final fragment is moved to ``<path>.torn``; a last record missing
    only its newline gets it."""
    return read_records(path, key="id")


def make_record(q: dict, res: DecodeResult, end_marker: str = END_MARKER) -> dict:
    final = extract_answer(res.answer_text)
    return {
        "id": q["id"],
        "question": q["question"],
        "answer": q["answer"],
        "prompt": res.prompt,
        # The student's target: the reasoning after the prompt, its end marker, and the answer.
        "trajectory": res.beam.text[len(res.prompt):] + res.answer_text,
        "steps": res.beam.steps,
        "final_answer": final,
        "correct": answers_match(final, q["answer"]),
        "predictive_perplexity": res.beam.score,
        "tokens_generated": res.tokens_generated,
        "meta_prover_tokens": res.meta_prover_tokens,
    }


def load_teachers(cfg: CordConfig) -> list[Teacher]:
    """The config's teachers, with its generation backend."""
    from distillkit.teachers import load_teacher

    if cfg.teacher_backend == "hf":
        kw = dict(dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size)
    else:
        kw = {} if cfg.dtype == "float32" else dict(dtype=cfg.dtype)
    kw.update(cfg.teacher_kwargs or {})
    return [load_teacher(p, backend=cfg.teacher_backend, name=n, **kw) for p, n in zip(cfg.teachers, cfg.names())]


def load_meta_prover(cfg: CordConfig):
    from distillkit.methods.meta_prover import MetaProver

    return MetaProver.from_pretrained(cfg.meta_prover, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                                      backend=cfg.scoring_backend, reuse_prefix_cache=cfg.reuse_prefix_cache,
                                      batch_size=cfg.batch_size)


def run_config_file(cfg: CordConfig) -> str:
    """Where the config a run of ``output_path`` was started with is recorded."""
    return cfg.output_path + ".run_config.json"


def _limit_grows(old, new) -> bool:
    # a larger limit (or none) only adds questions after those done; a smaller one would leave records outside it
    return new is None or (old is not None and new >= old)


def begin_cord_run(cfg: CordConfig) -> list[str]:
    """Refuses a config that differs from the one ``output_path``'s records were made with (unless
    ``overwrite``: then the records, their summary and plot are moved aside) and records it. May
    change: overwrite, progress, summary_path, plot_path, and limit upwards."""
    out = cfg.output_path
    return begin_run(cfg, run_config_file(cfg),
                     run_exists=os.path.exists(out) and os.path.getsize(out) > 0,
                     outputs=[out, out + ".torn", cfg.summary_file(), cfg.plot_file()],
                     what=f"output_path={out!r}", free=("summary_path", "plot_path"),
                     extendable={"limit": _limit_grows})


def run(cfg: CordConfig, *, teachers: Sequence[Teacher] | None = None, meta_prover: Scorer | None = None) -> dict:
    """Decodes every input question not yet in the output, appends one record each, and writes the
    summary (JSON + hit-rate PNG) over all records of the output. Returns the summary."""
    questions = read_questions(cfg.input_path, cfg.limit)
    begin_cord_run(cfg)
    done = load_done(cfg.output_path)
    done_ids = {str(r["id"]) for r in done}
    pending = [q for q in questions if str(q["id"]) not in done_ids]
    log.info("cord: %d questions, %d already done, %d to go", len(questions), len(questions) - len(pending),
             len(pending))
    if pending:
        teachers = teachers if teachers is not None else load_teachers(cfg)
        meta_prover = meta_prover if meta_prover is not None else load_meta_prover(cfg)
        if len(teachers) != len(cfg.teachers):
            raise ValueError(f"teachers: {len(teachers)} given but the config lists {len(cfg.teachers)}")
        seg = cfg.make_segmentation()
        decode = DECODERS[cfg.method]
        from tqdm.auto import tqdm

        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_path)), exist_ok=True)
        with open(cfg.output_path, "a", encoding="utf-8") as out, \
                tqdm(total=len(questions), initial=len(questions) - len(pending), desc=f"cord[{cfg.method}]",
                     unit="q", disable=not cfg.progress) as bar:
            for q in pending:
                res = decode(str(q["question"]), str(q["answer"]), teachers, meta_prover, cfg,
                             seed=question_seed(cfg.seed, q["id"]), seg=seg)
                append_record(out, make_record(q, res, seg.end_marker))
                bar.update(1)
    records = load_done(cfg.output_path)
    summary = summarize(records, cfg.names())
    summary["method"] = cfg.method
    write_summary(summary, cfg.summary_file(), cfg.plot_file())
    return summary


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def hit_rates(records: Sequence[dict], names: Sequence[str], bins: int = HIT_RATE_BINS) -> dict[str, list[float | None]]:
    """Share of steps each teacher wrote, per bin of normalised reasoning progress (step j of n sits
    at (j + 0.5) / n), as in the seed's Figure 2. None where a bin holds no step."""
    counts = [[0] * bins for _ in names]
    index = {n: i for i, n in enumerate(names)}
    for rec in records:
        steps = rec.get("steps") or []
        for j, step in enumerate(steps):
            t = index.get(step.get("teacher"))
            if t is None:
                continue
            counts[t][min(bins - 1, int((j + 0.5) / len(steps) * bins))] += 1
    totals = [sum(c[b] for c in counts) for b in range(bins)]
    return {n: [(counts[i][b] / totals[b]) if totals[b] else None for b in range(bins)] for i, n in enumerate(names)}


def summarize(records: Sequence[dict], names: Sequence[str]) -> dict:
    n = len(records)
    scores = [r["predictive_perplexity"] for r in records if isinstance(r.get("predictive_perplexity"), (int, float))
              and math.isfinite(r["predictive_perplexity"])]
    all_steps = [s for r in records for s in (r.get("steps") or [])]
    return {
        "records": n,
        "accuracy": (sum(bool(r.get("correct")) for r in records) / n) if n else None,
        "mean_predictive_perplexity": (sum(scores) / len(scores)) if scores else None,
        "mean_tokens_generated": (sum(r["tokens_generated"] for r in records) / n) if n else None,
        "mean_meta_prover_tokens": (sum(r["meta_prover_tokens"] for r in records) / n) if n else None,
        "mean_steps": (len(all_steps) / n) if n else None,
        "teacher_share": {name: (sum(s.get("teacher") == name for s in all_steps) / len(all_steps))
                          if all_steps else None for name in names},
        "hit_rate_bins": HIT_RATE_BINS,
        "hit_rates": hit_rates(records, names),
    }


def _atomic_write(path: str, write) -> None:
    """Writes through a temporary file in the same folder, then renames (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_hit_rates(summary: dict, path: str) -> None:
    """Teacher hit rate per bin of normalised reasoning progress (the seed's Figure 2), as PNG.

    Uses a bare Agg figure, not pyplot: no global backend switch, no GUI, safe in a worker thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bins = summary["hit_rate_bins"]
    x = [(b + 0.5) / bins for b in range(bins)]
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, rates in summary["hit_rates"].items():
        # Empty bins (no step fell there) are skipped, so the line joins the bins that have data.
        pts = [(xb, r) for xb, r in zip(x, rates) if r is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=os.path.basename(name.rstrip("/")) or name)
    ax.set_xlabel("normalised reasoning progress")
    ax.set_ylabel("teacher hit rate")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.set_title(f"CoRD ({summary.get('method', 'cord')}): whose step was chosen, n={summary['records']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def write_summary(summary: dict, json_path: str, png_path: str | None) -> None:
    def dump(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)

    _atomic_write(json_path, dump)
    if png_path:
        plot_hit_rates(summary, png_path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def cli(argv: Sequence[str] | None = None) -> int:
    """`distillkit cord --config cord.yaml [--field value ...]`; returns the exit code."""
    # types, ranges, device, paths: all checked before any model loads
    try:
        cfg = parse_config(CordConfig, argv, "distillkit cord",
                           "CoRD: collaborative step-wise multi-teacher decoding scored by a meta-prover.")
    except SystemExit as exc:  # cord's cli has always returned its exit code (bad input: 2) rather than exiting
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "hit_rates"}, indent=1))
    print(f"records: {cfg.output_path}\nsummary: {cfg.summary_file()}\nplot: {cfg.plot_file()}")
    return 0
