"""Turning modules, state dicts and tensor lists into aligned (name, tensor) lists, with checks."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def named_tensors(obj, arg: str) -> dict[str, torch.Tensor]:
    """An nn.Module (its state dict, sharing storage), a mapping name -> tensor, or a list of tensors."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{arg}[{k!r}] is a {type(v).__name__}, expected a torch.Tensor")
            out[str(k)] = v
        return out
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        out = {}
        for i, v in enumerate(obj):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{arg}[{i}] is a {type(v).__name__}, expected a torch.Tensor")
            out[f"[{i}]"] = v
        return out
    raise TypeError(f"{arg} must be an nn.Module, a state dict or a list of tensors, got {type(obj).__name__}")


def check_sources(sources, arg: str = "sources") -> list:
    if isinstance(sources, (nn.Module, Mapping)) or not isinstance(sources, Sequence) or isinstance(sources, str):
        raise TypeError(f"{arg} must be a list of modules / state dicts / tensor lists")
    if len(sources) == 0:
        raise ValueError(f"{arg} is empty: nothing to merge")
    return list(sources)


def check_aligned(reference: dict[str, torch.Tensor], ref_arg: str, others: list[dict[str, torch.Tensor]],
                  other_arg: str) -> None:
    """Same names, shapes, dtypes and devices, else ValueError naming the key and the argument."""
    for k, other in enumerate(others):
        missing = [n for n in reference if n not in other]
        extra = [n for n in other if n not in reference]
        if missing or extra:
            raise ValueError(
                f"{other_arg}[{k}] does not match {ref_arg}: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
            )
        for name, ref in reference.items():
            t = other[name]
            if t.shape != ref.shape:
                raise ValueError(f"{other_arg}[{k}][{name!r}] has shape {tuple(t.shape)}, {ref_arg} has {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise ValueError(f"{other_arg}[{k}][{name!r}] has dtype {t.dtype}, {ref_arg} has {ref.dtype}")
            if t.device != ref.device:
                raise ValueError(f"{other_arg}[{k}][{name!r}] is on {t.device}, {ref_arg} is on {ref.device}")


def check_weights(weights, k: int, *, normalize: bool, arg: str = "weights") -> list[float]:
    """K finite weights; normalised to sum 1 when asked. A negative sum is refused either way."""
    if weights is None:
        return [1.0 / k] * k if normalize else [1.0] * k
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise ValueError(f"{arg} has {len(weights)} entries for {k} sources")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{arg} must be finite, got {weights}")
    total = sum(weights)
    if total < 0:
        raise ValueError(f"{arg} sum to {total} < 0")
    if normalize:
        if total == 0:
            raise ValueError(f"{arg} sum to 0 and cannot be normalised (pass normalize=False to use them as given)")
        weights = [w / total for w in weights]
    return weights


def check_density(density: float, arg: str = "density") -> float:
    density = float(density)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"{arg}={density} must lie in (0, 1]")
    return density


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor covers (tied parameters share it)."""
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
