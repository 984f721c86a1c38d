"""`distillkit cord` with served teachers (teacher_backend: openai) against a real `transformers serve` on
127.0.0.1, serving the world's shipped teachers from their folders: the same traces as the in-process hf
backend at temperature 0, a server killed mid-run bridged by the retries, a failed run resumed, and the
one-line error of an unreachable URL."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _served import LocalServer, free_port  # noqa: E402 (tests/teachers is on the path: no __init__.py)

from distillkit.cli import main as distillkit_main  # noqa: E402
from distillkit.methods.cord import CordConfig, run  # noqa: E402
from distillkit.methods.cord.runner import cli as cord_cli  # noqa: E402
from distillkit.methods.cord.runner import load_teachers  # noqa: E402
from distillkit.teachers.openai import ServedTeacherError  # noqa: E402
from distillkit.world.problems import main as write_questions  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "world", "cord.yaml")
ASSETS = os.path.join(ROOT, "distillkit", "world", "assets")
TEACHERS = [os.path.join(ASSETS, f"teacher-{n}") for n in ("carry", "borrow", "overflow")]


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "questions.jsonl"
    write_questions(["--n", "3", "--seed", "7", "--out", str(path)])
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(log_path=str(tmp_path_factory.mktemp("server") / "serve.log"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def hf_records(questions, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "traces.jsonl")
    assert cord_cli(["--config", CONFIG, "--input-path", questions, "--output-path", out, "--no-progress"]) == 0
    return _records(out)


def _records(path: str) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def _same_traces(got: dict, want: dict) -> None:
    """The same steps from the same teachers, the same answers and token counts. Scores are compared to
    float32 rounding only: the meta-prover batches the candidates of all questions in flight, so a run with
    another number in flight sums in another order."""
    assert sorted(got) == sorted(want)
    for k, r in want.items():
        for field in ("trajectory", "final_answer", "tokens_generated"):
            assert got[k][field] == r[field], (k, field)
        assert [(s["text"], s["teacher"]) for s in got[k]["steps"]] == [(s["text"], s["teacher"]) for s in r["steps"]]
        assert got[k]["predictive_perplexity"] == pytest.approx(r["predictive_perplexity"], rel=1e-5)


def _served_flags(url: str, **extra) -> list[str]:
    flags = ["--teacher-backend", "openai", "--teacher-base-urls", url, "--teachers", *TEACHERS]
    for k, v in extra.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


@pytest.mark.timeout(240)  # the module's server start and the hf reference run are set up on first use
def test_cord_served_equals_hf_at_temperature_0(questions, server, hf_records, tmp_path):
    out = str(tmp_path / "traces.jsonl")
    code = cord_cli(["--config", CONFIG, "--input-path", questions, "--output-path", out, "--no-progress",
                     *_served_flags(server.base_url)])
    assert code == 0
    _same_traces(_records(out), hf_records)
    assert all(r["correct"] is not None for r in hf_records.values())


def _served_config(questions, out, url, **kw) -> CordConfig:
    return CordConfig.from_yaml(CONFIG, input_path=questions, output_path=out, progress=False,
                                teacher_backend="openai", teacher_base_urls=[url], teachers=TEACHERS, **kw)


def _kill_when(server: LocalServer, ready, *, restart_after_s: float | None):
    """Kills the server once ``ready()`` is true (polled; at most 60 s); restarts it after the pause."""
    def watch():
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            server.start()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(300)  # two runs and two server restarts; minutes on a loaded machine
def test_server_killed_mid_run_is_retried_then_a_failed_run_resumes(questions, server, hf_records, tmp_path,
                                                                    caplog):
    # 1. killed and restarted while requests are in flight: the retries (backoff 0.25, 0.5, ... 8 s) bridge it
    out = str(tmp_path / "bridged.jsonl")
    cfg = _served_config(questions, out, server.base_url, max_retries=8)
    teachers = load_teachers(cfg)
    watcher = _kill_when(server, lambda: sum(t.requests_sent for t in teachers) >= 12, restart_after_s=0.5)
    with caplog.at_level(logging.WARNING, logger="distillkit.teachers.openai"):
        run(cfg, teachers=teachers)
    watcher.join()
    assert any("retry" in r.getMessage() for r in caplog.records)
    _same_traces(_records(out), hf_records)

    # 2. killed for good with no retries left: the run fails with one line, its finished records stay; the
    # server back, the same command resumes (by id) and completes the output
    out = str(tmp_path / "resumed.jsonl")
    cfg = _served_config(questions, out, server.base_url, max_retries=0, questions_in_flight=1, limit=2)
    teachers = load_teachers(cfg)
    watcher = _kill_when(server, lambda: os.path.exists(out) and os.path.getsize(out) > 0, restart_after_s=None)
    with pytest.raises(ServedTeacherError, match="unreachable"):
        run(cfg, teachers=teachers)
    watcher.join()
    kept = _records(out)
    assert len(kept) == 1
    server.start()
    code = cord_cli(["--config", CONFIG, "--input-path", questions, "--output-path", out, "--no-progress",
                     "--questions-in-flight", "1", "--limit", "2", *_served_flags(server.base_url, max_retries=0)])
    assert code == 0
    resumed = _records(out)
    assert resumed[next(iter(kept))] == next(iter(kept.values()))  # the record from before is kept as it was
    _same_traces(resumed, {k: hf_records[k] for k in ("0", "1")})


@pytest.mark.timeout(60)
def test_unreachable_url_is_one_line(questions, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    code = distillkit_main(["cord", "--config", CONFIG, "--input-path", questions, "--output-path",
                            str(tmp_path / "t.jsonl"), "--no-progress", *_served_flags(url, max_retries=1)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("distillkit cord: ") and "unreachable after 2 attempt(s)" in err[0]
    assert url in err[0] and "is the server running" in err[0]


@pytest.mark.timeout(60)
def test_unknown_model_name_is_one_line(server):
    """transformers serve answers a model it cannot load with HTTP 500 (vLLM: 404, test_openai_teacher.py):
    after the retries, one line that names the model and the likely cause."""
    from distillkit.teachers.openai import OpenAITeacher

    teacher = OpenAITeacher(os.path.join(ASSETS, "no-such-teacher"), base_url=server.base_url, max_retries=1)
    with pytest.raises(ServedTeacherError) as e:
        teacher.propose(["1+1=?\n<think> ### Step"], max_new_tokens=4)
    text = str(e.value)
    assert "\n" not in text and "kept failing after 2 attempt(s) (HTTP 500" in text and "no-such-teacher" in text
