"""Served teacher backend: a model behind an OpenAI-compatible ``/v1/completions`` endpoint
(``vllm serve``, SGLang, ``transformers serve``), driven over HTTP with many requests in flight.

    teacher = OpenAITeacher("Qwen/QwQ-32B", base_url="http://gpu-node:8000/v1", max_concurrency=64)
    props = teacher.propose(["Q: 2+3?\\n<think> ### Step"], n=2, max_new_tokens=256, stop=PromptGuided())
    props = await teacher.apropose(...)   # the same, as a coroutine (requests of all callers share the bound)

How the Teacher contract is met over HTTP:

* Stop strings are the boundary's ``stop_strings()``; its ``cut`` stays authoritative and is applied to
  the returned text. Servers differ in whether the matched stop string stays in the text
  (``transformers serve`` keeps it, vLLM and SGLang drop it and name it in ``stop_reason`` /
  ``matched_stop``): a named stop string is put back before cutting, so every server gives the step
  the in-process backends give.
* ``n > 1`` sampled continuations: one request with ``n`` where the server honours it (vLLM, SGLang);
  ``transformers serve`` ignores ``n`` and answers one choice, which is detected on the first such call
  (``n_mode="auto"``) and answered from then on with ``n`` requests seeded ``seed, seed + 1, ...``.
  Greedy continuations (temperature 0) are identical: one request, repeated.
* Token counts come from ``usage.completion_tokens``; with ``n`` choices in one response the total
  is shared among them in proportion to their text length (the API reports only the total).
* Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times with exponential
  backoff (a restarted server is picked up again); a server that stays unreachable raises
  :class:`ServedTeacherError`, an unknown model name or a refused request raises ``InputError``, each
  one line naming the teacher and the URL.

httpx (``pip install 'distillkit[serve]'``) is imported when a teacher is built.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from urllib.parse import urlsplit

from distillkit._errors import InputError
from distillkit.teachers.base import (
    Proposal,
    StepBoundary,
    Teacher,
    as_boundary,
    check_propose_args,
    finish,
)

log = logging.getLogger(__name__)

N_MODES = ("auto", "native", "split")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_START_S, _BACKOFF_MAX_S = 0.25, 8.0


class ServedTeacherError(RuntimeError):
    """A served teacher could not answer: its server stayed unreachable (or kept failing) after the retries."""


def _httpx():
    try:
        import httpx
    except ImportError as exc:
        raise ImportError("teacher_backend 'openai' needs httpx: pip install 'distillkit[serve]'") from exc
    return httpx


def normalize_base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> ``http://host:port/v1`` (no trailing slash)."""
    if not isinstance(url, str) or not url:
        raise InputError(f"base_url={url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"base_url={url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if parts.path.rstrip("/") else url + "/v1"


def _share_tokens(total: int, texts: list[str]) -> list[int]:
    """``total`` tokens split among ``texts`` in proportion to their length (sum kept exact)."""
    if len(texts) == 1:
        return [total]
    weights = [max(1, len(t)) for t in texts]
    shares = [total * w // sum(weights) for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


def _error_text(response) -> str:
    """The server's error message from an OpenAI-style error body ({"error": {"message"}}, {"detail"}), one line."""
    try:
        body = response.json()
    except Exception:
        body = response.text
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(err, dict):
            err = err.get("message", err)
        body = err
    text = " ".join(str(body).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class OpenAITeacher(Teacher):
    """Proposes steps by calling ``POST {base_url}/completions`` of an OpenAI-compatible server.

    model:            the served model name (``vllm serve --served-model-name``; ``transformers serve``:
                      the checkpoint path or Hub id).
    base_url:         ``http://host:port/v1`` (``/v1`` is added when the URL has no path).
    api_key_env:      name of the environment variable holding the API key (None: no key is sent).
    max_concurrency:  requests of this teacher in flight at once (per event loop).
    request_timeout_s: seconds one request may take (connect, generate, read) before it is retried.
    max_retries:      retries of a request after a connection error, a timeout, 429 or 5xx.
    n_mode:           auto (try ``n`` once, fall back to n requests when the server ignores it) |
                      native | split.
    check:            probe the server once when built (``GET {base_url}/models``): an unreachable
                      server fails here, before anything else loads.
    transport:        an ``httpx.AsyncBaseTransport`` to use instead of the network (tests).
    """

    def __init__(self, model: str, *, base_url: str, name: str | None = None, api_key_env: str | None = None,
                 max_concurrency: int = 16, request_timeout_s: float = 600.0, max_retries: int = 6,
                 n_mode: str = "auto", check: bool = True, transport=None):
        if not isinstance(model, str) or not model:
            raise InputError(f"model={model!r}: expected the served model name")
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
            raise InputError(f"max_concurrency={max_concurrency!r}: expected an integer >= 1")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise InputError(f"max_retries={max_retries!r}: expected an integer >= 0")
        if not (isinstance(request_timeout_s, (int, float)) and request_timeout_s > 0):
            raise InputError(f"request_timeout_s={request_timeout_s!r}: expected a number of seconds > 0")
        if n_mode not in N_MODES:
            raise InputError(f"n_mode={n_mode!r}: expected one of {N_MODES}")
        self._httpx = _httpx()
        self.model, self.base_url, self.name = model, normalize_base_url(base_url), name or model
        self.max_concurrency, self.request_timeout_s = max_concurrency, float(request_timeout_s)
        self.max_retries, self.n_mode, self._transport = max_retries, n_mode, transport
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise InputError(f"teacher_api_key_env={api_key_env!r}: the environment variable is not set "
                                 f"(it should hold the API key of {self.base_url})")
            self.headers["Authorization"] = f"Bearer {key}"
        self.requests_sent = 0  # HTTP requests made (retries included), for tests and statistics
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        if check:
            self.check_server()

    # ---- public ----------------------------------------------------------------------------------

    def check_server(self) -> None:
        """Raises ServedTeacherError (one line) when ``{base_url}/models`` cannot be reached after the
        retries; any HTTP answer (even an error status) means a server is there."""
        async def probe():
            async with self._client() as client:
                await self._send(client, "GET", "/models", None)

        self._run_sync(probe())

    def propose(self, prefixes: Sequence[str], *, n: int = 1, max_new_tokens: int = 128,
                stop: StepBoundary | Sequence[str] | str | None = None, temperature: float = 0.0,
                seed: int | None = None, top_p: float = 1.0) -> list[list[Proposal]]:
        return self._run_sync(self.apropose(prefixes, n=n, max_new_tokens=max_new_tokens, stop=stop,
                                            temperature=temperature, seed=seed, top_p=top_p))

    async def apropose(self, prefixes: Sequence[str], *, n: int = 1, max_new_tokens: int = 128,
                       stop: StepBoundary | Sequence[str] | str | None = None, temperature: float = 0.0,
                       seed: int | None = None, top_p: float = 1.0) -> list[list[Proposal]]:
        """``propose`` as a coroutine: every prefix is its own request, all in flight at once up to
        ``max_concurrency`` (shared with every other caller on this event loop). The call's HTTP connections
        are closed when it returns (a driver may run each round in a fresh event loop)."""
        prefixes = check_propose_args(prefixes, n, max_new_tokens, temperature, top_p)
        boundary = as_boundary(stop)
        gate = self._gate()
        async with self._client() as client:
            rows = [self._one_prefix(client, gate, p, n, max_new_tokens, boundary, float(temperature), seed,
                                     float(top_p)) for p in prefixes]
            return list(await asyncio.gather(*rows))

    async def aclose(self) -> None:
        """Nothing to close: each call closes its own connections (kept for callers that close clients)."""

    # ---- requests --------------------------------------------------------------------------------

    def _client(self):
        httpx = self._httpx
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, limits=limits,
                                 timeout=httpx.Timeout(self.request_timeout_s), transport=self._transport)

    def _gate(self) -> asyncio.Semaphore:
        """The running event loop's bound on requests in flight (a semaphore belongs to one loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            gate = self._per_loop.get(loop)
            if gate is None:
                gate = self._per_loop[loop] = asyncio.Semaphore(self.max_concurrency)
        return gate

    def _run_sync(self, coro):
        """Runs ``coro`` to completion from synchronous code (in a helper thread when this thread already
        runs an event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        out: dict = {}

        def target():
            try:
                out["value"] = asyncio.run(coro)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                out["error"] = exc

        t = threading.Thread(target=target, name=f"{self.name}-propose")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    async def _one_prefix(self, client, gate, prefix: str, n: int, max_new_tokens: int, boundary: StepBoundary,
                          temperature: float, seed: int | None, top_p: float) -> list[Proposal]:
        if temperature == 0:  # greedy continuations are identical: ask once
            return (await self._complete(client, gate, prefix, 1, max_new_tokens, boundary, 0.0, seed, top_p)) * n
        if n > 1 and self.n_mode != "split":
            got = await self._complete(client, gate, prefix, n, max_new_tokens, boundary, temperature, seed, top_p)
            if len(got) >= n:
                if self.n_mode == "auto":
                    self.n_mode = "native"
                return got[:n]
            if self.n_mode == "native":
                raise ServedTeacherError(f"teacher {self.name!r} at {self.base_url}: asked for n={n} choices, "
                                         f"got {len(got)} (set n_mode to split or auto)")
            log.info("teacher %r at %s ignores n (answered %d choice(s) for n=%d): sending n requests from now on",
                     self.name, self.base_url, len(got), n)
            self.n_mode = "split"
            rest = await asyncio.gather(*(
                self._complete(client, gate, prefix, 1, max_new_tokens, boundary, temperature,
                               None if seed is None else seed + i, top_p) for i in range(len(got), n)))
            return got + [p for r in rest for p in r]
        rows = await asyncio.gather(*(
            self._complete(client, gate, prefix, 1, max_new_tokens, boundary, temperature,
                           None if seed is None else seed + i, top_p) for i in range(n)))
        return [p for r in rows for p in r]

    async def _complete(self, client, gate, prefix: str, n: int, max_new_tokens: int, boundary: StepBoundary,
                        temperature: float, seed: int | None, top_p: float) -> list[Proposal]:
        stops = boundary.stop_strings()
        head, head_tokens, prompt = "", 0, prefix
        while True:
            body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens - head_tokens,
                    "temperature": temperature}
            if n > 1:
                body["n"] = n
            if top_p < 1:
                body["top_p"] = top_p
            if seed is not None:
                body["seed"] = int(seed) % (1 << 63)
            if stops:
                body["stop"] = stops
            async with gate:
                data = await self._send(client, "POST", "/completions", body)
            more = self._stopped_on_prompt(data, prompt, head, boundary, stops) if n == 1 else None
            if more is None or head_tokens + more[1] >= max_new_tokens:
                return self._proposals(data, boundary, stops, head=head, head_tokens=head_tokens)
            # The server matched a stop string that began inside the prompt (Hugging Face stop strings look at
            # the whole sequence: a prefix ending in "\n" and a step starting "### Step" match "\n### Step"):
            # not a boundary of the generated text, so the continuation goes on from where it stopped.
            head, head_tokens, prompt = head + more[0], head_tokens + more[1], prompt + more[0]

    @staticmethod
    def _stopped_on_prompt(data: dict, prompt: str, head: str, boundary: StepBoundary,
                           stops: list[str]) -> tuple[str, int] | None:
        """(text, tokens) of a one-choice answer that stopped on a stop string straddling the prompt's end
        (nothing else explains the stop), else None."""
        choices = data.get("choices") or []
        tokens = (data.get("usage") or {}).get("completion_tokens")
        if len(choices) != 1 or not isinstance(tokens, int) or tokens < 1:
            return None
        c = choices[0]
        text = c.get("text") or ""
        if c.get("finish_reason") != "stop" or isinstance(c.get("stop_reason", c.get("matched_stop")), str):
            return None
        if not text or boundary.cut(head + text, final=True) is not None or any(s in head + text for s in stops):
            return None
        straddles = any(len(s) > 1 and s in prompt[-(len(s) - 1):] + text for s in stops)
        return (text, tokens) if straddles else None

    async def _send(self, client, method: str, path: str, body: dict | None) -> dict:
        """One request with retries; returns the JSON answer. Raises InputError for a refused request
        (4xx other than 408/429) and ServedTeacherError once the retries are spent."""
        httpx = self._httpx
        url = self.base_url + path
        delay, last = _BACKOFF_START_S, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                log.warning("teacher %r: %s; retry %d/%d in %.2g s", self.name, last, attempt, self.max_retries, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _BACKOFF_MAX_S)
            self.requests_sent += 1
            try:
                response = await client.request(method, path, json=body)
            except httpx.TransportError as exc:  # connect/read errors, timeouts, a server killed mid-answer
                last = f"{type(exc).__name__} {str(exc) or 'no answer'}".strip()
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code} {_error_text(response)}"
                continue
            if response.status_code >= 400:
                raise self._refused(response, url)
            if method == "GET":
                return {}
            try:
                return response.json()
            except ValueError:
                raise ServedTeacherError(f"teacher {self.name!r}: {url} answered HTTP {response.status_code} "
                                         f"with a body that is not JSON") from None
        if last.startswith("HTTP"):  # the server answers, but with errors
            raise ServedTeacherError(f"teacher {self.name!r}: {url} kept failing after {self.max_retries + 1} "
                                     f"attempt(s) ({last}); see the server's log (an unknown model name "
                                     f"{self.model!r} fails so on some servers: teachers are the served names)")
        raise ServedTeacherError(f"teacher {self.name!r}: {url} unreachable after {self.max_retries + 1} "
                                 f"attempt(s) ({last}); is the server running? (vllm serve / transformers serve; "
                                 "README: Served teachers)")

    def _refused(self, response, url: str) -> InputError:
        status, why = response.status_code, _error_text(response)
        lower = why.lower()
        if status == 404 or ("model" in lower and ("not" in lower or "unknown" in lower)):
            return InputError(f"teacher {self.name!r}: {url} does not serve model {self.model!r} "
                              f"(HTTP {status}: {why}); teachers: are the served model names")
        if status in (401, 403):
            return InputError(f"teacher {self.name!r}: {url} refused the API key (HTTP {status}: {why}); "
                              "teacher_api_key_env names the variable holding it")
        return InputError(f"teacher {self.name!r}: {url} refused the request (HTTP {status}: {why})")

    def _proposals(self, data: dict, boundary: StepBoundary, stops: list[str], *, head: str = "",
                   head_tokens: int = 0) -> list[Proposal]:
        """Proposals from a completions answer; ``head`` (``head_tokens``) was generated by earlier requests
        of the same continuation."""
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if not choices:
            raise ServedTeacherError(f"teacher {self.name!r}: {self.base_url}/completions answered no choices")
        texts = []
        stopped_by_string = []
        for c in choices:
            text = head + (c.get("text") or "")
            matched = c.get("stop_reason", c.get("matched_stop"))
            by_string = c.get("finish_reason") == "stop" and (
                isinstance(matched, str) or any(s in text for s in stops))
            if isinstance(matched, str) and matched and not text.endswith(matched):
                text += matched  # vLLM / SGLang drop the stop string; `cut` needs it to place the boundary
            texts.append(text)
            stopped_by_string.append(by_string)
        usage = data.get("usage") or {}
        total = usage.get("completion_tokens")
        counts = _share_tokens(int(total), texts) if isinstance(total, int) else [0] * len(texts)
        out = []
        for c, text, tokens, by_string in zip(choices, texts, counts, stopped_by_string):
            hit_eos = c.get("finish_reason") == "stop" and not by_string
            out.append(finish(text, boundary, num_tokens=head_tokens + tokens, hit_eos=hit_eos))
        return out
