"""Every error answer is `{"error": {"code": ..., "message": ...}}`: never a traceback, never HTML."""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import DiskFullError, SyncServerError

log = logging.getLogger("sync_server.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "bad_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the JSON error shape."""

    @app.exception_handler(SyncServerError)
    async def _ours(request: Request, exc: SyncServerError) -> JSONResponse:
        request.state.error_code = exc.code
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.error_code = "invalid_request"
        return error_response(422, "invalid_request", describe_validation(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 413:
            detail = str(exc.detail)
            message = detail if detail.startswith("the ") else "the request body is larger than this endpoint accepts"
        else:
            message = str(exc.detail)
        request.state.error_code = code
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        known = world_error(exc)
        if known is not None:  # a full disk or an unreachable database that no module translated
            return await _ours(request, known)
        request_id = getattr(request.state, "request_id", "-")
        log.error("unhandled error", exc_info=exc, extra={"request_id": request_id, "path": request.url.path})
        request.state.error_code = "internal"
        return error_response(
            500, "internal", f"internal server error (request {request_id}); the server log has the details",
            {"X-Request-ID": request_id},
        )


def world_error(exc: BaseException) -> SyncServerError | None:
    """The SyncServerError for a failure of the world that reached the handler untranslated: ENOSPC
    anywhere (artifact store, staging, TF Serving repository) is 507, a database error 503 or 507."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..db import translate_error

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"the server's disk is full ({exc.strerror}); free space on the server and try again")
    if isinstance(exc, SQLAlchemyError):
        translated = translate_error(exc)
        return translated if isinstance(translated, SyncServerError) else None
    return None


def describe_validation(errors: Any) -> str:
    """FastAPI's validation errors as one sentence naming the field(s)."""
    parts = []
    for error in list(errors)[:3]:
        loc = [str(p) for p in error.get("loc", ())]
        kind = error.get("type", "")
        if kind == "json_invalid":
            parts.append("the request body is not valid JSON")
            continue
        where = loc[0] if loc else ""
        name = ".".join(loc[1:])
        if where == "query":
            subject = f"query parameter {name}"
        elif where == "path":
            subject = f"path parameter {name}"
        elif where == "header":
            subject = f"header {name}"
        elif where == "body":
            subject = f"field {name}" if name else "the request body"
        else:
            subject = ".".join(loc) or "the request"
        message = error.get("msg", "is invalid")
        parts.append(f"{subject}: {message}" if kind != "missing" else f"{subject} is required")
    return "; ".join(parts) or "the request is invalid"
