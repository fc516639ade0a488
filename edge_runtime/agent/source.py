"""Follow the source of aspired versions (the sync server): its push stream, else polling with ETag.

The push stream (`GET /v1/devices/{id}/events`, Server-Sent Events) delivers an `assignment` event
at once on connect and whenever the assignment changes; its id is the assignment's ETag, sent back
as `Last-Event-ID` on reconnect. When the stream cannot be opened, goes silent longer than the
stream timeout (no keepalive, no complete event: bytes dripping do not count) or sends garbage, the
source polls `GET .../assignment` with `If-None-Match` every poll interval and reconnects after a
backoff (exponential, capped, with jitter; garbage always counts as a failure). A 429/503 with
Retry-After is waited out, up to the longest backoff. A `revoked` event or a revoked token stops it;
the device keeps serving the model it has.

Every assignment is checked (`parse_assignment`) before the manager sees it; a malformed one is
refused with its reason, reported once (`on_refused`), and its ETag kept so that the server is not
asked for it again until it changes. No failure stops the loop; `following()` says `ok` or
`stalled since T: why`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import threading
import time
from typing import Any, Callable

from .assignment import Assignment, InvalidAssignmentError, parse_assignment
from .client import Stream, SyncClient, describe
from .errors import ServerRejectedError, ServerUnreachableError
from .options import AgentOptions
from .retry import backoff_delay
from .sse import StreamGarbageError, parse_events, read_lines

log = logging.getLogger("edge_agent.source")

#: A stream that stayed up this long was healthy: the next reconnect starts the backoff afresh.
_HEALTHY_STREAM_S = 5.0


class _Garbage(ServerUnreachableError):
    """The push stream was not an event stream: reconnect with backoff however long it stayed up."""


class AssignmentSource:
    """Calls `on_assignment(Assignment)` for every valid assignment the server announces, and
    `on_refused(version or None, reason)` once for each malformed one."""

    def __init__(
        self,
        client: SyncClient,
        device_id: str,
        options: AgentOptions,
        on_assignment: Callable[[Assignment], None],
        *,
        on_reachable: Callable[[], None] = lambda: None,
        on_revoked: Callable[[str], None] = lambda _message: None,
        on_refused: Callable[[int | None, str], None] = lambda _version, _reason: None,
    ) -> None:
        self.client = client
        self.options = options
        self.on_assignment = on_assignment
        self.on_reachable = on_reachable
        self.on_revoked = on_revoked
        self.on_refused = on_refused
        self.base = f"/v1/devices/{device_id}"
        self.etag: str | None = None
        self.connected = False
        self.revoked: str | None = None
        self.counts = {"streams": 0, "events": 0, "polls": 0, "not_modified": 0, "refused": 0, "loop_errors": 0}
        self.last_error: str | None = None
        self._stream: Stream | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_before = 0.0  # monotonic: no request before (the server's Retry-After)
        self._failing: tuple[float, str] | None = None  # (since, why): the server cannot be asked
        self._refusal: tuple[float, str, str] | None = None  # (since, why, key): the last assignment was malformed

    def start(self) -> None:
        """Start following (again, after the supervisor found the loop dead)."""
        if self.alive():
            return
        self._thread = threading.Thread(target=self._run, name="edge-agent-source", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cut()
        if self._thread is not None:
            self._thread.join(timeout)

    def following(self) -> str:
        """`ok`, or `stalled since <UTC time>: <why>`."""
        stall = self._refusal or self._failing
        if self.revoked is not None:
            return f"stopped: {self.revoked}"
        if stall is None:
            return "ok"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stall[0]))
        return f"stalled since {since}: {stall[1]}"

    def status(self) -> dict[str, Any]:
        return {
            "mode": "push" if self.options.push else "poll",
            "connected": self.connected,
            "etag": self.etag,
            "revoked": self.revoked,
            "last_error": self.last_error,
            "following": self.following(),
            **self.counts,
        }

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set() and self.revoked is None:
            try:
                failures = self._round(failures)
            except Exception as exc:  # no bug in one round may stop following  # noqa: BLE001
                self.counts["loop_errors"] += 1
                failures += 1
                self._stalled(f"the follower failed ({exc.__class__.__name__}: {exc})")
                log.log(logging.ERROR if self.counts["loop_errors"] <= 1 else logging.DEBUG,
                        "following the server failed; trying again", exc_info=True)
                self._stop.wait(backoff_delay(failures, self.options.retry))

    def _round(self, failures: int) -> int:
        """One stream (then polls until the reconnect), or one poll interval; returns the failure count."""
        self._wait_not_before()
        if not self.options.push:
            self._poll_until(time.monotonic() + self.options.poll_interval_s, first=True)
            return 0
        opened = time.monotonic()
        garbage = False
        try:
            self._listen()
            self.last_error = "the push stream ended"
        except ServerRejectedError as exc:
            self._rejected(exc)
        except ServerUnreachableError as exc:
            garbage = isinstance(exc, _Garbage)
            self.last_error = str(exc)
        finally:
            self.connected = False
            self._stream = None
        if self._stop.is_set() or self.revoked is not None:
            return failures
        healthy = time.monotonic() - opened >= _HEALTHY_STREAM_S and not garbage
        failures = 0 if healthy else failures + 1
        delay = backoff_delay(max(0, failures - 1), self.options.retry) if failures else 0.5
        # one line when the stream goes down, then quiet (a week offline must not fill the disk)
        log.log(logging.INFO if failures <= 1 else logging.DEBUG,
                "push stream down (%s); polling every %g s, reconnecting with backoff (next in %.1f s)",
                self.last_error, self.options.poll_interval_s, delay)
        self._poll_until(time.monotonic() + delay, first=True)
        return failures

    def _wait_not_before(self) -> None:
        wait = self._not_before - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)

    def _poll_until(self, deadline: float, *, first: bool = False) -> None:
        """Poll now, then every poll interval (or later, as Retry-After says), until `deadline`."""
        while not self._stop.is_set() and self.revoked is None:
            self._wait_not_before()
            if self._stop.is_set():
                return
            self._poll()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            wait = max(self.options.poll_interval_s, self._not_before - time.monotonic())
            if self._stop.wait(min(wait, remaining)):
                return

    # --- the two ways -----------------------------------------------------------------------------

    def _listen(self) -> None:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.etag:
            headers["Last-Event-ID"] = self.etag
        stream = self.client.open("GET", self.base + "/events", headers=headers, timeout_s=self.options.timeouts.stream_s, ok=(200,))
        self._stream = stream
        silence = self.options.timeouts.stream_s
        quiet = f"the push stream sent no complete event or keepalive for {silence:g} s"
        with stream:
            if not (stream.header("content-type") or "").startswith("text/event-stream"):
                raise ServerUnreachableError(f"the push stream answered {stream.header('content-type')!r}, not text/event-stream")
            self.connected = True
            self.counts["streams"] += 1
            if self.counts["streams"] > 1:
                log.info("push stream connected again")
            self.on_reachable()
            stream.expire_at(time.monotonic() + silence, quiet)
            try:
                for event in parse_events(read_lines(stream.response.readline)):
                    if self._stop.is_set():
                        return
                    stream.expire_at(time.monotonic() + silence, quiet)  # a sign of life: a whole line or event
                    if event is None:
                        continue
                    if event.event == "assignment":
                        self.counts["events"] += 1
                        self._deliver(event.data, event.id)
                    elif event.event == "revoked":
                        self._revoke("the server revoked this device")
                        return
            except StreamGarbageError as exc:
                raise _Garbage(f"the push stream sent garbage ({exc}); polling instead") from exc
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:  # AttributeError: http.client, cut mid-read
                if self._stop.is_set():
                    return
                raise ServerUnreachableError(f"the push stream broke off ({stream.expired or describe(exc)})") from exc
            if stream.expired and not self._stop.is_set():
                raise ServerUnreachableError(f"the push stream broke off ({stream.expired})")

    def _poll(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else {}
        self.counts["polls"] += 1
        try:
            reply = self.client.request("GET", self.base + "/assignment", headers=headers, ok=(200, 304))
        except ServerRejectedError as exc:
            self._rejected(exc)
            self._stalled(str(exc))
            return
        except ServerUnreachableError as exc:
            self.last_error = str(exc)
            self._stalled(str(exc))
            return
        self.on_reachable()
        if reply.status == 304:
            self.counts["not_modified"] += 1
            self._failing = None
            return
        self._deliver(reply.body, reply.headers.get("etag"))

    # --- helpers --------------------------------------------------------------------------------

    def _deliver(self, raw: str | bytes, etag: str | None) -> None:
        self._failing = None
        try:
            assignment = parse_assignment(raw, etag)
        except InvalidAssignmentError as exc:
            self._refuse(exc, raw, etag)
            return
        self.etag = etag
        self.last_error = None
        self._refusal = None
        self.on_assignment(assignment)

    def _refuse(self, exc: InvalidAssignmentError, raw: str | bytes, etag: str | None) -> None:
        data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
        key = etag or hashlib.sha256(data).hexdigest()
        reason = f"refused the server's assignment: {exc}"
        self.last_error = reason
        if etag is not None and len(etag) <= 200:
            self.etag = etag  # not asked for again (304) until the server changes it
        if self._refusal is not None and self._refusal[2] == key:
            return
        self._refusal = (time.time(), reason, key)
        self.counts["refused"] += 1
        log.warning("%s (still serving the current model)", reason)
        self.on_refused(exc.version, str(exc))

    def _stalled(self, why: str) -> None:
        if self._failing is None:
            self._failing = (time.time(), why)
        else:
            self._failing = (self._failing[0], why)

    def _rejected(self, exc: ServerRejectedError) -> None:
        self.last_error = str(exc)
        if exc.retry_after_s is not None:
            self._not_before = time.monotonic() + min(exc.retry_after_s, self.options.retry.max_s)
        if exc.code == "revoked_token":
            self._revoke(str(exc))

    def _revoke(self, message: str) -> None:
        self.revoked = message
        log.error("%s: no more updates; enrol again with `edge-agent enroll --force` (still serving the current model)", message)
        self.on_revoked(message)
