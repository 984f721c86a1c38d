"""The teacher options every method with teachers shares (CoRD, QR-Distill, VCRD): the generation backend
(``hf`` in-process, ``vllm`` in-process, ``openai``: a served model over HTTP), per-teacher sampling and
per-teacher engine arguments, and how a served teacher is reached.

A method config inherits :class:`TeacherOptions` (its fields are flat YAML keys and flags like the
method's own), keeps its own ``teachers`` / ``temperature`` fields (their defaults are the method's), and
calls :meth:`TeacherOptions.check_teacher_options` from ``__post_init__``:

    teacher_backend: openai
    teachers: [r1-distill-32b, qwq-32b]            # the served model names
    teacher_base_urls: [http://node0:8000/v1, http://node1:8000/v1]   # one per teacher, or one for all
    temperature: [0.5, 0.6]                         # one per teacher, or one for all
    top_p: 0.95

``temperature`` and ``top_p`` take one number or a list of one per teacher; ``teacher_kwargs`` one
mapping for every teacher or a list of one mapping per teacher (in-process engines: e.g. vLLM's
``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distillkit._errors import InputError
from distillkit.pipeline.config import config_field as _help

TEACHER_BACKENDS = ("hf", "vllm", "openai")
N_MODES = ("auto", "native", "split")  # distillkit.teachers.openai.N_MODES (not imported: it needs no httpx)


@dataclass
class TeacherOptions:
    """Teacher generation options shared by the methods' configs (see the module docstring)."""

    top_p: list[float] | float = _help("teacher nucleus sampling: keep the most likely tokens up to this probability "
                                       "(1: all); one number, or a list of one per teacher", default=1.0)
    teacher_kwargs: dict | list[dict] | None = _help(
        "extra keyword arguments for the teachers' engines: one mapping for every teacher, or a list of one "
        "mapping per teacher (vllm: tensor_parallel_size, gpu_memory_utilization, max_model_len, ...); YAML only",
        default=None)
    teacher_base_urls: list[str] | None = _help(
        "teacher_backend openai: the OpenAI-compatible server of each teacher (http://host:port/v1), one per "
        "teacher or one for all; teachers are then the served model names", default=None)
    teacher_api_key_env: str | None = _help(
        "teacher_backend openai: name of the environment variable holding the servers' API key (None: no key)",
        default=None)
    max_concurrency: int = _help("teacher_backend openai: requests in flight per teacher at most", default=16)
    request_timeout_s: float = _help("teacher_backend openai: seconds one request may take before it is retried",
                                     default=600.0)
    max_retries: int = _help("teacher_backend openai: retries of a request after a connection error, a timeout, "
                             "429 or 5xx (exponential backoff from 0.25 s, at most 8 s apart)", default=6)
    n_mode: str = _help("teacher_backend openai: how n samples of a prefix are asked: auto (n in one request; "
                        "n requests once the server is seen to ignore n, as transformers serve does) | native | "
                        "split", default="auto")

    # ---- checks ------------------------------------------------------------------------------------

    def check_teacher_options(self, num_teachers: int, *, backends: Sequence[str] = TEACHER_BACKENDS,
                              per_teacher_temperature: bool = True) -> None:
        """Range and shape checks of the shared options for a config with ``num_teachers`` teachers; a
        one-element ``temperature`` / ``top_p`` list becomes its number. Raises InputError naming the field."""
        backend = getattr(self, "teacher_backend", "hf")
        if backend not in backends:
            raise InputError(f"teacher_backend={backend!r}: expected one of {tuple(backends)}")
        if per_teacher_temperature:
            self.temperature = _per_teacher_numbers("temperature", self.temperature, num_teachers, 0, 100,
                                                    "0 is greedy")
        self.top_p = _per_teacher_numbers("top_p", self.top_p, num_teachers, 0, 1, "1 keeps every token",
                                          low_open=True)
        kw = self.teacher_kwargs
        if kw is not None:
            if isinstance(kw, (list, tuple)):
                if len(kw) != num_teachers or not all(isinstance(m, dict) for m in kw):
                    raise InputError(f"teacher_kwargs: expected one mapping for every teacher or a list of "
                                     f"{num_teachers} mappings (one per teacher), got a list of {len(kw)}")
                self.teacher_kwargs = [dict(m) for m in kw]
            elif not isinstance(kw, dict):
                raise InputError(f"teacher_kwargs: expected a mapping or a list of mappings, got {type(kw).__name__}")
        urls = self.teacher_base_urls
        if isinstance(urls, str):
            self.teacher_base_urls = urls = [urls]
        if backend == "openai":
            if not urls:
                raise InputError("teacher_base_urls: teacher_backend 'openai' needs the server URL of the teachers "
                                 "(one for all, or one per teacher), e.g. [http://127.0.0.1:8000/v1]")
            if len(urls) not in (1, num_teachers):
                raise InputError(f"teacher_base_urls: expected 1 URL (for all) or {num_teachers} (one per teacher), "
                                 f"got {len(urls)}")
            from urllib.parse import urlsplit

            for i, url in enumerate(urls):
                parts = urlsplit(url) if isinstance(url, str) else None
                if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                    raise InputError(f"teacher_base_urls[{i}]={url!r}: expected an http(s) URL such as "
                                     "http://127.0.0.1:8000/v1")
        elif urls:
            raise InputError(f"teacher_base_urls: only used with teacher_backend 'openai', not {backend!r}")
        for name in ("max_concurrency", "max_retries"):
            value, low = getattr(self, name), (1 if name == "max_concurrency" else 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name}={value!r}: expected an integer >= {low}")
        if not (isinstance(self.request_timeout_s, (int, float)) and not isinstance(self.request_timeout_s, bool)
                and self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise InputError(f"request_timeout_s={self.request_timeout_s!r}: expected a number of seconds > 0")
        if self.n_mode not in N_MODES:
            raise InputError(f"n_mode={self.n_mode!r}: expected one of {N_MODES}")
        if self.teacher_api_key_env is not None and not self.teacher_api_key_env:
            raise InputError("teacher_api_key_env: expected the name of an environment variable, or null")

    # ---- per teacher ------------------------------------------------------------------------------

    def served_model_fields(self) -> tuple[str, ...]:
        """Fields that name served models rather than checkpoints on this machine (not checked as paths)."""
        return (("teachers",) if getattr(self, "teacher_backend", "hf") == "openai" else ()) + \
            (("judge",) if getattr(self, "judge_backend", "hf") == "openai" else ())

    def served_kwargs(self, base_url: str) -> dict[str, Any]:
        """``load_teacher`` keyword arguments of a model served at ``base_url`` (backend "openai")."""
        return {"base_url": base_url, "api_key_env": self.teacher_api_key_env, "max_concurrency": self.max_concurrency,
                "request_timeout_s": self.request_timeout_s, "max_retries": self.max_retries, "n_mode": self.n_mode}

    def teacher_sampling(self, k: int) -> dict[str, float]:
        """Keyword arguments of teacher ``k``'s ``propose``: its temperature, and its top_p when not 1."""
        out = {"temperature": _pick(self.temperature, k)}
        top_p = _pick(self.top_p, k)
        if top_p != 1.0:
            out["top_p"] = top_p
        return out

    def teacher_load_kwargs(self, k: int, **engine: Any) -> dict[str, Any]:
        """Keyword arguments of ``distillkit.teachers.load_teacher`` for teacher ``k``: ``engine`` (the
        method's in-process settings: dtype, device, batch size) then its teacher_kwargs for hf / vllm;
        the server settings for openai."""
        kw = self.teacher_kwargs
        own = dict(kw[k] if isinstance(kw, list) else (kw or {}))
        if getattr(self, "teacher_backend", "hf") != "openai":
            return {**engine, **own}
        urls = self.teacher_base_urls or []
        return {**self.served_kwargs(urls[k] if len(urls) > 1 else urls[0]), **own}


def _pick(value, k: int) -> float:
    return float(value[k]) if isinstance(value, (list, tuple)) else float(value)


def _per_teacher_numbers(name: str, value, num_teachers: int, low: float, high: float, note: str, *,
                         low_open: bool = False):
    """A number, or a list of ``num_teachers`` numbers (a list of one becomes its number), each in range."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(items) not in (1, num_teachers):
        raise InputError(f"{name}: expected one number for every teacher or a list of {num_teachers} "
                         f"(one per teacher), got a list of {len(items)}")
    for i, x in enumerate(items):
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and (low < x if low_open else low <= x) \
            and x <= high
        if not ok:
            where = f"[{i}]" if isinstance(value, (list, tuple)) else ""
            bracket = "(" if low_open else "["
            raise InputError(f"{name}{where}={x!r}: expected a number in {bracket}{low:g}, {high:g}] ({note})")
    if isinstance(value, (list, tuple)):
        return float(items[0]) if len(items) == 1 else [float(x) for x in items]
    return value


def load_teachers(cfg, paths: Sequence[str], names: Sequence[str], **engine: Any) -> list:
    """The config's teachers with its backend (``cfg.teacher_backend``): teacher ``k`` from ``paths[k]``
    (a served model name for openai) named ``names[k]``, with ``cfg.teacher_load_kwargs(k, **engine)``;
    ``engine`` holds the in-process settings (hf: dtype, device, batch_size; vllm: dtype) and is not
    used for served teachers."""
    from distillkit.teachers import load_teacher

    return [load_teacher(p, backend=cfg.teacher_backend, name=n, **cfg.teacher_load_kwargs(k, **engine))
            for k, (p, n) in enumerate(zip(paths, names))]
