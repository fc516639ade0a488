"""Helpers for the edge agent's tests: a real `sync-server` process, signed bundles, a loopback proxy.

    sync_server_process()   `python -m sync_server serve` on a free loopback port, SQLite in a folder
    BundleMaker             signed bundles of the tiny model under any name and version
    Proxy                   a loopback HTTP proxy in front of the server that records requests and can
                            hold a download after N bytes, refuse the push stream, rewrite assignments
                            or play offline
    device_home()           a device's store with the publisher key pinned
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from tests.server_fixtures import ADMIN_TOKEN, ENROLLMENT_SECRET, Publisher, tarball

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "the condition", every: float = 0.05) -> Any:
    """Poll `condition()` until it is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


# ----------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A running `sync-server serve` and the admin calls the tests make."""

    url: str
    data_dir: Path
    process: subprocess.Popen
    http: httpx.Client = field(repr=False)

    def publish(self, bundle: Path, saved_model: Path, channel: str | None = "stable") -> dict[str, Any]:
        files = {"bundle": ("bundle.tar.gz", tarball(bundle)), "saved_model": ("saved_model.tar.gz", tarball(saved_model))}
        response = self.http.post("/v1/models", files=files, data={"channel": channel} if channel else None)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def set_channel(self, model: str, version: int, channel: str = "stable") -> None:
        response = self.http.put(f"/v1/models/{model}/channels/{channel}", json={"version": version})
        assert response.status_code == 200, response.text

    def device(self, device_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/devices/{device_id}").json()

    def status_of(self, device_id: str, version: int) -> dict[str, Any] | None:
        return next((s for s in self.device(device_id)["status"] if s["version"] == version), None)

    def telemetry(self, model: str) -> dict[str, Any]:
        return self.http.get(f"/v1/models/{model}/telemetry").json()

    def artifact_path(self, sha256: str) -> Path:
        return self.data_dir / "artifacts" / "sha256" / sha256[:2] / sha256


@contextlib.contextmanager
def sync_server_process(data_dir: Path, publisher_keys: list[Path]) -> Iterator[ServerProcess]:
    """`python -m sync_server serve` on 127.0.0.1 and a free port (SQLite in `data_dir`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "SYNC_SERVER_DATA_DIR": str(data_dir),
        "SYNC_SERVER_HOST": "127.0.0.1",
        "SYNC_SERVER_PORT": str(port),
        "SYNC_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "SYNC_SERVER_ENROLLMENT_SECRET": ENROLLMENT_SECRET,
        "SYNC_SERVER_PUBLISHER_KEYS": os.pathsep.join(str(k) for k in publisher_keys),
        "SYNC_SERVER_EMBEDDED_PRELOAD": "off",
        "SYNC_SERVER_PUSH_POLL": "0.2",
        "SYNC_SERVER_LOG_LEVEL": "warning",
        "SYNC_SERVER_LOG_FORMAT": "text",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    log = open(data_dir / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "sync_server", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"sync-server exited: {(data_dir / 'server.log').read_text()[-2000:]}"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "sync-server did not become ready"
            time.sleep(0.1)
        yield ServerProcess(url, data_dir, process, http)
    finally:
        http.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# ----------------------------------------------------------------------------------------------------------
# Bundles and devices
# ----------------------------------------------------------------------------------------------------------


class BundleMaker:
    """Signed bundles of the tiny model's v1 under any name and version (same weights, new manifest)."""

    def __init__(self, publisher: Publisher, root: Path) -> None:
        from converter import read_bundle

        self.publisher = publisher
        self.root = root
        bundle = read_bundle(publisher.bundles[1], publisher.public_key)
        self.model = bundle.read_model()
        self.manifest = bundle.manifest

    def make(self, name: str, version: int, *, key: Path | None = None, pad: int = 0) -> Path:
        """`pad` bytes of zeros after the model (a bigger file that loads the same: flatbuffers ignore them)."""
        from converter import write_bundle

        path = self.root / (f"{name}-v{version}-{(key or self.publisher.private_key).name}" + (f"-pad{pad}" if pad else ""))
        if not path.exists():
            from converter.bundle import sha256_hex

            model = self.model + bytes(pad)
            manifest = dataclasses.replace(self.manifest, name=name, version=version, model_sha256=sha256_hex(model),
                                           model_size=len(model))
            write_bundle(path, model, manifest, sign_key=key or self.publisher.private_key)
        return path


def device_home(root: Path, publisher: Publisher) -> Path:
    """A fresh device store with the publisher's key pinned (what a kiosk is shipped with)."""
    home = root / "device"
    home.mkdir(parents=True)
    shutil.copyfile(publisher.public_key, home / "trusted.pub")
    return home


# ----------------------------------------------------------------------------------------------------------
# The proxy
# ----------------------------------------------------------------------------------------------------------


class Proxy:
    """A loopback HTTP proxy in front of `upstream` that the agent is enrolled through.

    `requests` records (method, path, headers) of every request; `body_bytes[path]` counts the body
    bytes passed on. Knobs: `offline` (close every connection unanswered), `refuse_events` (503 for the
    push stream), `hold` ({path prefix: (n, threading.Event)}: pass n body bytes, then wait for the
    event and cut the connection), `rewrite_assignment` (a function applied to assignment JSON).
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.body_bytes: dict[str, int] = {}
        self.offline = False
        self.refuse_events = False
        self.hold: dict[str, tuple[int, threading.Event]] = {}
        self.rewrite_assignment: Callable[[dict], dict] | None = None
        self._lock = threading.Lock()
        self._upstreams: set[http.client.HTTPConnection] = set()
        handler = type("ProxyHandler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a cut connection is what the tests want
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def seen(self, method: str, path_start: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for m, p, h in self.requests if m == method and p.startswith(path_start)]

    def close(self) -> None:
        """Stop listening and cut every connection to the server (streams included)."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            upstreams = list(self._upstreams)
        for connection in upstreams:
            if connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: Proxy

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._forward()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    def do_PUT(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        proxy = self.proxy
        headers = {k: v for k, v in self.headers.items()}
        with proxy._lock:
            proxy.requests.append((self.command, self.path, headers))
        if proxy.offline:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if proxy.refuse_events and self.path.endswith("/events"):
            body = json.dumps({"error": {"code": "unavailable", "message": "push is down (test proxy)"}}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        with proxy._lock:
            proxy._upstreams.add(upstream)
        try:
            self._relay(upstream, headers, body)
        finally:
            with proxy._lock:
                proxy._upstreams.discard(upstream)
            upstream.close()

    def _relay(self, upstream: http.client.HTTPConnection, headers: dict[str, str], body: bytes | None) -> None:
        proxy = self.proxy
        headers.pop("Connection", None)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        hold = next(((n, event) for prefix, (n, event) in proxy.hold.items() if self.path.startswith(prefix)), None)
        rewrite = proxy.rewrite_assignment if self.path.endswith("/assignment") and response.status == 200 else None
        out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("transfer-encoding", "connection", "content-length")]
        if rewrite is not None:
            data = json.dumps(rewrite(json.loads(response.read()))).encode()
            self._start(response.status, out_headers, len(data))
            self.wfile.write(data)
            return
        declared = response.getheader("Content-Length")
        self._start(response.status, out_headers, int(declared) if declared is not None else None)
        sent = 0
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                if hold is not None and sent + len(chunk) >= hold[0]:
                    chunk = chunk[: hold[0] - sent]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    self._count(sent + len(chunk))
                    hold[1].wait(60)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
            self._count(sent)
        except (OSError, http.client.HTTPException):  # the proxy closed, or a client went away
            self._count(sent)

    def _start(self, status: int, headers: list[tuple[str, str]], length: int | None) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()

    def _count(self, n: int) -> None:
        path = self.path.split("?")[0]
        with self.proxy._lock:
            self.proxy.body_bytes[path] = self.proxy.body_bytes.get(path, 0) + n
