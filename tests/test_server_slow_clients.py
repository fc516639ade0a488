"""Slow clients against a real `sync-server serve` process with few file descriptors.

An attacker without any token opens many connections and sends a request header a byte at a time
(slowloris), or sends a body a byte at a time. The server must close them at its header and body
deadlines, keep answering `/healthz` meanwhile, never run out of descriptors while it holds them, and
not flood its log when the descriptors do run out.
"""

from __future__ import annotations

import contextlib
import re
import resource
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from tests.server_fixtures import ADMIN_TOKEN, ENROLLMENT_SECRET, serve_process


#: Descriptors the server process may open (soft and hard: it cannot raise them).
NOFILE = 160
#: Slow connections the attacker holds open at once; more than the server has descriptors.
SLOW = 200
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@dataclass
class ServerProcess:
    url: str
    port: int
    log: Path
    process: subprocess.Popen

    def log_bytes(self) -> int:
        return self.log.stat().st_size

    def healthz_seconds(self, timeout: float = 10.0) -> float:
        """Seconds a fresh connection takes to get /healthz answered (the timeout when it is not)."""
        started = time.monotonic()
        try:
            response = httpx.get(self.url + "/healthz", timeout=timeout)
            assert response.status_code == 200, response.text
        except httpx.HTTPError:
            return timeout
        return time.monotonic() - started


@contextlib.contextmanager
def sync_server(tmp_path: Path, *flags: str) -> Iterator[ServerProcess]:
    """`python -m sync_server serve` on a free port, limited to NOFILE descriptors."""
    log_path = tmp_path / "server.log"
    args = ["--data-dir", str(tmp_path / "data"), "--admin-token", ADMIN_TOKEN, "--enrollment-secret", ENROLLMENT_SECRET,
            "--log-level", "warning", *flags]
    with serve_process(args, log_path, env={"SYNC_SERVER_EMBEDDED_PRELOAD": "off"}, ready_path="/healthz",
                       ready_timeout_s=60, preexec_fn=_limit_descriptors) as (url, process):
        yield ServerProcess(url, int(url.rsplit(":", 1)[1]), log_path, process)


@dataclass
class SlowConnection:
    sock: socket.socket
    opened_at: float
    closed_at: float | None = None
    answer: bytes = b""


@dataclass
class SlowClients:
    """Connections that send `head` at once, then `trickle` a byte every `interval_s`, and never finish."""

    port: int
    head: bytes
    trickle: bytes = b"X-Slow: " + b"a" * 4000
    interval_s: float = 0.5
    connections: list[SlowConnection] = field(default_factory=list)
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def open(self, count: int) -> None:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(self.head)
            except OSError:
                self.refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            self.connections.append(SlowConnection(sock, time.monotonic()))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        sent = 0
        next_byte = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            alive = [c for c in self.connections if c.closed_at is None]
            readable = select.select([c.sock for c in alive], [], [], 0.05)[0] if alive else []
            for conn in alive:
                if conn.sock in readable:
                    self._read(conn)
            if time.monotonic() >= next_byte:
                byte = self.trickle[sent % len(self.trickle): sent % len(self.trickle) + 1]
                for conn in alive:
                    if conn.closed_at is None:
                        try:
                            conn.sock.send(byte)
                        except OSError:
                            conn.closed_at = time.monotonic()
                sent += 1
                next_byte += self.interval_s
            if not alive:
                time.sleep(0.05)

    def _read(self, conn: SlowConnection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.answer += data
        else:
            conn.closed_at = time.monotonic()

    def still_open(self) -> int:
        return sum(1 for c in self.connections if c.closed_at is None)

    def held_seconds(self) -> list[float]:
        now = time.monotonic()
        return [(c.closed_at or now) - c.opened_at for c in self.connections]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self.connections:
            conn.sock.close()


@contextlib.contextmanager
def slow_clients(port: int, count: int, head: bytes) -> Iterator[SlowClients]:
    clients = SlowClients(port, head)
    try:
        clients.open(count)
        yield clients
    finally:
        clients.close()


SLOW_HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def test_slow_headers_are_closed_at_the_deadline_and_healthz_answers_meanwhile(tmp_path):
    with sync_server(tmp_path, "--header-timeout", str(HEADER_TIMEOUT_S)) as server:
        with slow_clients(server.port, SLOW, SLOW_HEADER) as attacker:
            latencies = []
            for _ in range(4):
                latencies.append(server.healthz_seconds(timeout=5))
                time.sleep(0.3)
            time.sleep(HEADER_TIMEOUT_S + 1.5)
            held = attacker.held_seconds()
            left = attacker.still_open()
            after = server.healthz_seconds(timeout=5)
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        log_bytes = server.log_bytes()
        log_text = server.log.read_text(errors="replace")

    assert max(latencies) < 2.0, f"/healthz took {max(latencies):.2f} s while {SLOW} slow clients were connected"
    assert left == 0, f"{left} of {SLOW} slow connections are still open after the {HEADER_TIMEOUT_S:g} s header deadline"
    assert max(held) < HEADER_TIMEOUT_S + 1.0, f"a slow connection was held {max(held):.2f} s"
    assert after < 2.0
    assert log_bytes < 20_000, f"the server logged {log_bytes} bytes: {log_text[-1500:]}"
    assert "Too many open files" not in log_text
    closed = {reason: float(n) for reason, n in re.findall(r'sync_server_connections_closed_total\{reason="(\w+)"\} ([\d.]+)', metrics)}
    assert closed["header_timeout"] + closed["evicted"] >= SLOW, closed
    assert re.search(r"sync_server_connections_max \d+", metrics), "the limit is in /metrics"


def test_a_slow_connection_that_sent_part_of_a_header_gets_408(tmp_path):
    with sync_server(tmp_path, "--header-timeout", str(HEADER_TIMEOUT_S)) as server:
        with slow_clients(server.port, 1, SLOW_HEADER) as attacker:
            time.sleep(HEADER_TIMEOUT_S + 1.0)
            (conn,) = attacker.connections
            assert conn.closed_at is not None, "the slow connection is still open"
            assert conn.answer.startswith(b"HTTP/1.1 408 "), conn.answer[:200]
            assert b'"code":"header_timeout"' in conn.answer.replace(b" ", b"")


def test_a_body_sent_a_byte_at_a_time_is_closed_at_the_body_deadline(tmp_path):
    head = (
        b"POST /v1/devices/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ENROLLMENT_SECRET.encode() + b"\r\nContent-Length: 5000\r\n\r\n{"
    )
    with sync_server(tmp_path, "--body-timeout", str(BODY_TIMEOUT_S)) as server:
        with slow_clients(server.port, 20, head) as attacker:
            healthz = server.healthz_seconds(timeout=5)
            time.sleep(BODY_TIMEOUT_S + 1.5)
            held = attacker.held_seconds()
            answers = [c.answer for c in attacker.connections]
    assert healthz < 2.0
    assert max(held) < BODY_TIMEOUT_S + 1.0, f"a slow body was read for {max(held):.2f} s"
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0][:200]


def test_descriptor_exhaustion_degrades_without_a_log_storm(tmp_path):
    """An operator sets --max-connections above the descriptor limit: accept() fails with EMFILE.

    The server keeps running, logs the condition a few times (not once per failed accept), and
    answers again once the slow connections are closed at their deadline.
    """
    with sync_server(tmp_path, "--header-timeout", str(HEADER_TIMEOUT_S), "--max-connections", "1000") as server:
        with slow_clients(server.port, SLOW, SLOW_HEADER) as attacker:
            time.sleep(2 * HEADER_TIMEOUT_S + 1.5)  # the backlog is accepted and closed in two rounds
            after = server.healthz_seconds(timeout=5)
        log_text = server.log.read_text(errors="replace")
        log_bytes = server.log_bytes()
    assert after < 3.0, "the server did not recover after the slow connections were closed"
    assert "Too many open files" in log_text or "out of system resource" in log_text, "the test did not exhaust descriptors"
    assert log_bytes < 20_000, f"the server logged {log_bytes} bytes when descriptors ran out"


def test_at_the_connection_limit_with_every_connection_busy_a_new_one_gets_503(tmp_path):
    """Connections sending a body are busy, not idle: none is evicted, so a new one is refused."""
    head = (
        b"POST /v1/devices/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n{"
    )
    with sync_server(tmp_path, "--max-connections", "4", "--body-timeout", "30") as server:
        with slow_clients(server.port, 4, head) as busy:
            time.sleep(0.3)
            refused = httpx.get(server.url + "/healthz", timeout=5)
            assert busy.still_open() == 4
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        time.sleep(0.3)
        assert server.healthz_seconds(timeout=5) < 2.0, "room again once they are gone"
