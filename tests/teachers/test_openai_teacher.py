"""The served teacher (teacher_backend: openai) against scripted HTTP answers (httpx.MockTransport): how
vLLM-, SGLang- and transformers-serve-style answers become proposals, n, retries and errors. The tests
against a real `transformers serve` are in test_openai_server.py."""
from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")

from distillkit import InputError  # noqa: E402
from distillkit.methods.cord.segmentation import PromptGuided  # noqa: E402
from distillkit.teachers.openai import OpenAITeacher, ServedTeacherError, normalize_base_url  # noqa: E402

URL = "http://served.test:8000/v1"


class Script:
    """A fake server: ``answer(body) -> (status, json)`` per completion request; records every request."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body, dict(request.headers)))
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        status, payload = self.answer(body)
        if isinstance(payload, Exception):
            raise payload
        return httpx.Response(status, json=payload)

    def completions(self):
        return [r for r in self.requests if r[1].endswith("/completions")]


def choice(text, finish="stop", index=0, **extra):
    return {"text": text, "index": index, "finish_reason": finish, **extra}


def reply(*choices, tokens=7):
    return 200, {"choices": list(choices), "usage": {"completion_tokens": tokens, "prompt_tokens": 3}}


def teacher(script, **kw):
    kw.setdefault("max_retries", 2)
    return OpenAITeacher("served-model", base_url=URL, transport=httpx.MockTransport(script), **kw)


SEG = PromptGuided()


def test_stop_string_kept_or_dropped_gives_the_same_step():
    """transformers serve keeps the stop string in the text, vLLM drops it and names it (stop_reason),
    SGLang names it matched_stop: each gives the step the in-process backends give (cut on the text)."""
    kept = Script(lambda b: reply(choice(" 1: 1+2=3\n### Step")))
    vllm = Script(lambda b: reply(choice(" 1: 1+2=3", stop_reason="\n### Step")))
    sglang = Script(lambda b: reply(choice(" 1: 1+2=3", matched_stop="\n### Step")))
    want = None
    for script in (kept, vllm, sglang):
        (p,), = teacher(script).propose(["Q\n<think> ### Step"], max_new_tokens=16, stop=SEG)
        assert (p.text, p.finished, p.stop_reason, p.num_tokens) == (" 1: 1+2=3\n", False, "boundary", 7)
        want = want or p
        body = script.completions()[0][2]
        assert body["stop"] == SEG.stop_strings() and body["max_tokens"] == 16 and body["model"] == "served-model"
        assert body["temperature"] == 0 and "n" not in body and "top_p" not in body


def test_end_marker_eos_and_length():
    end = Script(lambda b: reply(choice(" 3: 9+2=2\n</think>", tokens=5)))
    (p,), = teacher(end).propose(["Q"], stop=SEG)
    assert p.text == " 3: 9+2=2\n</think>" and p.finished and p.stop_reason == "end"
    eos = Script(lambda b: reply(choice(" The final answer is 2.")))
    (p,), = teacher(eos).propose(["Q"], stop=None)
    assert p.finished and p.stop_reason == "eos"
    length = Script(lambda b: reply(choice(" 1: 1+", finish="length")))
    (p,), = teacher(length).propose(["Q"], stop=SEG)
    assert not p.finished and p.stop_reason == "length"


def test_n_native_split_and_greedy():
    """n sampled continuations: one request with n where the server answers n choices; a server that
    answers one (transformers serve) is detected once, then asked n times with seeds seed, seed+1, ..."""
    native = Script(lambda b: reply(*[choice(f"a{i}", index=i) for i in range(b.get("n", 1))], tokens=9))
    t = teacher(native)
    rows = t.propose(["p", "q"], n=3, temperature=0.7, seed=5, top_p=0.9)
    assert [[p.text for p in r] for r in rows] == [["a0", "a1", "a2"]] * 2
    assert sum(p.num_tokens for p in rows[0]) == 9  # usage's total shared among the choices
    assert len(native.completions()) == 2 and t.n_mode == "native"
    assert native.completions()[0][2]["n"] == 3 and native.completions()[0][2]["top_p"] == 0.9

    one = Script(lambda b: reply(choice(f"s{b.get('seed')}")))
    t = teacher(one)
    (row,) = t.propose(["p"], n=3, temperature=0.7, seed=5)
    assert [p.text for p in row] == ["s5", "s6", "s7"] and t.n_mode == "split"
    t.propose(["p"], n=3, temperature=0.7, seed=5)
    assert len(one.completions()) == 3 + 3  # auto's one try, 2 more; then n requests straight away
    assert all("n" not in r[2] for r in one.completions()[3:])

    greedy = Script(lambda b: reply(choice("g")))
    (row,) = teacher(greedy).propose(["p"], n=4, temperature=0)
    assert [p.text for p in row] == ["g"] * 4 and len(greedy.completions()) == 1


def test_retries_then_succeeds_on_429_5xx_and_connection_errors():
    answers = iter([(429, {"error": {"message": "slow down"}}), (503, {"detail": "loading"}),
                    (0, httpx.ConnectError("refused")), reply(choice("ok"))])
    script = Script(lambda b: next(answers))
    (p,), = teacher(script, max_retries=3).propose(["p"])
    assert p.text == "ok" and len(script.completions()) == 4


def test_errors_are_one_line():
    down = Script(lambda b: (0, httpx.ConnectError("refused")))
    with pytest.raises(ServedTeacherError, match=r"unreachable after 3 attempt\(s\).*is the server running") as e:
        teacher(down).propose(["p"])
    assert "\n" not in str(e.value) and len(down.completions()) == 3
    missing = Script(lambda b: (404, {"error": {"message": "The model `served-model` does not exist."}}))
    with pytest.raises(InputError, match="does not serve model 'served-model'.*does not exist"):
        teacher(missing).propose(["p"])
    assert len(missing.completions()) == 1  # not retried
    failing = Script(lambda b: (500, {"detail": "Internal Server Error"}))
    with pytest.raises(ServedTeacherError, match="kept failing.*HTTP 500.*served names"):
        teacher(failing, max_retries=1).propose(["p"])
    bad = Script(lambda b: (400, {"error": {"message": "max_tokens is too large"}}))
    with pytest.raises(InputError, match="refused the request.*max_tokens is too large"):
        teacher(bad).propose(["p"])


def test_api_key_from_the_named_variable(monkeypatch):
    script = Script(lambda b: reply(choice("x")))
    with pytest.raises(InputError, match="DK_TEST_KEY"):
        teacher(script, api_key_env="DK_TEST_KEY")
    monkeypatch.setenv("DK_TEST_KEY", "sk-123")
    teacher(script, api_key_env="DK_TEST_KEY").propose(["p"])
    assert script.completions()[0][3]["authorization"] == "Bearer sk-123"


def test_apropose_keeps_at_most_max_concurrency_in_flight():
    state = {"now": 0, "peak": 0}

    async def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": []})
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return httpx.Response(200, json={"choices": [choice("x")], "usage": {"completion_tokens": 1}})

    t = OpenAITeacher("m", base_url=URL, transport=httpx.MockTransport(handler), max_concurrency=3)

    async def main():
        rows = await asyncio.gather(*(t.apropose([f"p{i}", f"q{i}"]) for i in range(5)))
        await t.aclose()
        return rows

    rows = asyncio.run(main())
    assert len(rows) == 5 and all(len(r) == 2 for r in rows)
    assert state["peak"] == 3  # 10 requests, 3 at a time


def test_base_url_and_argument_checks():
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(InputError, match="base_url"):
        normalize_base_url("h:1")
    script = Script(lambda b: reply(choice("x")))
    for bad in (dict(max_concurrency=0), dict(max_retries=-1), dict(request_timeout_s=0), dict(n_mode="x")):
        with pytest.raises(InputError):
            teacher(script, **bad)


def test_stop_string_straddling_the_prompt_continues():
    """Hugging Face stop strings look at the whole sequence: a prefix ending in "\\n" and a step that begins
    "### Step" match "\\n### Step" at once (transformers serve answers "### Step"); the teacher goes on
    from there, so the step is the one the in-process backend gives."""
    answers = iter([reply(choice("### Step"), tokens=8), reply(choice(" 2: 3+4=7\n### Step"), tokens=10)])
    script = Script(lambda b: next(answers))
    (p,), = teacher(script).propose(["Q\n<think> ### Step 1: 1+2=3\n"], max_new_tokens=32, stop=SEG)
    assert (p.text, p.num_tokens, p.finished, p.stop_reason) == ("### Step 2: 3+4=7\n", 18, False, "boundary")
    first, second = [r[2] for r in script.completions()]
    assert second["prompt"] == first["prompt"] + "### Step" and second["max_tokens"] == 32 - 8
    eos = Script(lambda b: reply(choice(" The final answer is 7.")))  # no stop string anywhere: EOS, no retry
    (p,), = teacher(eos).propose(["Q\n"], stop=SEG)
    assert p.stop_reason == "eos" and len(eos.completions()) == 1


def test_httpx_is_imported_on_use_with_the_extra_named(monkeypatch):
    import subprocess
    import sys

    code = "import sys, distillkit.teachers, distillkit.pipeline.generation; assert 'httpx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if not installed
    with pytest.raises(ImportError, match=r"distillkit\[serve\]"):
        OpenAITeacher("m", base_url=URL, check=False)
