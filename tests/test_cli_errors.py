"""`distillkit <command>` on bad input: one line on stderr naming the field or flag, exit 2 for bad input,
1 for a runtime failure, 130 for Ctrl-C, no traceback unless --debug; every config check runs before any
model loads (each method's ``run`` is replaced by a tripwire here)."""
import os
import subprocess
import sys
import types

import pytest
import torch

from distillkit import cli
from distillkit._errors import InputError

METHODS = {"cord": "distillkit.methods.cord.runner", "vcrd": "distillkit.methods.vcrd.runner",
           "mot": "distillkit.methods.mot", "qr-distill": "distillkit.methods.qr_distill.runner"}
NO_CUDA = not torch.cuda.is_available()


def run_cli(argv, capsys):
    """(exit code, stderr) of ``distillkit argv``, in process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # parse_config and argparse exit; the console script does the same
        code = exc.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with a questions file, a minimal valid YAML per method, and each method's run()
    replaced by a recorder: a config that gets through the checks is recorded, nothing loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"id": "1", "question": "1+1", "answer": "2"}\n')
    base = {
        "cord": "teachers: [t1, t2]\nmeta_prover: m\ninput_path: q.jsonl\noutput_path: out.jsonl\n",
        "vcrd": "student: s\nteacher: t\nprompts: q.jsonl\n",
        "mot": "student: s\nteacher_data: [q.jsonl]\n",
        "qr-distill": "input_path: q.jsonl\nteachers: [t]\nstudents: [a, b]\nrouting: random\n",
    }
    ran = {}
    for command, module_name in METHODS.items():
        module = __import__(module_name, fromlist=["run"])
        result = [] if command == "mot" else {}

        def record(cfg, *args, _command=command, _result=result, **kw):
            ran[_command] = cfg
            return _result

        monkeypatch.setattr(module, "run", record)

    def config(command: str, extra: str = "") -> str:
        path = tmp_path / f"{command}.yaml"
        path.write_text(base[command] + extra)
        return str(path)

    return types.SimpleNamespace(path=tmp_path, config=config, ran=ran)


# ----------------------------------------------------------------------------------------------
# YAML values of the wrong type (point 14)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", list(METHODS))
def test_lr_1e_minus_4_is_read_as_a_float(work, capsys, command):
    # PyYAML (YAML 1.1) reads 1e-4, without a dot, as the string "1e-4"
    code, err = run_cli([command, "--config", work.config(command, "lr: 1e-4\n" if command != "cord" else
                                                          "temperature: 1e-1\n")], capsys)
    assert code == 0, err
    cfg = work.ran[command]
    value = cfg.temperature if command == "cord" else cfg.lr
    assert isinstance(value, float) and value == (0.1 if command == "cord" else 1e-4)


@pytest.mark.parametrize("command,extra,field,expected", [
    ("vcrd", 'seed: "x"\n', "seed", "an integer"),
    ("vcrd", "prompts: 5\n", "prompts", "a string"),
    ("vcrd", "steps: 2.5\n", "steps", "an integer"),
    ("vcrd", 'progress: "yes"\n', "progress", "true or false"),
    ("vcrd", "clip: 0.5\n", "clip", "a list of numbers"),
    ("vcrd", "bf16: on\n", "bf16", "a string"),
    ("vcrd", "lr: [1]\n", "lr", "a number"),
    ("mot", "teacher_data: 5\n", "teacher_data", "a list of strings"),
    ("mot", "weights: [1, x]\n", "weights[1]", "a number"),
    ("qr-distill", "style_templates: [a]\n", "style_templates", "a mapping"),
    ("qr-distill", "limit: abc\n", "limit", "an integer or null"),
    ("cord", 'seed: "x"\n', "seed", "an integer"),
    ("cord", "meta_prover: {a: 1}\n", "meta_prover", "a string"),
])
def test_yaml_value_of_the_wrong_type_names_field_type_and_file(work, capsys, command, extra, field, expected):
    path = work.config(command, extra)
    code, err = run_cli([command, "--config", path], capsys)
    line = one_line(err)
    assert code == 2
    assert line.startswith(f"distillkit {command}: {path}: {field}: expected {expected}"), line
    assert command not in work.ran  # refused before run(), i.e. before any model loads


def test_yaml_boolean_for_a_string_field_says_to_quote_it(work, capsys):
    code, err = run_cli(["vcrd", "--config", work.config("vcrd", "bf16: off\n")], capsys)
    assert code == 2 and 'quote the word, e.g. "on"' in one_line(err)


def test_invalid_yaml_names_the_file_and_line(work, capsys):
    path = work.config("vcrd", "clip: [0.5, 2.0\n")
    code, err = run_cli(["vcrd", "--config", path], capsys)
    line = one_line(err)
    assert code == 2 and f"{path}: line " in line and "invalid YAML" in line and "started on line 4" in line


@pytest.mark.parametrize("command", list(METHODS))
def test_config_file_missing_or_a_directory(work, capsys, command):
    code, err = run_cli([command, "--config", "nope.yaml"], capsys)
    assert code == 2 and one_line(err) == f"distillkit {command}: --config nope.yaml: no such file"
    code, err = run_cli([command, "--config", str(work.path)], capsys)
    assert code == 2 and "is a directory" in one_line(err)


def test_unknown_yaml_field_is_one_line(work, capsys):
    code, err = run_cli(["mot", "--config", work.config("mot", "round: 2\n")], capsys)
    assert code == 2 and "unknown config field(s) ['round']" in one_line(err)


# ----------------------------------------------------------------------------------------------
# What the machine must provide, checked before any model loads (point 13)
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", list(METHODS))
def test_device_cuda_without_cuda(work, capsys, command):
    code, err = run_cli([command, "--config", work.config(command), "--device", "cuda"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"distillkit {command}: --device cuda: no CUDA device here"), line
    path = work.config(command, "device: cuda\n")
    code, err = run_cli([command, "--config", path], capsys)
    assert code == 2 and f"{path}: device='cuda': no CUDA device here" in one_line(err)
    assert command not in work.ran


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_device_index_beyond_the_devices_here(work, capsys):
    index = torch.cuda.device_count()
    code, err = run_cli(["qr-distill", "--config", work.config("qr-distill"), "--device", f"cuda:{index}"], capsys)
    line = one_line(err)
    assert code == 2 and f"--device cuda:{index}: this machine has {index} CUDA device(s)" in line, line


@pytest.mark.parametrize("command,flag,value", [
    ("vcrd", "--student", "./no-such-model"),
    ("vcrd", "--judge", "/no/such/prm"),
    ("mot", "--student", "~/no-such-dir/model"),
    ("cord", "--meta-prover", "runs/x/no-such-model"),
    ("qr-distill", "--students", "hub-student ./no-b"),
])
def test_model_path_that_does_not_exist(work, capsys, command, flag, value):
    code, err = run_cli([command, "--config", work.config(command), flag, *value.split()], capsys)
    line = one_line(err)
    assert code == 2 and f"{flag} {value.split()[-1]}: no such directory" in line, line
    assert command not in work.ran


def test_model_list_in_yaml_names_the_element(work, capsys):
    (work.path / "t1").mkdir()
    path = work.config("cord", "teachers: [./t1, ./t2]\n")  # PyYAML: the last of a repeated key wins
    code, err = run_cli(["cord", "--config", path], capsys)
    assert code == 2 and f"{path}: teachers[1]='./t2': no such directory" in one_line(err)


def test_hub_ids_are_left_to_the_loader(work, capsys):
    code, err = run_cli(["vcrd", "--config", work.config("vcrd"), "--student", "org/model", "--teacher", "gpt2"],
                        capsys)
    assert code == 0, err
    assert work.ran["vcrd"].student == "org/model"


@pytest.mark.parametrize("command,flag,make", [
    ("cord", "--output-path", "dir"),
    ("cord", "--summary-path", "dir"),
    ("vcrd", "--output-dir", "file"),
    ("mot", "--output-dir", "file"),
    ("qr-distill", "--output-dir", "file"),
])
def test_output_path_of_the_wrong_kind(work, capsys, command, flag, make):
    target = work.path / "target"
    if make == "dir":
        target.mkdir()
    else:
        target.write_text("x")
    code, err = run_cli([command, "--config", work.config(command), flag, str(target)], capsys)
    line = one_line(err)
    assert code == 2 and f"{flag} {target}: is a {'directory' if make == 'dir' else 'file'}" in line, line
    assert command not in work.ran


def test_input_file_that_does_not_exist(work, capsys):
    code, err = run_cli(["vcrd", "--config", work.config("vcrd"), "--prompts", "missing.jsonl"], capsys)
    assert code == 2 and "--prompts missing.jsonl: no such file" in one_line(err)


def test_kernel_backend_that_cannot_run(work, capsys):
    code, err = run_cli(["vcrd", "--config", work.config("vcrd"), "--device", "cpu", "--backend", "cuda"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("distillkit vcrd: --backend cuda: the cuda backend"), line
    assert "vcrd" not in work.ran


@pytest.mark.skipif(not NO_CUDA, reason="triton runs here")
def test_scoring_backend_triton_without_gpu_or_interpreter(work, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = run_cli(["cord", "--config", work.config("cord"), "--scoring-backend", "triton"], capsys)
    assert code == 2 and "--scoring-backend triton: the triton backend" in one_line(err)


def test_vllm_teacher_backend_when_vllm_is_missing(work, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    code, err = run_cli(["vcrd", "--config", work.config("vcrd"), "--teacher-backend", "vllm"], capsys)
    assert code == 2 and "--teacher-backend vllm: vllm is not installed" in one_line(err)


def test_merge_nonexistent_checkpoint_goes_through_the_wrapper(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["merge", "no-such-ckpt", "other-ckpt", "-o", "out"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("distillkit merge: ") and "no-such-ckpt" in line, line
    assert not (tmp_path / "out").exists()


def test_demo_bad_option_is_one_line(capsys):
    code, err = run_cli(["demo", "--n-distill", "0"], capsys)
    assert code == 2 and "n_distill" in one_line(err)


def test_info_takes_no_options(capsys):
    code, err = run_cli(["info", "--bogus"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus" in err and "usage:" in err


# ----------------------------------------------------------------------------------------------
# The wrapper itself: exit codes, folding, --debug
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_command(monkeypatch):
    """`distillkit fake ...` runs the function given to the returned setter."""
    module = types.ModuleType("_distillkit_fake_command")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "test command"))

    def set_body(body):
        module.cli = lambda argv: body(argv)

    return set_body


def _missing_field(argv):
    raise InputError("q.jsonl:3: missing field(s) ['question']; expected {id, question, answer}")


def _runtime(argv):
    raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA to debug")


def _interrupt(argv):
    raise KeyboardInterrupt


def _library_value_error(argv):
    return int("not a number")  # raised outside distillkit: not one of our argument checks


def _distillkit_value_error(argv):
    from distillkit.merge._named import check_density

    return check_density(5.0)


@pytest.mark.parametrize("body,code,needle", [
    (_missing_field, 2, "distillkit fake: q.jsonl:3: missing field(s) ['question']"),
    (_runtime, 1, "distillkit fake: RuntimeError: CUDA error: device-side assert triggered (--debug shows"),
    (_interrupt, 130, "distillkit fake: interrupted"),
    (_library_value_error, 1, "ValueError: invalid literal for int()"),
    (_distillkit_value_error, 2, "density"),
])
def test_exception_becomes_one_line_and_an_exit_code(fake_command, capsys, body, code, needle):
    fake_command(body)
    got, err = run_cli(["fake"], capsys)
    assert got == code and needle in one_line(err)


def test_path_errors_are_bad_input_only_for_paths_the_user_gave(fake_command, capsys, tmp_path):
    def open_it(argv):
        open(os.path.join(argv[0], "config.json"))

    fake_command(open_it)
    code, err = run_cli(["fake", str(tmp_path / "ckpt")], capsys)
    missing = tmp_path / "ckpt" / "config.json"
    assert code == 2 and one_line(err) == f"distillkit fake: {missing}: No such file or directory"

    def open_internal(argv):
        open(str(tmp_path / "internal-asset.bin"))

    fake_command(open_internal)
    code, err = run_cli(["fake", "other"], capsys)
    assert code == 1 and "FileNotFoundError; --debug shows the traceback" in one_line(err)


def test_hugging_face_missing_model_is_folded_and_named(fake_command, capsys):
    """The real loader's message: several lines that do not name the model."""
    transformers = pytest.importorskip("transformers")

    def load(argv):
        transformers.AutoConfig.from_pretrained(argv[0], local_files_only=True)

    fake_command(load)
    code, err = run_cli(["fake", "nobody-xyz/no-model-here"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("distillkit fake: model 'nobody-xyz/no-model-here': "), line
    assert "--debug shows the full message" in line and "Hub id" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(work, capsys, where):
    argv = ["vcrd", "--config", work.config("vcrd", 'seed: "x"\n')]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "InputError: " in err and "seed" in err
    assert "DISTILLKIT_DEBUG" not in os.environ  # restored after the command


def test_debug_shows_the_traceback_of_a_runtime_failure(fake_command, capsys):
    fake_command(_runtime)
    code, err = run_cli(["fake", "--debug"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "TORCH_USE_CUDA_DSA" in err


def test_debug_after_a_double_dash_is_an_argument(fake_command, capsys):
    seen = []
    fake_command(lambda argv: seen.append(argv) or 0)
    assert cli.main(["fake", "--", "--debug"]) == 0 and seen == [["--", "--debug"]]


def test_console_entry_prints_one_line(tmp_path):
    """`python -m distillkit.cli`: nothing else reaches stderr (no warnings, no traceback)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: s\nteacher: t\nprompts: [q.jsonl\n")
    proc = subprocess.run([sys.executable, "-m", "distillkit.cli", "vcrd", "--config", str(bad)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr).startswith(f"distillkit vcrd: {bad}: line ")


def test_cord_bad_input_record_is_one_line(tmp_path, capsys, monkeypatch):
    """A CoRD run on the shipped world models whose input JSONL lacks a field: one line naming the line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # configs/world name the models relative to the repository root
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "1", "question": "1+1", "answer": "2"}\n{"id": "2", "answer": "3"}\n')
    code, err = run_cli(["cord", "--config", "configs/world/cord.yaml", "--input-path", str(questions),
                         "--output-path", str(tmp_path / "out.jsonl"), "--no-progress"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"distillkit cord: {questions}:2: ") and "question" in line, line
