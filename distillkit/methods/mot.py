"""MoT: Merge-of-Thought distillation.

Rounds of teacher-specific branch SFT followed by weight-space merging: in each of T rounds, K
branches start from the current merged student and train S steps on their own teacher's traces
(one random trace per prompt among those whose final answer is correct, Section 4.1; ``traces_per_prompt:
all`` keeps every correct one); the branches are merged (average, or TIES / DARE) into the next round's
start, and the merged student is evaluated after every round (accuracy averaged over ``eval_samples``
sampled answers per question when above 1, as the paper averages 16 runs). The final model is the best
round by that accuracy (``select: last`` takes the last round).

TIES / DARE need a base: the previous round's merge, or in round 1 the student. A student given as a
Hub id or saved in another dtype than the float32 branches is first loaded as the branches are
(``from_pretrained``, float32) and written to ``output_dir/base``, which is then the merge's base.

One process (default): branches train one after another, holding one branch plus the running
average in memory (TIES / DARE stream the saved branches from disk instead). Under torchrun:

- ``strategy: ddp | fsdp`` (any world size): the branches train one after another, each data-parallel over
  all ranks (each rank its slice of every global batch of ``world_size x batch_size`` traces), each exported
  with ``Trainer.export``; rank 0 merges the saved branches (average, TIES or DARE) and every rank starts the
  next round from the merge on disk;
- ``strategy: none`` with one rank per teacher: rank k trains branch k alone and the merge is
  ``all_reduce_average_`` (average only).

    distillkit mot --config configs/mot.yaml
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distillkit._errors import InputError
from distillkit.pipeline.config import config_field as _help
from distillkit.pipeline.config import parse_config
from distillkit.pipeline.data import question_seed
from distillkit.pipeline.runs import config_values, write_json_atomic
from distillkit.pipeline.train import (
    TrainConfig,
    save_pretrained_atomic,
    torch_device,
    train_field,
    with_train_options,
)

log = logging.getLogger(__name__)
MERGES = ("average", "ties", "dare", "dare_ties")
SELECTS = ("best", "last")
TRACES_PER_PROMPT = ("one", "all")


# each branch trains steps_per_round steps in its own directory, checkpointing a few times
@with_train_options(derived=("max_steps", "save_every", "log_every"))
@dataclass
class MotConfig:
    student: str = _help("student checkpoint to start from (HF directory or Hub id)", default="")
    teacher_data: list[str] = _help("one JSONL of traces per teacher ({question, answer, response} or CoRD records)",
                                    default_factory=list)
    output_dir: str = _help("run directory: branches, merged rounds, metrics, plot, final model", default="mot-run")
    rounds: int = _help("T: merge rounds", default=3)
    steps_per_round: int = _help("S: optimizer steps per branch per round", default=50)
    merge: str = _help("average | ties | dare | dare_ties", default="average")
    weights: list[float] | None = _help("merge weight per teacher branch (default equal)", default=None)
    density: float = _help("ties/dare: fraction of each task vector kept", default=0.5)
    lam: float = _help("ties/dare: scale of the merged task vector", default=1.0)
    traces_per_prompt: str = _help("one: one random correct trace per prompt per teacher (Section 4.1, seeded) | "
                                   "all: every correct trace", default="one")
    select: str = _help("final model: best (the round with the highest eval accuracy; the last round without "
                        "eval_data) | last", default="best")
    eval_data: str | None = _help("JSONL {id, question, answer} evaluated after every round", default=None)
    eval_samples: int = _help("answers per eval question: 1 = greedy; n > 1 = n sampled answers (eval_temperature) "
                              "and the accuracy averaged over them", default=1)
    eval_temperature: float = _help("sampling temperature of the eval answers when eval_samples > 1", default=1.0)
    eval_limit: int = _help("at most this many eval questions", default=64)
    max_new_tokens: int = _help("generation budget per eval answer", default=64)
    prompt_template: str = _help("prompt with {question}", default="{question}\n<think> ### Step")
    fields: dict[str, str] | None = _help("column names of the inputs (teacher_data and eval_data: JSONL files or "
                                          "Hugging Face dataset folders), e.g. {question: problem, answer: solution, "
                                          "response: trace}; None: the names as they are", default=None)
    split: str | None = _help("the split to read from a Hugging Face DatasetDict input", default=None)
    chat_template: str = _help("none: the branches train on the raw prompt | auto: on the student tokenizer's chat "
                               "template around it (system_prompt first when set)", default="none")
    system_prompt: str | None = _help("system turn of chat_template auto", default=None)
    train: TrainConfig = train_field()
    max_length: int = _help("truncate examples to this many tokens", default=512)
    device: str = _help("auto | cpu | cuda", default="auto")
    overwrite: bool = _help("when output_dir holds a run started with a different config: move it aside "
                            "(<output_dir>.replaced-<time>) and start afresh instead of refusing", default=False)

    def __post_init__(self):
        if not self.student:
            raise ValueError("student: a checkpoint directory is required")
        if len(self.teacher_data) < 1:
            raise ValueError("teacher_data: at least one teacher's JSONL is required")
        for name in ("rounds", "steps_per_round", "eval_limit", "max_new_tokens", "max_length", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r}: expected one of {MERGES}")
        if self.weights is not None and len(self.weights) != len(self.teacher_data):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.teacher_data)} teachers")
        if self.select not in SELECTS:
            raise ValueError(f"select={self.select!r}: expected one of {SELECTS}")
        if self.traces_per_prompt not in TRACES_PER_PROMPT:
            raise ValueError(f"traces_per_prompt={self.traces_per_prompt!r}: expected one of {TRACES_PER_PROMPT}")
        if not (self.eval_temperature > 0 and self.eval_temperature < float("inf")):
            raise ValueError(f"eval_temperature={self.eval_temperature} must be a finite number > 0")
        if not 0 < self.density <= 1:
            raise ValueError(f"density={self.density} must lie in (0, 1]")
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")
        from distillkit.pipeline.data import CHAT_TEMPLATES, check_fields

        self.fields = check_fields(self.fields)
        if self.chat_template not in CHAT_TEMPLATES:
            raise InputError(f"chat_template={self.chat_template!r}: expected one of {CHAT_TEMPLATES}")


def one_trace_per_prompt(examples, seed: int):
    """One trace per distinct prompt, drawn at random (seeded: the same draw whatever the run order), in
    the order of each prompt's first trace."""
    import random

    groups: dict[str, list] = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex)
    return [random.Random(question_seed(seed, prompt)).choice(group) for prompt, group in groups.items()]


def load_teacher_datasets(cfg: MotConfig):
    """Teacher-specific datasets, keeping only traces whose final answer is correct (one per prompt unless
    ``traces_per_prompt`` is all)."""
    from distillkit.pipeline.answers import answers_match, extract_answer
    from distillkit.pipeline.data import load_examples

    datasets = []
    for k, path in enumerate(cfg.teacher_data):
        exs = load_examples(path, prompt_template=cfg.prompt_template, only_correct=True,
                            is_correct=lambda resp, ans: answers_match(extract_answer(resp), ans), fields=cfg.fields,
                            split=cfg.split)
        if not exs:
            raise ValueError(f"teacher_data[{k}]={path!r} has no trace with a correct final answer")
        if cfg.traces_per_prompt == "one":
            exs = one_trace_per_prompt(exs, cfg.train.seed * 1009 + k)
        datasets.append(exs)
    return datasets


def branch_trainer(model, tokenizer, examples, cfg: MotConfig, round_idx: int, k: int, *, strategy: str | None = None):
    """The Trainer of one teacher's branch: S steps in its own directory (resumable); ``strategy`` overrides
    ``cfg.train.strategy`` (the one-branch-per-rank mode trains each branch in its own process)."""
    from distillkit.pipeline.data import sft_loss
    from distillkit.pipeline.train import Trainer

    tcfg = dataclasses.replace(cfg.train, output_dir=branch_dir(cfg, round_idx, k), max_steps=cfg.steps_per_round,
                               seed=cfg.train.seed + 1000 * round_idx + k,
                               save_every=max(1, cfg.steps_per_round // 4), log_every=max(1, cfg.steps_per_round // 10),
                               strategy=strategy or cfg.train.strategy)
    return Trainer(model, tcfg, examples, _collator(cfg, tokenizer), sft_loss)


def _collator(cfg: MotConfig, tokenizer):
    from distillkit.pipeline.data import SFTCollator

    return SFTCollator(tokenizer, cfg.max_length, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)


def train_branch(model, tokenizer, examples, cfg: MotConfig, round_idx: int, k: int, *, strategy: str | None = None):
    """Trains ``model`` in place for S steps on one teacher's data (resumable in its own directory)."""
    return branch_trainer(model, tokenizer, examples, cfg, round_idx, k, strategy=strategy).train()


def branch_dir(cfg: MotConfig, round_idx: int, k: int) -> str:
    return os.path.join(cfg.output_dir, f"round{round_idx}", f"branch{k}")


def round_dir(cfg: MotConfig, round_idx: int) -> str:
    """The merged student after round ``round_idx`` (-1: the starting student)."""
    return cfg.student if round_idx < 0 else os.path.join(cfg.output_dir, f"round{round_idx}", "merged")


def _load(path: str, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)



def merge_round_local(cfg: MotConfig, tokenizer, datasets, round_idx: int, device) -> None:
    """K branches one after another from the previous merge; writes round_dir(round_idx)."""
    from distillkit.merge import average_

    start = round_dir(cfg, round_idx - 1)
    K = len(datasets)
    weights = cfg.weights or [1.0] * K
    running, running_w = None, 0.0
    for k, examples in enumerate(datasets):
        branch = _load(start, device)
        train_branch(branch, tokenizer, examples, cfg, round_idx, k)
        if cfg.merge != "average":  # TIES / DARE need every branch: stream them from disk
            save_pretrained_atomic(branch, tokenizer, os.path.join(branch_dir(cfg, round_idx, k), "model"))
        elif running is None:
            running, running_w = branch, weights[k]
        else:  # running average: avg <- (W avg + w_k branch) / (W + w_k); one branch + the average in memory
            average_(running, [running, branch], [running_w, weights[k]])
            running_w += weights[k]
        del branch
    if cfg.merge == "average":
        save_pretrained_atomic(running, tokenizer, round_dir(cfg, round_idx))
    else:
        merge_saved_branches(cfg, tokenizer, K, round_idx, device)


def merge_saved_branches(cfg: MotConfig, tokenizer, K: int, round_idx: int, device) -> None:
    """Merges the K branches saved in ``branch_dir(round_idx, k)/model`` into round_dir(round_idx): the average
    (one branch and the running average in memory, the same arithmetic as :func:`merge_round_local`'s) or TIES /
    DARE streamed from disk."""
    from distillkit.merge import average_, merge_checkpoints

    weights = cfg.weights or [1.0] * K
    paths = [os.path.join(branch_dir(cfg, round_idx, k), "model") for k in range(K)]
    out = round_dir(cfg, round_idx)
    if cfg.merge == "average":
        running = _load(paths[0], device)
        running_w = weights[0]
        for k in range(1, K):
            branch = _load(paths[k], device)
            average_(running, [running, branch], [running_w, weights[k]])
            running_w += weights[k]
            del branch
        save_pretrained_atomic(running, tokenizer, out)
        return
    method = {"ties": "ties", "dare": "dare", "dare_ties": "dare_ties"}[cfg.merge]
    base = merge_base(cfg, round_idx, tokenizer, device)
    merge_checkpoints(paths, out, method=method, base=base, weights=weights, density=cfg.density, lam=cfg.lam,
                      seed=cfg.train.seed + round_idx, overwrite=True, progress=cfg.train.progress)
    tokenizer.save_pretrained(out)


def _float32_safetensors(path: str) -> bool:
    """True when ``path`` is a local safetensors checkpoint whose floating tensors are all float32 (the
    branches' dtype), so that it can be the merge's base as it is."""
    from distillkit.merge.checkpoint import _Checkpoint

    if not os.path.isdir(path):
        return False
    try:
        tensors = _Checkpoint(path, "base").tensors
    except InputError:
        return False
    return all(t.dtype == torch.float32 for t in tensors.values() if t.dtype.is_floating_point)


def merge_base(cfg: MotConfig, round_idx: int, tokenizer, device) -> str:
    """The TIES / DARE base of a round: the previous round's merge (written float32 by this run), or the
    student in round 1. A student that is a Hub id, or a checkpoint in another dtype than the float32 branches
    (or not in safetensors), is loaded as the branches are (``from_pretrained``, float32) and saved once to
    ``output_dir/base``; the merged model is float32 like the branches."""
    start = round_dir(cfg, round_idx - 1)
    if round_idx > 0 or _float32_safetensors(start):
        return start
    base = os.path.join(cfg.output_dir, "base")
    if not _float32_safetensors(base):
        model = _load(start, device)
        save_pretrained_atomic(model, tokenizer, base)
        del model
    return base


def merge_round_data_parallel(cfg: MotConfig, tokenizer, datasets, round_idx: int, device) -> None:
    """Under torchrun with strategy ddp / fsdp: every branch in turn, data-parallel over all ranks, exported to
    ``branch_dir/model`` (rank 0 writes; FSDP2 gathers first); rank 0 merges them into round_dir(round_idx), then
    every rank waits for it (the next round starts from it on disk)."""
    import torch.distributed as dist

    start = round_dir(cfg, round_idx - 1)
    for k, examples in enumerate(datasets):
        trainer = branch_trainer(_load(start, device), tokenizer, examples, cfg, round_idx, k)
        trainer.train()
        trainer.export(os.path.join(branch_dir(cfg, round_idx, k), "model"), tokenizer)
        del trainer
    if dist.get_rank() == 0:
        merge_saved_branches(cfg, tokenizer, len(datasets), round_idx, device)
    dist.barrier()


def merge_round_distributed(cfg: MotConfig, tokenizer, datasets, round_idx: int, device) -> None:
    """Under torchrun: :func:`merge_round_data_parallel` with strategy ddp / fsdp; with strategy none, one branch
    per rank (the world size must be the number of teachers): rank k trains branch k alone, ``all_reduce_average_``
    merges, rank 0 writes round_dir(round_idx)."""
    import torch.distributed as dist

    from distillkit.merge import all_reduce_average_

    if cfg.train.strategy != "none":
        merge_round_data_parallel(cfg, tokenizer, datasets, round_idx, device)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.merge != "average":
        raise InputError(f"merge={cfg.merge!r} under torchrun with strategy none: one branch per rank merges by "
                         "all_reduce_average_ (average only); strategy ddp or fsdp trains the branches one after "
                         "another over all ranks and merges them with TIES / DARE on rank 0")
    if world != len(datasets):
        raise InputError(f"torchrun world size {world} != number of teachers {len(datasets)} with strategy none "
                         "(one branch per rank): set strategy ddp or fsdp to train the branches one after another, "
                         "each data-parallel over all ranks")
    branch = _load(round_dir(cfg, round_idx - 1), device)
    train_branch(branch, tokenizer, datasets[rank], cfg, round_idx, rank)
    all_reduce_average_(branch, weight=None if cfg.weights is None else cfg.weights[rank])
    if rank == 0:
        save_pretrained_atomic(branch, tokenizer, round_dir(cfg, round_idx))
    dist.barrier()


def evaluate_round(cfg: MotConfig, tokenizer, round_idx: int, device, datasets) -> dict:
    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.pipeline.evaluate import answer_accuracy, mean_loss

    model = _load(round_dir(cfg, round_idx), device)
    metrics: dict = {"round": round_idx + 1}
    collate = _collator(cfg, tokenizer)
    for k, exs in enumerate(datasets):  # how well the merge keeps each teacher's skill
        metrics[f"train_loss_teacher{k}"] = mean_loss(model, collate, exs[:64])
    if cfg.eval_data:
        questions = read_questions_for_eval(cfg.eval_data, cfg.eval_limit, fields=cfg.fields, split=cfg.split)
        if cfg.eval_samples == 1:
            acc = answer_accuracy(model, tokenizer, questions, prompt_template=cfg.prompt_template,
                                  max_new_tokens=cfg.max_new_tokens, chat_template=cfg.chat_template,
                                  system_prompt=cfg.system_prompt)
            metrics["accuracy"] = acc["accuracy"]
        else:
            per_sample = sampled_accuracy(model, tokenizer, questions, cfg, seed=cfg.train.seed + 7919 * round_idx)
            metrics["accuracy"] = sum(per_sample) / len(per_sample)
            metrics["accuracy_samples"] = per_sample
    return metrics


@torch.no_grad()
def sampled_accuracy(model, tokenizer, questions: Sequence[dict], cfg: MotConfig, *, seed: int,
                     batch_size: int = 16) -> list[float]:
    """Answer accuracy of each of ``cfg.eval_samples`` sampled runs over ``questions`` (temperature
    ``cfg.eval_temperature``; run i seeded from ``seed`` and i), framed as the greedy evaluation frames them."""
    from distillkit.pipeline.answers import answers_match, extract_answer
    from distillkit.pipeline.data import check_reference_answer
    from distillkit.pipeline.evaluate import eval_prompts

    for i, q in enumerate(questions):
        check_reference_answer(q, f"questions[{i}]")
    prompts = eval_prompts(tokenizer, questions, prompt_template=cfg.prompt_template, chat_template=cfg.chat_template,
                           system_prompt=cfg.system_prompt)
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    try:
        for run_idx in range(cfg.eval_samples):
            correct = 0
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(seed * 1_000_003 + run_idx)
                for i in range(0, len(prompts), batch_size):
                    enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                    if tokenizer.bos_token_id is not None:  # the same framing as training (bos + prompt)
                        bos = torch.full((enc["input_ids"].shape[0], 1), tokenizer.bos_token_id, device=device)
                        enc["input_ids"] = torch.cat([bos, enc["input_ids"]], 1)
                        enc["attention_mask"] = torch.cat([torch.ones_like(bos), enc["attention_mask"]], 1)
                    gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                         temperature=cfg.eval_temperature, top_k=0, top_p=1.0,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                    texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                    correct += sum(answers_match(extract_answer(t), q["answer"])
                                   for t, q in zip(texts, questions[i:i + batch_size]))
            out.append(correct / max(1, len(prompts)))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def best_round(history: Sequence[dict], select: str) -> int:
    """The index of the final model's round: the highest accuracy (the earliest of equals) with ``best``
    when the rounds were evaluated, else the last."""
    if select == "last" or not history or "accuracy" not in history[0]:
        return len(history) - 1
    return max(range(len(history)), key=lambda r: (history[r]["accuracy"], -r))


def _rounds_grow(old, new) -> bool:
    # a round trains the same whatever the number of rounds: more rounds extend a run, fewer do not
    return new >= old


def begin_mot_run(cfg: MotConfig, distributed: bool) -> None:
    """Refuses a config that differs from the one output_dir's run was started with (InputError naming
    the fields; ``overwrite`` moves the old run aside instead) and records it (see
    :mod:`distillkit.pipeline.runs`). May change: overwrite, progress, and rounds upwards. Under torchrun rank 0
    checks and records; every rank raises the same error."""
    from distillkit.pipeline.runs import begin_dir_run

    def begin():
        begin_dir_run(cfg, cfg.output_dir, extendable={"rounds": _rounds_grow}, previous_from="mot_metrics.json")

    if not distributed:
        begin()
        return
    import torch.distributed as dist

    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            begin()
        except InputError as exc:
            error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise InputError(error[0])


def run(cfg: MotConfig) -> list[dict]:
    """Runs every round (skipping rounds already merged on disk); returns per-round metrics.

    A rerun must use the config the run was started with (recorded in output_dir/run_config.json), or
    raise its rounds; another config raises InputError naming the fields, unless ``overwrite``."""
    import torch.distributed as dist

    from distillkit.pipeline.data import read_questions_for_eval
    from distillkit.teachers.hf import load_tokenizer

    device = torch_device(cfg.device)
    if cfg.train.strategy != "none":  # under torchrun (refused otherwise, naming the launch)
        from distillkit.pipeline.distributed import init_distributed

        init_distributed(cfg.train.strategy, device)
    distributed = dist.is_available() and dist.is_initialized()
    is_main = not distributed or dist.get_rank() == 0
    # the input files are checked, and the config compared with the run's, before any model loads
    datasets = load_teacher_datasets(cfg)
    if cfg.eval_data:
        read_questions_for_eval(cfg.eval_data, cfg.eval_limit, fields=cfg.fields, split=cfg.split)
    begin_mot_run(cfg, distributed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    tokenizer = load_tokenizer(cfg.student)
    metrics_path = os.path.join(cfg.output_dir, "mot_metrics.json")
    history: list[dict] = []
    if os.path.exists(metrics_path):
        history = json.loads(open(metrics_path).read())["rounds"]
    for r in range(cfg.rounds):
        if os.path.isdir(round_dir(cfg, r)) and len(history) > r:
            log.info("round %d already merged: %s", r + 1, round_dir(cfg, r))
            continue
        (merge_round_distributed if distributed else merge_round_local)(cfg, tokenizer, datasets, r, device)
        if is_main:
            history = history[:r] + [evaluate_round(cfg, tokenizer, r, device, datasets)]
            log.info("round %d: %s", r + 1, history[-1])
            write_json_atomic(metrics_path, {"config": config_values(cfg), "rounds": history})
            plot_rounds(history, os.path.join(cfg.output_dir, "mot_rounds.png"))
        if distributed:
            dist.barrier()
    if is_main:
        chosen = best_round(history[:cfg.rounds], cfg.select)
        log.info("final model: round %d (select=%s)", chosen + 1, cfg.select)
        write_json_atomic(metrics_path, {"config": config_values(cfg), "rounds": history,
                                         "final_round": chosen + 1})
        final = os.path.join(cfg.output_dir, "final")
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(round_dir(cfg, chosen), partial)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(partial, final)
    return history


def plot_rounds(history: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in sorted(k for k in history[0] if k.startswith("train_loss")):
        ax.plot(rounds, [h[key] for h in history], marker="o", label=key.replace("train_loss_", "loss: "))
    ax.set_xlabel("MoT round")
    ax.set_ylabel("cross-entropy")
    if "accuracy" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(rounds, [h["accuracy"] for h in history], marker="s", color="black", label="accuracy")
        ax2.set_ylabel("answer accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Merge-of-Thought: merged student after each round")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(MotConfig, argv, "distillkit mot", "MoT: rounds of teacher-specific branch SFT and merging.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            cfg.device = "cuda"
    try:
        history = run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        for h in history:
            print(json.dumps(h))
        print(f"final model: {os.path.join(cfg.output_dir, 'final')}")
    return 0
