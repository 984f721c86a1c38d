"""QR-Distill on the synthetic world (slow): two copies of the world student, learned vs random routing; the
learned router's split of the routes stays within [0.3, 0.7] and both students are trained. The full-size
numbers (``python -m distillkit.methods.qr_distill.world_run``) are recorded with the demo's report."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.slow
@pytest.mark.timeout(600)  # three teachers' traces and two short QR-Distill runs, single-threaded
def test_world_check_keeps_both_students_in_training(tmp_path):
    from distillkit.methods.qr_distill import world_check
    from distillkit.teachers.hf import load_causal_lm
    from distillkit.world import models as M

    out = world_check(str(tmp_path), variants=("learned", "random"), steps=20, n_distill=32, n_eval=16)
    learned = next(r for r in out["runs"] if r["variant"] == "learned")
    assert set(learned["split"]) == {"s0", "s1"} and sum(learned["split"].values()) == pytest.approx(1.0)
    assert out["learned_split_ok"] and all(0.3 <= v <= 0.7 for v in learned["split"].values())
    assert isinstance(out["learned_beats_random"], bool) and 0.0 <= out["base_accuracy"] <= 1.0
    base, _ = load_causal_lm(M.asset_path(M.STUDENT))
    for name in ("s0", "s1"):  # both students moved away from the shared starting point
        trained, _ = load_causal_lm(os.path.join(str(tmp_path), "learned-seed0", "students", name))
        assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
    assert os.path.exists(os.path.join(str(tmp_path), "world_check.json"))
