"""Header and body deadlines and a connection limit for uvicorn, which has neither.

uvicorn's only read timeout, `timeout_keep_alive`, covers the idle time between requests and is reset
by every byte received (uvicorn issue #157 lists `--timeout-request-start` as not done), so a client
sending a header a byte every 2 s holds its connection for good, and a thousand of them take every
file descriptor. `guarded_protocol(options)` returns uvicorn's h11 protocol with three additions:

- **header deadline**: a request's headers must be complete `header_timeout_s` after the connection
  opened, or after the previous response on a kept-alive connection. A client that sent part of a
  request gets 408 and the connection closes; an idle one just closes.
- **body deadline**: a body gets `body_timeout_s`, plus one second per `body_min_bytes_per_s` bytes it
  delivered (the rule of Apache's mod_reqtimeout), so a large upload at a fair rate has all the time it
  needs and a trickle does not. Time while the app is not reading (uvicorn paused the socket) is not
  counted against the client.
- **connection limit**: with `max_connections` open, a new connection closes the one that has waited
  longest for its request headers (a slow or idle client); when every connection is busy with a
  request, the new one gets 503. The default limit stays below the descriptor limit, so accept()
  does not run out of descriptors while slow clients are held.

Counters of what was closed and why are `sync_server_connections_closed_total{reason}` in `/metrics`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import resource
import socket
import time
from typing import Any, Iterable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ConnectionOptions, ServerConfig

log = logging.getLogger("sync_server.connections")

#: Descriptors kept free of client connections: database, files, TF Serving, and the connections
#: accepted in the last loop iterations whose eviction has not yet closed them.
_RESERVED_FRACTION = 4  # a quarter
_RESERVED_MIN = 96
_SUMMARY_EVERY_S = 10.0
#: asyncio accepts up to `backlog` connections per loop iteration, before any of them is looked at; a
#: small number keeps a flood from taking more descriptors than the reserve in one go ...
ACCEPTS_PER_ITERATION = 16
#: ... while the kernel's queue of connections waiting to be accepted stays long.
LISTEN_BACKLOG = 4096


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def default_max_connections(nofile: int) -> int:
    """Connections that leave a quarter of `nofile` (at least 96) for everything else."""
    return max(8, nofile - max(_RESERVED_MIN, nofile // _RESERVED_FRACTION))


def serve(app: Any, config: ServerConfig) -> None:
    """Run `app` under uvicorn with the guarded protocol until interrupted (`sync-server serve`)."""
    nofile = raise_descriptor_limit()
    safe = default_max_connections(nofile)
    limit = config.connections.max_connections or safe
    if limit > safe:
        log.warning(
            "--max-connections is above what the descriptor limit allows; accept() may fail with EMFILE",
            extra={"max_connections": limit, "descriptor_limit": nofile, "suggested": safe},
        )
    protocol, guard = guarded_protocol(config.connections, limit)
    app.state.services.metrics.add_state(guard.collect)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False, log_level=config.log_level.lower(),
        http=protocol, timeout_keep_alive=config.connections.keep_alive_s, backlog=ACCEPTS_PER_ITERATION,
    ))
    server.run()


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for listening in server.sockets:
                with socket.socket(fileno=os.dup(listening.fileno())) as same:
                    same.listen(LISTEN_BACKLOG)  # the kernel's queue; asyncio keeps its small accept batch


class ConnectionGuard:
    """The state the guarded connections of one server share: who is open, who waits, what was closed."""

    def __init__(self, options: ConnectionOptions, max_connections: int) -> None:
        self.options = options
        self.max_connections = max_connections
        self.open: dict[Any, None] = {}  # guarded protocols not being closed, in opening order
        self.waiting: dict[Any, float] = {}  # those waiting for request headers, longest waiting first
        self.closed: collections.Counter[str] = collections.Counter()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._logged_at = 0.0

    def count_closed(self, reason: str) -> None:
        """Count a closed connection; a summary line at most every 10 s, never one line per connection."""
        self.closed[reason] += 1
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= _SUMMARY_EVERY_S:
            log.warning(
                "closed slow or surplus connections",
                extra={"closed": dict(self._unlogged), "open": len(self.open), "max_connections": self.max_connections},
            )
            self._unlogged.clear()
            self._logged_at = now

    def collect(self) -> Iterable[Any]:
        """Metric families for `/metrics`."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        opened = GaugeMetricFamily("sync_server_connections_open", "HTTP connections open now")
        opened.add_metric([], len(self.open))
        limit = GaugeMetricFamily("sync_server_connections_max", "Most HTTP connections held at once")
        limit.add_metric([], self.max_connections)
        closed = CounterMetricFamily(
            "sync_server_connections_closed", "Connections the server closed: header_timeout, body_timeout, evicted, refused",
            labels=["reason"],
        )
        for reason in ("header_timeout", "body_timeout", "evicted", "refused"):
            closed.add_metric([reason], self.closed[reason])
        return [opened, limit, closed]


def guarded_protocol(options: ConnectionOptions, max_connections: int | None = None) -> tuple[type[H11Protocol], ConnectionGuard]:
    """uvicorn's h11 protocol class with deadlines and the limit, and the guard its connections share.

    Pass the class as `uvicorn.run(app, http=cls)`. `max_connections` defaults to
    `options.max_connections`, else to what the current descriptor limit allows.
    """
    limit = max_connections or options.max_connections or default_max_connections(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    guard = ConnectionGuard(options, limit)
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"guard": guard}), guard


class _GuardedH11Protocol(H11Protocol):
    guard: ConnectionGuard

    _phase: str | None = None
    _timer: asyncio.TimerHandle | None = None
    _phase_started = 0.0
    _phase_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        guard.open[self] = None
        if len(guard.open) > guard.max_connections:
            victim = next(iter(guard.waiting), None)
            if victim is not None:
                victim._close("evicted")
            else:
                self._close("refused", 503, "the server is at its connection limit; try again shortly")
                return
        self._update_phase()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._phase_bytes += len(data)
        super().data_received(data)
        self._update_phase()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_phase()

    # --- phases -----------------------------------------------------------------------------------

    def _current_phase(self) -> str | None:
        if self.transport is None or self.transport.is_closing():
            return None
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            return "body"
        if their is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            return "headers"
        return None  # the app has the whole request: no read deadline

    def _update_phase(self) -> None:
        phase = self._current_phase()
        if phase == self._phase:
            return
        self._phase = phase
        self._cancel_timer()
        now = self.loop.time()
        self._phase_started = now
        self._phase_bytes = 0
        self.guard.waiting.pop(self, None)
        if phase == "headers":
            self.guard.waiting[self] = now
            self._timer = self.loop.call_at(now + self.guard.options.header_timeout_s, self._header_deadline)
        elif phase == "body":
            self._timer = self.loop.call_at(now + self.guard.options.body_timeout_s, self._body_deadline)

    def _header_deadline(self) -> None:
        self._timer = None
        if self._current_phase() != "headers":
            self._update_phase()
            return
        if self._phase_bytes:
            seconds = self.guard.options.header_timeout_s
            self._close("header_timeout", 408, f"the request headers did not arrive within {seconds:g} s")
        else:  # an idle connection: close it quietly, as the keep-alive timeout does
            self._close("header_timeout")

    def _body_deadline(self) -> None:
        self._timer = None
        if self._current_phase() != "body":
            self._update_phase()
            return
        options = self.guard.options
        now = self.loop.time()
        if self.flow.read_paused:  # the app is not reading: the client is not the slow one
            self._phase_started, self._phase_bytes = now, 0
            self._timer = self.loop.call_at(now + options.body_timeout_s, self._body_deadline)
            return
        deadline = self._phase_started + options.body_timeout_s + self._phase_bytes / options.body_min_bytes_per_s
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._body_deadline)
            return
        started = self.cycle is not None and self.cycle.response_started
        message = (
            f"the request body did not arrive in time ({options.body_timeout_s:g} s, plus 1 s per "
            f"{options.body_min_bytes_per_s} bytes received)"
        )
        self._close("body_timeout", None if started else 408, message)

    # --- closing ----------------------------------------------------------------------------------

    def _close(self, reason: str, status: int | None = None, message: str = "") -> None:
        self._forget()
        self.guard.count_closed(reason)
        if self.transport.is_closing():
            return
        if status is None:
            self.transport.abort()  # nothing to say: free the descriptor now
            return
        body = json.dumps({"error": {"code": reason if status == 408 else "too_many_connections", "message": message}}).encode()
        phrase = b"Request Timeout" if status == 408 else b"Service Unavailable"
        head = [b"HTTP/1.1 %d %s" % (status, phrase), b"content-type: application/json", b"connection: close",
                b"content-length: %d" % len(body)]
        if status == 503:
            head.append(b"retry-after: 1")
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()

    def _forget(self) -> None:
        self._cancel_timer()
        self._phase = None
        self.guard.open.pop(self, None)
        self.guard.waiting.pop(self, None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
