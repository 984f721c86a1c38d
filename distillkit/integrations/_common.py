"""What the Hugging Face and TRL integrations share: the fused loss call from two models' hidden states and
lm_heads (logit transforms and the shared vocabulary read from the models), a chunked cross-entropy that never
builds [N, V] logits, and the teacher's placement (eval mode, no gradient, sharded too under FSDP2)."""
from __future__ import annotations

import importlib
import inspect
import logging

import torch

from distillkit._errors import InputError
from distillkit.reference.fused_linear import logit_transform as apply_logit_transform

logger = logging.getLogger(__name__)


def require(module: str, extra: str = "trl"):
    """Imports an optional dependency, or raises ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"distillkit.integrations needs {module!r}: pip install \"distillkit[{extra}]\"") from e


def check_options(alpha, temperature, ce_weight=0.0, token_weights=None) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not float(temperature) > 0:
        raise InputError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or not float(ce_weight) >= 0:
        raise InputError(f"ce_weight must be a number >= 0, got {ce_weight!r}")
    if token_weights is not None and not callable(token_weights):
        raise InputError(f"token_weights must be a callable (inputs, student_outputs, teacher_outputs) -> [B, T] "
                         f"weights, got {type(token_weights).__name__}")


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model) -> dict:
    """{"logit_scale": ..., "softcap": ...} of a model's final logits, read from its config (Gemma-2/3
    final_logit_softcapping, Cohere logit_scale, Granite logits_scaling)."""
    from distillkit.losses import logit_transform_from_config

    return logit_transform_from_config(text_config(model))


def head_rows(head: torch.nn.Module) -> int:
    # a DTensor (FSDP2 shard) reports the global shape
    return int(head.weight.shape[0])


def shared_vocab_size(student_model, teacher_model, student_head, teacher_head, tokenizer=None) -> int | None:
    """None when both lm_heads have the same rows; else the real vocabulary both share: the tokenizer's length
    when given, else the smaller config vocabulary. A size neither head can hold is an InputError."""
    s_rows, t_rows = head_rows(student_head), head_rows(teacher_head)
    if s_rows == t_rows:
        return None
    if tokenizer is not None:
        vocab = len(tokenizer)
        source = f"the tokenizer's length {vocab}"
    else:
        vocab = min(int(text_config(student_model).vocab_size), int(text_config(teacher_model).vocab_size))
        source = f"the smaller config vocab_size {vocab}"
    if vocab > min(s_rows, t_rows):
        raise InputError(f"student lm_head has {s_rows} rows and teacher lm_head {t_rows}: {source} exceeds the "
                         f"smaller head, so the two models do not share a vocabulary (a different tokenizer?)")
    return vocab


def hidden_states_kwargs(model) -> dict:
    """Keyword arguments that make a causal LM's forward return its final hidden states while computing logits
    for the last position only (the loss never needs the [B, T, V] logits)."""
    kwargs = {"output_hidden_states": True, "use_cache": False, "return_dict": True}
    if hasattr(model, "get_base_model"):  # PEFT: its forward passes keyword arguments on to the base model's
        model = model.get_base_model()
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def fused_skew_sum(student_hidden, student_head, teacher_hidden, teacher_head, labels, weights, *, alpha,
                   temperature, reverse, student_transform, teacher_transform, vocab_size, chunk_size=None,
                   backend=None, ignore_index=-100) -> torch.Tensor:
    """sum over kept tokens of w_t D_t (SKL, or SRKL when reverse), from hidden states [B, T, H] and the two
    lm_head modules; float32 scalar."""
    from distillkit.ops.fused_linear import fused_linear_skew_kl, fused_linear_skew_reverse_kl

    op = fused_linear_skew_reverse_kl if reverse else fused_linear_skew_kl
    extra = {}
    # the logit transforms and vocab_size are passed only when they change something, so a model without them
    # works with any version of the op
    if vocab_size is not None:
        extra["vocab_size"] = vocab_size
    for side, t in (("student", student_transform), ("teacher", teacher_transform)):
        if t.get("logit_scale", 1.0) != 1.0:
            extra[f"{side}_logit_scale"] = float(t["logit_scale"])
        if t.get("softcap") is not None:
            extra[f"{side}_softcap"] = float(t["softcap"])
    teacher_hidden = teacher_hidden.to(student_hidden.device)
    return op(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, labels, weights,
              student_bias=getattr(student_head, "bias", None), teacher_bias=getattr(teacher_head, "bias", None),
              alpha=float(alpha), temperature=float(temperature), ignore_index=ignore_index, reduction="sum",
              chunk_size=chunk_size, backend=backend, **extra)


def chunked_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, transform: dict,
                              *, chunk_rows: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """sum over kept tokens of -log softmax(transform(hidden @ W.T + b))[label], chunk by chunk, each chunk
    recomputed in the backward (activation checkpointing), so at most [chunk_rows, V] logits are alive.
    hidden [B, T, H] or [N, H]; labels the leading shape, ``ignore_index`` skipped. float32 scalar."""
    from torch.utils.checkpoint import checkpoint

    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):  # an FSDP2 shard: gather once, the gradient flows back to the shard
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    kept = y != ignore_index
    h, y = h[kept], y[kept]

    def chunk_loss(h_c, y_c, w, b):
        z = h_c @ w.T if b is None else torch.addmm(b, h_c, w.T)
        z = apply_logit_transform(z.float(), transform.get("logit_scale", 1.0), transform.get("softcap"))
        return torch.nn.functional.cross_entropy(z, y_c, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_rows):
        stop = start + chunk_rows
        total = total + checkpoint(chunk_loss, h[start:stop], y[start:stop], weight, bias, use_reentrant=False)
    return total


def causal_labels(inputs: dict, ignore_index: int = -100) -> torch.Tensor:
    """The batch's labels [B, T]: ``labels`` when given, else the input ids with padding (attention_mask == 0)
    set to ``ignore_index``."""
    if inputs.get("labels") is not None:
        return inputs["labels"]
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, ignore_index)


def shard_fsdp2(model, *, mesh=None, reshard_after_forward: bool = True, mp_policy=None):
    """fully_shard on each decoder layer (the model's ``_no_split_modules`` classes), then on the root: the
    wrapping accelerate's FSDP2 gives a student, here for a frozen teacher. Returns the model, in eval mode."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": mp_policy or MixedPrecisionPolicy()}
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model.eval()


def prepare_teacher(teacher, accelerator):
    """The teacher in eval mode with no gradient, on the student's device; under FSDP2 sharded like the student
    (each decoder layer, then the root, on the same mesh), so that a teacher larger than one device fits."""
    teacher.requires_grad_(False)
    teacher.eval()
    if getattr(accelerator, "is_fsdp2", False):
        plugin = accelerator.state.fsdp_plugin
        mesh = getattr(accelerator, "torch_device_mesh", None)
        pc = getattr(accelerator, "parallelism_config", None)
        if mesh is not None and pc is not None and getattr(pc, "fsdp_dim_names", None):
            mesh = mesh[tuple(pc.fsdp_dim_names)]
        teacher.to(accelerator.device)
        return shard_fsdp2(teacher, mesh=mesh, reshard_after_forward=bool(plugin.reshard_after_forward),
                           mp_policy=plugin.mixed_precision_policy)
    if str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        raise InputError("teacher_model: DeepSpeed is not supported by distillkit.integrations (use DDP or FSDP2)")
    # DDP / one process: a frozen model needs no wrapper, only the device
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def check_launch(accelerator) -> None:
    """Ranks that would each train alone, silently: the launcher started WORLD_SIZE processes but accelerate set
    up fewer (on a machine without GPUs, `accelerate launch` with a GPU or FSDP config starts torchrun's ranks, and
    accelerate then finds no GPU and no cpu flag); and FSDP asked for on CPU, where accelerate runs DDP."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > accelerator.num_processes:
        raise InputError(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate set up "
                         f"{accelerator.num_processes}: each would train alone. On CPU pass use_cpu=True in the "
                         f"TrainingArguments (or set ACCELERATE_USE_CPU=true) so the ranks join over gloo")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not str(
            accelerator.distributed_type).endswith("FSDP"):
        logger.warning("FSDP was asked for but accelerate runs %s (accelerate enables FSDP on GPUs only): "
                       "the ranks hold full copies of the models", accelerator.distributed_type)
