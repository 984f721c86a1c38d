"""In-place weighted parameter averaging (Merge-of-Thought's merge step)."""
from __future__ import annotations

from collections import defaultdict

import torch

from distillkit._errors import InputError
from distillkit.merge._named import check_aligned, check_sources, check_weights, named_tensors, storage_key
from distillkit.ops.merge import SUPPORTED_DTYPES, average_group_


def average_(target, sources, weights=None, *, normalize: bool = True, backend: str | None = None):
    """Writes sum_k w_k * sources[k] into ``target`` in place and returns ``target``.

    Args:
        target: an nn.Module, a state dict (name -> tensor) or a list of tensors; it may itself be
            one of ``sources`` (MoT merges branch models into the first branch).
        sources: a non-empty list of objects of the same kind, with the same names, shapes,
            dtypes and devices as ``target``.
        weights: K finite weights (default: equal); normalised to sum 1 unless ``normalize=False``.
            Individual weights may be negative (task arithmetic); a negative sum is refused.
        backend: "cuda", "triton", "cpu", "reference" or None (automatic; DISTILLKIT_BACKEND).

    Floating tensors (float32/float64/bfloat16/float16) are averaged with float32 accumulation
    (float64 for float64), in one kernel launch per (device, dtype) group and with no model-sized
    temporary. Non-floating tensors (e.g. integer buffers) must be equal across sources and are
    copied.

    Tied parameters: names whose tensors in ``target`` are one tensor (same memory, e.g. ``head.weight is
    emb.weight``) are averaged and written once. That is only consistent when every source holds the same
    values under those names (tied the same way, or equal copies); a source whose tied names differ would
    need two different averages in one memory, so it raises InputError naming both names and the source.
    """
    sources = check_sources(sources)
    weights = check_weights(weights, len(sources), normalize=normalize)
    tgt = named_tensors(target, "target")
    srcs = [named_tensors(s, f"sources[{k}]") for k, s in enumerate(sources)]
    check_aligned(tgt, "target", srcs, "sources")

    _check_ties(tgt, srcs)

    groups: dict[tuple, tuple[list, list[list]]] = defaultdict(lambda: ([], [[] for _ in sources]))
    seen = set()
    for name, t in tgt.items():
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        if not t.is_floating_point():
            _copy_exact(name, t, [s[name] for s in srcs])
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"target[{name!r}] has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
        parts = [s[name] for s in srcs]
        contiguous = t.is_contiguous() and all(p.is_contiguous() for p in parts)
        # non-contiguous tensors are rare (views); they take the reference path, one tensor each
        g_targets, g_sources = groups[(t.device, t.dtype, contiguous)]
        g_targets.append(t)
        for k, p in enumerate(parts):
            g_sources[k].append(p)

    with torch.no_grad():
        for (_, _, contiguous), (g_targets, g_sources) in groups.items():
            average_group_(g_targets, g_sources, weights, backend=backend if contiguous else "reference")
    return target


def _copy_exact(name: str, target: torch.Tensor, parts: list[torch.Tensor]) -> None:
    first = parts[0]
    for k, p in enumerate(parts[1:], start=1):
        if not torch.equal(p, first):
            raise InputError(f"sources[{k}][{name!r}] is a non-floating tensor ({p.dtype}) that differs from "
                             "sources[0]; such tensors cannot be averaged")
    if target.data_ptr() != first.data_ptr():
        with torch.no_grad():
            target.copy_(first)


def _check_ties(tgt: dict[str, torch.Tensor], srcs: list[dict[str, torch.Tensor]]) -> None:
    """Target names that share one tensor must hold equal values in every source (see average_)."""
    tied: dict[tuple, list[str]] = defaultdict(list)
    for name, t in tgt.items():
        tied[storage_key(t)].append(name)
    for names in tied.values():
        for k, src in enumerate(srcs):
            first = src[names[0]]
            for other in names[1:]:
                if storage_key(src[other]) == storage_key(first) or torch.equal(src[other], first):
                    continue
                raise InputError(
                    f"target[{names[0]!r}] and target[{other!r}] are one tied tensor, but sources[{k}] holds different "
                    f"values under these names (untied): their two averages cannot both be written into the target's "
                    f"one memory. Tie sources[{k}] the same way, or untie the target (e.g. clone one of the two) to "
                    f"average each name separately")
