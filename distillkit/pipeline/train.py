"""The shared trainer behind SFT on CoRD traces, MoT's branch training and VCRD.

AdamW, cosine schedule with linear warmup, gradient clipping and accumulation, bf16 autocast where
the device supports it, JSONL metrics, a progress bar, and checkpoint + resume: the trainer's whole
state (model, optimizer, schedule, RNG, step) is written atomically every ``save_every`` steps, and a
run started again with the same ``output_dir`` continues from there and reaches the same weights as
an uninterrupted run (the data order is a pure function of seed and step).

Under torchrun (``strategy: ddp | fsdp``, see :mod:`distillkit.pipeline.distributed`) the same loop runs
data-parallel: each rank its slice of every global batch, the loss normalised over the global kept tokens,
DCP checkpoints, and the final model exported from rank 0. LoRA (peft), gradient checkpointing and
TensorBoard / Weights & Biases reporting are options of :class:`TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distillkit._errors import InputError

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
REPORT_TO = ("none", "tensorboard", "wandb")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    output_dir: str = _help("where checkpoints and metrics.jsonl go")
    max_steps: int = _help("optimizer steps", default=100)
    batch_size: int = _help("examples per micro-batch", default=8)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    lr: float = _help("peak learning rate", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_steps: int = _help("linear warmup steps before the cosine decay", default=0)
    min_lr_ratio: float = _help("final learning rate as a fraction of lr", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    bf16: str = _help("bf16 autocast: auto (CUDA with bf16 support) | on | off", default="auto")
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=0)
    log_every: int = _help("write a metrics line every N steps", default=10)
    seed: int = _help("data order and initial RNG", default=0)
    progress: bool = _help("show a progress bar", default=True)
    resume: bool = _help("continue from output_dir's checkpoint when there is one", default=True)
    adam_betas: tuple[float, float] = _help("AdamW (beta1, beta2)", default=(0.9, 0.999))
    strategy: str = _help("none (one process) | ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per decoder "
                          "layer, then the root); ddp and fsdp run under torchrun", default="none")
    gradient_checkpointing: bool = _help("recompute each decoder layer's activations in the backward "
                                         "(Hugging Face gradient_checkpointing_enable)", default=False)
    lora_r: int = _help("LoRA rank through peft (0: full fine-tuning); merged into the exported model", default=0)
    lora_alpha: float = _help("LoRA alpha (the adapter's scale is alpha / r)", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.0)
    lora_target_modules: list[str] = _help("module names LoRA adapts", default_factory=lambda: ["q_proj", "v_proj"])
    report_to: str = _help("none | tensorboard | wandb: where the metrics also go (metrics.jsonl always)",
                           default="none")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16={self.bf16!r}: expected auto, on or off")
        from distillkit.pipeline.distributed import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.report_to not in REPORT_TO:
            raise InputError(f"report_to={self.report_to!r}: expected one of {REPORT_TO}")
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in betas):
            raise InputError(f"adam_betas={self.adam_betas!r}: expected two numbers in [0, 1)")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise InputError(f"weight_decay={self.weight_decay!r}: expected a number >= 0")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise InputError(f"lora_r={self.lora_r!r}: expected an integer >= 0 (0: no LoRA)")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise InputError(f"lora_alpha={self.lora_alpha!r}: expected a positive number")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout={self.lora_dropout!r}: expected a number in [0, 1)")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_r > 0 and (not self.lora_target_modules
                                or not all(isinstance(m, str) and m for m in self.lora_target_modules)):
            raise InputError(f"lora_target_modules={self.lora_target_modules!r}: expected module names")


# the method owns these: its run directory (the trainer writes there or below), and resuming (always on)
METHOD_OWNED = ("output_dir", "resume")


def train_field(**defaults) -> Any:
    """A method config's ``train: TrainConfig`` field, with the method's own defaults (``output_dir`` is the
    method's: ``train.output_dir`` stays empty until the method names its trainer's directory)."""
    return field(default_factory=lambda: TrainConfig(output_dir="", **defaults),
                 metadata={"help": "the shared trainer's options (distillkit.pipeline.train.TrainConfig)"})


def with_train_options(cls=None, *, derived: tuple[str, ...] = (), renamed: dict[str, str] | None = None):
    """Class decorator for a method config holding ``train: TrainConfig = train_field(...)``: the trainer's
    options are also accepted flat, as before (``MotConfig(lr=1e-4)``, ``lr:`` in YAML, ``--lr``), and routed
    into ``train``; a ``train:`` mapping is merged onto the method's defaults.

    derived: trainer options the method sets itself (refused when given); renamed: {old name: trainer name}
    accepted for one release with a deprecation message naming the new name."""

    def wrap(cls):
        own = {f.name for f in dataclasses.fields(cls)}
        flat = {f.name: f for f in dataclasses.fields(TrainConfig)
                if f.name not in own and f.name not in METHOD_OWNED and f.name not in derived}
        cls.__train_options__ = flat  # read by distillkit.pipeline.config (flags, coercion, YAML)
        cls.__renamed_options__ = dict(renamed or {})
        init = cls.__init__

        def __init__(self, *args, **kw):
            for old, new in cls.__renamed_options__.items():
                if old in kw:
                    log.warning("%s: %r is deprecated, use %r (the old name is accepted for this release only)",
                                cls.__name__, old, new)
                    if new in kw:
                        raise ValueError(f"{old} and {new}: the same option given twice ({old} is its old name)")
                    kw[new] = kw.pop(old)
            given = {k: kw.pop(k) for k in list(kw) if k in flat}
            bad = sorted(k for k in kw if k in derived)
            train = kw.pop("train", None)
            if isinstance(train, dict):
                bad += sorted(k for k in train if k not in flat)
                given = {**train, **given} if not set(train) & set(given) else _twice(set(train) & set(given))
                train = None
            if bad:
                raise ValueError(f"{bad}: not a trainer option of {cls.__name__} (set by the method, or unknown); "
                                 f"trainer options: {sorted(flat)}")
            if given or train is not None:
                base = train if train is not None else _default_train(cls)
                train = dataclasses.replace(base, **given)
            if train is not None:
                kw["train"] = train
            init(self, *args, **kw)

        __init__.__wrapped__ = init
        cls.__init__ = __init__
        for name in flat:  # read access as before the options were nested: cfg.lr is cfg.train.lr
            setattr(cls, name, property(lambda self, _name=name: getattr(self.train, _name),
                                        doc=f"``train.{name}`` (read-only)"))
        return cls

    return wrap if cls is None else wrap(cls)


def _twice(names) -> dict:
    raise ValueError(f"{sorted(names)}: given both flat and under train:")


def _default_train(cls) -> TrainConfig:
    f = next(f for f in dataclasses.fields(cls) if f.name == "train")
    return f.default_factory()  # type: ignore[misc]


def torch_device(name: str) -> torch.device:
    """A config's ``device`` as a torch device: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: this rank's own GPU
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine to min_ratio at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, params) -> list[dict]:
    """AdamW groups of trainable parameters from parameters or from param-group dicts."""
    if params is None:
        params = model.parameters()
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("params: nothing to optimise (no parameter requires grad)")
    return groups


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_pretrained_atomic(model, tokenizer, path: str, *, max_shard_size: str | int | None = None) -> None:
    """``save_pretrained`` of model and tokenizer (None: the model only) into ``path`` without ever leaving a
    half-written folder there: written beside it, then renamed into place (an older folder is moved aside first
    and removed last, so a crash leaves either the old or the new model, plus a stray folder at worst).
    max_shard_size: safetensors files of at most this size ("5GB", bytes; None: transformers' default)."""
    import shutil

    tmp, old = path + ".partial", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class _Reporter:
    """metrics to TensorBoard or Weights & Biases besides metrics.jsonl (rank 0 only); imported on use."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.kind, self.writer, self.run = cfg.report_to, None, None
        if cfg.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("report_to=tensorboard needs the tensorboard package: pip install "
                                  f"'distillkit[tensorboard]' (or report_to: none); import failed: {exc}") from exc
            if enabled:
                self.writer = SummaryWriter(log_dir=os.path.join(cfg.output_dir, "tensorboard"))
        elif cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("report_to=wandb needs the wandb package: pip install wandb (or report_to: none); "
                                  f"import failed: {exc}") from exc
            if enabled:
                self.run = wandb.init(dir=cfg.output_dir, config=asdict(cfg), resume="allow",
                                      name=os.path.basename(os.path.abspath(cfg.output_dir)))

    def log(self, step: int, metrics: dict) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


def _lora_config(cfg: TrainConfig):
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ImportError(f"lora_r={cfg.lora_r} needs peft: pip install 'distillkit[lora]' (or lora_r: 0 for full "
                          f"fine-tuning); import failed: {exc}") from exc
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")


class Trainer:
    """Trains ``model`` on ``examples`` with ``loss_fn(model, batch) -> (loss, metrics)``.

    examples: any indexable sequence; ``collate(list_of_examples) -> batch`` (tensors are moved to
    the model's device). params: what to optimise (default: every parameter requiring grad), either
    parameters or AdamW param groups (dicts with "params" and per-group options such as "lr"; every
    group follows the same warmup + cosine schedule, scaled to its own rate).

    Loss normalisation: when ``metrics`` holds ``num_tokens`` (the micro-batch's kept tokens, ``loss`` their
    mean), the step's gradient is that of the sum of every kept token's loss over the step's micro-batches and
    ranks divided by their global count: the gradient of one process on the whole global batch, whatever each
    rank's count. Without it each micro-batch weighs the same (the mean of the micro-batch losses). Under torchrun
    every rank's ``metrics`` must hold the same keys (they are summed over the ranks in one all-reduce); the logged
    ``loss`` is the global token mean, the other metrics the mean over micro-batches and ranks.

    Under torchrun (``strategy`` ddp or fsdp) each of the N ranks takes its own ``batch_size`` slice of every
    global micro-batch of ``N * batch_size`` examples, a pure function of (seed, step, rank, N); ``loss_fn`` gets
    the data-parallel model (call it, not its submodules: the wrappers' hooks run in its forward); rank 0 alone
    writes metrics and shows the progress bar; checkpoints are DCP folders. With ``lora_r > 0`` the model is
    wrapped by peft (adapter init seeded by ``seed``); :meth:`train` merges the adapters back into ``model`` in place
    at the end (strategies none and ddp); under fsdp :meth:`export` writes the merged model.

    on_step: a callback ``on_step(step, metrics)`` called after every optimizer step, once that step's
    metrics line and checkpoint (when ``save_every`` falls on it) are on disk: ``step`` is the number of
    steps done, ``metrics`` the step's floats (loss, lr, grad_norm, ...). A callback may stop training by
    raising, or even end the process; a run started again resumes from the last checkpoint with nothing
    lost (the tests kill the process from here at a known step).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, examples: Sequence, collate: Callable,
                 loss_fn: Callable, *, params=None, on_step: Callable[[int, dict], None] | None = None):
        from distillkit.pipeline.distributed import init_distributed, wrap_model

        if len(examples) == 0:
            raise ValueError("examples is empty: nothing to train on")
        self.cfg, self.examples, self.collate, self.loss_fn = config, examples, collate, loss_fn
        self.on_step = on_step
        self.device = next(model.parameters()).device
        self.dist = init_distributed(config.strategy, self.device)
        if self.dist.distributed and self.device.type == "cuda" and self.device.index != self.dist.local_rank:
            self.device = torch.device("cuda", self.dist.local_rank)
            model.to(self.device)
        self.reporter = _Reporter(config, enabled=False)  # fails here, before any work, when the package is missing
        self.base_model = model  # the caller's model: trained in place (LoRA merged into it at the end)
        self.lora_config = None
        if config.lora_r > 0:
            if params is not None:
                raise InputError("params: not with lora_r > 0 (the LoRA adapters are what is optimised)")
            self.lora_config = _lora_config(config)  # raises naming the extra when peft is missing
            from peft import get_peft_model

            with torch.random.fork_rng(devices=[]):  # the same adapters on every rank and in every rerun
                torch.manual_seed(config.seed)
                model = get_peft_model(model, self.lora_config)
        if config.gradient_checkpointing:  # transformers 5 names it activation checkpointing
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise InputError("gradient_checkpointing: the model has no activation_checkpointing_enable "
                                 "(a Hugging Face PreTrainedModel has)")
        self.module = model  # the model to checkpoint (peft-wrapped with LoRA), before any data-parallel wrapper
        if self.dist.is_main and config.strategy != "none":
            log.info("%s over %d ranks", config.strategy, self.dist.world_size)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = _param_groups(model, params)
        self.autocast = {"on": True, "off": False}.get(config.bf16)
        if self.autocast is None:
            self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.model = wrap_model(model, self.dist, bf16=self.autocast)
        if config.strategy == "fsdp":  # fully_shard replaced the parameters by sharded ones: find them by name
            now = dict(model.named_parameters())
            for g in groups:
                g["params"] = [now[names[id(p)]] for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cosine_with_warmup(
            s, warmup=config.warmup_steps, total=config.max_steps, min_ratio=config.min_lr_ratio))
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}

    # -- data order: a pure function of (seed, step, rank, world size), so a resumed run sees the same batches
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g)}
        return self._perms[epoch]

    def batch_examples(self, step: int, micro: int) -> list:
        """This rank's examples of micro-batch ``micro`` of step ``step``: the global micro-batch is the next
        ``world_size * batch_size`` examples of the seeded epoch permutations, rank r takes its r-th slice."""
        n, b, w = len(self.examples), self.cfg.batch_size, self.dist.world_size
        start = (step * self.cfg.grad_accum + micro) * b * w + self.dist.rank * b
        return [self.examples[int(self._perm(p // n)[p % n])] for p in range(start, start + b)]

    # -- checkpoints
    @property
    def state_path(self) -> str:
        return os.path.join(self.cfg.output_dir, STATE_NAME)

    def _extra_state(self) -> dict:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": asdict(self.cfg),
        }

    def save(self) -> None:
        if self.dist.distributed:
            from distillkit.pipeline.distributed import save_checkpoint

            save_checkpoint(self.cfg.output_dir, self.model, self.optimizer, self._extra_state(), self.dist)
            return
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        atomic_save({**self._extra_state(), "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict()}, self.state_path)

    def load(self) -> bool:
        if self.dist.distributed:
            from distillkit.pipeline.distributed import barrier, checkpoint_path, load_checkpoint

            path = checkpoint_path(self.cfg.output_dir)
            if path is None:
                return False
            state = load_checkpoint(path, self.model, self.optimizer, self.dist, self.device)
        else:
            if not os.path.exists(self.state_path):
                return False
            state = torch.load(self.state_path, map_location=self.device, weights_only=False)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = int(state["step"])
        if self.dist.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed %s at step %d", self.cfg.output_dir, self.step)
        if self.dist.distributed:
            barrier(self.dist)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drops the metric records written after the checkpoint we resume from (they will be redone), with
        :func:`distillkit.pipeline.runs.read_records`' rules: every other line stays, one that does not
        parse included, and a torn last line is moved to ``metrics.jsonl.torn``."""
        from distillkit.pipeline.runs import read_records

        path = os.path.join(self.cfg.output_dir, METRICS_NAME)
        if not os.path.exists(path):
            return
        read_records(path)  # repairs the tail first: what is left is whole lines
        keep = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step):
                    keep.append(line)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(keep)
        os.replace(tmp, path)

    def _log(self, metrics: dict) -> None:
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        with open(os.path.join(self.cfg.output_dir, METRICS_NAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def _to_device(self, batch):
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch.to(self.device) if isinstance(batch, torch.Tensor) else batch

    # -- the loop
    def train_step(self) -> dict:
        from distillkit.pipeline.distributed import all_reduce_sum, set_gradient_sync

        self.model.train()
        accum = self.cfg.grad_accum
        weight, weighted_loss = 0.0, 0.0  # this rank's kept tokens (or micro-batches) and sum of loss x weight
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = self._to_device(self.collate(self.batch_examples(self.step, micro)))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {self.step}")
            w = float(metrics["num_tokens"]) if "num_tokens" in metrics else 1.0
            with set_gradient_sync(self.model, self.dist, sync=micro == accum - 1):
                (loss * w if w != 1.0 else loss).backward()  # a sum over kept tokens, divided below
            weight += w
            weighted_loss += float(loss.detach()) * w
            for k, v in metrics.items():
                if k not in ("loss", "num_tokens"):
                    sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        stats = all_reduce_sum(torch.tensor([weight, weighted_loss, *(sums[k] for k in keys)], dtype=torch.float64,
                                            device=self.device), self.dist).tolist()
        # gradients hold sum over this step's micro-batches, averaged over ranks by DDP / FSDP: times world size
        # over the global weight, they are the global mean's
        scale = self.dist.world_size / stats[0]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        totals = {"loss": stats[1] / stats[0]}
        if "num_tokens" in metrics:
            totals["num_tokens"] = stats[0]
        totals.update({k: v / (accum * self.dist.world_size) for k, v in zip(keys, stats[2:])})
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals

    def train(self) -> dict:
        from tqdm.auto import tqdm

        if self.cfg.resume:
            self.load()
        main = self.dist.is_main
        reporter = _Reporter(self.cfg, enabled=main)
        last: dict = {}
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=os.path.basename(self.cfg.output_dir) or "train",
                   unit="step", disable=not (self.cfg.progress and main))
        try:
            while self.step < self.cfg.max_steps:
                last = self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "grad_norm")})
                if main and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
                    self._log({"step": self.step, **last})
                    reporter.log(self.step, last)
                # the last step always checkpoints (a run resumed after it does nothing); a loop that never ran
                # (resumed at max_steps) has nothing new to write
                if self.step == self.cfg.max_steps or (self.cfg.save_every and self.step % self.cfg.save_every == 0):
                    self.save()
                if self.on_step is not None:  # after the checkpoint: a callback that ends the process loses nothing
                    self.on_step(self.step, last)
        finally:
            bar.close()
            reporter.close()
        if self.lora_config is not None and self.cfg.strategy != "fsdp":
            from distillkit.pipeline.distributed import unwrap

            unwrap(self.model).merge_and_unload()  # in place: the caller's model holds the merged weights
        return {"step": self.step, **last}

    def export(self, path: str, tokenizer=None, *, max_shard_size: str | int = "5GB") -> None:
        """Writes the trained model (LoRA merged) as a Hugging Face folder of safetensors shards of at most
        ``max_shard_size`` (and ``tokenizer`` when given), atomically, from rank 0; under fsdp the shards are
        gathered on rank 0's CPU first (every rank must call this). Call after :meth:`train`."""
        from distillkit.pipeline.distributed import barrier, full_state_dict, rebuild_on_cpu

        if self.cfg.strategy == "fsdp":
            state = full_state_dict(self.model, self.dist)
            if self.dist.is_main:
                save_pretrained_atomic(rebuild_on_cpu(self.module, state, self.lora_config), tokenizer, path,
                                       max_shard_size=max_shard_size)
        elif self.dist.is_main:
            save_pretrained_atomic(self.base_model, tokenizer, path, max_shard_size=max_shard_size)
        barrier(self.dist)
