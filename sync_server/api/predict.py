"""The full-model fallback: `POST /v1/models/{name}/predict` with the photo's bytes as the body."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from ..errors import (
    BackendUnavailableError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    SyncServerError,
)
from ..rollout import DEFAULT_CHANNEL
from ..services import Services
from . import auth
from .schemas import MAX_VERSION, responses

router = APIRouter(prefix="/v1/models", tags=["fallback"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "the photo's bytes (JPEG, PNG, WebP, BMP or GIF), as the device has it",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/{name}/predict", openapi_extra=_BODY_DOC, responses=responses(400, 404, 409, 502))
async def predict(
    name: Annotated[str, PathParam(max_length=100)],
    request: Request,
    version: int | None = Query(None, ge=1, le=MAX_VERSION, description="version to ask (default: the device's assigned version; a device may ask only versions it was assigned)"),
    channel: str | None = Query(None, max_length=64, description="admin only: ask the version of this channel (default stable)"),
    top_k: int = Query(5, ge=1, le=100, description="how many categories to return"),
    who: auth.Caller = Depends(auth.caller),
    state: Services = Depends(auth.services),
) -> JSONResponse:
    """The full model's top-k for a photo the device was unsure about.

    Answers `{"model": {"name", "version"}, "top_k": [{"label", "score"}], "latency_ms"}`. A bad photo
    gets 422 (400 when empty, 413 when too large) with the preprocessing code; a backend that is down
    or still loading the version, or a server busy decoding other photos (`busy`), gets 503 with Retry-After.
    """
    outcome = "ok"
    try:
        resolved = await _resolve_version(state, who, name, version, channel)  # first: 403 whatever the backend
        if state.prediction is None:
            raise BackendUnavailableError("this server has no prediction backend", retry_after_s=60)
        photo = await _read_body(request, state.config.limits.max_image_bytes)
        result = await state.prediction.predict(name, resolved, photo, top_k)
        return JSONResponse(result.to_dict())
    except SyncServerError as exc:
        outcome = exc.code
        raise
    finally:
        state.metrics.predictions.labels(name if outcome != "unknown_model" else "_unknown", outcome).inc()


async def _resolve_version(state: Services, who: auth.Caller, name: str, version: int | None, channel: str | None) -> int:
    if who.device is not None:
        if who.device.model != name:
            raise PermissionDeniedError(f"device {who.device.id} runs model {who.device.model!r}, not {name!r}", code="forbidden")
        assigned = await auth.current_assignment(state, who.device)
        if version is not None:
            if version != assigned.version:  # 403 `not_assigned` unless the server once assigned it
                await anyio.to_thread.run_sync(state.devices.check_assigned, who.device, version)
            return version
        if assigned.version is None:
            raise ConflictError(f"device {who.device.id} has no assigned version of {name!r} yet; pass ?version=", code="no_assignment")
        return assigned.version
    if version is not None:
        return version
    view = await anyio.to_thread.run_sync(state.rollouts.get, name, channel or DEFAULT_CHANNEL)
    if view["version"] is None:
        raise NotFoundError(f"channel {view['channel']!r} of model {name!r} has no version yet", code="no_version")
    return int(view["version"])


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the photo is {int(declared)} bytes; the limit is {limit} bytes", code="too_large")
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(f"the photo is larger than the limit of {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)
