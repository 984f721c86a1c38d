"""Integration baseline: an LLM merges the K teachers' complete traces into one (the paper's Integration row).

Each teacher writes one complete trace from the reasoning prompt (up to the token budget, as in curation);
an integrator (any :class:`distillkit.teachers.base.Teacher`: a teacher of the run, a served model, ...) reads
the question and the K traces under :data:`INTEGRATION_TEMPLATE` and writes one merged reasoning, ended by
``"</think>"``, then the final answer. The record's trace is the question's reasoning prompt followed by the
merged reasoning, so a student learns it exactly as it learns a CoRD trace; the meta-prover scores it for the
record. Cost: K traces + the integrator's reasoning and answer (``tokens_generated``).

    res = decode_integration(question, answer, teachers, meta_prover, cfg)   # cfg.integrator: a teacher's name
    distillkit cord --config ... --method integration [--integrator NAME]

Chat templates: pass teachers (and the integrator) wrapped by :func:`~distillkit.methods.cord.prompts.
with_chat_templates`; the integrator's task then becomes its user turn (the text before ``"<think>"``).

The template is this project's wording of the task (the paper's Table 17 prompt asks the same: combine the
traces into one coherent, correct reasoning); ``template=`` takes the paper's text verbatim.
"""
from __future__ import annotations

from collections.abc import Sequence

from distillkit._errors import InputError
from distillkit.methods.cord.config import CordConfig
from distillkit.methods.cord.prompts import split_reasoning_prompt
from distillkit.methods.cord.segmentation import Segmentation
from distillkit.pipeline.data import fill_prompt
from distillkit.teachers.base import StringStop, Teacher

INTEGRATION_TEMPLATE = (
    "Below are a problem and {num_traces} reasoning traces written for it by different models. Integrate "
    "them into one coherent reasoning trace: keep the steps that are correct, fix or drop the ones that are "
    "wrong, combine complementary ideas, and reach the final answer.\n\n"
    "Problem:\n{question}\n\n{traces}\n\nIntegrated reasoning:"
)
TRACE_HEADER = "Trace {index} ({name}):\n{trace}"


def integration_prompt(question: str, traces: Sequence[str], names: Sequence[str] | None = None, *,
                       template: str = INTEGRATION_TEMPLATE) -> str:
    """The integrator's task: ``template`` with ``{question}``, ``{traces}`` (each trace under a numbered header
    naming its teacher) and ``{num_traces}`` filled in."""
    traces = list(traces)
    if not traces:
        raise InputError("traces: expected at least one trace to integrate")
    names = list(names) if names is not None else [f"model {k + 1}" for k in range(len(traces))]
    if len(names) != len(traces):
        raise InputError(f"names: expected {len(traces)} (one per trace), got {len(names)}")
    if "{question}" not in template or "{traces}" not in template:
        raise InputError(f"template: must contain {{question}} and {{traces}}, got {template!r}")
    body = "\n\n".join(TRACE_HEADER.format(index=k + 1, name=n, trace=t.strip())
                       for k, (t, n) in enumerate(zip(traces, names)))
    return (template.replace("{num_traces}", str(len(traces))).replace("{question}", question)
            .replace("{traces}", body))


def _temperature(cfg: CordConfig, k: int) -> float:
    t = cfg.temperature
    if isinstance(t, (list, tuple)):
        return float(t[min(k, len(t) - 1)])
    return float(t)


def _top_p(cfg: CordConfig, k: int) -> float:
    t = getattr(cfg, "top_p", 1.0)
    if isinstance(t, (list, tuple)):
        return float(t[min(k, len(t) - 1)])
    return float(t)


def integrator_index(cfg: CordConfig) -> int:
    """The teacher that merges the traces: ``cfg.integrator`` (a name from teacher_names, or a teacher's path),
    the first teacher when unset."""
    name = getattr(cfg, "integrator", None)
    if name is None:
        return 0
    for names in (cfg.names(), list(cfg.teachers)):
        if name in names:
            return names.index(name)
    raise InputError(f"integrator={name!r}: expected one of the teachers {cfg.names()}")


def _strip_end(text: str, end_marker: str) -> str:
    return text[:-len(end_marker)] if text.endswith(end_marker) else text


def integration_steps(question: str, answer: str, num_teachers: int, cfg: CordConfig, *, seed: int = 0,
                      seg: Segmentation | None = None, integrator: int | None = None,
                      template: str = INTEGRATION_TEMPLATE):
    """Generator of Integration for one question, in the decode loop's request protocol (``decode.serve_one``,
    ``decode.decode_many``): yields teacher requests (each teacher's trace, then the integrator's merged
    reasoning, then its answer) and the meta-prover's scoring request; returns a DecodeResult.
    ``integrator``: the index of the teacher that merges (default :func:`integrator_index`); an index equal to
    ``num_teachers`` names an extra model served after the teachers (see :func:`decode_integration`)."""
    from distillkit.methods.cord.decode import Beam, DecodeResult, ProposeRequest, ScoreRequest

    seg = seg or cfg.make_segmentation()
    names = cfg.names()
    j = integrator_index(cfg) if integrator is None else integrator
    if not 0 <= j <= num_teachers:
        raise InputError(f"integrator={j!r}: expected a teacher index in [0, {num_teachers}]")
    prompt = fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)
    stop = StringStop([seg.end_marker])
    replies = yield [ProposeRequest(k, [prompt], 1, cfg.token_budget, stop, _temperature(cfg, k), seed + 7919 * k,
                                    _top_p(cfg, k)) for k in range(num_teachers)]
    props = [rows[0][0] for rows in replies]
    tokens = sum(p.num_tokens for p in props)
    traces = [_strip_end(p.text, seg.end_marker) for p in props]
    # The integrator's answer opens like a teacher's reasoning ("<think> ### Step"), so the merged text is a trace.
    opening = split_reasoning_prompt(prompt)[1]
    task = integration_prompt(question, traces, names, template=template) + "\n" + opening
    (rows,) = yield [ProposeRequest(j, [task], 1, cfg.token_budget, stop, _temperature(cfg, j), seed + 104723,
                                    _top_p(cfg, j))]
    merged = rows[0][0]
    tokens += merged.num_tokens
    reasoning = _strip_end(merged.text, seg.end_marker)
    who = names[j] if j < num_teachers else "integrator"
    steps = [{"text": s, "teacher": who, "score": None} for s in seg.split(reasoning + seg.end_marker)]
    beam = Beam(text=prompt + reasoning + seg.end_marker, steps=steps, tokens=merged.num_tokens, finished=True,
                teacher=j if j < num_teachers else None, parent=prompt)
    (rows,) = yield [ProposeRequest(j, [task + reasoning + seg.end_marker + cfg.answer_prompt], 1,
                                    cfg.max_answer_tokens, None, _temperature(cfg, j), seed + 104729, _top_p(cfg, j))]
    ans = rows[0][0]
    tokens += ans.num_tokens
    scores, scorer_tokens = yield ScoreRequest([(prompt + reasoning, answer)], [prompt])
    beam.score = float(scores[0])
    if beam.steps:
        beam.steps[-1]["score"] = beam.score
    return DecodeResult(beam, prompt, cfg.answer_prompt + ans.text, tokens, scorer_tokens)


def decode_integration(question: str, answer: str, teachers: Sequence[Teacher], scorer, cfg: CordConfig, *,
                       seed: int = 0, seg: Segmentation | None = None, integrator: Teacher | None = None,
                       template: str = INTEGRATION_TEMPLATE):
    """Integration for one question -> a DecodeResult (what ``runner.make_record`` records). ``integrator``: a
    merging model outside the teachers (any backend); None: the teacher ``cfg.integrator`` (default the first).
    ``scorer``: the meta-prover."""
    from distillkit.methods.cord.decode import serve_one

    if not teachers:
        raise InputError("teachers: expected at least one teacher")
    models = [*teachers, integrator] if integrator is not None else list(teachers)
    gen = integration_steps(question, answer, len(teachers), cfg, seed=seed, seg=seg, template=template,
                            integrator=len(teachers) if integrator is not None else None)
    return serve_one(gen, models, scorer)
