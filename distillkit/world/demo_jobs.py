"""The demo's scheduler: independent runs (``Job``) side by side in worker processes on one torch thread each,
a job starting as soon as the jobs it reads from are done; their wall and CPU time per job and per section."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("distillkit.world.demo")  # the demo's progress lines, under the demo's logger as before


@dataclass
class Job:
    """One independent run, ``fn(**kwargs)``, started once the jobs named in ``deps`` are done.

    ``kwargs`` may be a function of the finished jobs' values (by key); ``cost`` is a rough guess of its
    CPU seconds, used only to start the longest chains of work first.
    """
    key: str
    section: str
    fn: Callable
    kwargs: dict | Callable[[dict], dict]
    deps: tuple = ()
    cost: float = 1.0


def _timed(fn: Callable, kwargs: dict) -> tuple:
    """(fn(**kwargs), start on the system-wide monotonic clock, wall s, CPU s of this process)."""
    t0, c0 = time.monotonic(), time.process_time()
    value = fn(**kwargs)
    return value, t0, time.monotonic() - t0, time.process_time() - c0


def _worker_init(log_level: int) -> None:
    torch.set_num_threads(1)  # one thread per job: results independent of how many run side by side
    logging.basicConfig(level=log_level, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model load would drown the log
    hf_logging.set_verbosity_error()   # the meta-prover loaded as QR's encoder reports its unused lm_head
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports count as start-up, not as a job's time)

    import distillkit.teachers.hf  # noqa: F401


def run_jobs(jobs: list[Job], workers: int) -> dict[str, tuple]:
    """Runs ``jobs`` (each listed after its deps) -> {key: (value, start, wall_s, cpu_s)}.

    workers == 1: one after another in this process. Otherwise in ``workers`` spawned processes, a job
    starting when its deps are done, the ready job with the most work behind it (its cost plus its
    dependents' longest chain) first.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    def kwargs_of(job: Job) -> dict:
        return job.kwargs(done) if callable(job.kwargs) else job.kwargs

    done: dict[str, tuple] = {}
    if workers == 1:
        for job in jobs:
            done[job.key] = _timed(job.fn, kwargs_of(job))
        return done
    chain: dict[str, float] = {}
    for job in reversed(jobs):
        chain[job.key] = job.cost + max((chain[j.key] for j in jobs if job.key in j.deps), default=0.0)
    pending, running = list(jobs), {}
    # spawn, not fork: this process may hold torch's thread pools and open files
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        while pending or running:
            ready = sorted((j for j in pending if all(d in done for d in j.deps)), key=lambda j: -chain[j.key])
            for job in ready[:workers - len(running)]:
                pending.remove(job)
                running[pool.submit(_timed, job.fn, kwargs_of(job))] = job.key
            if not running:
                raise ValueError(f"jobs: {[j.key for j in pending]} wait on jobs that are not listed before them")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                done[key] = future.result()
                log.info("demo: %d/%d jobs done (%s: %.0f s CPU)", len(done), len(jobs), key, done[key][3])
    return done


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished (waited-for) children: the workers, once the pool is shut down."""
    try:
        import resource
    except ImportError:  # Windows: the workers' CPU time goes uncounted
        return 0.0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def section_times(jobs: list[Job], done: dict[str, tuple]) -> dict[str, dict]:
    """{section: {"jobs", "cpu_s": summed over its jobs, "wall_s": first start to last end}}."""
    out: dict[str, dict] = {}
    for job in jobs:
        _, start, wall, cpu = done[job.key]
        s = out.setdefault(job.section, {"jobs": 0, "cpu_s": 0.0, "start": start, "end": start + wall})
        s["jobs"] += 1
        s["cpu_s"] += cpu
        s["start"], s["end"] = min(s["start"], start), max(s["end"], start + wall)
    return {k: {"jobs": s["jobs"], "cpu_s": round(s["cpu_s"], 1), "wall_s": round(s["end"] - s["start"], 1)}
            for k, s in out.items()}


def job_times(jobs: list[Job], done: dict[str, tuple], t0: float) -> dict[str, dict]:
    """{job: {"start_s": after t0 (monotonic clock), "wall_s", "cpu_s"}}, to see what a schedule would give."""
    return {j.key: {"start_s": round(done[j.key][1] - t0, 1), "wall_s": round(done[j.key][2], 1),
                    "cpu_s": round(done[j.key][3], 1)} for j in jobs}
