"""The agent's HTTP client of the sync server: the standard library only, a timeout on every call.

`SyncClient.request` makes one JSON call and returns a `Reply`; `SyncClient.open` starts a streamed
response (the push stream, a download) and hands back the connection so that another thread can cut
it. Failures are translated once, here: the network and timeouts become `ServerUnreachableError`,
HTTP errors become `ServerRejectedError` with the server's error code and its Retry-After.

Every exchange has an overall deadline besides the per-read timeout: a watchdog thread cuts the
connection when it passes, so an answer that drips a byte a second fails at the deadline, not never.
A JSON call (headers and body) must finish within `exchange_s`; a stream's headers too, after which
its reader sets its own deadlines (`Stream.expire_at`). Answers are bounded (`MAX_JSON_BYTES`).
"""

from __future__ import annotations

import email.utils
import http.client
import itertools
import json
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ServerRejectedError, ServerUnreachableError

#: The largest JSON answer read (an assignment with its manifest and smoke-test photos is ~100 KB).
MAX_JSON_BYTES = 4 * 1024 * 1024
#: The most of an error answer read (the server's `{"error": ...}` is a few hundred bytes).
MAX_ERROR_BYTES = 64 * 1024
#: The whole of one JSON exchange, unless the client is told otherwise.
DEFAULT_EXCHANGE_S = 30.0
USER_AGENT = "edge-agent/1"


class _Watchdog:
    """One daemon thread that runs a callback when its deadline passes (it cuts a connection)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, when: float, callback: Callable[[], None]) -> int:
        with self._cond:
            token = next(self._ids)
            self._items[token] = (when, callback)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="edge-agent-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int | None) -> None:
        if token is None:
            return
        with self._cond:
            self._items.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [token for token, (when, _) in self._items.items() if when <= now]
                callbacks = [self._items.pop(token)[1] for token in due]
                if not callbacks:
                    upcoming = min((when for when, _ in self._items.values()), default=now + 60.0)
                    self._cond.wait(max(0.005, upcoming - now))
                    continue
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # noqa: BLE001  (a failed cut must not stop the watchdog)
                    pass


_WATCHDOG = _Watchdog()


@dataclass(frozen=True)
class Reply:
    """A complete HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ServerRejectedError(f"the server's answer is not JSON ({exc})", status=self.status, code="bad_answer") from exc


class Stream:
    """A streamed answer: read it with `response.read1()` / `readline()`; `cut()` from any thread."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse | None = None) -> None:
        self.connection = connection
        self.response = response  # type: ignore[assignment]
        self.expired: str | None = None  # why the watchdog cut it
        self.sock: socket.socket | None = None  # kept: http.client lets go of it when the answer says "close"
        self._deadline: int | None = None

    def expire_at(self, when: float | None, why: str = "no complete answer in time") -> None:
        """Cut the connection at monotonic time `when` (None: no deadline); `expired` then says `why`."""
        _WATCHDOG.disarm(self._deadline)
        self._deadline = None
        if when is not None:
            self._deadline = _WATCHDOG.arm(when, lambda: self._expire(why))

    def _expire(self, why: str) -> None:
        self.expired = why
        self.cut()

    def read_body(self, limit: int, where: str) -> bytes:
        """The whole body, at most `limit` bytes (more is refused), within the deadline."""
        declared = self.response.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise ServerUnreachableError(f"{where}: the answer is {int(declared)} bytes, more than the {limit} read")
        try:
            data = self.response.read(limit + 1)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ServerUnreachableError(f"{where}: {self.expired or 'the answer broke off'} ({describe(exc)})") from exc
        if self.expired:
            raise ServerUnreachableError(f"{where}: {self.expired}")
        if len(data) > limit:
            raise ServerUnreachableError(f"{where}: the answer is more than the {limit} bytes read")
        if self.response.length:  # Content-Length said more than arrived
            raise ServerUnreachableError(f"{where}: the answer broke off after {len(data)} bytes")
        return data

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def cut(self) -> None:
        """Abort the transfer from another thread: the reader wakes up to a closed connection (and
        closes it itself; closing here would race with its read)."""
        sock = self.sock or self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.expire_at(None)
        try:
            if self.response is not None:
                self.response.close()
        finally:
            self.connection.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncClient:
    """Calls one sync server, with the device token when it has one."""

    def __init__(self, server: str, token: str | None = None, *, timeout_s: float = 10.0, exchange_s: float | None = None) -> None:
        parsed = urllib.parse.urlsplit(server.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"the server URL must look like http://HOST:PORT, got {server!r}")
        self.server = server.strip().rstrip("/")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = parsed.path.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.exchange_s = exchange_s or max(DEFAULT_EXCHANGE_S, timeout_s)

    # --- calls ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        deadline_s: float | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204, 304),
    ) -> Reply:
        """One call; a JSON `body` is encoded. The whole exchange must end within `deadline_s` (default
        `exchange_s`). Raises unless the status is in `ok`."""
        seconds = deadline_s or self.exchange_s
        stream = self.open(method, path, body=body, headers=headers, timeout_s=timeout_s, ok=ok,
                           deadline=time.monotonic() + seconds)
        with stream:
            data = stream.read_body(MAX_JSON_BYTES, self._where(path))
            return Reply(stream.status, {k.lower(): v for k, v in stream.response.getheaders()}, data)

    def open(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        ok: tuple[int, ...] = (200, 206),
        deadline: float | None = None,
    ) -> Stream:
        """Send a request and return the answer unread; raises unless the status is in `ok`.

        The headers must arrive within `exchange_s`. With `deadline` (monotonic), the stream stays armed
        until then (the caller reads the body); without, the caller sets its own (`Stream.expire_at`)."""
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        connection = self._connection(timeout_s or self.timeout_s)
        stream = Stream(connection)
        limit = deadline if deadline is not None else time.monotonic() + self.exchange_s
        stream.expire_at(limit, f"no complete answer within {_seconds(limit - time.monotonic())}")
        try:
            connection.connect()
            stream.sock = connection.sock
            connection.request(method, self._prefix + path, body=data, headers=all_headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            stream.close()
            if stream.expired:
                raise ServerUnreachableError(f"{self._where(path)}: {stream.expired}") from exc
            raise ServerUnreachableError(f"cannot reach the sync server at {self.server} ({describe(exc)})") from exc
        stream.response = response
        if response.status not in ok:
            with stream:
                try:
                    raw = response.read(MAX_ERROR_BYTES)
                except (OSError, http.client.HTTPException, ValueError):
                    raw = b""
            raise rejected(response.status, raw, self._where(path), retry_after=response.getheader("retry-after"))
        if deadline is None:
            stream.expire_at(None)
        return stream

    # --- internals ------------------------------------------------------------------------------

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s, context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _where(self, path: str) -> str:
        return f"{self.server}{path.split('?')[0]}"


def rejected(status: int, raw: bytes, where: str, retry_after: str | None = None) -> ServerRejectedError:
    """The server's `{"error": {"code", "message"}}` as an exception (or the status when it is not that).

    Anything else in the body is shown cut short and never trusted: codes and messages are bounded strings."""
    code, message = "http_error", f"HTTP {status}"
    try:
        error = json.loads(raw)["error"]
        if not isinstance(error.get("code"), str) or not isinstance(error.get("message"), str):
            raise TypeError("not strings")
        code, message = error["code"][:64], error["message"][:500]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        text = " ".join(raw[:200].decode("utf-8", "replace").split())
        if text:
            message += f": {text}"
    return ServerRejectedError(f"the sync server refused {where}: {message} ({code})", status=status, code=code,
                               retry_after_s=parse_retry_after(retry_after))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 10**7))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _seconds(value: float) -> str:
    return f"{max(0.0, value):.3g} s"


def describe(exc: BaseException) -> str:
    """A network failure in a few words: 'connection refused', 'no answer within 10 s', ..."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "the connection was closed"
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0]
