"""Served vs in-process teachers: questions per second on the tiny world, against a local `transformers serve`.

    python bench/bench_teachers.py [--questions 16] [--out bench/results/teachers-cpu.json]

Two measurements, each in this one run (same machine state):

  propose   one world teacher writes the complete greedy reasoning of N questions (stop at "</think>",
            at most 48 tokens): served (teacher_backend openai) with 1, 4 and 16 requests in flight
            (apropose, max_concurrency = c), against the in-process hf backend (one batched generate
            over the N questions, batch_size 1 and 16). Ratio: served q/s over hf q/s.
  cord      `distillkit cord` on the world's config (3 teachers, B = 4, the meta-prover in-process) over
            N questions with questions_in_flight 1 and 16: served teachers, and the hf backend.

The server runs single-threaded (OMP_NUM_THREADS=1) as a subprocess on a free 127.0.0.1 port; the driver
also uses one torch thread. The server is transformers serve as the tests start it (one generate per
request: requests in flight queue); --continuous-batching adds a second one with that flag (requests in
flight share decoding steps; it applies neither per-request stop strings nor per-request sampling, so steps
run to EOS or the token limit and `cut` finds the boundary afterwards: more tokens per step, and CoRD's
token budget runs out sooner). The result names the CPU (lscpu) and the load average before and after (a
shared machine makes every number slower and noisier).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "teachers"))

from _served import LocalServer  # noqa: E402  (tests/teachers/_served.py: starts transformers serve)

ASSETS = os.path.join(ROOT, "distillkit", "world", "assets")
TEACHERS = [os.path.join(ASSETS, f"teacher-{n}") for n in ("carry", "borrow", "overflow")]
WORLD_CORD = os.path.join(ROOT, "configs", "world", "cord.yaml")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def world_questions(n: int, path: str) -> list[dict]:
    from distillkit.world.problems import main as write_questions

    write_questions(["--n", str(n), "--seed", "11", "--out", path])
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bench_propose(server: LocalServer, prompts: list[str], hf_rows: list[dict] | None = None) -> list[dict]:
    from distillkit.teachers.base import StringStop
    from distillkit.teachers.hf import HFTeacher
    from distillkit.teachers.openai import OpenAITeacher

    kw = dict(n=1, max_new_tokens=48, stop=StringStop(["</think>"]), temperature=0.0)
    rows = []
    hf = HFTeacher.from_pretrained(TEACHERS[0], batch_size=1)
    want = hf.propose(prompts, **kw)
    if hf_rows is None:
        hf.propose(prompts[:1], **kw)  # warm-up
        for batch in (1, 16):
            hf.batch_size = batch
            t = time.perf_counter()
            want = hf.propose(prompts, **kw)
            rows.append({"backend": "hf", "batch_size": batch, "qps": len(prompts) / (time.perf_counter() - t)})
    for c in (1, 4, 16):
        served = OpenAITeacher(TEACHERS[0], base_url=server.base_url, max_concurrency=c)
        served.propose(prompts[:1], **kw)  # the server loads the model on its first request

        async def all_in_flight():
            try:
                return await served.apropose(prompts, **kw)
            finally:
                await served.aclose()

        t = time.perf_counter()
        got = asyncio.run(all_in_flight())
        rows.append({"backend": "openai", "server": server.label, "concurrency": c,
                     "qps": len(prompts) / (time.perf_counter() - t),
                     "same_text_as_hf": [p[0].text for p in got] == [p[0].text for p in want]})
    return rows


def bench_cord(servers: list[LocalServer], questions_path: str, n: int, workdir: str) -> list[dict]:
    from distillkit.methods.cord import CordConfig, run

    rows = []
    for backend, server in [("hf", None)] + [("openai", s) for s in servers]:
        for in_flight in (1, 16):
            extra = dict(teacher_backend="openai", teacher_base_urls=[server.base_url],
                         max_concurrency=16) if backend == "openai" else {}
            label = server.label if server else "in-process"
            out = os.path.join(workdir, f"cord-{backend}-{label}-{in_flight}.jsonl")
            cfg = CordConfig.from_yaml(WORLD_CORD, input_path=questions_path, output_path=out, progress=False,
                                       questions_in_flight=in_flight, limit=n, teachers=TEACHERS, **extra)
            t = time.perf_counter()
            run(cfg)
            elapsed = time.perf_counter() - t  # models load inside: the same for both in-flight settings
            with open(out, encoding="utf-8") as f:
                records = [json.loads(line) for line in f]
            rows.append({"backend": backend, "server": label, "questions_in_flight": in_flight,
                         "questions": len(records), "tokens_generated": sum(r["tokens_generated"] for r in records),
                         "qps": len(records) / elapsed, "elapsed_s": elapsed,
                         "trajectories": {r["id"]: r["trajectory"] for r in records}})
    reference = next(r["trajectories"] for r in rows if r["backend"] == "hf" and r["questions_in_flight"] == 1)
    for r in rows:
        r["same_traces_as_hf_1"] = r.pop("trajectories") == reference
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--out", default=os.path.join(HERE, "results", "teachers-cpu.json"))
    p.add_argument("--skip-cord", action="store_true")
    p.add_argument("--continuous-batching", action="store_true",
                   help="also measure transformers serve --continuous-batching")
    p.add_argument("--server-log", default=os.devnull, help="where the servers' output goes")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    env = {"cpu": cpu_name(), "nproc": os.cpu_count(), "driver_threads": 1, "server_threads": 1,
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "load_average_before": load()}
    with tempfile.TemporaryDirectory() as workdir:
        questions_path = os.path.join(workdir, "questions.jsonl")
        questions = world_questions(args.questions, questions_path)
        prompts = [f"{q['question']}\n<think> ### Step" for q in questions]
        servers = []
        kinds = [("transformers serve", ())]
        if args.continuous_batching:
            kinds.append(("transformers serve --continuous-batching", ("--continuous-batching",)))
        for label, extra in kinds:
            server = LocalServer(threads=1, log_path=args.server_log, extra_args=extra, startup_s=120)
            server.label = label
            servers.append(server)
        propose, cord = [], []
        try:
            for server in servers:
                server.start()
                propose += bench_propose(server, prompts, hf_rows=propose or None)
                server.kill()
            if not args.skip_cord:
                for server in servers:
                    server.start()
                cord = bench_cord(servers, questions_path, args.questions, workdir)
        finally:
            for server in servers:
                server.kill()
    env["load_average_after"] = load()
    env["shared_machine"] = max(env["load_average_before"][0], env["load_average_after"][0]) > 1.5 * (
        env["nproc"] or 1) / 2
    hf16 = next(r["qps"] for r in propose if r["backend"] == "hf" and r["batch_size"] == 16)
    hf1 = next(r["qps"] for r in propose if r["backend"] == "hf" and r["batch_size"] == 1)
    for r in propose:
        r["ratio_to_hf_batch16"], r["ratio_to_hf_batch1"] = r["qps"] / hf16, r["qps"] / hf1
    for label in dict.fromkeys(r["server"] for r in cord):
        one, many = (next(r for r in cord if r["server"] == label and r["questions_in_flight"] == k) for k in (1, 16))
        many["speedup_vs_one_in_flight"] = many["qps"] / one["qps"]
    result = {"environment": env, "questions": args.questions, "propose": propose, "cord": cord}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)

    print(f"{env['cpu']}, {env['nproc']} cores, load average {env['load_average_before']} -> "
          f"{env['load_average_after']} (shared: {env['shared_machine']})")
    print(f"propose: {args.questions} greedy traces of one world teacher")
    for r in propose:
        what = (f"hf batch_size {r['batch_size']:>2}" if r["backend"] == "hf"
                else f"{r['server']}, in flight {r['concurrency']:>2}")
        print(f"  {what:<58} {r['qps']:7.2f} q/s   x{r['ratio_to_hf_batch16']:.2f} of hf batch 16, "
              f"x{r['ratio_to_hf_batch1']:.2f} of hf batch 1")
    if cord:
        print(f"cord (world config, 3 teachers, B = 4): {args.questions} questions")
        for r in cord:
            print(f"  {r['server']:<42} in flight {r['questions_in_flight']:>2}: {r['qps']:6.2f} q/s "
                  f"({r['elapsed_s']:.1f} s, {r['tokens_generated']} teacher tokens)  same traces as hf one at a "
                  f"time: {r['same_traces_as_hf_1']}")
        for r in cord:
            if "speedup_vs_one_in_flight" in r:
                print(f"  {r['server']}: 16 in flight / 1 at a time = x{r['speedup_vs_one_in_flight']:.2f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
