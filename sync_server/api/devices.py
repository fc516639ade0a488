"""Device endpoints: enrol, read the assignment (ETag/304), hold the push stream, report status and telemetry."""

from __future__ import annotations

from typing import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..devices import DeviceIdentity
from ..errors import AuthenticationError
from ..services import Services
from . import auth
from .schemas import DeviceId, EnrollRequest, StatusReport, TelemetryReport, responses

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("/enroll", status_code=201, responses=responses(400, 404))
def enroll(body: EnrollRequest, request: Request, state: Services = Depends(auth.services)) -> dict:
    """Enrol a device with `Authorization: Bearer ENROLLMENT_TOKEN`; answers its id and token (shown once).

    The enrolment token comes from an admin (`POST /v1/enrollment-tokens`); the fleet-wide enrolment
    secret works too when the server was given one. 403 when the token is for another model or channel.
    """
    try:
        secret = auth.bearer_token(request)
    except AuthenticationError as exc:
        raise AuthenticationError(
            "enrolment needs 'Authorization: Bearer ENROLLMENT_TOKEN' (or the fleet's ENROLLMENT_SECRET)", code=exc.code
        ) from None
    return state.devices.enroll(secret, body.model, body.channel, body.name)


@router.get("/{device_id}/assignment", responses=responses(304))
async def assignment(
    device_id: DeviceId,
    request: Request,
    device: DeviceIdentity = Depends(auth.own_device),
    state: Services = Depends(auth.services),
) -> Response:
    """The version this device should run, with its manifest and file URLs. ETag; 304 when unchanged."""
    current = await auth.current_assignment(state, device)
    headers = {"ETag": current.etag, "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("if-none-match"), current.etag):
        return Response(status_code=304, headers=headers)
    view = await anyio.to_thread.run_sync(state.devices.assignment_view, current)
    return JSONResponse(view, headers=headers)


@router.get("/{device_id}/events", response_class=EventSourceResponse, responses=responses())
async def events(
    device_id: DeviceId,
    request: Request,
    device: DeviceIdentity = Depends(auth.own_device),
    state: Services = Depends(auth.services),
) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: an `assignment` event now and whenever this device's assignment changes.

    Each event's data is the same JSON as GET .../assignment and its id is the ETag. Comment lines keep
    idle connections open. Reconnect on any error (polling the assignment with If-None-Match is the
    fallback).
    """
    subscription = state.hub.subscribe(device.model)
    keepalive = state.config.sse_keepalive_s
    last_etag = request.headers.get("last-event-id")
    try:
        first = True
        while True:
            try:
                # Read afresh: the device may have been moved to another channel since it connected. After
                # a change, one worker reads the model's devices and the other streams answer from that.
                current = state.devices.pushed_assignment(device) or await anyio.to_thread.run_sync(
                    state.devices.assignment, device
                )
            except AuthenticationError:
                yield ServerSentEvent(event="revoked", data={"device_id": device.id})
                return
            if current.etag != last_etag:
                view = state.devices.cached_view(current) or await anyio.to_thread.run_sync(
                    state.devices.assignment_view, current
                )
                yield ServerSentEvent(event="assignment", id=current.etag, data=view, retry=5000 if first else None)
                last_etag = current.etag
                first = False
            if not await subscription.wait(keepalive):
                yield ServerSentEvent(comment="keepalive")
    finally:
        state.hub.unsubscribe(subscription)


@router.post("/{device_id}/status", responses=responses(400, 404))
def status(
    device_id: DeviceId,
    body: StatusReport,
    device: DeviceIdentity = Depends(auth.own_device),
    state: Services = Depends(auth.services),
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", description="1-64 visible ASCII characters; a resent report with it counts once"
    ),
) -> dict:
    """Report a version's load and smoke-test result, or its rollback (`details.rolled_back: true`).

    Only about a version the server assigned this device (403 `not_assigned` otherwise): a device
    outside a rollout cannot pause it, nor claim to run a version it never got.

    Failures and rollbacks can pause a rollout. A report is an upsert per (device, version). Resent
    with the `Idempotency-Key` of the report that last changed it, it changes nothing and the answer
    says `duplicate`: an old failure sent again after a paused rollout was resumed does not count anew.
    """
    return state.devices.record_status(
        device,
        body.version,
        running=body.running,
        load_ok=body.load_ok,
        smoke_test_ok=body.smoke_test_ok,
        message=body.message,
        details=body.details,
        idempotency_key=idempotency_key,
    )


@router.post("/{device_id}/telemetry", status_code=202, responses=responses(400, 404))
def telemetry(
    device_id: DeviceId,
    body: TelemetryReport,
    device: DeviceIdentity = Depends(auth.own_device),
    state: Services = Depends(auth.services),
    idempotency_key: str | None = Header(
        None, alias="Idempotency-Key", description="1-64 visible ASCII characters; a resent report with it counts once"
    ),
) -> dict:
    """Periodic counts, confidence histogram, fallback rate and latency.

    With an `Idempotency-Key` the device already used, nothing is stored and the answer says `duplicate`.
    """
    return state.devices.record_telemetry(device, body.model_dump(), idempotency_key)


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return etag in candidates

