"""`distillkit [--debug] <command> [args]`.

Each command lives in the module that implements it and exposes ``cli(argv: list[str]) -> int``;
this file only routes, so that `distillkit info` does not pay for transformers' import.

Errors: any exception escaping a command becomes one line ``distillkit <command>: <message>`` on
stderr (a multi-line message is folded to its first meaningful line) and an exit code:

- 2, bad input: ``InputError`` and any ValueError/TypeError raised by distillkit's own checks, an
  invalid YAML file, ``BackendUnavailable``, and a missing file / a file where a folder is needed (or
  the reverse), or a model the loader cannot find, when the path or model is one the user gave (on the
  command line or in the ``--config`` file);
- 1, runtime failure: anything else (out of memory, a library's internal error, ...);
- 130: interrupted (Ctrl-C).

``--debug`` (anywhere before a ``--``; or ``DISTILLKIT_DEBUG=1``) prints the traceback instead of the
one line. Command-line syntax errors stay argparse's: usage plus one line, exit 2.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

COMMANDS = {
    "info": ("distillkit.info", "print the backend table with versions"),
    "merge": ("distillkit.merge.cli", "merge Hugging Face safetensors checkpoints (average, TIES, DARE)"),
    "cord": ("distillkit.methods.cord.runner", "CoRD: collaborative step-wise multi-teacher decoding"),
    "vcrd": ("distillkit.methods.vcrd.runner", "VCRD: validity-calibrated reasoning distillation"),
    "mot": ("distillkit.methods.mot", "MoT: merge-of-thought distillation"),
    "qr-distill": ("distillkit.methods.qr_distill.runner", "QR-Distill: routed multi-student distillation"),
    "demo": ("distillkit.world.demo", "run every method on the tiny reasoning world"),
}
DEBUG_FLAG = "--debug"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)
_MODEL_HINT = "check the local path or Hub id, and the network: offline, the model must be in the HF cache"


def _usage() -> str:
    lines = ["usage: distillkit [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`distillkit <command> --help` describes a command's options.",
              "--debug: show the traceback of an error instead of one line."]
    return "\n".join(lines)


def _pop_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --debug was given before any "--", argv without it)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != DEBUG_FLAG]
    return len(head) != end, head + argv[end:]


# ----------------------------------------------------------------------------------------------
# One line per error
# ----------------------------------------------------------------------------------------------
def _user_values(argv: list[str]) -> list[str]:
    """Strings the user gave: command-line tokens and the string values of the --config YAML file."""
    values = [a.partition("=")[2] if a.startswith("--") and "=" in a else a for a in argv]
    config = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.partition("=")[2]
    if config:
        try:
            import yaml

            with open(config, encoding="utf-8") as f:
                stack = [yaml.safe_load(f)]
        except Exception:  # an unreadable config is already the error being reported
            stack = []
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                values.append(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return [v for v in values if v and not v.startswith("-")]


def _is_user_path(name, user: list[str]) -> bool:
    """True when the file ``name`` is, or lies inside, a path the user gave."""
    if not name:
        return False
    target = os.path.abspath(os.path.expanduser(os.fsdecode(name)))
    for v in user:
        given = os.path.abspath(os.path.expanduser(v))
        if target == given or target.startswith(given.rstrip(os.sep) + os.sep):
            return True
    return False


def _raised_by_distillkit(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is distillkit's own code (an argument check)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _is_instance(exc: BaseException, module: str, name: str) -> bool:
    # only a module already imported can have raised its exception: no import here
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(exc, cls)


_MODEL_ARGS = ("pretrained_model_name_or_path", "path_or_repo_id", "model_name_or_path", "repo_id")


def _model_id(exc: BaseException) -> str | None:
    """The model path or Hub id a Hugging Face loader was resolving when it raised ``exc`` (read from
    the loader's frames: its message often does not name it), or None."""
    if not isinstance(exc, OSError) or isinstance(exc, _PATH_ERRORS):
        return None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first: the id actually being resolved
        for name in _MODEL_ARGS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.fspath(value):
                return os.fspath(value)
    return None


def _is_missing_model(exc: BaseException, user: list[str]) -> bool:
    """An OSError from a model loader about a path or Hub id the user gave."""
    if not isinstance(exc, OSError) or isinstance(exc, _PATH_ERRORS):
        return False
    model = _model_id(exc)
    if model is not None:
        return model in user or _is_user_path(model, user)
    return any(v in str(exc) for v in user if len(v) > 1)


def exit_code(exc: BaseException, argv: list[str]) -> int:
    """2 for bad input, 130 for an interrupt, 1 for any other failure (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if _is_instance(exc, "distillkit._errors", "InputError") or _is_instance(exc, "yaml", "YAMLError") \
            or _is_instance(exc, "distillkit._backend", "BackendUnavailable"):
        return 2
    if isinstance(exc, (ValueError, TypeError)):
        return 2 if _raised_by_distillkit(exc) else 1
    if isinstance(exc, _PATH_ERRORS):
        return 2 if _is_user_path(exc.filename, _user_values(argv)) else 1
    if _is_missing_model(exc, _user_values(argv)):
        return 2
    return 1


def _meaningful_lines(text: str) -> list[str]:
    # a line of only punctuation or a "Traceback"/"During handling" banner carries no message
    return [s for s in (line.strip() for line in text.splitlines())
            if any(c.isalnum() for c in s) and not s.startswith(("Traceback", "During handling"))]


def error_line(exc: BaseException, code: int) -> str:
    """``exc`` as one line: its first meaningful line, what to do about it, and "--debug" when more
    (lines, or a traceback worth reading) is hidden."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if _is_instance(exc, "yaml", "YAMLError"):
        from distillkit.pipeline.config import yaml_error_line

        mark = getattr(exc, "problem_mark", None)
        return (f"{mark.name}: " if mark is not None and mark.name else "") + yaml_error_line(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
        if exc.filename2 is not None:
            text += f" (-> {exc.filename2})"
        return text + ("" if code == 2 else f" ({type(exc).__name__}; --debug shows the traceback)")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (f"no module named {exc.name!r}: install the package that provides it (README lists the extras, "
                f"e.g. pip install 'distillkit[vllm]'); --debug shows who imported it")
    lines = _meaningful_lines(str(exc))
    text = lines[0] if lines else type(exc).__name__
    if code == 1:
        if lines:
            text = f"{type(exc).__name__}: {text}"
        model = _model_id(exc)
        if model is not None:
            text = f"model {model!r}: {text}"
        return text + " (--debug shows the traceback)"
    notes = []
    model = _model_id(exc)
    if model is not None and model not in text:
        text = f"model {model!r}: {text}"
    if isinstance(exc, OSError) and not isinstance(exc, _PATH_ERRORS):
        notes.append(_MODEL_HINT)
    if len(lines) > 1:
        notes.append("--debug shows the full message")
    return text + (f" ({'; '.join(notes)})" if notes else "")


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
def _run(name: str, rest: list[str]) -> int:
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"distillkit: command {name!r} is not available in this version", file=sys.stderr)
        return 2
    return int(module.cli(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = _pop_debug(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"distillkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    flag, saved = debug, os.environ.get("DISTILLKIT_DEBUG")
    if flag:
        os.environ["DISTILLKIT_DEBUG"] = "1"  # parse_config and the commands re-raise instead of exiting
    debug = flag or saved not in (None, "", "0")
    try:
        return _run(name, rest)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 (KeyboardInterrupt included: one line, exit 130)
        code = exit_code(exc, rest)
        if debug:
            traceback.print_exc()
        else:
            print(f"distillkit {name}: {error_line(exc, code)}", file=sys.stderr)
        return code
    finally:
        if flag and saved is None:
            os.environ.pop("DISTILLKIT_DEBUG", None)
        elif flag:
            os.environ["DISTILLKIT_DEBUG"] = saved


if __name__ == "__main__":
    raise SystemExit(main())
