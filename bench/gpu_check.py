"""One GPU check from a bare machine: build, GPU tests, every bench suite at the anchor shapes, one report.

    python3 bench/gpu_check.py [OUT_DIR] [--dry-run] [--budget-s 480] [--skip-install] [--only SUITE,...]

OUT_DIR defaults to $OUT (the device machine's return folder), else ./gpu_check_out. Steps, each under `timeout`
and under one overall deadline (--budget-s; a step gets what is left, a step that overruns is stopped and
reported, the steps after it are listed as not run):
  env         device name, driver, python / torch / triton / CUDA / nvcc versions, cores
  install     `pip install --no-build-isolation --no-deps --no-index -e .` with TORCH_CUDA_ARCH_LIST set to this
              device's architecture alone and MAX_JOBS to its cores (pip never resolves torch or anything else;
              modules the checks need and the image lacks are listed, and installed from the wheels in .whl/
              when there: the device machine reaches no registry). A liger-kernel wheel in .whl/ is installed
              too, so that the fused-linear suite times Liger's fused-linear JSD beside ours.
  compile     bench/triton_compile_check.py: every Triton skew-KL configuration through triton.compile for
              this device's architecture, with registers and stack (spills) per cubin
  tests       the GPU tests: every cuda and triton case (`-k "cuda or triton"`) of tests/ops (loss modules
              included) and tests/merge, on CUDA tensors: values and gradients against float64, extreme logits,
              ignored tokens, odd sizes
  bench:NAME  bench/bench_NAME.py at the anchor shapes (bench/shapes.py), providers eager, torch.compile'd
              eager, distillkit's backends and Liger where its wheel is present
Writes to OUT_DIR (4 files: the device machine returns at most 8): gpu_check.md (the steps, the test summary and
one Markdown table of every suite, bench/summarize.py's), gpu_check.json (the same as data), gpu_check.log
(every step's output) and results-<device>.tar.gz (bench/results/<suite>-<device>.json files: untar into
bench/results/ to record them).

--dry-run is the CI check of this script on a CPU: the same steps with the CPU build already installed (pip
install is asked with --dry-run), Triton compiled for sm_90 without a GPU, the test selection collected but not
run (CI's own test command ran them, the Triton cases under the interpreter), the suites at toy shapes
(`--shapes tiny`) with the CPU backends and torch.compile's aot_eager backend. It fails on any step that fails.

For the lent H200 (torch 2.11+cu130, Triton 3.6, no liger there), carry the liger wheel as the device README
says: `echo /.whl/ >> .git/info/exclude; pip download liger-kernel==0.8.5 --no-deps -d .whl`, then
run(command="python3 bench/gpu_check.py", carry=[".whl"], timeout_s=600).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ("skew_kl", "fused_linear", "scoring", "merge", "meta_prover")  # in order of what matters most
# seconds per step on a GPU, before the overall deadline cuts them (install builds 13 translation units on
# MAX_JOBS cores; a suite's limit covers torch.compile's first compiles and the eager baselines)
GPU_LIMITS = {"env": 30, "install": 240, "compile": 60, "tests": 120, "bench:skew_kl": 100,
              "bench:fused_linear": 100, "bench:scoring": 60, "bench:merge": 75, "bench:meta_prover": 60}
DRY_LIMITS = {"env": 30, "install": 120, "compile": 120, "tests": 120, "bench:skew_kl": 90,
              "bench:fused_linear": 90, "bench:scoring": 60, "bench:merge": 60, "bench:meta_prover": 90}
TEST_PATHS = ["tests/ops", "tests/merge"]  # tests/ops holds the loss-module tests too
TEST_SELECTION = "cuda or triton"
# modules the checks import, by pip name; the image is expected to hold them all (KINDS.md lists it)
NEEDED = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "pytest_timeout": "pytest-timeout",
          "numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "pyyaml",
          "transformers": "transformers", "tokenizers": "tokenizers", "peft": "peft", "triton": "triton"}


class Run:
    """Runs the steps under one deadline and keeps their record."""

    def __init__(self, out_dir: str, budget_s: float, dry_run: bool):
        self.out_dir, self.dry_run = out_dir, dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.steps: list[dict] = []
        self.log = open(os.path.join(out_dir, "gpu_check.log"), "w", encoding="utf-8")
        self.limits = DRY_LIMITS if dry_run else GPU_LIMITS

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def step(self, name: str, cmd: list[str], env: dict | None = None, reserve_s: float = 15) -> dict:
        """Runs cmd under `timeout` for min(its limit, what the deadline leaves); records status and output."""
        left = self.deadline - time.monotonic() - reserve_s
        limit = int(min(self.limits.get(name, 60), left))
        rec = {"step": name, "cmd": " ".join(cmd), "limit_s": limit}
        if limit < 5:
            rec.update(status="not run", reason="overall budget spent", elapsed_s=0.0)
            self.steps.append(rec)
            self.say(f"== {name}: not run (overall budget spent)")
            return rec
        self.say(f"== {name} (limit {limit} s): {rec['cmd']}")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        wrapped = (["timeout", "--kill-after=10", str(limit)] if shutil.which("timeout") else []) + cmd
        start = time.monotonic()
        tail: list[str] = []
        try:
            proc = subprocess.Popen(wrapped, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True)
            for line in proc.stdout:
                self.log.write(line)
                print(line, end="", flush=True)
                tail = (tail + [line.rstrip("\n")])[-40:]
            rc = proc.wait(timeout=max(1, limit + 30 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:  # `timeout` is missing or did not stop it: stop the group
            os.killpg(proc.pid, 9)
            rc = 124
        except OSError as exc:
            rc, tail = 127, [f"{exc.__class__.__name__}: {exc}"]
        elapsed = time.monotonic() - start
        status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"failed (rc {rc})")
        rec.update(status=status, rc=rc, elapsed_s=round(elapsed, 1), tail=tail[-12:])
        self.steps.append(rec)
        self.say(f"== {name}: {status} in {elapsed:.1f} s")
        return rec


def environment(dry_run: bool) -> dict:
    env = {"python": platform.python_version(), "executable": sys.executable, "cores": os.cpu_count(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": dry_run}
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            env.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}")
    except Exception as exc:  # noqa: BLE001 - recorded, the install step will fail visibly
        env["torch"] = f"does not import: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"does not import: {exc.__class__.__name__}"
    for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"]),
                     ("nvcc", ["nvcc", "--version"]), ("git", ["git", "rev-parse", "--short", "HEAD"])):
        try:
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
            text = out.stdout.strip().splitlines()
            env[key] = text[-1] if text and out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            env[key] = None
    env["device_tag"] = (env.get("gpu") or "cpu").replace(" ", "_")
    return env


def missing_modules() -> list[str]:
    return [pip_name for mod, pip_name in NEEDED.items() if importlib.util.find_spec(mod) is None]


def install(run: Run, env: dict) -> bool:
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "*.whl")))
    missing = missing_modules()
    run.say(f"modules missing before install: {missing or 'none'}; wheels in .whl/: "
            f"{[os.path.basename(w) for w in wheels] or 'none'}")
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "--disable-pip-version-check"]
    if wheels:  # liger-kernel and anything the image lacks, never their dependencies (torch stays as it is)
        rec = run.step("wheels", pip + (["--dry-run"] if run.dry_run else []) + wheels)
        if rec["status"] != "ok":
            return False
    build_env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if run.dry_run:
        build_env.update(DISTILLKIT_BUILD_CUDA="0")
        cmd = pip + ["--dry-run", "-e", "."]  # the CPU build CI made stays; pip checks the command
    else:
        build_env.update(DISTILLKIT_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=env.get("capability") or "9.0")
        cmd = pip + ["-e", "."]
    run.say(f"build environment: {build_env}")
    rec = run.step("install", cmd, env=build_env)
    if rec["status"] != "ok":
        return False
    still = missing_modules()
    if still:
        run.say(f"still missing after install (steps that import them will fail): {still}")
    check = ("import distillkit, json; from distillkit._backend import backends; "
             "print(distillkit.__file__); print(json.dumps({k: v for k, v in backends().items()}, indent=1))")
    return run.step("backends", [sys.executable, "-c", check])["status"] == "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", default=os.environ.get("OUT") or os.path.join(REPO, "gpu_check_out"))
    p.add_argument("--dry-run", action="store_true", help="CPU check of this script: tiny shapes, interpreter")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall deadline in seconds (default 480: the GPU budget, build included)")
    p.add_argument("--skip-install", action="store_true", help="use the distillkit already installed")
    p.add_argument("--only", help="comma-separated suites to run (default all: " + ",".join(SUITES) + ")")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    budget = args.budget_s or 480.0
    run = Run(args.out_dir, budget, args.dry_run)
    env = environment(args.dry_run)
    run.say("== env: " + json.dumps(env))
    if not args.dry_run and "gpu" not in env:
        run.say("no CUDA device: a GPU check needs one (use --dry-run on a CPU)")
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    results_dir = os.path.join(scratch, "results")
    os.makedirs(results_dir)
    common = {"DISTILLKIT_BENCH_RESULTS": results_dir}
    if args.dry_run:  # (the tests set TRITON_INTERPRET themselves; the suites time no interpreter)
        common.update(DISTILLKIT_BENCH_COMPILE_BACKEND="aot_eager")

    installed = True if args.skip_install else install(run, env)
    if installed:
        arch = (env.get("capability") or "9.0").replace(".", "")
        run.step("compile", [sys.executable, "-c", "import os, runpy, sys; os.environ.pop('TRITON_INTERPRET', None); "
                             f"sys.argv = ['triton_compile_check', '--arch', '{arch}', '--json', "
                             f"{os.path.join(scratch, 'compile.json')!r}]; "
                             "runpy.run_path('bench/triton_compile_check.py', run_name='__main__')"],
                 env=common)
        tests = [sys.executable, "-m", "pytest", *TEST_PATHS, "-k", TEST_SELECTION, "-q", "-p", "no:cacheprovider",
                 "-rfE", "--junitxml", os.path.join(scratch, "tests.xml")]
        if args.dry_run:
            tests.append("--collect-only")
        elif importlib.util.find_spec("xdist") is not None:
            tests += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles many variants: spread them
        run.step("tests", tests, env=common)
        suites = [s for s in (args.only.split(",") if args.only else SUITES)]
        for suite in suites:
            if suite not in SUITES:
                run.say(f"unknown suite {suite!r}; expected one of {SUITES}")
                continue
            run.step(f"bench:{suite}", [sys.executable, "-m", "pytest", f"bench/bench_{suite}.py", "-q", "-s",
                                        "-p", "no:cacheprovider", "--shapes", "tiny" if args.dry_run else "anchor",
                                        "--benchmark-columns=median", "-W", "ignore::RuntimeWarning"], env=common)
    return report(run, env, results_dir, scratch)


def _test_summary(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    lines = [line for line in rec.get("tail", []) if line.strip()]
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line
                    or " error" in line or "tests collected" in line or " selected" in line), None)
    return f"{rec['status']}: {summary or (lines[-1] if lines else 'no output')}"


def report(run: Run, env: dict, results_dir: str, scratch: str) -> int:
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import summarize

    runs = summarize.load(results_dir)
    table = summarize.table(runs) if runs else "(no suite wrote results)"
    failed = [s for s in run.steps if s["status"] != "ok"]
    tests = next((s for s in run.steps if s["step"] == "tests"), None)
    compile_rows = []
    compile_json = os.path.join(scratch, "compile.json")
    if os.path.exists(compile_json):
        with open(compile_json) as f:
            compile_rows = json.load(f)
    device = env.get("gpu") or f"CPU ({env.get('cores')} cores)"
    md = [f"# distillkit GPU check{' (dry run)' if run.dry_run else ''}: {device}", "",
          f"{env.get('date')}; python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
          f"triton {env.get('triton')}, driver {env.get('driver')}, nvcc {env.get('nvcc')}, git {env.get('git')}, "
          f"{env.get('cores')} cores; total {time.monotonic() - run.t0:.0f} s", "",
          "| step | status | seconds | limit |", "|---|---|---:|---:|"]
    md += [f"| {s['step']} | {s['status']} | {s.get('elapsed_s', 0):.0f} | {s['limit_s']} |" for s in run.steps]
    md += ["", f"GPU tests ({TEST_SELECTION!r} in {' '.join(TEST_PATHS)}): {_test_summary(tests)}", ""]
    if compile_rows:
        md += ["Triton skew-KL compiles (cuobjdump -res-usage):", "",
               "| config | BLOCK | warps | ok | registers | stack bytes |", "|---|---:|---:|---|---:|---:|"]
        md += [f"| {r['config']} | {r['BLOCK']} | {r['num_warps']} | {'yes' if r['ok'] else 'NO'} | "
               f"{r.get('registers', '?')} | {r.get('stack', '?')} |" for r in compile_rows]
        md.append("")
    if failed:
        md += ["Did not finish or failed:", ""]
        for s in failed:
            md.append(f"- {s['step']}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else ""))
            md += [f"      {line}" for line in s.get("tail", [])[-6:]]
        md.append("")
    md += ["## Bench (bench/summarize.py)", "", table]
    text = "\n".join(md)
    with open(os.path.join(run.out_dir, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(run.out_dir, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump({"environment": env, "steps": run.steps, "compile": compile_rows,
                   "results": {os.path.basename(p): json.load(open(p)) for p in
                               sorted(glob.glob(os.path.join(results_dir, "*.json")))}}, f, indent=1)
    with tarfile.open(os.path.join(run.out_dir, f"results-{env['device_tag']}.tar.gz"), "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
            tar.add(path, arcname=os.path.basename(path))
    run.say("\n" + text)
    run.log.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
