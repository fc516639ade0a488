"""The agent's HTTP client of the sync server: the standard library only, a timeout on every call.

`SyncClient.request` makes one JSON call and returns a `Reply`; `SyncClient.open` starts a streamed
response (the push stream, a download) and hands back the connection so that another thread can cut
it. Failures are translated once, here: the network and timeouts become `ServerUnreachableError`,
HTTP errors become `ServerRejectedError` with the server's error code.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ServerRejectedError, ServerUnreachableError

#: The largest JSON answer read (an assignment with its manifest and smoke-test photos is ~100 KB).
MAX_JSON_BYTES = 16 * 1024 * 1024
USER_AGENT = "edge-agent/1"


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

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self.connection = connection
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def cut(self) -> None:
        """Abort the transfer from another thread: the reader wakes up to a closed connection (and
        closes it itself; closing here would race with its read)."""
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            self.connection.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncClient:
    """Calls one sync server, with the device token when it has one."""

    def __init__(self, server: str, token: str | None = None, *, timeout_s: float = 10.0) -> None:
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

    # --- calls ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204, 304),
    ) -> Reply:
        """One call; a JSON `body` is encoded. Raises unless the status is in `ok`."""
        stream = self.open(method, path, body=body, headers=headers, timeout_s=timeout_s, ok=ok)
        with stream:
            try:
                data = stream.response.read(MAX_JSON_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachableError(f"{self._where(path)}: the answer broke off ({describe(exc)})") from exc
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
    ) -> Stream:
        """Send a request and return the answer unread; raises unless the status is in `ok`."""
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        connection = self._connection(timeout_s or self.timeout_s)
        try:
            connection.request(method, self._prefix + path, body=data, headers=all_headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ServerUnreachableError(f"cannot reach the sync server at {self.server} ({describe(exc)})") from exc
        stream = Stream(connection, response)
        if response.status not in ok:
            with stream:
                try:
                    raw = response.read(64 * 1024)
                except (OSError, http.client.HTTPException):
                    raw = b""
            raise rejected(response.status, raw, self._where(path))
        return stream

    # --- internals ------------------------------------------------------------------------------

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s, context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _where(self, path: str) -> str:
        return f"{self.server}{path.split('?')[0]}"


def rejected(status: int, raw: bytes, where: str) -> ServerRejectedError:
    """The server's `{"error": {"code", "message"}}` as an exception (or the status when it is not that)."""
    code, message = "http_error", f"HTTP {status}"
    try:
        error = json.loads(raw)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = raw[:200].decode("utf-8", "replace").strip()
        if text:
            message += f": {text}"
    return ServerRejectedError(f"the sync server refused {where}: {message} ({code})", status=status, code=code)


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
