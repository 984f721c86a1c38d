"""CoRD's run (JSONL in, JSONL out, resumable) and its command line."""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from distillkit._errors import InputError
from distillkit.methods.cord.config import CordConfig
from distillkit.methods.cord.decode import DecodeResult, Scorer, decode_many
from distillkit.methods.cord.prompts import with_chat_templates
from distillkit.methods.cord.segmentation import END_MARKER
from distillkit.methods.cord.selectors import make_selector, score_for_record
from distillkit.methods.cord.summary import summarize, write_summary
from distillkit.pipeline.answers import answers_match, extract_answer
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.data import question_seed, read_questions
from distillkit.pipeline.runs import (
    append_record,
    begin_run,
    config_from_record,
    config_values,
    merge_shard_records,
    parse_merge_shards,
    read_records,
    read_shard_configs,
    select_shard,
    write_json_atomic,
    write_records_atomic,
)
from distillkit.teachers.base import Teacher

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Run: JSONL in, JSONL out, resumable
# ----------------------------------------------------------------------------------------------


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
        "trajectories": res.trajectories,
        # per trajectory searched, per expansion step: the teachers whose candidates survived selection
        "selections": res.selections,
    }


def load_teachers(cfg: CordConfig) -> list[Teacher]:
    """The config's teachers, with its generation backend."""
    from distillkit.pipeline.generation import load_teachers as load_configured

    if cfg.teacher_backend == "hf":
        engine = dict(dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size)
    else:  # vllm in-process; openai ignores it (the server holds the weights)
        engine = {} if cfg.dtype == "float32" else dict(dtype=cfg.dtype)
    return load_configured(cfg, cfg.teachers, cfg.names(), **engine)  # per-teacher teacher_kwargs, servers


def load_meta_prover(cfg: CordConfig):
    from distillkit.methods.cord.meta_prover import MetaProver

    return MetaProver.from_pretrained(cfg.meta_prover, dtype=cfg.dtype, device=cfg.device, template=cfg.template,
                                      backend=cfg.scoring_backend, reuse_prefix_cache=cfg.reuse_prefix_cache,
                                      batch_size=cfg.batch_size, kv_cache_bytes=cfg.meta_prover_kv_cache_bytes)


def run_config_file(cfg: CordConfig) -> str:
    """Where the config a run of ``output_path`` was started with is recorded."""
    return cfg.output_path + ".run_config.json"


def _limit_grows(old, new) -> bool:
    # a larger limit (or none) only adds questions after those done; a smaller one would leave records outside it
    return new is None or (old is not None and new >= old)


def begin_cord_run(cfg: CordConfig) -> list[str]:
    """Refuses a config that differs from the one ``output_path``'s records were made with (unless
    ``overwrite``: then the records, their summary and plot are moved aside) and records it. May
    change: overwrite, progress, summary_path, plot_path, questions_in_flight, meta_prover_kv_cache_bytes, and
    limit upwards."""
    out = cfg.output_path
    return begin_run(cfg, run_config_file(cfg),
                     run_exists=os.path.exists(out) and os.path.getsize(out) > 0,
                     outputs=[out, out + ".torn", cfg.summary_file(), cfg.plot_file()],
                     what=f"output_path={out!r}", free=("summary_path", "plot_path", "questions_in_flight",
                                                                "meta_prover_kv_cache_bytes"),
                     extendable={"limit": _limit_grows})


def run(cfg: CordConfig, *, teachers: Sequence[Teacher] | None = None, meta_prover: Scorer | None = None) -> dict:
    """Decodes every input question not yet in the output, appends one record each, and writes the
    summary (JSON + hit-rate PNG) over all records of the output. Returns the summary."""
    questions = select_shard(read_questions(cfg.input_path, cfg.limit), cfg.num_shards, cfg.shard_index)
    begin_cord_run(cfg)
    done = load_done(cfg.output_path)
    done_ids = {str(r["id"]) for r in done}
    pending = [q for q in questions if str(q["id"]) not in done_ids]
    log.info("cord: %d questions, %d already done, %d to go", len(questions), len(questions) - len(pending),
             len(pending))
    if pending:
        teachers = teachers if teachers is not None else load_teachers(cfg)
        meta_prover = meta_prover if meta_prover is not None else load_meta_prover(cfg)
        teachers = with_chat_templates(cfg, teachers)  # chat_template auto: each teacher's own (prompts.py)
        scorer = make_selector(cfg, meta_prover)  # what ranks the candidates (the meta-prover for perplexity)
        if len(teachers) != len(cfg.teachers):
            raise ValueError(f"teachers: {len(teachers)} given but the config lists {len(cfg.teachers)}")
        seg = cfg.make_segmentation()
        from tqdm.auto import tqdm

        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_path)), exist_ok=True)
        items = [(str(q["question"]), str(q["answer"]), question_seed(cfg.seed, q["id"])) for q in pending]
        with open(cfg.output_path, "a", encoding="utf-8") as out, \
                tqdm(total=len(questions), initial=len(questions) - len(pending), desc=f"cord[{cfg.method}]",
                     unit="q", disable=not cfg.progress) as bar:
            # Records land as their questions finish (not in input order); a resumed run goes by id.
            for i, res in decode_many(items, teachers, scorer, cfg, seg=seg, in_flight=cfg.questions_in_flight):
                res = score_for_record(cfg, meta_prover, res, str(pending[i]["answer"]), seg.end_marker)
                append_record(out, make_record(pending[i], res, seg.end_marker))
                bar.update(1)
    records = load_done(cfg.output_path)
    summary = summarize(records, cfg.names())
    summary["method"] = cfg.method
    write_summary(summary, cfg.summary_file(), cfg.plot_file())
    return summary


def merge_shards(output_path: str, shard_paths: Sequence[str]) -> dict:
    """Concatenates the outputs of a sharded run (``num_shards`` runs, ``shard_index`` 0 .. N-1, each with
    its own output_path) into ``output_path``, in input order, and writes its summary and hit-rate plot.

    Refuses (InputError) shards made with different configs, a shard given twice or missing, an id in
    two shards, an input question in none (a shard not finished) and an existing ``output_path``. The
    merged output records the config with num_shards 1, so the unsharded command resumes it (nothing
    left to do). Returns the summary."""
    common = read_shard_configs([(p, p + ".run_config.json") for p in shard_paths], command="cord",
                                what="output_path")
    if os.path.exists(output_path):
        raise InputError(f"--merge-shards {output_path}: exists; choose a new path for the merged output")
    cfg = config_from_record(CordConfig, common, output_path=output_path, num_shards=1, shard_index=0,
                             summary_path=None, plot_path=None)
    expected = [q["id"] for q in read_questions(cfg.input_path, cfg.limit)]
    records = merge_shard_records(list(shard_paths), expected)
    write_records_atomic(output_path, records)
    write_json_atomic(run_config_file(cfg), {"config": config_values(cfg)})
    summary = summarize(records, cfg.names())
    summary["method"] = cfg.method
    write_summary(summary, cfg.summary_file(), cfg.plot_file())
    log.info("cord: merged %d shards, %d records -> %s", len(shard_paths), len(records), output_path)
    return summary


def _print_summary(summary: dict, cfg: CordConfig) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "hit_rates"}, indent=1))
    print(f"records: {cfg.output_path}\nsummary: {cfg.summary_file()}\nplot: {cfg.plot_file()}")


def merge_cli(argv: Sequence[str]) -> int:
    """`distillkit cord --merge-shards OUT SHARD [SHARD ...]`."""
    out, shards = parse_merge_shards(
        argv, prog="distillkit cord --merge-shards", what="output_path",
        description="Concatenate the outputs of a sharded CoRD run (--num-shards N --shard-index i) in input order "
                    "and write their summary and hit-rate plot.")
    summary = merge_shards(out, shards)
    print(json.dumps({k: v for k, v in summary.items() if k != "hit_rates"}, indent=1))
    print(f"records: {out}\nsummary: {out}.summary.json\nplot: {out}.hit_rates.png")
    return 0


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def cli(argv: Sequence[str] | None = None) -> int:
    """`distillkit cord --config cord.yaml [--field value ...]`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--merge-shards" in argv:
        return merge_cli(argv)
    # types, ranges, device, paths: all checked before any model loads
    try:
        cfg = parse_config(CordConfig, argv, "distillkit cord",
                           "CoRD: collaborative step-wise multi-teacher decoding scored by a meta-prover. A sharded "
                           "run (--num-shards N --shard-index i, one output_path each) is merged with "
                           "`distillkit cord --merge-shards OUT SHARD_OUTPUT...`.")
    except SystemExit as exc:  # cord's cli has always returned its exit code (bad input: 2) rather than exiting
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    _print_summary(summary, cfg)
    return 0
