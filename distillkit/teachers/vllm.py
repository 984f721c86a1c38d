"""vLLM teacher backend (optional: ``pip install distillkit[vllm]``).

``LLM.generate`` with stop strings approximating the step boundary and automatic prefix caching
(beams of one question share their prompt, so their KV blocks are reused across calls); the
boundary's ``cut`` is then applied to each output, exactly as the Hugging Face backend does.
vllm is imported when a VLLMTeacher is built, never at ``import distillkit``.
"""
from __future__ import annotations

from collections.abc import Sequence

from distillkit.teachers.base import (
    Proposal,
    StepBoundary,
    Teacher,
    as_boundary,
    check_propose_args,
    finish,
)


def vllm_available() -> tuple[bool, str]:
    """(whether vllm imports, why not)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError or a broken CUDA install raising at import
        return False, f"vllm does not import ({exc.__class__.__name__}: {exc}); install distillkit[vllm]"
    return True, f"vllm {vllm.__version__}"


class VLLMTeacher(Teacher):
    """Proposes steps with a vLLM engine.

    model: a local path or Hub id; extra keyword arguments go to ``vllm.LLM`` (e.g.
    ``tensor_parallel_size``, ``gpu_memory_utilization``, ``dtype``). Prefix caching is on.
    """

    def __init__(self, model: str, *, name: str | None = None, llm=None, **llm_kwargs):
        ok, why = vllm_available()
        if not ok:
            raise ImportError(why)
        import vllm

        self.name = name or str(model)
        llm_kwargs.setdefault("enable_prefix_caching", True)
        self.llm = llm if llm is not None else vllm.LLM(model=model, **llm_kwargs)
        self._vllm = vllm

    def propose(self, prefixes: Sequence[str], *, n: int = 1, max_new_tokens: int = 128,
                stop: StepBoundary | Sequence[str] | str | None = None, temperature: float = 0.0,
                seed: int | None = None, top_p: float = 1.0) -> list[list[Proposal]]:
        prefixes = check_propose_args(prefixes, n, max_new_tokens, temperature, top_p)
        boundary = as_boundary(stop)
        params = self._vllm.SamplingParams(
            n=n, temperature=float(temperature), top_p=float(top_p), max_tokens=max_new_tokens, seed=seed,
            stop=boundary.stop_strings() or None,
            # Keep the stop string so that `cut` sees it (it decides where the step really ends).
            include_stop_str_in_output=True)
        outputs = self.llm.generate(prefixes, params, use_tqdm=False)
        result = []
        for out in outputs:
            props = []
            for comp in out.outputs:
                hit_eos = comp.finish_reason == "stop" and comp.stop_reason is None
                props.append(finish(comp.text, boundary, num_tokens=len(comp.token_ids), hit_eos=hit_eos))
            result.append(props)
        return result
