"""Follow the source of aspired versions (the sync server): its push stream, else polling with ETag.

The push stream (`GET /v1/devices/{id}/events`, Server-Sent Events) delivers an `assignment` event
at once on connect and whenever the assignment changes; its id is the assignment's ETag, sent back
as `Last-Event-ID` on reconnect. When the stream cannot be opened or goes silent longer than the
stream timeout, the source polls `GET .../assignment` with `If-None-Match` every poll interval and
reconnects after a backoff (exponential, capped, with jitter). A `revoked` event or a revoked token
stops it; the device keeps serving the model it has.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from typing import Any, Callable

from .assignment import Assignment
from .client import Stream, SyncClient, describe
from .errors import ServerRejectedError, ServerUnreachableError
from .options import AgentOptions
from .retry import backoff_delay
from .sse import parse_events

log = logging.getLogger("edge_agent.source")

#: A stream that stayed up this long was healthy: the next reconnect starts the backoff afresh.
_HEALTHY_STREAM_S = 5.0


class AssignmentSource:
    """Calls `on_assignment(Assignment)` for every assignment the server announces."""

    def __init__(
        self,
        client: SyncClient,
        device_id: str,
        options: AgentOptions,
        on_assignment: Callable[[Assignment], None],
        *,
        on_reachable: Callable[[], None] = lambda: None,
        on_revoked: Callable[[str], None] = lambda _message: None,
    ) -> None:
        self.client = client
        self.options = options
        self.on_assignment = on_assignment
        self.on_reachable = on_reachable
        self.on_revoked = on_revoked
        self.base = f"/v1/devices/{device_id}"
        self.etag: str | None = None
        self.connected = False
        self.revoked: str | None = None
        self.counts = {"streams": 0, "events": 0, "polls": 0, "not_modified": 0}
        self.last_error: str | None = None
        self._stream: Stream | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cut()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        return {
            "mode": "push" if self.options.push else "poll",
            "connected": self.connected,
            "etag": self.etag,
            "revoked": self.revoked,
            "last_error": self.last_error,
            **self.counts,
        }

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and self.revoked is None:
            if self.options.push:
                opened = time.monotonic()
                try:
                    self._listen()
                    self.last_error = "the push stream ended"
                except ServerRejectedError as exc:
                    self._rejected(exc)
                except ServerUnreachableError as exc:
                    self.last_error = str(exc)
                finally:
                    self.connected = False
                    self._stream = None
                if self._stop.is_set() or self.revoked is not None:
                    return
                failures = 0 if time.monotonic() - opened >= _HEALTHY_STREAM_S else failures + 1
                delay = backoff_delay(max(0, failures - 1), self.options.retry) if failures else 0.5
                # one line when the stream goes down, then quiet (a week offline must not fill the disk)
                log.log(logging.INFO if failures <= 1 else logging.DEBUG,
                        "push stream down (%s); polling every %g s, reconnecting with backoff (next in %.1f s)",
                        self.last_error, self.options.poll_interval_s, delay)
            else:
                delay = self.options.poll_interval_s
            self._poll_until(time.monotonic() + delay)

    def _poll_until(self, deadline: float) -> None:
        """Poll now, then every poll interval, until `deadline` (the next reconnect)."""
        while not self._stop.is_set() and self.revoked is None:
            self._poll()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._stop.wait(min(self.options.poll_interval_s, remaining)):
                return

    # --- the two ways -----------------------------------------------------------------------------

    def _listen(self) -> None:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.etag:
            headers["Last-Event-ID"] = self.etag
        stream = self.client.open("GET", self.base + "/events", headers=headers, timeout_s=self.options.timeouts.stream_s, ok=(200,))
        self._stream = stream
        with stream:
            if not (stream.header("content-type") or "").startswith("text/event-stream"):
                raise ServerUnreachableError(f"the push stream answered {stream.header('content-type')!r}, not text/event-stream")
            self.connected = True
            self.counts["streams"] += 1
            if self.counts["streams"] > 1:
                log.info("push stream connected again")
            self.on_reachable()
            try:
                for event in parse_events(iter(stream.response.readline, b"")):
                    if self._stop.is_set():
                        return
                    if event is None:
                        continue
                    if event.event == "assignment":
                        self.counts["events"] += 1
                        self._deliver(event.data, event.id)
                    elif event.event == "revoked":
                        self._revoke("the server revoked this device")
                        return
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:  # AttributeError: http.client, cut mid-read
                if self._stop.is_set():
                    return
                raise ServerUnreachableError(f"the push stream broke off ({describe(exc)})") from exc

    def _poll(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else {}
        self.counts["polls"] += 1
        try:
            reply = self.client.request("GET", self.base + "/assignment", headers=headers, ok=(200, 304))
        except ServerRejectedError as exc:
            self._rejected(exc)
            return
        except ServerUnreachableError as exc:
            self.last_error = str(exc)
            return
        self.on_reachable()
        if reply.status == 304:
            self.counts["not_modified"] += 1
            return
        self._deliver(reply.body, reply.headers.get("etag"))

    # --- helpers --------------------------------------------------------------------------------

    def _deliver(self, raw: str | bytes, etag: str | None) -> None:
        try:
            assignment = Assignment.from_json(json.loads(raw), etag)
        except ValueError as exc:
            self.last_error = f"ignored a malformed assignment: {exc}"
            log.warning(self.last_error)
            return
        self.etag = etag
        self.last_error = None
        self.on_assignment(assignment)

    def _rejected(self, exc: ServerRejectedError) -> None:
        self.last_error = str(exc)
        if exc.code == "revoked_token":
            self._revoke(str(exc))

    def _revoke(self, message: str) -> None:
        self.revoked = message
        log.error("%s: no more updates; enrol again with `edge-agent enroll --force` (still serving the current model)", message)
        self.on_revoked(message)
