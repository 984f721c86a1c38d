"""A guard against the DDP pitfall: hidden states taken from ``ddp_model.module.model(...)`` skip
DistributedDataParallel's forward, so its reducer never expects the backward and no gradient is all-reduced:
each rank trains its own copy and the ranks drift apart, silently.

:func:`check_ddp_forward` runs on a fused loss call that will compute a gradient for the student's lm_head
weight in a multi-rank run. The first time it sees a weight it looks for the DistributedDataParallel modules
that hold it (one pass over the garbage collector's objects, ~0.4 s with transformers loaded, once per
weight; DDP keeps no map from a parameter to its wrapper); then on every call it raises InputError with the
recipe when none of them has ever run its forward. A wrapper whose forward ran once (say for evaluation) but
is bypassed in training is not caught: take the hidden states through the wrapper, as
:func:`distillkit.losses.final_hidden_states` does. ``DISTILLKIT_CHECK_DDP=0`` turns the check off.
"""
from __future__ import annotations

import gc
import os
import sys
import weakref

import torch

from distillkit._errors import InputError

# id(weight) -> (weakref to the weight, [weakrefs to the DDP modules holding it])
_OWNERS: dict[int, tuple] = {}

RECIPE = ("take the student's hidden states through the DDP wrapper's own forward, e.g. "
          "distillkit.losses.final_hidden_states(ddp_model, input_ids, attention_mask=...) or "
          "ddp_model(input_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]")


def _ddp_owners(weight: torch.Tensor) -> list:
    entry = _OWNERS.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return [r() for r in entry[1] if r() is not None]
    from torch.nn.parallel import DistributedDataParallel

    owners = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)
              and any(p is weight for p in o.module.parameters())]
    key = id(weight)
    _OWNERS[key] = (weakref.ref(weight, lambda _, key=key: _OWNERS.pop(key, None)), [weakref.ref(o) for o in owners])
    return owners


def check_ddp_forward(weight) -> None:
    """InputError if ``weight`` (the student's lm_head weight, about to get a gradient) belongs to a
    DistributedDataParallel module whose forward never ran. Free outside a multi-rank torch.distributed run."""
    if os.environ.get("DISTILLKIT_CHECK_DDP", "1") == "0" or "torch.distributed" not in sys.modules:
        return
    # parameters are leaves; a cast or sliced weight (autocast, vocab_size) is checked as the leaf it came from
    if not (isinstance(weight, torch.Tensor) and weight.is_leaf and weight.requires_grad and torch.is_grad_enabled()):
        return
    dist = sys.modules["torch.distributed"]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if torch.compiler.is_compiling():
        return
    for ddp in _ddp_owners(weight):
        if not getattr(ddp, "_lazy_init_ran", True):
            raise InputError(
                "student_weight belongs to a DistributedDataParallel model whose forward has not run: hidden states "
                "taken from ddp_model.module (a submodule) skip DDP's gradient all-reduce, so the ranks would drift "
                f"apart silently. Instead, {RECIPE}")
