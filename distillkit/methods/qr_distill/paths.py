"""QR-Distill steps 1-2: reasoning paths from the teachers (or a file), judged and filtered; resumable."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from distillkit._errors import InputError
from distillkit.methods.qr_distill.config import (
    JUDGE_MODES,
    QRDistillConfig,
)
from distillkit.pipeline.data import fill_prompt
from distillkit.pipeline.train import torch_device
from distillkit.teachers.base import Teacher

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# 1. Paths
# ----------------------------------------------------------------------------------------------
def path_key(qid: Any, style: str, teacher: str, sample: int) -> str:
    return f"{qid}|{style}|{teacher}|{sample}"


def make_path_record(q: dict, *, style: str, teacher: str, sample: int, prompt: str, response: str,
                     key: str | None = None) -> dict:
    """One path record with its final-answer verdict (the judge's fields are added by judge_paths)."""
    from distillkit.pipeline.answers import answers_match, extract_answer

    final = extract_answer(response)
    return {"id": key or path_key(q["id"], style, teacher, sample), "qid": q["id"], "question": q["question"],
            "answer": q["answer"], "style": style, "teacher": teacher, "sample": sample, "prompt": prompt,
            "response": response, "final_answer": final, "answer_correct": answers_match(final, q["answer"])}


def teacher_prompts(teacher: Teacher, prompts: Sequence[str], cfg: QRDistillConfig) -> list[str]:
    """The style prompts as ``teacher`` is given them: with ``chat_template`` auto each in the teacher's tokenizer
    chat template (``system_prompt`` first; a BOS the template writes is left to the teacher's tokenizer, which adds
    it when it encodes the prompt); a teacher without a ``tokenizer`` (a server applies its own template, a
    scripted teacher) gets the raw prompt. The path records keep the raw prompt: each student puts it in its own
    template."""
    from distillkit.pipeline.data import render_prompt

    tok = getattr(teacher, "tokenizer", None)
    if cfg.chat_template == "none" or tok is None:
        return list(prompts)
    bos = tok.bos_token if getattr(tok, "bos_token_id", None) is not None else None
    out = []
    for p in prompts:
        text = render_prompt(tok, p, cfg.chat_template, cfg.system_prompt)
        out.append(text[len(bos):] if bos and text != p and text.startswith(bos) else text)
    return out


def propose_paths(q: dict, teachers: Sequence[Teacher], cfg: QRDistillConfig, pending: set[str]) -> list[dict]:
    """Every teacher writes ``paths_per_style`` paths of question ``q`` in every style; returns the
    records whose key is in ``pending`` (seeds depend only on the question and teacher, so a resumed
    run regenerates exactly the missing ones)."""
    from distillkit.pipeline.data import question_seed

    templates, names, out = cfg.templates(), cfg.names(), []
    for t, teacher in enumerate(teachers):
        styles = [s for s in cfg.styles
                  if any(path_key(q["id"], s, names[t], j) in pending for j in range(cfg.paths_per_style))]
        if not styles:
            continue
        prompts = [fill_prompt(templates[s], question=q["question"]) for s in styles]
        props = teacher.propose(teacher_prompts(teacher, prompts, cfg), n=cfg.paths_per_style,
                                max_new_tokens=cfg.max_new_tokens, stop=cfg.stop,
                                seed=question_seed(cfg.train.seed, q["id"]) + 7919 * t, **cfg.teacher_sampling(t))
        for style, prompt, row in zip(styles, prompts, props):
            for j, prop in enumerate(row):
                key = path_key(q["id"], style, names[t], j)
                if key in pending:
                    out.append(make_path_record(q, style=style, teacher=names[t], sample=j, prompt=prompt,
                                                response=prop.text))
    return out


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_SCORE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_RATING = re.compile(r"\b(?:rating|score)\s*[:=]?\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)
_FLAGGED = re.compile(r"\bflagged\s*[:=]?\s*([^\n]*)", re.IGNORECASE)
_NOTHING = re.compile(r"^\W*(none|no|nothing|n/?a|-)?\W*$", re.IGNORECASE)


def parse_judgement(text: str, *, mode: str = "yes_no", threshold: float = 7.0) -> tuple[bool | None, float | None]:
    """(verdict, score) from a judge's output; (None, None) when it cannot be read.

    rating (Section 2.3): "Rating: N" (else "Score: N") is the score; a "Flagged:" line naming any step
    rejects the path whatever its rating; the verdict is (nothing flagged) and score >= threshold.
    yes_no: the first standalone "yes" / "no" (any case) gives score 1 / 0.
    score: the first number is the score; the verdict is score >= threshold."""
    if mode == "rating":
        m = _RATING.search(text)
        if m is None:
            return None, None
        score = float(m.group(1))
        flags = _FLAGGED.search(text)
        flagged = flags is not None and not _NOTHING.match(flags.group(1).strip())
        return (not flagged) and score >= threshold, score
    if mode == "yes_no":
        m = _YES_NO.search(text)
        if m is None:
            return None, None
        yes = m.group(1).lower() == "yes"
        return yes, float(yes)
    if mode == "score":
        m = _SCORE.search(text)
        if m is None:
            return None, None
        score = float(m.group(0))
        return score >= threshold, score
    raise ValueError(f"mode={mode!r}: expected one of {JUDGE_MODES}")


def judge_paths(judge: Teacher, records: list[dict], cfg: QRDistillConfig) -> list[dict]:
    """Adds judge_output, judge_score and judge_valid (None: unreadable verdict) to every record."""
    if not records:
        return records
    prompts = [fill_prompt(cfg.judge_prompt, question=r["question"], answer=r["answer"], response=r["response"])
               for r in records]
    outs = judge.propose(prompts, n=1, max_new_tokens=cfg.judge_max_new_tokens, stop=None, temperature=0.0)
    for rec, (prop,) in zip(records, outs):
        valid, score = parse_judgement(prop.text, mode=cfg.judge_mode, threshold=cfg.judge_threshold)
        rec.update(judge_output=prop.text, judge_score=score, judge_valid=valid)
    return records


def imported_records(cfg: QRDistillConfig) -> list[dict]:
    """Path records built from ``paths_input`` (a JSONL file or a Hugging Face dataset folder, columns renamed
    through ``fields``; answer verdicts recomputed, judge fields not yet set).
    A record without "id" is keyed ``path<i>`` (its index among the file's records); one without a
    reference answer raises InputError naming its line."""
    from distillkit.pipeline.data import check_reference_answer, iter_rows

    out, seen = [], set()
    for i, (where, rec) in enumerate(iter_rows(cfg.paths_input, fields=cfg.fields, split=cfg.split)):
        missing = [k for k in ("question", "answer", "response") if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field(s) {missing}; expected {{question, answer, response}}")
        check_reference_answer(rec, where)
        style = str(rec.get("style", "given"))
        key = str(rec.get("id", f"path{i}"))
        if key in seen:
            raise InputError(f"{where}: duplicate id {key!r}")
        seen.add(key)
        q = {"id": rec.get("qid", key), "question": rec["question"], "answer": rec["answer"]}
        prompt = rec.get("prompt") or (fill_prompt(cfg.templates()[style], question=rec["question"])
                                       if style in cfg.templates() else "")
        out.append(make_path_record(q, style=style, teacher=str(rec.get("teacher", "given")), sample=0,
                                    prompt=prompt, response=str(rec["response"]), key=key))
    if cfg.limit is not None:
        out = out[:cfg.limit]
    return out


def _load_generators(cfg: QRDistillConfig, need_teachers: bool, need_judge: bool):
    from distillkit.teachers import load_teacher

    def kw(backend):
        if backend == "openai":  # the judge served (teachers: pipeline.generation.load_teachers)
            return cfg.served_kwargs(cfg.judge_base_url or cfg.teacher_base_urls[0])
        if backend == "hf":
            return dict(dtype=cfg.gen_dtype, device=str(torch_device(cfg.device)), batch_size=cfg.gen_batch_size)
        return {} if cfg.gen_dtype == "float32" else dict(dtype=cfg.gen_dtype)

    from distillkit.pipeline.generation import load_teachers

    # per-teacher teacher_kwargs; served teachers (openai) take the server settings instead
    teachers = load_teachers(cfg, cfg.teachers, cfg.names(), **kw(cfg.teacher_backend)) if need_teachers else []
    judge = load_teacher(cfg.judge, backend=cfg.judge_backend, name="judge", **kw(cfg.judge_backend)) \
        if need_judge else None
    return teachers, judge


def collect_paths(cfg: QRDistillConfig, *, teachers: Sequence[Teacher] | None = None,
                  judge: Teacher | None = None) -> list[dict]:
    """All path records of the run, generating (and judging) the missing ones into paths.jsonl.

    Records of one question are appended together after they are judged, each as one whole line,
    so an interrupted run loses at most the question it was on."""
    from tqdm.auto import tqdm

    from distillkit.pipeline.data import read_questions
    from distillkit.pipeline.runs import append_record, read_records, select_shard

    path = cfg.paths_file()
    os.makedirs(cfg.output_dir, exist_ok=True)
    done = read_records(path, key="id")
    if cfg.judging() and any("judge_valid" not in r for r in done):
        raise ValueError(f"{path}: holds paths without a judge verdict but judge={cfg.judge!r} is set; "
                         "use another output_dir (or judge=None)")
    done_keys = {r["id"] for r in done}
    wanted: set[str] = set()
    if cfg.paths_input:
        groups: dict[Any, list[dict]] = {}
        for rec in select_shard(imported_records(cfg), cfg.num_shards, cfg.shard_index, key="qid"):
            wanted.add(rec["id"])
            if rec["id"] not in done_keys:
                groups.setdefault(rec["qid"], []).append(rec)
        work = [(qid, recs) for qid, recs in groups.items()]
    else:
        names = cfg.names()
        questions = read_questions(cfg.input_path, cfg.limit, fields=cfg.question_fields(), split=cfg.split)
        questions = select_shard(questions, cfg.num_shards, cfg.shard_index)
        work = []
        for q in questions:
            keys = {path_key(q["id"], s, n, j) for s in cfg.styles for n in names for j in range(cfg.paths_per_style)}
            wanted |= keys
            if keys - done_keys:
                work.append((q, keys - done_keys))
    log.info("qr-distill: %d path records on disk, %d question(s) to do", len(done), len(work))
    if work:
        need_judge = cfg.judging() and judge is None
        need_teachers = not cfg.paths_input and teachers is None
        if need_judge or need_teachers:
            loaded_t, loaded_j = _load_generators(cfg, need_teachers, need_judge)
            teachers = teachers if teachers is not None else loaded_t
            judge = judge if judge is not None else loaded_j
        if not cfg.paths_input and len(teachers) != len(cfg.teachers):
            raise ValueError(f"teachers: {len(teachers)} given but the config lists {len(cfg.teachers)}")
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(work), desc="qr-distill paths", unit="q", disable=not cfg.train.progress) as bar:
            for item, todo in work:  # (question, missing keys) or, for paths_input, (qid, records)
                recs = todo if cfg.paths_input else propose_paths(item, teachers, cfg, todo)
                if cfg.judging():
                    judge_paths(judge, recs, cfg)
                for rec in recs:
                    append_record(f, rec)
                bar.update(1)
    # Only this configuration's paths: records of styles or questions dropped since stay on disk, unused.
    return [r for r in read_records(path, key="id") if r["id"] in wanted]


def expected_path_ids(cfg: QRDistillConfig) -> list[str]:
    """Every path record id an unsharded run of ``cfg`` writes, in the order it writes them."""
    from distillkit.pipeline.data import read_questions

    if cfg.paths_input:
        return [rec["id"] for rec in imported_records(cfg)]
    names = cfg.names()
    questions = read_questions(cfg.input_path, cfg.limit, fields=cfg.question_fields(), split=cfg.split)
    return [path_key(q["id"], s, n, j) for q in questions
            for n in names for s in cfg.styles for j in range(cfg.paths_per_style)]


def merge_path_shards(output_dir: str, shard_dirs: Sequence[str]) -> dict:
    """Merges the paths.jsonl of a sharded path generation (``num_shards`` runs, each its own output_dir)
    into ``output_dir``/paths.jsonl, in question order, and records the unsharded config there, so that
    ``distillkit qr-distill`` with that config and ``output_dir`` trains on them (nothing left to generate).

    Refuses (InputError) shards of different configs, a shard given twice or missing, a path in two
    shards or in none, and an ``output_dir`` that already holds anything. Returns the path counts."""
    from distillkit.pipeline.runs import (
        RUN_CONFIG_NAME,
        config_from_record,
        config_values,
        dir_has_outputs,
        merge_shard_records,
        read_shard_configs,
        write_json_atomic,
        write_records_atomic,
    )

    common = read_shard_configs([(d, os.path.join(d, RUN_CONFIG_NAME)) for d in shard_dirs], command="qr-distill",
                                what="output_dir")
    if dir_has_outputs(output_dir, ignore=()):
        raise InputError(f"--merge-shards {output_dir}: not empty; choose a new directory for the merged paths")
    cfg = config_from_record(QRDistillConfig, common, output_dir=output_dir, num_shards=1, shard_index=0)
    records = merge_shard_records([os.path.join(d, os.path.basename(cfg.paths_file())) for d in shard_dirs],
                                  expected_path_ids(cfg))
    os.makedirs(output_dir, exist_ok=True)
    write_records_atomic(cfg.paths_file(), records)
    write_json_atomic(os.path.join(output_dir, RUN_CONFIG_NAME), {"config": config_values(cfg)})
    kept, stats = filter_paths(records, cfg)
    log.info("qr-distill: merged %d shards, %d paths (%d kept) -> %s", len(shard_dirs), len(records), len(kept),
             cfg.paths_file())
    return stats


# ----------------------------------------------------------------------------------------------
# 2. Quality filter
# ----------------------------------------------------------------------------------------------
def keep_path(rec: dict, cfg: QRDistillConfig) -> bool:
    """The filter: a correct final answer (filter_answer) and the judge's acceptance (filter_judge,
    when a judge is set; an unreadable verdict counts as rejection)."""
    if cfg.filter_answer and not rec.get("answer_correct", False):
        return False
    if cfg.filter_judge and cfg.judging() and rec.get("judge_valid") is not True:
        return False
    return True


def keep_top_rated(records: Sequence[dict], top: int | None) -> list[dict]:
    """Of each question's records, those whose judge_score is among its ``top`` highest (ties kept; order kept);
    ``top`` None: all."""
    if top is None:
        return list(records)
    scores: dict[Any, list[float]] = {}
    for r in records:
        scores.setdefault(r["qid"], []).append(float(r.get("judge_score") or 0.0))
    bar = {q: sorted(v, reverse=True)[min(top, len(v)) - 1] for q, v in scores.items()}
    return [r for r in records if float(r.get("judge_score") or 0.0) >= bar[r["qid"]]]


def filter_paths(records: Sequence[dict], cfg: QRDistillConfig) -> tuple[list[dict], dict]:
    """(kept records, counts overall and per style)."""
    kept = keep_top_rated([r for r in records if keep_path(r, cfg)], cfg.judge_keep_top if cfg.judging() else None)
    styles = sorted({r["style"] for r in records})
    stats = {"total": len(records), "answer_correct": sum(bool(r.get("answer_correct")) for r in records),
             "judge_valid": sum(r.get("judge_valid") is True for r in records) if cfg.judging() else None,
             "kept": len(kept),
             "kept_per_style": {s: sum(r["style"] == s for r in kept) for s in styles}}
    return kept, stats
