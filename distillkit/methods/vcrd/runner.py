"""VCRD's training run (resumable) and its command line."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

import torch

from distillkit._errors import InputError
from distillkit.methods.vcrd.config import VcrdConfig
from distillkit.methods.vcrd.step import (
    _eval_mode,
    build_rollouts,
    output_head,
    rollout,
    rollout_seed,
    vcrd_step,
)
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.runs import config_values, parse_merge_shards, write_json_atomic
from distillkit.pipeline.train import (
    torch_device,
)
from distillkit.teachers.base import Proposal

log = logging.getLogger(__name__)


# ---- training --------------------------------------------------------------------------------------

class VcrdObjective:
    """The Trainer's ``loss_fn(model, batch)``: rollouts + weights + fused losses.

    A batch is a list of prompts (online rollouts: drawn here, no grad, the student's with its current
    weights) or of :class:`FixedRollout` (offline: drawn once before training). ``trainer`` must be set
    after the Trainer is built: the rollout and candidate-token seeds derive from its step and the
    micro-batch index (counted here: the Trainer calls once per micro-batch, in order).

    Under torchrun each rank draws the rollouts of its own shard of prompts, seeded by the global index of its
    slice (``micro * world_size + rank``): a run on N ranks draws what one process accumulating N micro-batches
    of the same size draws, and trains on the same loss (each slice's loss averaged over slices and ranks)."""

    def __init__(self, teacher_model, teacher_backend, tokenizer, cfg: VcrdConfig, judge=None):
        self.teacher_model, self.teacher_backend, self.tokenizer = teacher_model, teacher_backend, tokenizer
        self.cfg, self.judge = cfg, judge
        self.trainer = None
        self._step, self._micro = -1, 0

    def _next_seed(self) -> int:
        step = self.trainer.step if self.trainer is not None else 0
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        info = self.trainer.dist if self.trainer is not None else None
        rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
        return rollout_seed(self.cfg.train.seed, step, self._micro * world + rank)

    def __call__(self, model, batch: list):
        from distillkit.teachers.hf import HFTeacher

        cfg = self.cfg
        seed = self._next_seed()
        if batch and isinstance(batch[0], FixedRollout):
            rolls = build_rollouts(self.tokenizer, [r.prompt for r in batch], [r.teacher for r in batch],
                                   [r.student for r in batch], max_new_tokens=cfg.rollout_tokens)
        else:
            from distillkit.pipeline.distributed import unwrap

            was_training = model.training
            student_backend = HFTeacher(unwrap(model), self.tokenizer, name="student", batch_size=max(1, len(batch)))
            model.train(was_training)  # HFTeacher puts the model in eval mode; rollout() handles generation
            with synced_generation(model, None if self.trainer is None else self.trainer.dist):
                rolls = rollout(self.teacher_backend, student_backend, self.tokenizer, batch,
                                max_new_tokens=cfg.rollout_tokens, temperature=cfg.temperature, seed=seed)
        # seed and seed + 1 drew the rollouts; seed + 2 draws the candidate tokens
        res = vcrd_step(model, self.teacher_model, rolls, judge=self.judge, weighting=cfg.weighting,
                        alpha=cfg.alpha, lambda_t=cfg.lambda_t, lambda_s=cfg.lambda_s, top_k=cfg.top_k,
                        gamma=cfg.gamma, clip=cfg.clip, eps=cfg.eps, backend=cfg.backend,
                        candidate_tokens=cfg.candidate_tokens, normalization=cfg.normalization, seed=seed + 2)
        return res.loss, res.metrics


@contextlib.contextmanager
def synced_generation(model, info):
    """Generation from the trainer's student under FSDP2 on several ranks: every forward all-gathers, so every
    rank must make the same number of them. Transformers' ``generate`` then keeps each rank stepping until all are
    done (its ``synced_gpus``, turned on for a module it sees as FSDP-managed), and the root's own parameters
    (embeddings, final norm, head) are gathered first by one forward of the root (a peft model's ``generate``
    calls the inner model, past the root's hooks; the decoder layers gather their own). DDP and one process:
    nothing to do."""
    if info is None or info.strategy != "fsdp" or info.world_size < 2:
        yield
        return
    marked = [m for m in model.modules() if hasattr(m, "generate") and hasattr(m, "config")
              and not getattr(m, "_is_fsdp_managed_module", False)]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    model.unshard()
    for m in marked:
        m._is_fsdp_managed_module = True
    try:
        yield
    finally:
        for m in marked:
            del m._is_fsdp_managed_module


@dataclasses.dataclass(frozen=True)
class FixedRollout:
    """One prompt with its teacher and student rollouts, drawn once before training (offline mode)."""
    prompt: str
    teacher: Proposal
    student: Proposal


ROLLOUTS_NAME = "rollouts.jsonl"


def rollout_batches(prompts: list[str], batch_size: int) -> list[tuple[int, list[int]]]:
    """The offline rollouts' batches: (batch index, positions of its prompts), batch i holding prompts
    i * batch_size .. (i + 1) * batch_size - 1. A prompt's rollout depends on its batch (sampled together with
    the batch's other prompts, seeded by the batch index), so a batch is the unit of a shard."""
    size = max(1, batch_size)
    return [(b, list(range(i, min(len(prompts), i + size)))) for b, i in enumerate(range(0, len(prompts), size))]


def shard_batches(prompts: list[str], cfg: VcrdConfig) -> list[tuple[int, list[int]]]:
    """The batches of shard ``cfg.shard_index`` of ``cfg.num_shards``: batch goes to shard
    :func:`distillkit.pipeline.runs.shard_of` of its prompt texts (joined), a stable hash."""
    from distillkit.pipeline.runs import select_shard

    items = [{"id": "\x1f".join(prompts[i] for i in pos), "batch": (b, pos)}
             for b, pos in rollout_batches(prompts, cfg.train.batch_size)]
    return [it["batch"] for it in select_shard(items, cfg.num_shards, cfg.shard_index)]


def _propose_all(backend, prompts: list[str], cfg: VcrdConfig, seed: int, side: int,
                 batches: list[tuple[int, list[int]]]) -> list[Proposal]:
    """One rollout per prompt of ``batches`` (batch index, prompt positions), in their order, batch b sampled with
    a seed from (seed, b, side): the same whatever else the run does (and whichever shard draws it)."""
    from tqdm.auto import tqdm

    out: list[Proposal] = []
    with _eval_mode([backend]):
        for b, pos in tqdm(batches, desc="rollouts", unit="batch", disable=not cfg.train.progress):
            got = backend.propose([prompts[i] for i in pos], n=1, max_new_tokens=cfg.rollout_tokens, stop=None,
                                  temperature=cfg.temperature, seed=rollout_seed(seed, b, side) + side)
            out += [p[0] for p in got]
    return out


def _read_rollouts(path: str, side: str, prompts: list[str]) -> list[Proposal] | None:
    """The kept rollouts of one side, or None when the file holds none for exactly these prompts."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if [r.get("prompt") for r in rows] != prompts or any(side not in r for r in rows):
        return None
    return [Proposal(**r[side]) for r in rows]


def _write_rollouts(path: str, ids: list[str], prompts: list[str], sides: dict[str, list[Proposal]]) -> None:
    from distillkit.pipeline.runs import write_records_atomic

    write_records_atomic(path, [{"id": ids[i], "prompt": prompt, **{k: dataclasses.asdict(v[i])
                                                                     for k, v in sides.items()}}
                                for i, prompt in enumerate(prompts)])


def offline_rollouts(cfg: VcrdConfig, prompts: list[str], backend, tokenizer, student=None, *,
                     side: str = "teacher", write: bool = True,
                     batches: list[tuple[int, list[int]]] | None = None) -> list[Proposal]:
    """The fixed rollouts of one side (teacher: through ``backend``; student: the model ``student``),
    drawn once and kept in output_dir/rollouts.jsonl, so that a resumed run trains on the same ones.
    write: False on every rank but rank 0 under torchrun (each draws the same rollouts: the seeds are the run's).
    batches: the batches to draw (:func:`shard_batches`: one shard's); default: every batch of ``prompts``.
    Each record's id is its prompt's position among all of ``prompts``; returns the rollouts of ``batches``."""
    from distillkit.teachers.hf import HFTeacher

    batches = rollout_batches(prompts, cfg.train.batch_size) if batches is None else batches
    positions = [i for _, pos in batches for i in pos]
    mine = [prompts[i] for i in positions]
    path = os.path.join(cfg.output_dir, ROLLOUTS_NAME)
    have = _read_rollouts(path, side, mine)
    if have is not None:
        return have
    if side == "student":
        was_training = student.training
        backend = HFTeacher(student, tokenizer, name="student", batch_size=max(1, cfg.train.batch_size))
        student.train(was_training)
    got = _propose_all(backend, prompts, cfg, cfg.train.seed, 0 if side == "teacher" else 1, batches)
    other = "student" if side == "teacher" else "teacher"
    sides = {side: got}
    kept = _read_rollouts(path, other, mine)
    if kept is not None:
        sides[other] = kept
    if write:
        _write_rollouts(path, [str(i) for i in positions], mine, sides)
    return got


def sft_stage(student, tokenizer, cfg: VcrdConfig, prompts: list[str], teacher_rollouts: list[Proposal], *,
              export: str | None = None) -> dict:
    """Supervised fine-tuning of ``student`` (in place) on prompt + teacher rollout, ``sft_steps`` steps
    before distillation (Appendix 10.2); resumable in output_dir/sft. export: also write the fine-tuned model
    there (``Trainer.export``: under torchrun the way to the weights, which FSDP2 leaves sharded)."""
    from distillkit.pipeline.data import Example, SFTCollator, sft_loss
    from distillkit.pipeline.train import Trainer

    examples = [Example(id=str(i), prompt=p, response=r.text, answer="") for i, (p, r)
                in enumerate(zip(prompts, teacher_rollouts)) if r.text]
    if not examples:
        raise InputError("sft_steps > 0 but every teacher rollout is empty: nothing to fine-tune on")
    tcfg = dataclasses.replace(cfg.train, output_dir=os.path.join(cfg.output_dir, "sft"), max_steps=cfg.sft_steps,
                               lr=cfg.sft_lr or cfg.train.lr, warmup_steps=min(cfg.train.warmup_steps, cfg.sft_steps))
    trainer = Trainer(student, tcfg, examples, SFTCollator(tokenizer), sft_loss)
    last = trainer.train()
    if export is not None:
        trainer.export(export, tokenizer)
    return last


def cap_prompts(prompts: list[str], tokenizer, max_tokens: int | None) -> list[str]:
    """The prompts of at most ``max_tokens`` tokens (all when None); the others are left out, logged."""
    if max_tokens is None:
        return prompts
    kept = [p for p in prompts if len(tokenizer(p)["input_ids"]) <= max_tokens]
    if len(kept) < len(prompts):
        log.warning("max_prompt_tokens=%d: leaving out %d of %d prompts", max_tokens, len(prompts) - len(kept),
                    len(prompts))
    if not kept:
        raise InputError(f"max_prompt_tokens={max_tokens}: every prompt is longer")
    return kept


def load_prompts(cfg: VcrdConfig) -> list[str]:
    """The prompts' questions (a JSONL file or a Hugging Face dataset folder, columns renamed through
    ``cfg.fields``) in ``cfg.prompt_template``; InputError naming the line or row (and id) of a record without a text
    question. The answer is not needed: VCRD trains on rollouts."""
    from distillkit.pipeline.data import fill_prompt, iter_rows

    rows = list(iter_rows(cfg.prompts, fields=cfg.fields, split=cfg.split))
    if not rows:
        raise InputError(f"prompts={cfg.prompts!r} holds no record")
    out = []
    for where, r in rows:
        question = r.get("question")
        if not isinstance(question, str) or not question.strip():
            rid = f" (id {r['id']!r})" if "id" in r else ""
            raise InputError(f"prompts={cfg.prompts!r}: {where}{rid}: question={question!r}: expected a "
                             "non-empty string")
        out.append(fill_prompt(cfg.prompt_template, question=question))
    return out


def render_prompts(prompts: list[str], tokenizer, cfg: VcrdConfig) -> list[str]:
    """The prompts as the models are given them: ``chat_template`` auto wraps each in the tokenizer's chat template
    (``system_prompt`` first); a BOS written by the template is left to the tokenizer, which adds it when the
    rollouts encode the prompt. none: as they are."""
    from distillkit.pipeline.data import render_prompt

    if cfg.chat_template == "none":
        return prompts
    bos = tokenizer.bos_token
    out = []
    for p in prompts:
        text = render_prompt(tokenizer, p, cfg.chat_template, cfg.system_prompt)
        out.append(text[len(bos):] if bos and text.startswith(bos) else text)
    return out


def load_models(cfg: VcrdConfig, device):
    """(student float32 in train mode, teacher frozen in eval mode, teacher rollout backend, tokenizer, judge)."""
    from transformers import AutoModelForCausalLM

    from distillkit.teachers.hf import HFTeacher, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.student)
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).to(device)
    teacher, _ = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype, device=device)
    teacher.requires_grad_(False)
    v_s, v_t = output_head(student)[0].shape[0], output_head(teacher)[0].shape[0]
    if v_s != v_t:
        raise ValueError(f"teacher={cfg.teacher!r} has a vocabulary of {v_t}, student={cfg.student!r} of {v_s}: "
                         "VCRD needs one shared tokenizer")
    if cfg.teacher_backend == "vllm":
        from distillkit.teachers.vllm import VLLMTeacher

        backend = VLLMTeacher(cfg.teacher, name="teacher", dtype=cfg.teacher_dtype,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    else:
        backend = HFTeacher(teacher, tokenizer, name="teacher", batch_size=max(1, cfg.train.batch_size))
    judge = None
    if cfg.judge and cfg.judge_type == "value_head":
        from distillkit.methods.vcrd.judges import HFValueHeadJudge

        judge = HFValueHeadJudge.from_pretrained(cfg.judge, policy_tokenizer=tokenizer, dtype=cfg.teacher_dtype,
                                                 device=device, step_tag=cfg.judge_step_tag,
                                                 batch_size=cfg.judge_batch_size)
    elif cfg.judge:
        from distillkit.methods.vcrd.judges import HFProcessRewardJudge

        judge = HFProcessRewardJudge.from_pretrained(
            cfg.judge, policy_tokenizer=tokenizer, dtype=cfg.teacher_dtype, device=device,
            good_token=cfg.judge_good_token, bad_token=cfg.judge_bad_token, step_tag=cfg.judge_step_tag,
            batch_size=cfg.judge_batch_size)
    return student.train(), teacher.eval(), backend, tokenizer, judge



# may differ between a run and its resume: how often a checkpoint / metrics line is written (the trainer
# resumes exactly from any checkpoint); overwrite and progress always may (distillkit.pipeline.runs)
RESUME_FREE_FIELDS = ("save_every", "log_every")


def _begin_run(cfg: VcrdConfig, info) -> None:
    """Checks output_dir's run against ``cfg`` and records it; under torchrun rank 0 does, and every rank raises
    its error."""
    from distillkit.pipeline.runs import begin_dir_run

    if not info.distributed:
        begin_dir_run(cfg, cfg.output_dir, free=RESUME_FREE_FIELDS, previous_from="vcrd_summary.json")
        return
    import torch.distributed as dist

    error: list[str | None] = [None]
    if info.is_main:
        try:
            begin_dir_run(cfg, cfg.output_dir, free=RESUME_FREE_FIELDS, previous_from="vcrd_summary.json")
        except InputError as exc:
            error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise InputError(error[0])


def _reload(path: str, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def run(cfg: VcrdConfig) -> dict:
    """Trains (resuming from output_dir's checkpoint), saves ``output_dir/final``, evaluates answer
    accuracy when eval_data is given; returns (and writes to vcrd_summary.json) the summary.

    A rerun must use the config the run was started with (recorded in output_dir/run_config.json;
    see :mod:`distillkit.pipeline.runs`): a different one raises InputError naming the fields, unless
    ``overwrite`` (then the old output_dir is moved aside and the run starts afresh).

    Under torchrun (``strategy: ddp | fsdp``) every rank runs this: each draws the online rollouts of its shard
    of prompts (offline ones: every rank the same, rank 0 writes them), the loss is averaged over all ranks' slices,
    the SFT stage's model passes to distillation through its export (output_dir/sft/model), and rank 0 writes
    ``final``, evaluates and writes the summary.

    With ``num_shards`` > 1 the run draws the offline rollouts of its shard of the prompt batches
    (:func:`shard_batches`; the sides :func:`shard_sides` names), writes them to output_dir/rollouts.jsonl and
    returns before training; :func:`merge_rollout_shards` (``distillkit vcrd --merge-shards``) merges the shards
    into an output_dir on which the unsharded run trains without drawing them again."""
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.distributed import barrier, init_distributed
    from distillkit.pipeline.train import Trainer

    device = torch_device(cfg.device)
    # the input files are checked, and the config compared with the run's, before any model loads
    prompts = load_prompts(cfg)
    questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit, fields=cfg.fields, split=cfg.split) \
        if cfg.eval_data else None
    info = init_distributed(cfg.train.strategy, device)
    _begin_run(cfg, info)
    student, teacher, teacher_backend, tokenizer, judge = load_models(cfg, device)
    prompts = cap_prompts(render_prompts(prompts, tokenizer, cfg), tokenizer, cfg.max_prompt_tokens)
    if cfg.num_shards > 1:  # one shard of the offline rollouts: training waits for the merged rollouts
        return _draw_shard(cfg, prompts, student, teacher_backend, tokenizer, info)
    teacher_rolls = None
    if cfg.rollouts == "offline" or cfg.sft_steps:
        teacher_rolls = offline_rollouts(cfg, prompts, teacher_backend, tokenizer, side="teacher", write=info.is_main)
    if cfg.sft_steps:
        sft_model = os.path.join(cfg.output_dir, "sft", "model") if info.distributed else None
        sft_stage(student, tokenizer, cfg, prompts, teacher_rolls, export=sft_model)
        if sft_model is not None:  # the data-parallel wrapper (or FSDP2's shards) stays with the SFT trainer
            student = _reload(sft_model, device)
    examples: list = prompts
    if cfg.rollouts == "offline":  # drawn once, by the student as it starts distillation (after SFT)
        student_rolls = offline_rollouts(cfg, prompts, None, tokenizer, student, side="student",
                                         write=info.is_main)
        examples = [FixedRollout(p, t, s) for p, t, s in zip(prompts, teacher_rolls, student_rolls)]
    student.train()
    tcfg = dataclasses.replace(cfg.train, output_dir=cfg.output_dir)
    objective = VcrdObjective(teacher, teacher_backend, tokenizer, cfg, judge)
    trainer = Trainer(student, tcfg, examples, list, objective)
    objective.trainer = trainer
    last = trainer.train()
    final = os.path.join(cfg.output_dir, "final")
    trainer.export(final, tokenizer)  # LoRA merged; under torchrun rank 0 writes (FSDP2: gathered first)
    summary_path = os.path.join(cfg.output_dir, "vcrd_summary.json")
    previous = {}
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            previous = json.load(f)
    finished_before = previous.get("step") == trainer.step  # a rerun of a finished run: nothing was trained
    if finished_before and previous.get("last_metrics"):
        last = previous["last_metrics"]  # the trainer returns only the step when it trains nothing
    summary = {"config": config_values(cfg), "step": trainer.step, "final_model": final, "last_metrics": last}
    if not info.is_main:
        barrier(info)  # rank 0 evaluates and writes the summary
        return summary
    if cfg.eval_data:
        if finished_before and "eval" in previous:  # same eval fields: the run config guarantees it
            summary["eval"] = previous["eval"]
        else:
            from distillkit.pipeline.evaluate import answer_accuracy

            if info.distributed:  # the trainer's student may be sharded: the exported one, whole
                student = _reload(final, device)
            acc = answer_accuracy(student, tokenizer, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.max_new_tokens, chat_template=cfg.chat_template,
                                  system_prompt=cfg.system_prompt)
            summary["eval"] = {"accuracy": acc["accuracy"], "n": acc["n"]}
        log.info("answer accuracy %.4f on %d questions", summary["eval"]["accuracy"], summary["eval"]["n"])
    write_json_atomic(summary_path, summary)
    barrier(info)
    return summary


def shard_sides(cfg: VcrdConfig) -> tuple[str, ...]:
    """The rollout sides a shard draws: the teacher's always (offline rollouts or the SFT stage's data), the
    student's when the run draws them offline from the student as it starts (no SFT stage: after one, the
    unsharded run draws them from the fine-tuned student)."""
    return ("teacher", "student") if cfg.rollouts == "offline" and not cfg.sft_steps else ("teacher",)


def _draw_shard(cfg: VcrdConfig, prompts: list[str], student, teacher_backend, tokenizer, info) -> dict:
    from distillkit.pipeline.distributed import barrier

    batches = shard_batches(prompts, cfg)
    for side in shard_sides(cfg):
        offline_rollouts(cfg, prompts, teacher_backend if side == "teacher" else None, tokenizer,
                         student if side == "student" else None, side=side, write=info.is_main, batches=batches)
    n = sum(len(pos) for _, pos in batches)
    path = os.path.join(cfg.output_dir, ROLLOUTS_NAME)
    log.info("vcrd: shard %d of %d: %s rollouts of %d of %d prompts in %s; merge the shards with --merge-shards",
             cfg.shard_index, cfg.num_shards, " and ".join(shard_sides(cfg)), n, len(prompts), path)
    barrier(info)
    return {"config": config_values(cfg), "shard": {"index": cfg.shard_index, "of": cfg.num_shards},
            "prompts": n, "sides": list(shard_sides(cfg)), "rollouts": path}


def merge_rollout_shards(output_dir: str, shard_dirs: Sequence[str]) -> dict:
    """Merges the rollouts.jsonl of a sharded rollout generation (``num_shards`` runs, each its own output_dir)
    into ``output_dir``/rollouts.jsonl, in prompt order, and records the unsharded config there, so that
    ``distillkit vcrd`` with that config and ``output_dir`` trains on them without drawing any.

    Refuses (InputError) shards of different configs, a shard given twice or missing, a prompt in two shards or
    in none (a shard unfinished), a shard without the student rollouts it should hold, prompts that are not the
    input's (the input changed since the shards ran), and an ``output_dir`` that already holds anything.
    Returns what was merged."""
    from distillkit.pipeline.runs import (
        RUN_CONFIG_NAME,
        config_from_record,
        dir_has_outputs,
        merge_shard_records,
        read_shard_configs,
        write_records_atomic,
    )
    from distillkit.teachers.hf import load_tokenizer

    common = read_shard_configs([(d, os.path.join(d, RUN_CONFIG_NAME)) for d in shard_dirs], command="vcrd",
                                what="output_dir")
    if dir_has_outputs(output_dir, ignore=()):
        raise InputError(f"--merge-shards {output_dir}: not empty; choose a new directory for the merged rollouts")
    cfg = config_from_record(VcrdConfig, common, output_dir=output_dir, num_shards=1, shard_index=0)
    tokenizer = load_tokenizer(cfg.student)
    prompts = cap_prompts(render_prompts(load_prompts(cfg), tokenizer, cfg), tokenizer, cfg.max_prompt_tokens)
    records = merge_shard_records([os.path.join(d, ROLLOUTS_NAME) for d in shard_dirs],
                                  [str(i) for i in range(len(prompts))])
    sides = shard_sides(cfg)
    for rec in records:
        i = int(rec["id"])
        if rec.get("prompt") != prompts[i]:
            raise InputError(f"rollout {i}: its prompt {rec.get('prompt')!r} is not the input's prompt {prompts[i]!r}; "
                             f"prompts={cfg.prompts!r} changed since the shards ran")
        lacking = [side for side in sides if side not in rec]
        if lacking:
            raise InputError(f"rollout {i} (prompt {prompts[i]!r}) has no {' or '.join(lacking)} rollout: its shard "
                             "has not finished; rerun it")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ROLLOUTS_NAME)
    write_records_atomic(path, records)
    write_json_atomic(os.path.join(output_dir, RUN_CONFIG_NAME), {"config": config_values(cfg)})
    log.info("vcrd: merged %d shards, %d prompts' %s rollouts -> %s", len(shard_dirs), len(records),
             " and ".join(sides), path)
    return {"shards": len(shard_dirs), "prompts": len(records), "sides": list(sides), "rollouts": path}


def merge_cli(argv: Sequence[str]) -> int:
    """`distillkit vcrd --merge-shards OUT_DIR SHARD_DIR [SHARD_DIR ...]`."""
    out, shards = parse_merge_shards(
        argv, prog="distillkit vcrd --merge-shards", what="output_dir",
        description="Merge the offline rollouts of a sharded run (--num-shards N --shard-index i, one output_dir "
                    "each) into a new output_dir; then run distillkit vcrd on it unsharded to train.")
    print(json.dumps(merge_rollout_shards(out, shards)))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--merge-shards" in argv:
        return merge_cli(argv)
    cfg = parse_config(VcrdConfig, argv, "distillkit vcrd",
                       "VCRD: validity-calibrated reasoning distillation (teacher- and student-prefix rollouts, "
                       "validity-weighted skew KL / skew reverse KL).")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("step", "final_model", "last_metrics", "eval", "shard", "prompts",
                                              "sides", "rollouts") if k in summary}))
    return 0
