"""Method configs: YAML + flags, and --help that tells the real defaults."""
import dataclasses

import pytest

from distillkit.pipeline.config import build_parser, config_field, load_config


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


def test_yaml_values_are_coerced_to_the_field_types(tmp_path):
    from distillkit._errors import InputError

    cfg_file = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 and 1e3 (no dot) as strings; whole numbers are exact integers
    cfg_file.write_text("rate: 1e-4\nsteps: 1e3\nsizes: [1, 2.5]\nname: y\n")
    cfg = load_config(_Cfg, str(cfg_file))
    assert cfg.rate == 1e-4 and isinstance(cfg.rate, float)
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    for text, needle in [("steps: 2.5", "steps: expected an integer, got 2.5"),
                         ("steps: true", "steps: expected an integer, got true (a boolean)"),
                         ('flag: "true"', "flag: expected true or false, got 'true' (str); remove the quotes"),
                         ("flag: 1", "flag: expected true or false"),
                         ("name: [a]", "name: expected a string, got a list"),
                         ("name: 5", "name: expected a string, got 5 (int); quote it"),
                         ("name:", "name: expected a string, got null"),
                         ("rate: fast", "rate: expected a number, got 'fast' (str)")]:
        cfg_file.write_text(text + "\n")
        with pytest.raises(InputError) as exc:
            load_config(_Cfg, str(cfg_file))
        assert str(exc.value).startswith(f"{cfg_file}: {needle}"), str(exc.value)


def test_optional_list_and_mapping_fields():
    from distillkit._errors import InputError

    @dataclasses.dataclass
    class Cfg:
        names: list[str] = config_field("names", default_factory=list)
        clip: list[float] | None = config_field("bounds", default=None)
        extra: dict[str, str] | None = config_field("mapping", default=None)
        limit: int | None = config_field("limit", default=None)

    cfg = load_config(Cfg, None, names="one", clip=["0.5", 2], extra={"a": "b"}, limit=None)
    assert (cfg.names, cfg.clip, cfg.extra, cfg.limit) == (["one"], [0.5, 2.0], {"a": "b"}, None)
    for kw, needle in [(dict(names=5), "names: expected a list of strings, got 5 (int)"),
                       (dict(clip=[1, "x"]), "clip[1]: expected a number, got 'x' (str)"),
                       (dict(extra={"a": 1}), "extra['a']: expected a string, got 1 (int)"),
                       (dict(extra="a=b"), "extra: expected a mapping or null, got 'a=b' (str)"),
                       (dict(limit="many"), "limit: expected an integer or null, got 'many' (str)")]:
        with pytest.raises(InputError) as exc:
            load_config(Cfg, None, **kw)
        assert str(exc.value).startswith(needle), str(exc.value)


def test_field_roles_by_metadata_or_name():
    from distillkit.pipeline.config import field_role, looks_local

    @dataclasses.dataclass
    class Cfg:
        device: str = "cpu"
        student: str = ""
        router_encoder: str = ""
        eval_data: str = ""
        output_dir: str = ""
        plot_path: str = ""
        weights_file: str = dataclasses.field(default="", metadata={"role": "input_file"})
        lr: float = 1.0

    roles = {f.name: field_role(f) for f in dataclasses.fields(Cfg)}
    assert roles == {"device": "device", "student": "model", "router_encoder": "model", "eval_data": "input_file",
                     "output_dir": "output_dir", "plot_path": "output_file", "weights_file": "input_file",
                     "lr": None}
    assert [looks_local(v) for v in ("gpt2", "Qwen/Qwen2.5-1.5B", "./m", "/abs/m", "~/m", "runs/a/m", "..")] == \
        [False, False, True, True, True, True, True]


# ----------------------------------------------------------------------------------------------
# The trainer's options embedded once (train: TrainConfig) in the VCRD, MoT and QR-Distill configs
# ----------------------------------------------------------------------------------------------
def test_train_options_flat_nested_and_flags(tmp_path, monkeypatch):
    from distillkit.methods.qr_distill import QRDistillConfig
    from distillkit.pipeline.config import checked_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"id": 1, "question": "1+1", "answer": "2"}\n')

    base = "input_path: q.jsonl\nteachers: [t]\nstudents: [a, b]\nrouting: random\n"
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(base + "lr: 1e-3\nmax_steps: 7\n")
    nested.write_text(base + "train:\n  lr: 1e-3\n  max_steps: 7\n")
    a, b = load_config(QRDistillConfig, str(flat)), load_config(QRDistillConfig, str(nested))
    assert a.train == b.train and (a.train.lr, a.train.max_steps) == (1e-3, 7)
    assert a.train.save_every == 100  # the method's own default, not TrainConfig's
    c = checked_config(QRDistillConfig, str(nested), {"lr": 2e-3})  # a flag overrides the nested YAML value
    assert (c.train.lr, c.train.max_steps) == (2e-3, 7)
    both = tmp_path / "both.yaml"
    both.write_text(base + "lr: 1e-3\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(ValueError, match="lr"):
        load_config(QRDistillConfig, str(both))


def test_vcrd_old_option_names_are_accepted_with_a_deprecation_message(tmp_path, caplog):
    from distillkit.methods.vcrd import VcrdConfig

    path = tmp_path / "old.yaml"
    path.write_text("student: s\nteacher: t\nprompts: p.jsonl\nsteps: 9\nwarmup: 2\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(VcrdConfig, str(path))
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (9, 2)
    assert "'steps' is deprecated, use 'max_steps'" in caplog.text
    assert "'warmup' is deprecated, use 'warmup_steps'" in caplog.text
    args = vars(build_parser(VcrdConfig, "p", "d").parse_args(["--steps", "3"]))
    assert args["steps"] == 3


def test_mot_refuses_trainer_options_it_sets_itself():
    from distillkit.methods.mot import MotConfig

    with pytest.raises(ValueError, match="max_steps"):
        MotConfig(student="s", teacher_data=["a"], max_steps=3)


def test_recorded_flat_run_config_still_matches(tmp_path):
    """A run recorded before the trainer's options were nested (flat keys, VCRD's old names) resumes."""
    from distillkit.methods.vcrd import VcrdConfig
    from distillkit.pipeline.runs import config_differences, config_values

    cfg = VcrdConfig(student="s", teacher="t", prompts="p", max_steps=7, warmup_steps=1)
    old = {k: v for k, v in config_values(cfg).items() if k not in ("max_steps", "warmup_steps")}
    assert config_differences({**old, "steps": 7, "warmup": 1}, cfg) == []
    assert config_differences({**old, "steps": 8, "warmup": 1}, cfg) == ["max_steps: 8 -> 7"]
