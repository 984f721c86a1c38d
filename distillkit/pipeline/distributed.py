"""The trainer's data-parallel plumbing on torch's own engine: process group from torchrun's environment,
DDP or FSDP2 (``fully_shard`` per decoder layer, then the root), sharded checkpoints with
torch.distributed.checkpoint (DCP), and the final model consolidated on rank 0 as Hugging Face safetensors.

Nothing here is home-made parallelism: every collective is torch.distributed's. Launch with
``torchrun --nproc_per_node N ...``; a run's ``output_dir`` must be on a file system every rank sees (DCP writes
one file per rank beside a shared metadata file).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from distillkit._errors import InputError

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")
CHECKPOINT_DIR = "checkpoint"  # DCP folder inside the trainer's output_dir (strategy ddp / fsdp)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(strategy: str, device: torch.device) -> DistInfo:
    """The process group for ``strategy`` ("ddp" / "fsdp"), initialised from torchrun's environment variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) unless it already is: nccl for CUDA, gloo for the CPU.
    "none": a single process, nothing initialised."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if strategy == "none":
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise InputError(f"strategy={strategy!r} needs a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK, "
                             "MASTER_ADDR, MASTER_PORT unset): torchrun --nproc_per_node N ..., or strategy: none")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), strategy=strategy)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``values`` summed over the ranks (in place; the tensor itself when single-process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP2 shards one by one: the modules whose class Hugging Face names in
    ``_no_split_modules`` (LlamaDecoderLayer, Qwen2DecoderLayer, ...), found through a peft wrapper too."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: nn.Module, info: DistInfo, *, bf16: bool) -> nn.Module:
    """``model`` made data-parallel: DDP (gradients all-reduced, averaged over ranks) or FSDP2 (each decoder layer
    its own ``fully_shard`` group, then the root: parameters, gradients and optimizer state sharded over the ranks;
    on CUDA with bf16, parameters computed in bf16 and gradients reduced in fp32). Returns the module to call."""
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        # a model whose loss leaves some parameters out on some steps (QR-Distill's container: the routing decides)
        # says so with the attribute ddp_find_unused_parameters = True
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=bool(getattr(model, "ddp_find_unused_parameters",
                                                                           False)))
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dev = next(model.parameters()).device
        kw = {}
        if bf16 and dev.type == "cuda":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = decoder_layers(model)
        if not layers:
            log.warning("fsdp: no decoder layer found (no _no_split_modules): the whole model is one FSDP group")
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    return model


def set_gradient_sync(model: nn.Module, info: DistInfo, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced over the ranks only on the last
    micro-batch of a step (``sync``), as DDP's ``no_sync`` and FSDP2's ``set_requires_gradient_sync`` do."""
    import contextlib

    if info.strategy == "ddp" and not sync:
        return model.no_sync()
    if info.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# -- checkpoints: DCP for model + optimizer (sharded), one small file per rank for the rest
def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank{rank}.pt")


def save_checkpoint(output_dir: str, model: nn.Module, optimizer, extra: dict, info: DistInfo) -> None:
    """Writes ``output_dir/checkpoint``: model and optimizer state through DCP (each rank its shard), and each
    rank's ``extra`` (step, schedule, RNG) in ``rank<r>.pt``. Written into ``checkpoint.partial`` and renamed into
    place by rank 0 once every rank is done, so a crash leaves the previous checkpoint whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(output_dir, CHECKPOINT_DIR)
    tmp, old = final + ".partial", final + ".old"
    if info.is_main:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    os.makedirs(tmp, exist_ok=True)
    from distillkit.pipeline.train import atomic_save

    atomic_save({**extra, "world_size": info.world_size}, _rank_file(tmp, info.rank))
    barrier(info)
    if info.is_main:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(info)


def checkpoint_path(output_dir: str) -> str | None:
    """The checkpoint folder to resume from: ``checkpoint``, or ``checkpoint.old`` when a crash came between the
    two renames of :func:`save_checkpoint`; None when there is none."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(output_dir, name)
        if os.path.exists(os.path.join(path, ".metadata")):
            return path
    return None


def load_checkpoint(path: str, model: nn.Module, optimizer, info: DistInfo, map_location) -> dict:
    """Loads model and optimizer state saved by :func:`save_checkpoint` in place (each rank reads its shard) and
    returns this rank's extra state. Refuses a checkpoint written by another world size: the data order (each
    rank's shard of every global batch) depends on it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank_file = _rank_file(path, info.rank)
    extra = torch.load(rank_file, map_location="cpu", weights_only=False) if os.path.exists(rank_file) else None
    if extra is None or extra.get("world_size") != info.world_size:
        saved = None if extra is None else extra.get("world_size")
        raise InputError(f"{path}: written by {saved or 'another number of'} ranks, this run has "
                         f"{info.world_size}: resume with the same world size (the data shards depend on it)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return extra


# -- export: one Hugging Face folder written by rank 0
def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU on rank 0 (gathered from the shards under FSDP2: a collective, every
    rank calls it); {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not info.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else {}


def rebuild_on_cpu(template: nn.Module, state: dict[str, torch.Tensor], lora_config=None) -> nn.Module:
    """A fresh copy of the Hugging Face model ``template`` (its class and config; built on the meta device, then
    given ``state``'s tensors), with ``lora_config``'s adapters merged in (peft's merge_and_unload)."""
    base = template.get_base_model() if hasattr(template, "get_base_model") else template
    with torch.device("meta"):
        model = type(base)(base.config)
    if lora_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(f"export: state does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if lora_config is not None:
        model = model.merge_and_unload()
    if getattr(base, "generation_config", None) is not None:  # the template's, not the config's defaults
        import copy

        model.generation_config = copy.deepcopy(base.generation_config)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
