"""The full-model fallback: `POST /v1/models/{name}/predict` with the photo's bytes as the body, and
`POST /v1/models/{name}/predict/pixels` with the device's fitted pixels (no decode on the server).

The pixel payload (`Content-Type: application/x-edge-pixels`): the body is the raw uint8 RGB pixels,
row-major, exactly `H*W*3` bytes, that the device fed its own model after decode, orientation, fit and
resize and before normalisation (`preprocessing.preprocess_pixels`); `X-Pixels-Shape: HxWx3` names
their shape and `X-Spec-Digest` the `PreprocessSpec.pixels_digest()` of the spec that fitted them. The
server refuses pixels whose digest is not its version's float spec's (409 `spec_mismatch`), whose shape
is not the spec's (400 `bad_shape`) or whose length is not `H*W*3` (400 `bad_length`), and asks the same
batcher and backend as for photos: with the pixels as they came when the version's backend takes uint8
pixels (the converter's `pixels` signature), else normalised with the float spec.
"""

from __future__ import annotations

from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from ..errors import (
    BackendUnavailableError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    SyncServerError,
    UnsupportedMediaTypeError,
)
from ..rollout import DEFAULT_CHANNEL
from ..services import Services
from . import auth
from .schemas import MAX_VERSION, ErrorBody, responses

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


#: The content type of a pixel payload.
PIXELS_CONTENT_TYPE = "application/x-edge-pixels"

_PIXELS_DOC = {
    "requestBody": {
        "required": True,
        "description": "the fitted uint8 RGB pixels, row-major, exactly H*W*3 bytes (X-Pixels-Shape), before normalisation",
        "content": {PIXELS_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}
_PIXELS_RESPONSES = {
    **responses(400, 404, 409, 502),
    415: {"description": f"the body is not {PIXELS_CONTENT_TYPE}", "model": ErrorBody},
}


@router.post("/{name}/predict/pixels", openapi_extra=_PIXELS_DOC, responses=_PIXELS_RESPONSES)
async def predict_pixels(
    name: Annotated[str, PathParam(max_length=100)],
    request: Request,
    shape: Annotated[str, Header(alias="X-Pixels-Shape", max_length=20, pattern=r"^[0-9]{1,5}x[0-9]{1,5}x3$",
                                 description="HxWx3: the pixels' height and width (the version spec's)")],
    digest: Annotated[str, Header(alias="X-Spec-Digest", min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$",
                                  description="PreprocessSpec.pixels_digest() of the spec that fitted the pixels")],
    version: int | None = Query(None, ge=1, le=MAX_VERSION, description="version to ask (default: the device's assigned version; a device may ask only versions it was assigned)"),
    channel: str | None = Query(None, max_length=64, description="admin only: ask the version of this channel (default stable)"),
    top_k: int = Query(5, ge=1, le=100, description="how many categories to return"),
    who: auth.Caller = Depends(auth.caller),
    state: Services = Depends(auth.services),
) -> JSONResponse:
    """The full model's top-k for the pixels the device fed its own model (no decode on the server).

    Answers as `/predict` does. 409 `spec_mismatch` when `X-Spec-Digest` is not the version's (both
    digests named); 400 `bad_shape` / `bad_length` when the shape is not the spec's or the body is not
    H*W*3 bytes; 415 for another content type.
    """
    outcome = "ok"
    try:
        resolved = await _resolve_version(state, who, name, version, channel)  # first: 403 whatever the backend
        if state.prediction is None:
            raise BackendUnavailableError("this server has no prediction backend", retry_after_s=60)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != PIXELS_CONTENT_TYPE:
            raise UnsupportedMediaTypeError(
                f"pixels must be sent as {PIXELS_CONTENT_TYPE}, not {content_type or 'no content type'}; "
                f"send a photo to /v1/models/{name}/predict instead"
            )
        spec = await state.prediction.version_spec(name, resolved)
        expected = state.prediction.pixels_digest(spec)
        if digest != expected:
            raise ConflictError(
                f"the pixels were prepared with spec digest {digest}, but version {resolved} of {name!r} needs "
                f"{expected} (size, fit, resize or draft differ); send the photo to /v1/models/{name}/predict instead",
                code="spec_mismatch",
            )
        height, width, _ = (int(part) for part in shape.split("x"))
        if (height, width) != (spec.height, spec.width):
            raise BadRequestError(
                f"the pixels are {height}x{width}x3, but version {resolved} of {name!r} takes {spec.height}x{spec.width}x3",
                code="bad_shape",
            )
        data = await _read_exact(request, spec.height * spec.width * 3)
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(spec.pixel_shape)
        result = await state.prediction.predict_pixels(name, resolved, pixels, top_k)
        return JSONResponse(result.to_dict())
    except SyncServerError as exc:
        outcome = exc.code
        raise
    finally:
        state.metrics.predictions.labels(name if outcome != "unknown_model" else "_unknown", outcome).inc()


async def _read_exact(request: Request, length: int) -> bytes:
    """The body, which must be exactly `length` bytes; reading stops at the first byte too many."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != length:
        raise BadRequestError(f"the body is {int(declared)} bytes; pixels of this shape are exactly {length} bytes", code="bad_length")
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > length:
            raise BadRequestError(f"the body is longer than the {length} bytes of pixels of this shape", code="bad_length")
        chunks.append(chunk)
    if received != length:
        raise BadRequestError(f"the body is {received} bytes; pixels of this shape are exactly {length} bytes", code="bad_length")
    return b"".join(chunks)


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
