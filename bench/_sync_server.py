"""A `sync-server` process on a free loopback port for the benchmarks, stopped when they finish."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def sync_server_started(
    settings: Mapping[str, str],
    log_path: Path,
    *,
    preexec_fn: Callable[[], None] | None = None,
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `python -m sync_server serve` with `SYNC_SERVER_*` settings; yields (URL, process) once /readyz is 200."""
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **settings, "SYNC_SERVER_PORT": str(port)}
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "sync_server", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready in {ready_timeout_s:.0f} s")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def sync_server_process(settings: Mapping[str, str], log_path: Path, **options: object) -> Iterator[str]:
    """`sync_server_started`, yielding only the URL."""
    with sync_server_started(settings, log_path, **options) as (url, _process):  # type: ignore[arg-type]
        yield url
