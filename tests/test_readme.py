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
