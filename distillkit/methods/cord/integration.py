"""Integration baseline: an LLM merges the K teachers' complete traces into one (the paper's Integration row).

Each teacher writes one complete trace from the reasoning prompt (up to the token budget, as in curation);
an integrator (any :class:`distillkit.teachers.base.Teacher`: a teacher of the run, a served model, ...) reads
the question and the K traces under :data:`INTEGRATION_TEMPLATE` and writes one merged reasoning, ended by
``"</think>"``, then the final answer. The record's trace is the question's reasoning prompt followed by the
merged reasoning, so a student learns it exactly as it learns a CoRD trace; the meta-prover scores it for the
record. Cost: K traces + the integrator's reasoning and answer (``tokens_generated``).

    res = decode_integration(question, answer, teachers, meta_prover, cfg, integrator=teachers[0])

Chat templates: pass teachers (and the integrator) wrapped by :func:`~distillkit.methods.cord.prompts.
with_chat_templates`; the integrator's task then becomes its user turn (the text before ``"<think>"``).

The template is this project's wording of the task (the paper's Table 17 prompt asks the same: combine the
traces into one coherent, correct reasoning); ``template=`` takes the paper's text verbatim.
"""
from __future__ import annotations

from collections.abc import Sequence

from distillkit._errors import InputError
from distillkit.methods.cord.config import CordConfig
from distillkit.methods.cord.decode import Beam, DecodeResult
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
    return float(t[k]) if isinstance(t, (list, tuple)) else float(t)


def decode_integration(question: str, answer: str, teachers: Sequence[Teacher], scorer, cfg: CordConfig, *,
                       seed: int = 0, seg: Segmentation | None = None, integrator: Teacher | None = None,
                       integrator_name: str = "integrator", template: str = INTEGRATION_TEMPLATE) -> DecodeResult:
    """Integration for one question -> a :class:`~distillkit.methods.cord.decode.DecodeResult` (what
    ``runner.make_record`` records). ``integrator``: the merging model (default: the first teacher);
    ``scorer``: the meta-prover (or None: the record's score is NaN)."""
    seg = seg or cfg.make_segmentation()
    if not teachers:
        raise InputError("teachers: expected at least one teacher")
    integrator = integrator if integrator is not None else teachers[0]
    names = cfg.names()
    prompt = fill_prompt(cfg.prompt_template, question=question) if cfg.prompt_template else seg.prompt(question)
    stop = StringStop([seg.end_marker])
    tokens = 0
    traces = []
    for k, teacher in enumerate(teachers):
        (prop,), = teacher.propose([prompt], n=1, max_new_tokens=cfg.token_budget, stop=stop,
                                   temperature=_temperature(cfg, k), seed=seed + 7919 * k)
        tokens += prop.num_tokens
        traces.append(prop.text[:-len(seg.end_marker)] if prop.text.endswith(seg.end_marker) else prop.text)
    # The integrator's answer opens like a teacher's reasoning ("<think> ### Step"), so the merged text is a trace.
    opening = split_reasoning_prompt(prompt)[1]
    task = integration_prompt(question, traces, names, template=template) + "\n" + opening
    (merged,), = integrator.propose([task], n=1, max_new_tokens=cfg.token_budget, stop=stop,
                                    temperature=_temperature(cfg, 0), seed=seed + 104723)
    tokens += merged.num_tokens
    reasoning = merged.text[:-len(seg.end_marker)] if merged.text.endswith(seg.end_marker) else merged.text
    text = prompt + reasoning + seg.end_marker
    steps = [{"text": s, "teacher": integrator_name, "score": None} for s in seg.split(reasoning + seg.end_marker)]
    beam = Beam(text=text, steps=steps, tokens=merged.num_tokens, finished=True, teacher=None, parent=prompt)
    (ans,), = integrator.propose([task + reasoning + seg.end_marker + cfg.answer_prompt], n=1,
                                 max_new_tokens=cfg.max_answer_tokens, stop=None,
                                 temperature=_temperature(cfg, 0), seed=seed + 104729)
    tokens += ans.num_tokens
    scorer_tokens = 0
    if scorer is not None:
        before = scorer.tokens_processed
        (beam.score,) = [float(s) for s in scorer.score([(prompt + reasoning, answer)], prefixes=[prompt])]
        scorer_tokens = scorer.tokens_processed - before
        if beam.steps:
            beam.steps[-1]["score"] = beam.score
    else:
        beam.score = float("nan")
    return DecodeResult(beam, prompt, cfg.answer_prompt + ans.text, tokens, scorer_tokens)
