"""QR-Distill's run (paths -> filter -> routed training -> students and summary) and its command line."""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

import torch

from distillkit._errors import InputError
from distillkit.methods.qr_distill.config import (
    ROUTER_NAME,
    SUMMARY_NAME,
    QRDistillConfig,
)
from distillkit.methods.qr_distill.paths import collect_paths, filter_paths, imported_records
from distillkit.methods.qr_distill.training import (
    QRCollator,
    build_items,
    build_model,
    evaluate_students,
    load_students,
    make_trainer,
    route_features,
    routing_split,
    routing_summary,
    save_students,
)
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.runs import begin_dir_run, config_values, parse_merge_shards, write_json_atomic
from distillkit.pipeline.train import torch_device
from distillkit.teachers.base import Teacher

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
# may differ between a run and its resume: how often a checkpoint / metrics line is written (the trainer
# resumes exactly from any checkpoint); overwrite and progress always may (distillkit.pipeline.runs)
RESUME_FREE_FIELDS = ("save_every", "log_every")


def check_inputs(cfg: QRDistillConfig) -> None:
    """Reads the questions (or paths_input) and eval_data, raising InputError naming the line of a bad
    record, before any model is loaded."""
    from distillkit.pipeline.data import read_questions, read_questions_for_eval

    if cfg.paths_input:
        imported_records(cfg)
    else:
        read_questions(cfg.input_path, cfg.limit, fields=cfg.question_fields(), split=cfg.split)
    if cfg.eval_data:
        read_questions_for_eval(cfg.eval_data, cfg.eval_limit, fields=cfg.question_fields(), split=cfg.split)


def run(cfg: QRDistillConfig, *, teachers: Sequence[Teacher] | None = None, judge: Teacher | None = None,
        encoder=None) -> dict:
    """Paths -> filter -> routed multi-student training -> saved students and summary.

    teachers / judge: ready Teacher objects instead of loading cfg.teachers / cfg.judge;
    encoder: a ready (encoder, tokenizer) pair instead of loading cfg.router_encoder.
    Returns the summary written to qr_summary.json.

    A rerun must use the config the run was started with (recorded in output_dir/run_config.json; see
    :mod:`distillkit.pipeline.runs`): another raises InputError naming the fields, unless ``overwrite`` (then the
    old output_dir is moved aside and the run starts afresh)."""
    from distillkit.pipeline.distributed import barrier, init_distributed

    device = torch_device(cfg.device)
    check_inputs(cfg)
    if cfg.train.strategy == "fsdp":
        raise InputError("strategy='fsdp': QR-Distill trains its students data-parallel with strategy 'ddp' (each "
                         "student replicated, the router's gradient all-reduced like any parameter's)")
    info = init_distributed(cfg.train.strategy, device)

    def begin():
        begin_dir_run(cfg, cfg.output_dir, free=RESUME_FREE_FIELDS, previous_from=SUMMARY_NAME)
        return collect_paths(cfg, teachers=teachers, judge=judge)

    # under torchrun rank 0 checks the run and writes the paths, the other ranks then read them
    records = _on_rank0(info, begin)
    if records is None:
        records = collect_paths(cfg, teachers=teachers, judge=judge)
    kept, path_stats = filter_paths(records, cfg)
    if cfg.num_shards > 1:  # one shard of the path generation: training waits for the merged paths
        log.info("qr-distill: shard %d of %d: %d paths in %s; merge the shards with --merge-shards",
                 cfg.shard_index, cfg.num_shards, len(records), cfg.paths_file())
        return {"paths": path_stats, "shard": {"index": cfg.shard_index, "of": cfg.num_shards}}
    log.info("qr-distill: kept %d of %d paths", len(kept), len(records))
    if not kept:
        raise ValueError(f"no path passed the filter ({path_stats}); check {cfg.paths_file()} or relax "
                         "filter_answer / filter_judge")
    items = build_items(kept, cfg)
    features = route_features(cfg, kept, device, encoder) if cfg.learned_routing() else None
    students, tokenizers = load_students(cfg, device)
    with torch.random.fork_rng(devices=[]):  # the router's and projections' initial weights: from the run's seed
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, students, features.shape[1] if features is not None else None).to(device)
    if model.router is not None:
        model.router.fit_feature_scale(features.to(device))
    collate = QRCollator(tokenizers, cfg.max_length, features, chat_template=cfg.chat_template,
                         system_prompt=cfg.system_prompt)
    trainer = make_trainer(model, cfg, items, collate)
    last = trainer.train()
    if not info.is_main:  # the container is trained in place on every rank: rank 0 writes the outputs
        barrier(info)
        return {"paths": path_stats, "train": last}
    names = cfg.student_labels()
    summary = {"paths": path_stats, "train": last, "students": save_students(model, tokenizers, cfg),
               "routing": routing_summary(model, features, items, names, routing=cfg.canonical_routing()),
               "routing_split": routing_split(cfg.output_dir, names)}
    if model.router is not None:
        torch.save({"router": model.router.state_dict(), "in_dim": features.shape[1], "hidden": cfg.router_hidden,
                    "students": names, "encoder": cfg.router_encoder,
                    "routing": cfg.canonical_routing()}, os.path.join(cfg.output_dir, ROUTER_NAME))
    if cfg.eval_data:
        summary["eval"] = evaluate_students(model, tokenizers, cfg)
    summary["config"] = config_values(cfg)
    write_json_atomic(os.path.join(cfg.output_dir, SUMMARY_NAME), summary)
    barrier(info)
    return summary


def _on_rank0(info, fn):
    """``fn()`` on rank 0 (its result), None on the other ranks once rank 0 is done; an error raised on rank 0 is
    raised there as it is and on every other rank (InputError as InputError, anything else as RuntimeError naming
    it). One process: fn()."""
    if not info.distributed:
        return fn()
    import torch.distributed as dist

    result, error = None, [None]
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:
            dist.broadcast_object_list([(isinstance(exc, InputError), f"{type(exc).__name__}: {exc}")], src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        is_input, text = error[0]
        raise (InputError if is_input else RuntimeError)(f"rank 0 failed: {text}")
    return result


def merge_cli(argv: Sequence[str]) -> int:
    """`distillkit qr-distill --merge-shards OUT_DIR SHARD_DIR [SHARD_DIR ...]`."""
    from distillkit.methods.qr_distill.paths import merge_path_shards

    out, shards = parse_merge_shards(
        argv, prog="distillkit qr-distill --merge-shards", what="output_dir",
        description="Merge the paths of a sharded path generation (--num-shards N --shard-index i, one output_dir "
                    "each) into a new output_dir; then run distillkit qr-distill on it unsharded to train.")
    print(json.dumps(merge_path_shards(out, shards), indent=1))
    print(f"paths: {os.path.join(out, 'paths.jsonl')}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--merge-shards" in argv:
        return merge_cli(argv)
    cfg = parse_config(QRDistillConfig, argv, "distillkit qr-distill",
                       "QR-Distill: quality-filtered routing of reasoning paths with mutual-student distillation.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    print(f"summary: {os.path.join(cfg.output_dir, SUMMARY_NAME)}")
    return 0
