"""merge.average_ with tied parameters in the target (head.weight is emb.weight): one memory, one average.

Sources tied the same way (or holding equal copies) give that one average; sources whose tied names hold
different values would need two averages in one memory and are refused with InputError, before anything is
written, on every backend.
"""
import pytest
import torch
from torch import nn

from distillkit._backend import runnable_backends
from distillkit._errors import InputError
from distillkit.merge import average_

BACKENDS = runnable_backends("cpu")


def _model(seed: int, tie: bool) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(13, 6), nn.Linear(6, 6), nn.Linear(6, 13, bias=False))
    if tie:
        m[2].weight = m[0].weight
    return m


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_target_untied_sources_refused(backend):
    """Before: the first name's average was written and the second name's silently dropped."""
    target = _model(0, tie=True)
    sources = [_model(1, tie=False), _model(2, tie=False)]
    before = _snapshot(target)
    with pytest.raises(InputError) as info:
        average_(target, sources, backend=backend)
    message = str(info.value)
    assert "'0.weight'" in message and "'2.weight'" in message and "sources[0]" in message
    for name, t in target.state_dict().items():  # refused before anything was written
        assert torch.equal(t, before[name]), name
    assert target[2].weight is target[0].weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_among_sources_with_one_untied_source_refused(backend):
    """MoT's running average (the target is sources[0]) against a branch that was untied: refused too."""
    target = _model(0, tie=True)
    with pytest.raises(InputError, match=r"sources\[1\]"):
        average_(target, [target, _model(1, tie=False)], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_like_the_target_averaged_once(backend):
    models = [_model(s, tie=True) for s in range(3)]
    snaps = [_snapshot(m) for m in models]
    average_(models[0], models, [1.0, 1.0, 2.0], backend=backend)
    want = (snaps[0]["0.weight"].double() + snaps[1]["0.weight"].double() + 2 * snaps[2]["0.weight"].double()) / 4
    torch.testing.assert_close(models[0][0].weight.double(), want, rtol=0, atol=1e-6)
    assert models[0][2].weight is models[0][0].weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_untied_sources_holding_equal_copies_averaged_once(backend):
    """State dicts saved with the tie broken into two equal tensors are consistent with a tied target."""
    target = _model(0, tie=True)
    sources = []
    for s in (1, 2):
        sd = _snapshot(_model(s, tie=True))
        sd["2.weight"] = sd["0.weight"].clone()  # no longer the same memory, same values
        sources.append(sd)
    average_(target, sources, backend=backend)
    want = (sources[0]["0.weight"].double() + sources[1]["0.weight"].double()) / 2
    torch.testing.assert_close(target[0].weight.double(), want, rtol=0, atol=1e-6)
    assert target[2].weight is target[0].weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_untied_target_averages_each_name(backend):
    """No tie in the target: each name gets its own average, whatever the sources share."""
    target = _snapshot(_model(0, tie=False))
    sources = [_snapshot(_model(1, tie=False)), _model(2, tie=True).state_dict()]
    average_(target, sources, backend=backend)
    for name in ("0.weight", "2.weight"):
        want = (sources[0][name].double() + sources[1][name].double()) / 2
        torch.testing.assert_close(target[name].double(), want, rtol=0, atol=1e-6, msg=name)
