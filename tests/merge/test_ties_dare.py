"""TIES and DARE: properties and a float64 re-derivation of the conventions in ties_dare.py."""
import math

import pytest
import torch

from _tolerance import ulp
from distillkit.merge import dare, ties
from distillkit.merge.ties_dare import trim_by_magnitude


def _setup(seed=0, k=3, shapes=((64,), (9, 13), (1,))):
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    srcs = [{n: b + torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in range(k)]
    return base, srcs


def _ties_f64(base, srcs, weights, density, lam):
    """TIES written element by element-ish in float64, independently of the implementation."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    out = {}
    for name, b in base.items():
        b = b.double().reshape(-1)
        deltas = []
        for s in srcs:
            d = s[name].double().reshape(-1) - b
            k = min(d.numel(), max(1, round(density * d.numel())))
            order = sorted(range(d.numel()), key=lambda i: -abs(d[i].item()))
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[order[:k]] = True
            deltas.append(torch.where(keep, d, 0.0))
        merged = torch.zeros_like(b)
        for i in range(b.numel()):
            elected = math.copysign(1.0, sum(w[j].item() * deltas[j][i].item() for j in range(len(srcs))))
            num = den = 0.0
            for j in range(len(srcs)):
                v = deltas[j][i].item()
                if v != 0 and math.copysign(1.0, v) == elected:
                    num += w[j].item() * v
                    den += w[j].item()
            merged[i] = num / den if den else 0.0
        out[name] = (b + lam * merged).view(base[name].shape)
    return out


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_float64_derivation(density):
    base, srcs = _setup(1)
    weights = [0.5, 1.0, 1.5]
    got = ties(base, srcs, weights, density=density, lam=0.8)
    want = _ties_f64(base, srcs, weights, density, 0.8)
    for n in base:
        # float32 from float32 inputs: ~6 roundings per element (delta, same-sign weighted sums, divide, scale,
        # add), each <= 2^-24 of the magnitudes involved, all bounded by |base| + sum |source|
        mag = base[n].abs().double() + sum(s[n].abs().double() for s in srcs)
        assert bool(((got[n].double() - want[n]).abs() <= 8 * ulp(torch.float32) * mag).all()), n


def test_trim_keeps_exact_fraction_of_largest():
    d = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    for density in (0.01, 0.1, 0.33, 0.9):
        t = trim_by_magnitude(d, density)
        kept = t != 0
        assert kept.sum().item() == round(density * 1000)
        assert d[kept].abs().min() >= d[~kept].abs().max()  # the largest ones
        assert torch.equal(t[kept], d[kept])


def test_ties_sign_agreement():
    base, srcs = _setup(3, k=4)
    merged = ties(base, srcs, density=0.5)
    for n, b in base.items():
        delta = merged[n] - b
        trimmed = [trim_by_magnitude(s[n] - b, 0.5) for s in srcs]
        elected = torch.sign(sum(trimmed))  # equal weights: the sign of the summed trimmed deltas
        nz = delta.abs() > 1e-7
        assert nz.any()
        assert torch.all(torch.sign(delta[nz]) == elected[nz])
        # an entry where every trimmed delta disagrees with the elected sign stays at base
        none_agree = torch.stack([(torch.sign(t) != elected) | (t == 0) for t in trimmed]).all(0)
        assert torch.all(delta[none_agree] == 0)


def test_dare_expectation_over_seeds():
    base, srcs = _setup(4, k=2, shapes=((200,),))
    weights = [0.3, 0.7]
    n = 400
    acc = torch.zeros(200, dtype=torch.float64)
    for seed in range(n):
        acc += dare(base, srcs, weights, density=0.3, seed=seed)["t0"].double()
    mean = acc / n
    want = sum(w * s["t0"].double() for w, s in zip(weights, srcs))  # E[result] = base + sum w_k delta_k
    # per-entry std of the mean: sqrt((1-p)/p) * |sum of weighted deltas| / sqrt(n); allow 5 sigma
    delta_scale = sum(w * (s["t0"] - base["t0"]).abs().double() for w, s in zip(weights, srcs))
    sigma = math.sqrt((1 - 0.3) / 0.3) * delta_scale / math.sqrt(n)
    # 5 sigma of the sampling noise; 1e-6 (~8 float32 ulp of these O(1) entries) for the float32 results' roundings
    assert torch.all((mean - want).abs() <= 5 * sigma + 1e-6)


def test_dare_drop_fraction_and_rescale():
    base = {"w": torch.zeros(20000)}
    src = {"w": torch.ones(20000)}
    out = dare(base, [src], density=0.25, seed=0)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01  # binomial std sqrt(0.25 * 0.75 / 20000) = 0.003: 3.3 sigma
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 4.0))


def test_dare_seed_is_per_tensor_and_reproducible():
    base, srcs = _setup(5)
    a = dare(base, srcs, density=0.5, seed=11)
    b = dare({k: base[k] for k in reversed(list(base))}, [{k: s[k] for k in reversed(list(s))} for s in srcs],
             density=0.5, seed=11)
    for n in base:
        assert torch.equal(a[n], b[n])


def test_dare_ties_and_generator():
    base, srcs = _setup(6)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = dare(base, srcs, density=0.6, ties=True, generator=g1)
    b = dare(base, srcs, density=0.6, ties=True, generator=g2)
    assert all(torch.equal(a[n], b[n]) for n in base)
    with pytest.raises(ValueError, match="generator or seed"):
        dare(base, srcs, density=0.5, generator=g1, seed=1)


def test_density_one_dare_is_weighted_average_and_list_input():
    base, srcs = _setup(7)
    names = list(base)
    out = dare([base[n] for n in names], [[s[n] for n in names] for s in srcs], [1, 2, 1], density=1.0)
    assert isinstance(out, list)
    for o, n in zip(out, names):
        want = (srcs[0][n].double() + 2 * srcs[1][n].double() + srcs[2][n].double()) / 4
        # b + sum w (s - b) / sum w in float32: ~6 roundings, each <= 2^-24 of |base| + sum |source|
        mag = base[n].abs().double() + sum(s[n].abs().double() for s in srcs)
        assert bool(((o.double() - want).abs() <= 8 * ulp(torch.float32) * mag).all()), n


def test_bf16_keeps_dtype():
    base, srcs = _setup(8)
    bf = lambda d: {k: v.bfloat16() for k, v in d.items()}  # noqa: E731
    out = ties(bf(base), [bf(s) for s in srcs], density=0.5)
    assert all(v.dtype == torch.bfloat16 for v in out.values())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    base, srcs = _setup(9)
    with pytest.raises(ValueError, match="density"):
        ties(base, srcs, density=density)
    with pytest.raises(ValueError, match="density"):
        dare(base, srcs, density=density)


def test_mismatch_names_key():
    base, srcs = _setup(10)
    srcs[1]["t1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="sources\\[1\\]\\['t1'\\].*shape"):
        ties(base, srcs, density=0.5)
