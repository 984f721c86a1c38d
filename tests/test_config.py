"""Method configs: YAML + flags, and --help that tells the real defaults."""
import dataclasses

import pytest

from distillkit.config import build_parser, config_field, load_config


@dataclasses.dataclass
class _Cfg:
    name: str = config_field("a name", default="x")
    steps: int = config_field("optimizer steps", default=10)
    rate: float = config_field("learning rate, 5% of the peak", default=0.05)
    sizes: list = config_field("sizes", default_factory=lambda: [1, 2])
    flag: bool = config_field("a switch", default=True)
    path: str = config_field("where (default: next to the input)", default="")


def test_help_shows_dataclass_defaults_not_the_flags_none():
    text = build_parser(_Cfg, "prog", "Test.").format_help()
    assert "(default: None)" not in text
    assert "optimizer steps (default: 10)" in text
    assert "learning rate, 5% of the peak (default: 0.05)" in text
    assert text.count("default:") == 5  # name, steps, rate, flag, and path's own wording


def test_flags_override_yaml_and_unknown_keys_are_refused(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: y\nsteps: 3\n")
    args = build_parser(_Cfg, "prog", "Test.").parse_args(["--steps", "7", "--no-flag"])
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    cfg = load_config(_Cfg, str(cfg_file), **given)
    assert (cfg.name, cfg.steps, cfg.flag) == ("y", 7, False)
    with pytest.raises(ValueError, match="unknown config field"):
        load_config(_Cfg, None, stepz=1)
