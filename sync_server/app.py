"""`create_app(config)`: the FastAPI application of the sync server."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .config import ServerConfig
from .predict.base import Predictor
from .services import Services

access_log = logging.getLogger("sync_server.access")

DESCRIPTION = """
Model registry, staged rollout, pushed updates and full-model fallback for edge-classify devices.

* **Admin** calls need `Authorization: Bearer ADMIN_TOKEN`.
* **Devices** enrol with `Authorization: Bearer ENROLLMENT_SECRET` and then use their own token.
* Every error is `{"error": {"code": "...", "message": "..."}}`.
"""


def create_app(config: ServerConfig, *, predictor: Predictor | None = None) -> FastAPI:
    """The app for `config`; `predictor` replaces the configured backend (tests).

    Parts are built now (`app.state.services`); the database is migrated and the background tasks
    (push watcher, TF Serving reconciler) start with the app's lifespan.
    """
    from .api import admin, artifacts, devices, errors, ops, predict, quality
    from .devices import last_seen_metrics
    from .quality import drift_gauges

    services = Services.build(config, predictor=predictor)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(title="sync-server", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.services = services
    errors.install(app)
    for router in (devices.router, predict.router, admin.router, artifacts.router, ops.router, quality.router):
        app.include_router(router)
    _install_dashboard(app)
    services.metrics.add_state(ops.state_gauges(services))
    services.metrics.add_state(last_seen_metrics(services.devices))
    services.metrics.add_state(drift_gauges(services.db, services.config.quality_gates.window_s))
    app.add_middleware(JsonBodyLimitMiddleware, limit=services.config.limits.max_json_bytes)
    if services.config.throttle.enabled:
        from .throttle import Throttle, ThrottleMiddleware

        app.add_middleware(ThrottleMiddleware, throttle=Throttle(services.config.throttle), admin_token=services.config.admin_token,
                           on_throttled=lambda scope: services.metrics.throttled.labels(scope).inc())
    app.add_middleware(RequestLogMiddleware, services=services)
    return app


def _install_dashboard(app: FastAPI) -> None:
    """The operators' dashboard under /dashboard (sync_server/dashboard); it needs Jinja2 (the `server` extra)."""
    try:
        import jinja2  # noqa: F401
    except ImportError as exc:
        logging.getLogger("sync_server").warning("no dashboard: %s (install edge-classify[server])", exc)
        return
    from .dashboard import install

    install(app)


class JsonBodyLimitMiddleware:
    """Bodies of the JSON endpoints stop at `limit` bytes (413 as JSON); uploads have their own limits.

    The error is raised from `receive` as an HTTPException, which FastAPI passes on to the JSON error
    handler; a body that is never read costs nothing.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _has_own_limit(scope):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = _header(scope, b"content-length")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, f"the request body is {declared} bytes; JSON bodies are limited to {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the request body is over the {limit}-byte limit of JSON bodies")
            return message

        await self.app(scope, limited, send)


def _has_own_limit(scope: Scope) -> bool:
    """Publish uploads, fallback photos and pixels are limited by their endpoints (--max-upload-bytes,
    --max-image-bytes, exactly H*W*3 for pixels)."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and (path.rstrip("/") == "/v1/models" or path.endswith(("/predict", "/predict/pixels")))


class RequestLogMiddleware:
    """One structured log line and the request metrics per HTTP request; sets X-Request-ID."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _header(scope, b"x-request-id") or secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics = self.services.metrics
            metrics.requests.labels(method, template, str(status)).inc()
            metrics.request_seconds.labels(method, template).observe(seconds)
            state = scope.get("state", {})
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                    "device_id": state.get("device_id"),
                    "error_code": state.get("error_code"),
                },
            )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text = value.decode("latin-1")
            return text[:64] if text.isprintable() else None
    return None
