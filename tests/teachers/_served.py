"""A local `transformers serve` (transformers' own OpenAI-compatible server, CPU) as a subprocess on a free
127.0.0.1 port, for the served-teacher tests and the teacher benchmark."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``transformers serve --host 127.0.0.1 --port PORT --device cpu`` started by ``start()`` (waits for
    ``/health``, at most ``startup_s``), stopped by ``kill()`` (SIGKILL: a crash, not a shutdown)."""

    def __init__(self, port: int | None = None, *, threads: int = 1, startup_s: float = 60.0, log_path=None,
                 extra_args: tuple[str, ...] = ()):
        self.port, self.threads, self.startup_s = port or free_port(), threads, startup_s
        self.extra_args = tuple(extra_args)  # e.g. ("--continuous-batching",)
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        exe = shutil.which("transformers")
        head = [exe] if exe else [sys.executable, "-m", "transformers.cli.transformers"]
        return head + ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                       "--dtype", "float32", "--log-level", "warning", *self.extra_args]

    def start(self) -> LocalServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(self.threads),
                   TOKENIZERS_PARALLELISM="false")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_s
        import httpx

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"transformers serve did not answer /health within {self.startup_s:.0f} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and nothing else
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
