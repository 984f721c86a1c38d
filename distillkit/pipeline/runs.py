"""Resumable-run plumbing shared by the methods: JSONL records appended whole and read back for a
resume, and the run's config recorded at its start and compared on every rerun.

**Records** (``read_records`` / ``append_record``). A run appends one JSON object per line, each
line written, flushed and fsynced whole. Reading the file back to resume keeps every complete
record and never deletes one:

- a newline-terminated line that parses as a JSON object is a record;
- a blank line is skipped (and stays in the file);
- a complete line in the middle that does not parse (or is not an object, or lacks the ``key``
  field the caller needs) is skipped with a warning and stays in the file as it is;
- the last line without its newline is a record when it parses: the newline is appended (repair);
- a last line without its newline that does not parse is a write torn by a crash: its bytes are
  appended to ``<path>.torn`` (fsynced) and only then cut from ``path``, so appending continues on a
  clean line boundary and the fragment is kept, not deleted.

**Run config** (``begin_run``). The first run records its config in a JSON file (written to a
temporary file, fsynced, then ``os.replace``d); a rerun compares its config with the recorded one
and refuses one that differs with an InputError listing each field as ``name: old -> new``, since
resuming would mix two configs in one output (or, for a finished run, change nothing but the
recorded config). Fields that may change between a run and its resume:

- ``overwrite`` and ``progress``: they change how a run is started or shown, not what it computes;
- per method (the ``free`` argument): fields that only say where a derived file goes or how often a
  checkpoint or a metrics line is written (CoRD's summary_path / plot_path, the trainer's
  save_every / log_every: the trainer resumes exactly from any checkpoint);
- per method (the ``extendable`` argument): fields that may only grow (CoRD's ``limit``: a larger
  limit, or none, adds questions after the done ones; a smaller one would leave records outside it).

A field the record does not hold (it was added to the config class after the run started) counts
as unchanged when the new value is the field's default. Nothing is compared when the run has not
written anything yet (the caller says so with ``run_exists``): then the new config is recorded.

``overwrite`` only matters when the configs differ (with the same config a rerun resumes): the old
outputs are renamed, each to ``<path>.replaced-<UTC time>`` beside it (a rename on the same
filesystem: never half-moved, nothing deleted), then the new run starts afresh and records its
config. The run's config record is renamed last, so an interrupted move still refuses the new
config until it is repeated with ``overwrite``.

**Shards** (``select_shard`` / ``merge_shard_records``). A run's items may be split over N drivers
(``--num-shards N --shard-index i``): item goes to shard ``sha256(str(id))[:8] mod N``, a stable hash of
its id (not its position: reordering, extending or limiting the input moves no item to another shard).
Each shard is an ordinary resumable run; the merge puts their records back in input order and refuses
ids found in two shards, ids found in none, and ids not in the input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from distillkit._errors import InputError

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
ALWAYS_FREE = frozenset({"overwrite", "progress"})
TORN_SUFFIX = ".torn"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def read_records(path: str, *, key: str | None = None) -> list[dict]:
    """The complete records of the JSONL file ``path`` (``[]`` when it does not exist), repaired so
    that appending continues on a line boundary (see the module docstring). ``key``: a field every
    record of this run holds (e.g. "id"); lines without it are skipped with a warning, like lines
    that do not parse."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    records: list[dict] = []
    skipped: list[int] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: b"" when the file ends with one
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _parse(line)
        if isinstance(rec, dict) and (key is None or key in rec):
            records.append(rec)
        else:
            skipped.append(lineno)
    if tail:
        rec = _parse(tail)
        if isinstance(rec, dict) or not tail.strip():
            # a whole record (or blank space) that lacks only its newline: add it, so the next append
            # starts a line of its own
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            if isinstance(rec, dict):
                if key is None or key in rec:
                    records.append(rec)
                else:
                    skipped.append(len(lines) + 1)
        else:
            _move_torn_tail(path, len(data) - len(tail), tail)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else "")
        what = "are not JSON objects" + (f" with a {key!r} field" if key else "")
        log.warning("%s: skipping %d line(s) that %s (line %s); they stay in the file", path, len(skipped), what,
                    shown)
    return records


def _move_torn_tail(path: str, start: int, tail: bytes) -> None:
    torn = path + TORN_SUFFIX
    log.warning("%s: the last %d byte(s) are an incomplete record (a write torn by a crash); moving them to %s",
                path, len(tail), torn)
    with open(torn, "ab") as f:  # first kept aside, then cut: a crash in between duplicates, never loses
        f.write(tail + b"\n")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def append_record(f, record: dict) -> None:
    """One whole line per write, flushed and fsynced: a crash leaves whole records only (or a torn
    tail that :func:`read_records` keeps aside)."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Run config
# ----------------------------------------------------------------------------------------------
def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as JSON at ``path``: a temporary file in the same folder, fsynced, then renamed over
    ``path`` (a reader sees the old file or the new one, never half of one)."""
    _write_atomic(path, ".json", lambda f: json.dump(obj, f, indent=1))


def _write_atomic(path: str, suffix: str, write: Callable[[Any], None]) -> None:
    # a temporary file in the same folder, written by ``write(f)``, fsynced, renamed over ``path``
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path)


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with a nested config (a method's ``train: TrainConfig``) spread into its options, as they
    were recorded before it was nested; an option the outer config has itself (output_dir) stays the outer's."""
    out: dict[str, Any] = {}
    for name, value in values.items():  # in field order: differences are listed in the order they were
        if dataclasses.is_dataclass(value):
            out.update({k: v for k, v in dataclasses.asdict(value).items() if k not in values})
        else:
            out[name] = value
    return out


def config_values(cfg) -> dict[str, Any]:
    """The config dataclass as plain JSON values (tuples become lists), as the record holds them."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    plain = {k: v for k, v in dataclasses.asdict(cfg).items() if not dataclasses.is_dataclass(values[k])}
    return json.loads(json.dumps(_flat({**values, **plain}), default=str))


def _defaults(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(_flat(out), default=str))


_UNSET = object()


def config_differences(old: Mapping[str, Any], cfg, *, free: Iterable[str] = (),
                       extendable: Mapping[str, Callable[[Any, Any], bool]] | None = None) -> list[str]:
    """``name: old -> new`` for every field of ``cfg`` whose value may not change from the recorded
    ``old`` (see the module docstring)."""
    new = config_values(cfg)
    defaults = _defaults(cfg)
    renamed = getattr(type(cfg), "__renamed_options__", {})  # a run recorded under an option's old name
    old = {renamed.get(k, k): v for k, v in old.items()}
    free = ALWAYS_FREE | set(free)
    extendable = dict(extendable or {})
    out = []
    for name, value in new.items():
        if name in free:
            continue
        before = old.get(name, _UNSET)
        if before is _UNSET:
            if name in defaults and value == defaults[name]:
                continue
            out.append(f"{name}: (not recorded) -> {value!r}")
            continue
        if before == value or (name in extendable and extendable[name](before, value)):
            continue
        out.append(f"{name}: {before!r} -> {value!r}")
    return out


def _aside_name(path: str, stamp: str) -> str:
    target, n = f"{path}.replaced-{stamp}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.replaced-{stamp}-{n}"
    return target


def move_aside(paths: Sequence[str]) -> list[str]:
    """Renames every existing path to ``<path>.replaced-<UTC time>`` beside it; returns the new names."""
    cwd = os.path.realpath(os.getcwd())
    for p in paths:
        real = os.path.realpath(p)
        if os.path.isdir(real) and (cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)):
            raise InputError(f"overwrite: {p!r} holds the working directory; cannot move it aside "
                             "(run from elsewhere, or choose another output directory)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for p in paths:
        if os.path.lexists(p):
            target = _aside_name(p, stamp)
            os.rename(p, target)
            _fsync_dir(target)
            moved.append(target)
    return moved


def begin_run(cfg, record_path: str, *, run_exists: bool, outputs: Sequence[str], what: str,
              free: Iterable[str] = (), extendable: Mapping[str, Callable[[Any, Any], bool]] | None = None,
              previous: Mapping[str, Any] | None = None, overwrite: bool | None = None) -> list[str]:
    """Checks ``cfg`` against the config recorded at ``record_path`` and records it.

    run_exists: the run has written outputs worth protecting (otherwise the config is just recorded);
    outputs: the paths that make up the run, moved aside with ``overwrite`` (``record_path`` is moved
    after them when it is not inside one); what: the run's name in messages (e.g. "output_dir='x'");
    previous: the config of a run recorded before run-config files existed (e.g. a summary's), used
    when ``record_path`` is missing. ``overwrite`` defaults to ``cfg.overwrite``.
    Returns the paths the old outputs were moved to ([] when nothing was moved). Raises InputError
    naming the differing fields."""
    overwrite = bool(getattr(cfg, "overwrite", False)) if overwrite is None else overwrite
    old = None
    if os.path.exists(record_path):
        try:
            with open(record_path, encoding="utf-8") as f:
                old = json.load(f)["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{what}: its run config {record_path} cannot be read ({exc}); move it aside, or "
                             "pass --overwrite to move the old outputs aside and start afresh") from None
    elif run_exists and previous is not None:
        old = dict(previous)
    moved: list[str] = []
    if old is not None and run_exists:
        diffs = config_differences(old, cfg, free=free, extendable=extendable)
        if diffs and not overwrite:
            raise InputError(
                f"{what} holds a run started with a different config ({record_path}): " + "; ".join(diffs)
                + ". Rerun with the recorded values, choose another output, or pass --overwrite to move the old "
                  "outputs aside (renamed to <path>.replaced-<time>) and start afresh")
        if diffs:
            moved = move_aside([*outputs, record_path])
            log.warning("%s: config changed (%s); overwrite: the old outputs were moved to %s", what,
                        "; ".join(diffs), ", ".join(moved))
    elif run_exists and old is None:
        log.warning("%s: outputs exist but no run config was recorded (%s): the config they were made with "
                    "cannot be checked; recording this run's", what, record_path)
    write_json_atomic(record_path, {"config": config_values(cfg)})
    return moved


def dir_has_outputs(output_dir: str, ignore: Iterable[str] = (RUN_CONFIG_NAME,)) -> bool:
    """True when ``output_dir`` holds anything besides the names in ``ignore``."""
    if not os.path.isdir(output_dir):
        return False
    skip = set(ignore)
    return any(name not in skip for name in os.listdir(output_dir))


def begin_dir_run(cfg, output_dir: str, *, what: str | None = None, free: Iterable[str] = (),
                  extendable: Mapping[str, Callable[[Any, Any], bool]] | None = None,
                  previous_from: str | None = None) -> list[str]:
    """:func:`begin_run` for a method whose run lives in one directory: the record is
    ``output_dir/run_config.json``; with ``overwrite`` the whole directory is moved aside and
    created anew. ``previous_from``: a JSON file in ``output_dir`` whose "config" is the config of a
    run made before run-config files existed."""
    previous = None
    if previous_from is not None:
        path = os.path.join(output_dir, previous_from)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    previous = json.load(f).get("config")
            except (ValueError, AttributeError):
                previous = None
    moved = begin_run(cfg, os.path.join(output_dir, RUN_CONFIG_NAME), run_exists=dir_has_outputs(output_dir),
                      outputs=[output_dir], what=what or f"output_dir={output_dir!r}", free=free,
                      extendable=extendable, previous=previous if isinstance(previous, dict) else None)
    os.makedirs(output_dir, exist_ok=True)
    return moved


# ----------------------------------------------------------------------------------------------
# Shards: one run's questions split over several drivers, their outputs merged
# ----------------------------------------------------------------------------------------------
def shard_of(key: Any, num_shards: int) -> int:
    """The shard (0 .. num_shards - 1) of the item whose id is ``key``: the first 8 bytes of the SHA-256
    of ``str(key)`` modulo num_shards. Stable across runs, machines and Python versions, and independent
    of the item's position, so reordering or extending the input moves no item to another shard."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def check_shard_args(num_shards: Any, shard_index: Any) -> None:
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise InputError(f"num_shards={num_shards!r}: expected an integer >= 1")
    if not isinstance(shard_index, int) or isinstance(shard_index, bool) or not 0 <= shard_index < num_shards:
        raise InputError(f"shard_index={shard_index!r}: expected an integer in [0, num_shards={num_shards})")


def select_shard(items: Sequence[dict], num_shards: int, shard_index: int, *, key: str = "id") -> list[dict]:
    """The items of shard ``shard_index`` of ``num_shards`` (by :func:`shard_of` of ``item[key]``), in
    their order; all items when num_shards is 1."""
    check_shard_args(num_shards, shard_index)
    if num_shards == 1:
        return list(items)
    return [it for it in items if shard_of(it[key], num_shards) == shard_index]


def merge_shard_records(shard_paths: Sequence[str], expected: Sequence[Any], *, key: str = "id") -> list[dict]:
    """The records of the shard outputs ``shard_paths`` in the order of ``expected`` (every id the
    unsharded run would write). Raises InputError naming the files when an id is in two shards, when an
    id of ``expected`` is in none (a shard unfinished or missing), or when a record's id is not expected."""
    if not shard_paths:
        raise InputError("shards: expected at least one shard output")
    where: dict[str, str] = {}
    by_id: dict[str, dict] = {}
    for path in shard_paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such shard output")
        for rec in read_records(path, key=key):
            k = str(rec[key])
            if k in where:
                raise InputError(f"id {k!r} is in two shards: {where[k]} and {path}; the shards overlap "
                                 "(same shard run twice, or runs with different num_shards)")
            where[k], by_id[k] = path, rec
    wanted = [str(k) for k in expected]
    missing = [k for k in wanted if k not in by_id]
    if missing:
        raise InputError(f"{len(missing)} of {len(wanted)} ids are in no shard (first: {missing[:5]}); "
                         "a shard is missing from the list or has not finished")
    extra = sorted(set(by_id) - set(wanted))
    if extra:
        raise InputError(f"{len(extra)} records are not in the input (first: {extra[:5]}, in {where[extra[0]]})")
    return [by_id[k] for k in wanted]


SHARD_FREE = frozenset({"shard_index", "output_path", "output_dir", "summary_path", "plot_path"})


def check_shard_configs(configs: Sequence[tuple[str, Mapping[str, Any]]], *, free: Iterable[str] = ()) -> dict:
    """The config the shards share, from each shard output's recorded config ``(shard output, config)``.

    Raises InputError naming the outputs when the shards were not made by one sharded run: num_shards
    differs or is not the number of outputs given, a shard index appears twice or not at all, or another
    field differs (fields in ``free``, the shard index and the output paths may differ)."""
    if not configs:
        raise InputError("shards: expected at least one shard output")
    skip = ALWAYS_FREE | SHARD_FREE | set(free)
    first_path, first = configs[0]
    counts = {c.get("num_shards", 1) for _, c in configs}
    if len(counts) > 1:
        raise InputError("shards: made with different num_shards (" + ", ".join(
            f"{p}: {c.get('num_shards', 1)}" for p, c in configs) + ")")
    (n,) = counts
    if n != len(configs):
        raise InputError(f"shards: {len(configs)} outputs given but they were made with num_shards={n}; give all "
                         f"{n} shard outputs")
    index: dict[int, str] = {}
    for path, cfg in configs:
        i = cfg.get("shard_index", 0)
        if i in index:
            raise InputError(f"shards: {index[i]} and {path} are both shard {i} of {n}; the shards overlap")
        index[i] = path
    for path, cfg in configs[1:]:
        diffs = [f"{k}: {first.get(k)!r} vs {cfg.get(k)!r}" for k in sorted(set(first) | set(cfg))
                 if k not in skip and first.get(k) != cfg.get(k)]
        if diffs:
            raise InputError(f"shards: {first_path} and {path} were made with different configs: " + "; ".join(diffs))
    return dict(first)


def write_records_atomic(path: str, records: Iterable[dict]) -> None:
    """``records`` as a JSONL file at ``path`` (temporary file, fsynced, renamed over ``path``)."""

    def write(f) -> None:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    _write_atomic(path, ".jsonl", write)


def read_shard_configs(shards: Sequence[tuple[str, str]], *, command: str, what: str) -> dict[str, Any]:
    """The config common to a sharded run's shards, each given as (its output, its run-config record): a missing
    record is an InputError naming the ``what`` (output_path / output_dir) of a ``distillkit <command>`` shard run;
    differing configs are refused by :func:`check_shard_configs`."""
    configs = []
    for where, record in shards:
        if not os.path.isfile(record):
            raise InputError(f"{where}: no run config ({record}); expected the {what} of a `distillkit {command}` "
                             "shard run")
        with open(record, encoding="utf-8") as f:
            configs.append((where, json.load(f)["config"]))
    return check_shard_configs(configs)


def config_from_record(cls, values: Mapping[str, Any], **overrides):
    """``cls`` built from a recorded flat config (the trainer's options beside the method's), keeping the names
    the class accepts, with ``overrides`` on top."""
    accepted = {f.name for f in dataclasses.fields(cls)} - {"train"}
    accepted |= set(getattr(cls, "__train_options__", {}))
    return cls(**{**{k: v for k, v in values.items() if k in accepted}, **overrides})


def parse_merge_shards(argv: Sequence[str], *, prog: str, description: str, what: str) -> tuple[str, list[str]]:
    """``prog --merge-shards OUT SHARD [SHARD ...]`` -> (OUT, [SHARD, ...]); ``what`` names the outputs
    (output_path / output_dir). Sets up INFO logging for the merge."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--merge-shards", nargs="+", required=True, metavar="PATH",
                        help=f"the merged {what}, then every shard's {what}")
    args = parser.parse_args(list(argv))
    if len(args.merge_shards) < 2:
        parser.error(f"--merge-shards: expected the merged {what} and at least one shard {what}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, *shards = args.merge_shards
    return out, shards
