"""average_ on every backend runnable here against a float64 computation."""
import pytest
import torch
from torch import nn

from distillkit._backend import BackendUnavailable, runnable_backends
from distillkit.merge import average_

BACKENDS = runnable_backends("cpu")
# one rounding of the float32 accumulator to the storage dtype, plus float32 accumulation error; derived from each
# dtype's ulp (relative to 1 + max |result|), not tuned: half an ulp for bf16 / fp16 (2^-8, 2^-11); for float32
# K <= 4 weighted terms, ~8 ulp (1e-6); float64 accumulates in float64 (1e-14 ~ 45 ulp)
TOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _f64_average(sources, weights):
    total = sum(weights)
    return [sum((w / total) * s[i].double() for w, s in zip(weights, sources)) for i in range(len(sources[0]))]


def _shapes(backend):
    # many small tensors, odd sizes, and (outside the slow interpreter) a few large ones
    shapes = [(1,), (3,), (7, 5), (33, 17), (4095,), (4097,), (2, 3, 11)]
    big = [(1_000_003,), (513, 1031)] if backend != "triton" else [(65_537,)]
    return shapes + big


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_average_matches_float64(backend, dtype, k):
    g = torch.Generator().manual_seed(1000 * k + hash(str(dtype)) % 997)
    shapes = _shapes(backend)
    sources = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(k)]
    weights = torch.rand(k, generator=g).add(0.1).tolist()
    target = [torch.full(s, float("nan"), dtype=dtype) for s in shapes]
    ptrs = [t.data_ptr() for t in target]
    out = average_(target, sources, weights, backend=backend)
    assert out is target and [t.data_ptr() for t in target] == ptrs  # really in place
    for got, want in zip(target, _f64_average(sources, weights)):
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[dtype] * (1 + want.abs().max().item()), (backend, dtype, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_is_a_source(backend):
    """MoT merges the branches into the first branch: target aliases sources[0]."""
    g = torch.Generator().manual_seed(7)
    a = [torch.randn(1001, generator=g), torch.randn(17, 3, generator=g)]
    b = [torch.randn_like(t) for t in a]
    want = _f64_average([a, b], [0.25, 0.75])
    average_(a, [a, b], [0.25, 0.75], backend=backend)
    for got, w in zip(a, want):
        # two N(0, 1) float32 terms (|x| < 6): one rounding to float32 plus two of the sum, <= 3 x 2^-24 x 6 ~ 1e-6
        torch.testing.assert_close(got.double(), w, rtol=0, atol=1e-6)


def _mlp(seed, tie=False):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 11, bias=False))
    m.register_buffer("steps", torch.tensor([3], dtype=torch.long))
    if tie:
        m[3].weight = m[0].weight
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_and_tied_weights(backend):
    models = [_mlp(s, tie=True) for s in range(3)]
    sds = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    average_(models[0], models, [1.0, 1.0, 2.0], backend=backend)
    for name, t in models[0].state_dict().items():
        if t.is_floating_point():
            want = (sds[0][name].double() + sds[1][name].double() + 2 * sds[2][name].double()) / 4
            # weights 1/4, 1/4, 1/2 scale exactly; two float32 additions of values |x| < 4: <= 2 x 2^-24 x 4 < 1e-6
            torch.testing.assert_close(t.double(), want, rtol=0, atol=1e-6, msg=name)
    assert models[0][3].weight is models[0][0].weight  # tie survives, written once


def test_state_dicts_normalize_false_and_noncontiguous():
    g = torch.Generator().manual_seed(3)
    srcs = [{"w": torch.randn(6, 4, generator=g).t(), "b": torch.randn(5, generator=g)} for _ in range(2)]
    tgt = {"w": torch.zeros(6, 4).t(), "b": torch.zeros(5)}
    average_(tgt, srcs, [2.0, -0.5], normalize=False)
    torch.testing.assert_close(tgt["w"], 2 * srcs[0]["w"] - 0.5 * srcs[1]["w"])
    torch.testing.assert_close(tgt["b"], 2 * srcs[0]["b"] - 0.5 * srcs[1]["b"])


def test_default_backend_and_env(monkeypatch):
    t = [torch.zeros(4)]
    monkeypatch.setenv("DISTILLKIT_BACKEND", "reference")
    average_(t, [[torch.ones(4)], [torch.full((4,), 3.0)]])
    assert torch.equal(t[0], torch.full((4,), 2.0))
    monkeypatch.setenv("DISTILLKIT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        average_(t, [[torch.ones(4)]])


@pytest.mark.parametrize(
    "target,sources,weights,match",
    [
        ({"a": torch.zeros(2)}, [], None, "sources is empty"),
        ({"a": torch.zeros(2)}, [{"b": torch.zeros(2)}], None, "missing keys \\['a'\\]"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(3)}], None, "'a'.*shape"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2, dtype=torch.float64)}], None, "'a'.*dtype"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2, device="meta")}], None, "'a'.*meta"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2)}] * 2, [1.0, float("nan")], "weights must be finite"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2)}] * 2, [1.0, -3.0], "weights sum to"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2)}] * 2, [1.0], "weights has 1 entries for 2"),
        ({"a": torch.zeros(2)}, [{"a": torch.zeros(2)}] * 2, [1.0, -1.0], "sum to 0"),
    ],
)
def test_bad_input(target, sources, weights, match):
    with pytest.raises(ValueError, match=match):
        average_(target, sources, weights)


def test_integer_buffers_must_agree():
    a, b = _mlp(0), _mlp(1)
    b.steps.fill_(4)
    with pytest.raises(ValueError, match="steps"):
        average_(a, [a, b])


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend="):
        average_([torch.zeros(1)], [[torch.zeros(1)]], backend="fast")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_cpu_streaming_stores_on_large_unaligned_targets(dtype, offset):
    """Targets of >= 4 MiB take the non-temporal store path: unaligned starts (views at an element offset),
    odd lengths, and a target that is also a source must all give the float64 result."""
    g = torch.Generator().manual_seed(offset)
    n = 2_100_007  # 8.4 MB in float32, 4.2 MB in bfloat16: both above the streaming threshold
    sources = [[torch.randn(n + offset, generator=g).to(dtype)[offset:]] for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    want = _f64_average(sources, weights)[0]
    target = [torch.empty(n + offset, dtype=dtype)[offset:]]
    average_(target, sources, weights, backend="cpu")
    tol = TOL[dtype] * (1 + want.abs().max().item())
    assert (target[0].double() - want).abs().max().item() <= tol
    average_(sources[1], sources, weights, backend="cpu")  # in place on a source
    assert (sources[1][0].double() - want).abs().max().item() <= tol
