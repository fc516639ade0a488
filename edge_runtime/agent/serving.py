"""The local HTTP API apps on the device classify through (loopback by default; no authentication).

    POST /classify[?top_k=K&fallback=auto|never|always]   body: the photo's bytes, or multipart/form-data
                                                           with one file; answer: the `edge-classify --json`
                                                           object (`error` set when it failed), headers
                                                           X-Model-Name / X-Model-Version
    GET  /status                                           the agent: device, versions, stream, outbox, events
    GET  /healthz                                          200 while a model is served, else 503; `following`
                                                           says `ok` or `stalled since T: why` (the server's side)

Statuses: 200 classified; 422 a bad photo (`error.code` from preprocessing); 413 too large; 500 the
model failed; 503 no model yet (`no_model`) or the resource-preserving policy is loading (`updating`).
Each request pins the version it started on, so a switch never fails or stalls it.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from preprocessing import DecodeBusyError, InvalidImageError, PreprocessSpec

from ..fallback import FallbackClient
from ..pipeline import ask_server_if_unsure, pixel_payload
from ..results import Classification
from ..store import ModelRef
from .options import AgentOptions
from .servable import ServableHandle

log = logging.getLogger("edge_agent.http")

Recorder = Callable[..., None]


@dataclass(frozen=True)
class ClassifiedPhoto:
    """One photo the serving version classified on the edge, as `Classify(on_classified=...)` hands it on
    (after the answer is made; the shadow runner replays `pixels` on a candidate off the request path)."""

    ref: ModelRef
    pixels: np.ndarray  # the fitted uint8 pixels the model ran (`preprocess_pixels(photo, spec)`); do not modify
    spec: PreprocessSpec
    label: str
    label_index: int | None
    score: float


class Classify:
    """One photo through the current version (and the server's full model when unsure).

    The photo is decoded once: the fitted pixels the model ran also go to the server (when it is
    asked and takes pixels), into the telemetry's input statistics, to `on_classified` and to `keep`.
    `on_classified` and `keep` run after the answer is made; anything they raise is logged, never
    answered. `keep(photo, data)` is offered every low-confidence edge answer (the opt-in sample store).
    """

    def __init__(
        self,
        handle: ServableHandle,
        options: AgentOptions,
        *,
        fallback: FallbackClient | None,
        record: Recorder,
        health: Callable[..., None],
        updating: Callable[[], bool] = lambda: False,
        on_classified: Callable[[ClassifiedPhoto], None] | None = None,
        keep: Callable[[ClassifiedPhoto, bytes], None] | None = None,
    ) -> None:
        self.handle = handle
        self.options = options
        self.fallback = fallback
        self.record = record
        self.health = health
        self.updating = updating
        self.on_classified = on_classified
        self.keep = keep

    def __call__(self, data: bytes, path: str | None, top_k: int, mode: str) -> tuple[int, Classification]:
        started = time.perf_counter()
        with self.handle.acquire() as servable:
            if servable is None:
                code, message = (
                    ("updating", "the model is being replaced; try again in a moment")
                    if self.updating() else ("no_model", "no model is installed yet: the agent is waiting for its first download")
                )
                return 503, Classification(path, error={"code": code, "message": message})
            ref, threshold = servable.ref, servable.threshold
            spec = getattr(getattr(servable, "classifier", None), "spec", None)  # for the pixels the server gets
            try:
                answer = servable.classify(data, top_k)
            except DecodeBusyError as exc:  # other photos hold the decode budget: not the model's fault
                return 503, Classification(path, model_name=ref.name, model_version=ref.version,
                                           latency_ms=_ms(started), error=exc.to_dict())
            except InvalidImageError as exc:
                return 422, Classification(path, model_name=ref.name, model_version=ref.version,
                                           latency_ms=_ms(started), error=exc.to_dict())
            except Exception as exc:  # a failure inside the model: counts against the version  # noqa: BLE001
                ms = _ms(started)
                self.health(ref, error=True)
                self.record(ref.version, None, ms, error=True)
                log.warning("%s failed on a photo: %s", ref, exc)
                return 500, Classification(path, model_name=ref.name, model_version=ref.version, latency_ms=ms,
                                           error={"code": "model_error", "message": f"{ref} failed: {exc}"})
        categories = answer[0]
        pixels = getattr(answer, "pixels", None)  # a servable that returns a plain pair has none
        label_index = getattr(answer, "label_index", None)
        edge = Classification(path, categories, ref.name, ref.version, "edge", _ms(started))
        if self.options.fallback_threshold is not None:
            threshold = self.options.fallback_threshold
        result = self._maybe_ask_server(edge, data, ref, top_k, mode, threshold, spec, pixels)
        self.health(ref, error=False)
        asked = result.fallback is not None and not result.fallback.startswith("skipped")
        unsure = edge.score is not None and edge.score < threshold
        disagrees = result.label != edge.label if result.fallback == "answered" else None
        self.record(ref.version, edge.score, result.latency_ms, fallback=asked, label_index=label_index,
                    low_confidence=unsure, server_disagrees=disagrees, pixels=pixels)
        if pixels is not None and spec is not None and edge.label is not None and (self.on_classified or (unsure and self.keep)):
            photo = ClassifiedPhoto(ref, pixels, spec, edge.label, label_index, float(edge.score))  # type: ignore[arg-type]
            self._hand_on(photo, data, unsure)
        return 200, result

    def _hand_on(self, photo: ClassifiedPhoto, data: bytes, unsure: bool) -> None:
        """The hooks, after the answer: never let one fail the request."""
        if self.on_classified is not None:
            try:
                self.on_classified(photo)
            except Exception as exc:  # noqa: BLE001
                log.warning("on_classified failed after %s classified a photo: %s", photo.ref, exc)
        if unsure and self.keep is not None:
            try:
                self.keep(photo, data)
            except Exception as exc:  # noqa: BLE001
                log.warning("keeping a low-confidence photo of %s failed: %s", photo.ref, exc)

    def _maybe_ask_server(self, edge: Classification, data: bytes, ref: ModelRef, top_k: int, mode: str, threshold: float,
                          spec: PreprocessSpec | None = None, fitted: np.ndarray | None = None) -> Classification:
        asked_as = SimpleNamespace(name=ref.name, version=ref.version, options=SimpleNamespace(top_k=top_k))

        def pixels():  # type: ignore[no-untyped-def]  # only when the server is asked: the pixels the model ran
            return pixel_payload(fitted, spec)  # type: ignore[arg-type]

        return ask_server_if_unsure(edge, data, asked_as, mode, self.fallback, threshold,  # type: ignore[arg-type]
                                    pixels if spec is not None and fitted is not None else None)


class LocalApi:
    """The HTTP server on its own threads (one per connection)."""

    def __init__(self, classify: Classify, status: Callable[[], dict[str, Any]], options: AgentOptions,
                 *, following: Callable[[], str] = lambda: "ok") -> None:
        self.classify = classify
        self.status = status
        self.following = following
        self.options = options
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer((options.serve.host, options.serve.port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edge-agent-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    api: LocalApi
    protocol_version = "HTTP/1.1"
    server_version = "edge-agent"
    timeout = 30  # a client that stops sending cannot hold a thread for long
    # Headers and body leave in one write (`handle_one_request` flushes after each request): written
    # separately, a kept-alive client's delayed ACK met Nagle and every answer waited ~40 ms.
    wbufsize = 64 * 1024

    def setup(self) -> None:
        super().setup()
        try:  # and no small segment waits for an ACK (answers are small and complete)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if path == "/status":
            self._json(200, self.api.status())
        elif path == "/healthz":
            current = self.api.classify.handle.current
            following = self.api.following()
            if current is None:
                self._json(503, {"status": "no_model", "following": following})
            else:
                self._json(200, {"status": "ok", "model": current.ref.to_dict(), "following": following})
        elif path == "/classify":
            self._error(405, "method_not_allowed", "POST the photo's bytes to /classify")
        else:
            self._error(404, "not_found", f"no such endpoint: GET {path} (try POST /classify, GET /status)")

    def do_POST(self) -> None:  # noqa: N802
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/classify":
            self._error(404, "not_found", f"no such endpoint: POST {parts.path}")
            return
        query = urllib.parse.parse_qs(parts.query)
        try:
            top_k = int(query.get("top_k", [self.api.options.serve.top_k])[0])
            mode = query.get("fallback", [self.api.options.fallback])[0]
            if not 1 <= top_k <= 100 or mode not in ("auto", "never", "always"):
                raise ValueError
        except ValueError:
            self._error(400, "bad_request", "top_k must be 1..100 and fallback one of auto, never, always")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "length_required", "send the photo with a Content-Length")
            return
        if int(length) > self.api.options.serve.max_image_bytes:
            self.close_connection = True
            self._error(413, "too_large", f"the photo is {length} bytes; the limit is {self.api.options.serve.max_image_bytes}")
            return
        body = self.rfile.read(int(length))
        data, name = _photo_from(body, self.headers.get("Content-Type", ""), self.headers.get("X-Filename"))
        status, result = self.api.classify(data, name, top_k, mode)
        headers = {}
        if result.model_name is not None:
            headers = {"X-Model-Name": result.model_name, "X-Model-Version": str(result.model_version)}
        if status == 503:
            headers["Retry-After"] = "1"
        self._json(status, result.to_dict(), headers)

    # --- helpers --------------------------------------------------------------------------------

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": {"code": code, "message": message}})

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = (json.dumps(body) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


def _photo_from(body: bytes, content_type: str, filename: str | None) -> tuple[bytes, str | None]:
    """The photo's bytes: the body itself, or the first file of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body, filename
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_filename() is not None or part.get_param("name", header="content-disposition") in ("image", "photo", "file"):
            return part.get_payload(decode=True) or b"", part.get_filename() or filename
    return b"", filename


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
