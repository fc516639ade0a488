"""A sync-server stand-in on 127.0.0.1 that misbehaves on cue: the edge agent's hostile network.

It speaks the device side of the sync server's protocol for one device, from plain data a test sets:

    GET  /v1/devices/{id}/assignment   `server.assignment` (JSON, or raw bytes), ETag, If-None-Match -> 304
    GET  /v1/devices/{id}/events       Server-Sent Events: the assignment now and on every change, keepalives
    GET  /v1/artifacts/{sha256}        the file's bytes, one Range with If-Range -> 206, past the end -> 416
    POST /v1/devices/{id}/status       recorded in `server.reports` (also .../telemetry)

`serve_bundle(folder, model, version)` publishes a real signed bundle folder and assigns it; `assign(...)`
sets any assignment, malformed or not. Misbehaviour is a rule: `server.on("GET", "/assignment", drip(1.0))`
applies to requests whose path contains the text, for `times` requests (None: until `clear()`).

    reply(status, body, headers)   a fixed answer (a 429/500/503 storm with Retry-After, a bad error body)
    drip(every_s, step=1)          the normal answer, `step` bytes of body every `every_s` seconds
    hold(after, release)           the normal answer's first `after` body bytes, then wait and cut (or go on)
    garbage_stream(n)              200 text/event-stream, then `n` random bytes
    long_line(n)                   200 text/event-stream, then one `data:` line of `n` bytes and no newline
    cut()                          close the connection without an answer

Every request is in `server.requests` (method, path, headers, monotonic time).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

Answer = tuple[int, dict[str, str], bytes]  # status, headers, body
Behaviour = Callable[["_Handler", Answer], None]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


@dataclass
class Rule:
    method: str
    contains: str
    behaviour: Behaviour
    times: int | None = None
    used: int = field(default=0)


class MisbehavingServer:
    """A loopback sync-server stand-in for one device; see the module docstring."""

    def __init__(self, device_id: str = "dev-test", *, keepalive_s: float = 0.5) -> None:
        self.device_id = device_id
        self.keepalive_s = keepalive_s
        self.assignment: Any = {"device_id": device_id, "model": "m", "version": None, "files": None, "manifest": None}
        self.etag = '"0"'
        self.artifacts: dict[str, bytes] = {}
        self.requests: list[Seen] = []
        self.reports: list[tuple[str, Any]] = []
        self._rules: list[Rule] = []
        self._changed = threading.Condition()
        self._generation = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        handler = type("Handler", (_Handler,), {"stand_in": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # cut connections are the point
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    # --- what it serves -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def assign(self, body: Any) -> None:
        """Serve `body` (a JSON value, or raw bytes) as the assignment, under a new ETag; streams are told."""
        with self._changed:
            self._generation += 1
            self.assignment = body
            self.etag = f'"{self._generation}"'
            self._changed.notify_all()

    def add_file(self, data: bytes) -> dict[str, Any]:
        """Serve `data` at its content address; returns its assignment entry."""
        sha = hashlib.sha256(data).hexdigest()
        self.artifacts[sha] = data
        return {"sha256": sha, "size": len(data), "url": f"/v1/artifacts/{sha}"}

    def bundle_assignment(self, folder: Path, model: str, version: int) -> dict[str, Any]:
        """The assignment of a real bundle folder (its files served here), not yet assigned."""
        files = {path.name: self.add_file(path.read_bytes()) for path in sorted(Path(folder).iterdir()) if path.is_file()}
        return {"device_id": self.device_id, "model": model, "channel": "stable", "version": version, "rollout": False,
                "manifest": None, "files": files}

    def serve_bundle(self, folder: Path, model: str, version: int) -> dict[str, Any]:
        body = self.bundle_assignment(folder, model, version)
        self.assign(body)
        return body

    # --- misbehaviour ---------------------------------------------------------------------------

    def on(self, method: str, contains: str, behaviour: Behaviour, times: int | None = None) -> None:
        with self._lock:
            self._rules.append(Rule(method, contains, behaviour, times))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def count(self, method: str, contains: str) -> int:
        with self._lock:
            return sum(1 for seen in self.requests if seen.method == method and contains in seen.path)

    def close(self) -> None:
        self._server.shutdown()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._changed:
            self._generation += 1
            self._changed.notify_all()
        self._server.server_close()

    def __enter__(self) -> "MisbehavingServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.method == method and rule.contains in path and (rule.times is None or rule.used < rule.times):
                    rule.used += 1
                    return rule
        return None


# --- behaviours -----------------------------------------------------------------------------------------


def reply(status: int, body: bytes | str | Any = b"", headers: dict[str, str] | None = None) -> Behaviour:
    """A fixed answer; a dict or list body is sent as JSON."""
    if isinstance(body, str):
        data = body.encode()
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()

    def behave(handler: "_Handler", _normal: Answer) -> None:
        handler.answer(status, {"Content-Type": "application/json", **(headers or {})}, data)

    return behave


def drip(every_s: float = 1.0, step: int = 1) -> Behaviour:
    """The normal answer's headers at once, then its body `step` bytes every `every_s` seconds."""

    def behave(handler: "_Handler", normal: Answer) -> None:
        status, headers, body = normal
        handler.start(status, headers, len(body))
        for i in range(0, len(body), step):
            handler.wfile.write(body[i:i + step])
            handler.wfile.flush()
            time.sleep(every_s)

    return behave


def hold(after: int, release: threading.Event, *, then_rest: bool = False) -> Behaviour:
    """The normal answer's first `after` body bytes, then wait for `release` (60 s at most) and cut (or,
    with `then_rest`, send the rest)."""

    def behave(handler: "_Handler", normal: Answer) -> None:
        status, headers, body = normal
        handler.start(status, headers, len(body))
        handler.wfile.write(body[:after])
        handler.wfile.flush()
        release.wait(60)
        if then_rest:
            handler.wfile.write(body[after:])
            handler.wfile.flush()
        else:
            handler.cut()

    return behave


def garbage_stream(n: int, chunk: int = 4096) -> Behaviour:
    """An event stream's headers, then `n` random bytes."""

    def behave(handler: "_Handler", _normal: Answer) -> None:
        handler.start(200, {"Content-Type": "text/event-stream"}, None)
        for _ in range(0, n, chunk):
            handler.wfile.write(os.urandom(chunk))
        handler.wfile.flush()
        handler.cut()

    return behave


def long_line(n: int) -> Behaviour:
    """An event stream's headers, then one `data:` line of `n` bytes with no end (from one small buffer)."""
    block = b"x" * (64 * 1024)

    def behave(handler: "_Handler", _normal: Answer) -> None:
        handler.start(200, {"Content-Type": "text/event-stream"}, None)
        handler.wfile.write(b"event: assignment\ndata: ")
        for _ in range(0, n, len(block)):
            handler.wfile.write(block)
        handler.cut()

    return behave


def cut() -> Behaviour:
    """Close the connection without an answer."""

    def behave(handler: "_Handler", _normal: Answer) -> None:
        handler.cut()

    return behave


# --- the handler ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    stand_in: MisbehavingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.stand_in._lock:
            self.stand_in._sockets.add(self.connection)

    def finish(self) -> None:
        with self.stand_in._lock:
            self.stand_in._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    # --- helpers the behaviours use -------------------------------------------------------------

    def start(self, status: int, headers: dict[str, str], length: int | None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.start(status, headers, len(body))
        self.wfile.write(body)
        self.wfile.flush()

    def cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- the protocol ---------------------------------------------------------------------------

    def _handle(self) -> None:
        stand_in = self.stand_in
        path = self.path.split("?")[0]
        with stand_in._lock:
            stand_in.requests.append(Seen(self.command, path, dict(self.headers.items()), time.monotonic()))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)) if length else b""
        rule = stand_in._rule_for(self.command, path)
        device = f"/v1/devices/{stand_in.device_id}"
        if rule is None and path == device + "/events":
            self._events()
            return
        normal = self._normal(path, device, body)
        if rule is not None:
            rule.behaviour(self, normal)
        else:
            self.answer(*normal)

    def _normal(self, path: str, device: str, body: bytes) -> Answer:
        stand_in = self.stand_in
        json_type = {"Content-Type": "application/json"}
        if self.command == "GET" and path == device + "/assignment":
            etag = stand_in.etag
            if self.headers.get("If-None-Match") == etag:
                return 304, {"ETag": etag}, b""
            return 200, {**json_type, "ETag": etag}, _encode(stand_in.assignment)
        if self.command == "GET" and path == device + "/events":
            return 200, {"Content-Type": "text/event-stream"}, self._event_bytes(stand_in.assignment, stand_in.etag)
        if self.command == "GET" and path.startswith("/v1/artifacts/"):
            return self._artifact(path.rsplit("/", 1)[-1])
        if self.command == "POST" and path.startswith(device + "/"):
            try:
                stand_in.reports.append((path, json.loads(body)))
            except ValueError:
                return 422, json_type, b'{"error": {"code": "bad_request", "message": "not JSON"}}'
            return 200, json_type, b'{"ok": true}'
        return 404, json_type, json.dumps({"error": {"code": "not_found", "message": f"no {path} here"}}).encode()

    def _artifact(self, sha: str) -> Answer:
        data = self.stand_in.artifacts.get(sha)
        if data is None:
            return 404, {"Content-Type": "application/json"}, b'{"error": {"code": "not_found", "message": "no such artifact"}}'
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-") and self.headers.get("If-Range", f'"{sha}"') == f'"{sha}"':
            start = int(wanted[6:-1])
            if start >= len(data):
                return 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b""
            return 206, {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:]
        return 200, headers, data

    def _event_bytes(self, assignment: Any, etag: str) -> bytes:
        data = _encode(assignment).decode("utf-8", "replace").replace("\n", "\ndata: ")
        return f"event: assignment\nid: {etag}\ndata: {data}\n\n".encode()

    def _events(self) -> None:
        stand_in = self.stand_in
        self.start(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}, None)
        sent = self.headers.get("Last-Event-ID")
        try:
            while True:
                with stand_in._changed:
                    if stand_in.etag == sent:
                        stand_in._changed.wait(stand_in.keepalive_s)
                    assignment, etag = stand_in.assignment, stand_in.etag
                if not stand_in._thread.is_alive() or stand_in._server.socket.fileno() < 0:
                    return
                if etag != sent:
                    self.wfile.write(self._event_bytes(assignment, etag))
                    sent = etag
                else:
                    self.wfile.write(b": keepalive\n\n")
                self.wfile.flush()
        except OSError:
            return


def _encode(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()
