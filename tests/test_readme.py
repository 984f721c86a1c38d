"""The README's two commands are what CI and users run: keep them honest."""
import re
from pathlib import Path

from distillkit.cli import main as cli_main
from distillkit.info import info_text

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in _commands() if "pytest" in c)
    assert test_cmd.startswith("pip install torch==2.13.0 ")  # pinned torch first
    assert "--no-build-isolation" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_main_job_command_installs_and_runs_demo():
    main_cmd = _commands()[0]
    assert main_cmd.startswith("pip install torch==2.13.0 ") and main_cmd.endswith("distillkit demo")


def test_info_lists_every_backend(capsys):
    text = info_text()
    for name in ("cuda", "triton", "cpu", "reference"):
        assert re.search(rf"^{name}\s+(yes|no)\s+\S", text, re.M), name
    assert cli_main(["info"]) == 0
    assert "reference  yes" in capsys.readouterr().out


def test_cli_unknown_command(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def _python_snippet(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(f"<!-- README snippet: {marker}"):]
    return re.search(r"```python\n(.+?)\n```", after, re.S).group(1)


def test_drop_in_snippet_runs_and_equals_the_skew_kl_of_the_models_logits():
    """The README's drop-in replacement, run as written on two tiny Hugging Face models (different
    widths, one vocabulary): its loss equals skew KL on the full logits, and the student gets gradients."""
    import torch

    import distillkit
    from distillkit.world.tiny import tiny_causal_lm

    student = tiny_causal_lm(53, hidden_size=32, seed=1).train()
    teacher = tiny_causal_lm(53, hidden_size=64, seed=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 53, (2, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 7:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    scope = {"student": student, "teacher": teacher, "batch": batch}
    exec(_python_snippet("drop-in"), scope)
    loss = scope["loss"]
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0

    from _tolerance import assert_eager_budget

    with torch.no_grad():
        s_out = student(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        t_out = teacher(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    # float64 truth from the snippet's inputs (last hidden states, lm_head weights)
    s_exact = s_out.hidden_states[-1].double() @ student.lm_head.weight.double().T
    t_exact = t_out.hidden_states[-1].double() @ teacher.lm_head.weight.double().T
    # the models' own logits are those hidden states through lm_head (else the snippet feeds the wrong states)
    for out, exact, model in ((s_out, s_exact, student), (t_out, t_exact, teacher)):
        plain = out.hidden_states[-1] @ model.lm_head.weight.T
        assert_eager_budget(out.logits, plain, exact, what="model logits")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    expected = distillkit.skew_kl(s_exact, t_exact, shifted, alpha=0.1, backend="reference")
    # plain PyTorch: skew KL in float32 on the models' full logits
    plain = distillkit.skew_kl(s_out.logits, t_out.logits, shifted, alpha=0.1, backend="reference")
    assert_eager_budget(loss, plain, expected, what="loss")
