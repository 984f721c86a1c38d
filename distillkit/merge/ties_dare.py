"""TIES and DARE merging of task vectors (deltas of each source against a common base).

Conventions, written down once:

TIES (Yadav et al. 2023, as mergekit implements it):
  1. delta_k = source_k - base.
  2. Trim: keep the ``round(density * numel)`` entries of each delta with the largest magnitude
     (at least one entry per non-empty tensor), zero the rest.
  3. Elect a sign per entry: sign(sum_k w_k * trimmed_k) (mergekit's "sum" sign method).
  4. Disjoint mean: merged = sum_k w_k * trimmed_k * [sign(trimmed_k) == elected]
                             / sum_k w_k * [sign(trimmed_k) == elected]   (0/0 -> 0).
  5. result = base + lam * merged.
DARE (Yu et al. 2024):
  1. delta_k = source_k - base; each entry is kept with probability ``density`` and survivors are
     rescaled by 1 / density, so E[dropped delta] = delta.
  2. Without ``ties``: result = base + lam * sum_k w_k * dropped_k with weights normalised to sum 1.
     With ``ties=True``: the sign election and disjoint mean of TIES (steps 3-5) follow.
Arithmetic is float32 (float64 for float64 tensors); results take the base's dtype.
"""
from __future__ import annotations

import zlib

import torch

from distillkit.merge._named import check_aligned, check_density, check_sources, check_weights, named_tensors


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the round(density * numel) largest-magnitude entries of ``delta`` (>= 1), zeroes the rest."""
    n = delta.numel()
    if n == 0 or density >= 1.0:
        return delta
    k = min(n, max(1, round(density * n)))
    flat = delta.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(delta)


def disjoint_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES steps 3-4: elected sign per entry, then the weighted mean of the agreeing entries."""
    weighted = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        weighted.add_(d, alpha=w)
    elected = torch.sign(weighted)
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        agree = (torch.sign(d) == elected) & (d != 0)
        num.add_(torch.where(agree, d, 0.0), alpha=w)
        den.add_(agree.to(den.dtype), alpha=w)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def ties_tensor(base: torch.Tensor, sources: list[torch.Tensor], weights: list[float], *, density: float,
                lam: float = 1.0) -> torch.Tensor:
    """TIES merge of one tensor (see the module docstring); returns a new tensor in base's dtype."""
    acc = _acc_dtype(base)
    b = base.to(acc)
    deltas = [trim_by_magnitude(s.to(acc) - b, density) for s in sources]
    return (b + lam * disjoint_mean(deltas, weights)).to(base.dtype)


def dare_tensor(base: torch.Tensor, sources: list[torch.Tensor], weights: list[float], *, density: float,
                lam: float = 1.0, ties: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE merge of one tensor (see the module docstring); returns a new tensor in base's dtype."""
    acc = _acc_dtype(base)
    b = base.to(acc)
    deltas = []
    for s in sources:
        d = s.to(acc) - b
        if density < 1.0:
            keep = torch.rand(d.shape, generator=generator, device="cpu" if generator is None else generator.device)
            d = torch.where(keep.to(d.device) < density, d / density, 0.0)
        deltas.append(d)
    if ties:
        merged = disjoint_mean(deltas, weights)
    else:
        merged = torch.zeros_like(b)
        for w, d in zip(weights, deltas):
            merged.add_(d, alpha=w)
    return (b + lam * merged).to(base.dtype)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends on (seed, tensor name) only, so streaming and in-memory DARE agree."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _prepare(base, sources, weights):
    sources = check_sources(sources)
    weights = check_weights(weights, len(sources), normalize=True)
    b = named_tensors(base, "base")
    srcs = [named_tensors(s, f"sources[{k}]") for k, s in enumerate(sources)]
    check_aligned(b, "base", srcs, "sources")
    return b, srcs, weights


def _restore_kind(base, merged: dict[str, torch.Tensor]):
    if isinstance(base, (list, tuple)):
        return [merged[f"[{i}]"] for i in range(len(base))]
    return merged


def ties(base, sources, weights=None, *, density: float, lam: float = 1.0):
    """TIES-merges ``sources`` against ``base``; returns a new state dict (or list, for list input).

    base/sources: nn.Module, state dict or list of tensors with matching names, shapes, dtypes,
    devices. weights: K finite weights, normalised to sum 1. density in (0, 1]: the fraction of
    each task vector kept. Non-floating tensors are taken from ``base``.
    """
    density = check_density(density)
    b, srcs, weights = _prepare(base, sources, weights)
    out = {}
    with torch.no_grad():
        for name, t in b.items():
            if not t.is_floating_point():
                out[name] = t.clone()
                continue
            out[name] = ties_tensor(t, [s[name] for s in srcs], weights, density=density, lam=lam)
    return _restore_kind(base, out)


def dare(base, sources, weights=None, *, density: float, lam: float = 1.0, ties: bool = False,
         generator: torch.Generator | None = None, seed: int | None = None):
    """DARE-merges ``sources`` against ``base`` (optionally with TIES sign election).

    Randomness: ``generator`` is drawn from in tensor order; with ``seed`` instead, every tensor gets
    its own generator from (seed, name), which makes the result independent of order (the streaming
    checkpoint merge uses this). Returns a new state dict (or list, for list input).
    """
    density = check_density(density)
    if generator is not None and seed is not None:
        raise ValueError("pass generator or seed, not both")
    b, srcs, weights = _prepare(base, sources, weights)
    out = {}
    with torch.no_grad():
        for name, t in b.items():
            if not t.is_floating_point():
                out[name] = t.clone()
                continue
            g = tensor_generator(seed, name) if seed is not None else generator
            out[name] = dare_tensor(t, [s[name] for s in srcs], weights, density=density, lam=lam, ties=ties, generator=g)
    return _restore_kind(base, out)
