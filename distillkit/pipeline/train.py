"""The shared trainer behind SFT on CoRD traces, MoT's branch training and VCRD.

AdamW, cosine schedule with linear warmup, gradient clipping and accumulation, bf16 autocast where
the device supports it, JSONL metrics, a progress bar, and checkpoint + resume: the trainer's whole
state (model, optimizer, schedule, RNG, step) is written atomically every ``save_every`` steps, and a
run started again with the same ``output_dir`` continues from there and reaches the same weights as
an uninterrupted run (the data order is a pure function of seed and step).
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

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def save_pretrained_atomic(model, tokenizer, path: str) -> None:
    """``save_pretrained`` of model and tokenizer into ``path`` without ever leaving a half-written
    folder there: written beside it, then renamed into place (an older folder is moved aside first and
    removed last, so a crash leaves either the old or the new model, plus a stray folder at worst)."""
    import shutil

    tmp, old = path + ".partial", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class Trainer:
    """Trains ``model`` on ``examples`` with ``loss_fn(model, batch) -> (loss, metrics)``.

    examples: any indexable sequence; ``collate(list_of_examples) -> batch`` (tensors are moved to
    the model's device). params: what to optimise (default: every parameter requiring grad), either
    parameters or AdamW param groups (dicts with "params" and per-group options such as "lr"; every
    group follows the same warmup + cosine schedule, scaled to its own rate).

    on_step: a callback ``on_step(step, metrics)`` called after every optimizer step, once that step's
    metrics line and checkpoint (when ``save_every`` falls on it) are on disk: ``step`` is the number of
    steps done, ``metrics`` the step's floats (loss, lr, grad_norm, ...). A callback may stop training by
    raising, or even end the process; a run started again resumes from the last checkpoint with nothing
    lost (the tests kill the process from here at a known step).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, examples: Sequence, collate: Callable,
                 loss_fn: Callable, *, params=None, on_step: Callable[[int, dict], None] | None = None):
        if len(examples) == 0:
            raise ValueError("examples is empty: nothing to train on")
        self.model, self.cfg, self.examples, self.collate, self.loss_fn = model, config, examples, collate, loss_fn
        self.on_step = on_step
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(_param_groups(model, params), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cosine_with_warmup(
            s, warmup=config.warmup_steps, total=config.max_steps, min_ratio=config.min_lr_ratio))
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}
        if config.bf16 == "on":
            self.autocast = True
        elif config.bf16 == "off":
            self.autocast = False
        else:
            self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    # -- data order: a pure function of (seed, step), so a resumed run sees the same batches
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g)}
        return self._perms[epoch]

    def batch_examples(self, step: int, micro: int) -> list:
        n, b = len(self.examples), self.cfg.batch_size
        start = (step * self.cfg.grad_accum + micro) * b
        return [self.examples[int(self._perm(p // n)[p % n])] for p in range(start, start + b)]

    # -- checkpoints
    @property
    def state_path(self) -> str:
        return os.path.join(self.cfg.output_dir, STATE_NAME)

    def save(self) -> None:
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        atomic_save({
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": asdict(self.cfg),
        }, self.state_path)

    def load(self) -> bool:
        if not os.path.exists(self.state_path):
            return False
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = int(state["step"])
        self._truncate_metrics(self.step)
        log.info("resumed %s at step %d", self.cfg.output_dir, self.step)
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
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(self.cfg.grad_accum):
            batch = self._to_device(self.collate(self.batch_examples(self.step, micro)))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, metrics = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {self.step}")
            (loss / self.cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.cfg.grad_accum
        if self.cfg.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
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
        last: dict = {}
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=os.path.basename(self.cfg.output_dir) or "train",
                   unit="step", disable=not self.cfg.progress)
        while self.step < self.cfg.max_steps:
            last = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "grad_norm")})
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                self._log({"step": self.step, **last})
            # the last step always checkpoints (a run resumed after it does nothing); a loop that never ran
            # (resumed at max_steps) has nothing new to write
            if self.step == self.cfg.max_steps or (self.cfg.save_every and self.step % self.cfg.save_every == 0):
                self.save()
            if self.on_step is not None:  # after the checkpoint: a callback that ends the process loses nothing
                self.on_step(self.step, last)
        bar.close()
        return {"step": self.step, **last}
