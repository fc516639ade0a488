"""Admin endpoints (admin token): publish, models and versions, channels and rollouts, devices, telemetry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest
from starlette.types import Message, Receive

from ..bundles import remove_tree, staging_dir, unpack_archive
from ..enrollment import EnrollmentTokens
from ..errors import BadRequestError, PayloadTooLargeError
from ..rollout import GateNotMetError, check_channel_name
from ..services import Services
from . import auth
from .schemas import (
    MAX_CHANNEL_NAME,
    MAX_MODEL_NAME,
    ChannelName,
    ChannelVersion,
    DeviceId,
    DeviceUpdate,
    EnrollmentTokenRequest,
    ModelName,
    PauseRequest,
    PromoteRequest,
    RolloutRequest,
    Version,
    VersionQuery,
    responses,
)

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(auth.admin)])

_PUBLISH_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bundle", "saved_model"],
                    "properties": {
                        "bundle": {"type": "string", "format": "binary", "description": "tar(.gz) of the bundle folder"},
                        "saved_model": {"type": "string", "format": "binary", "description": "tar(.gz) of the SavedModel folder"},
                        "channel": {"type": "string", "description": "also make it this channel's version"},
                    },
                }
            }
        },
    }
}


# --- models and versions ---------------------------------------------------------------------------


@router.post("/models", openapi_extra=_PUBLISH_DOC, status_code=201,
             responses={200: {"description": "the same version was already published"}, **responses(400, 409)})
async def publish(request: Request, state: Services = Depends(auth.services)) -> JSONResponse:
    """Publish a signed bundle with its SavedModel (multipart: `bundle`, `saved_model` tars; optional `channel`).

    201 with the version when new; 200 when the same version was already published; 409 when it exists
    with other content; 422 when the bundle or SavedModel does not verify.
    """
    limit = state.config.limits.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the upload is {int(declared)} bytes; the limit is {limit} bytes (--max-upload-bytes)")
    limited = StarletteRequest(request.scope, receive=_limited_receive(request.receive, limit))
    try:
        form = await limited.form(max_files=2, max_fields=4)
    except PayloadTooLargeError:
        raise
    except Exception as exc:  # python-multipart's errors: not a multipart body, bad boundary, ...
        raise BadRequestError(
            f"the publish body must be multipart/form-data with 'bundle' and 'saved_model' files ({exc})", code="bad_upload"
        ) from exc
    staging, claim = staging_dir(state.config.data_dir / "tmp")
    try:
        bundle = form.get("bundle")
        saved_model = form.get("saved_model")
        channel = form.get("channel")
        for field, value in (("bundle", bundle), ("saved_model", saved_model)):
            if not isinstance(value, UploadFile):
                raise BadRequestError(
                    f"the '{field}' file is missing: send the bundle and the SavedModel as tar archives "
                    "(multipart fields 'bundle' and 'saved_model')",
                    code="bad_upload",
                )
        if channel is not None and not isinstance(channel, str):
            raise BadRequestError("the 'channel' field must be text", code="bad_upload")
        if channel:
            check_channel_name(channel)  # before any work: a bad name must not leave a half-done publish
        bundle_dir = await anyio.to_thread.run_sync(
            lambda: unpack_archive(bundle.file, staging / "bundle", max_bytes=limit, what="bundle")  # type: ignore[union-attr]
        )
        model_dir = await anyio.to_thread.run_sync(
            lambda: unpack_archive(saved_model.file, staging / "saved_model", max_bytes=limit, what="SavedModel")  # type: ignore[union-attr]
        )
        return await _publish_dirs(state, bundle_dir, model_dir, channel or None)
    finally:
        await form.close()
        await anyio.to_thread.run_sync(remove_tree, staging)
        claim.release()


async def _publish_dirs(state: Services, bundle_dir: Path, model_dir: Path, channel: str | None) -> JSONResponse:
    result = await anyio.to_thread.run_sync(state.registry.publish, bundle_dir, model_dir)
    body: dict[str, Any] = await anyio.to_thread.run_sync(lambda: state.registry.get_version(result.name, result.version, with_manifest=False))
    body["created"] = result.created
    if channel:
        body["channel"] = await anyio.to_thread.run_sync(state.rollouts.set_version, result.name, channel, result.version)
    return JSONResponse(body, status_code=201 if result.created else 200)


def _limited_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLargeError(f"the upload is larger than the limit of {limit} bytes (--max-upload-bytes)")
        return message

    return wrapped


@router.get("/models", responses=responses())
def list_models(state: Services = Depends(auth.services)) -> list[dict[str, Any]]:
    """Every model with its versions and channels."""
    return state.registry.list_models(state.rollouts.gates, state.rollouts.options)


@router.get("/models/{name}", responses=responses(404))
def get_model(name: ModelName, state: Services = Depends(auth.services)) -> dict[str, Any]:
    return state.registry.get_model(name)


@router.get("/models/{name}/versions/{version}", responses=responses(404))
def get_version(name: ModelName, version: Version, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """A version: manifest, labels, content hashes and download URLs of its files."""
    return state.registry.get_version(name, version)


@router.delete("/models/{name}/versions/{version}", responses=responses(404, 409))
def delete_version(name: ModelName, version: Version, dry_run: bool = False, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Delete a version nothing uses: its files and its SavedModel are removed, its number stays taken.

    409 `version_in_use` while a channel names it, `version_running` while a device runs it,
    `version_served` while TF Serving's config still lists it. `?dry_run=true` checks and deletes nothing.
    """
    return state.registry.delete_version(name, version, dry_run=dry_run)


@router.get("/models/{name}/telemetry", responses=responses(404))
def telemetry(name: ModelName, version: VersionQuery = None, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Device telemetry summed per version: predictions, fallbacks, fallback rate, histogram, latency."""
    return state.devices.telemetry_summary(name, version)


# --- channels and rollouts -------------------------------------------------------------------------


@router.get("/models/{name}/channels/{channel}", responses=responses(400, 404))
def get_channel(name: ModelName, channel: ChannelName, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """The channel's version, rollout, history and devices per assigned version."""
    return state.rollouts.get(name, channel)


@router.put("/models/{name}/channels/{channel}", responses=responses(400, 404))
def set_channel(name: ModelName, channel: ChannelName, body: ChannelVersion, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Make `version` the channel's version for every device, now (creates the channel)."""
    return state.rollouts.set_version(name, channel, body.version)


@router.post("/models/{name}/channels/{channel}/rollout", responses=responses(400, 404, 409))
def rollout(
    name: ModelName, channel: ChannelName, body: RolloutRequest, request: Request, state: Services = Depends(auth.services)
) -> Any:
    """Start a staged rollout of `version` to `percent` of the channel's devices, or change its percentage.

    `mode: "shadow"`: the devices keep the channel's version and run the candidate beside it on
    `sample_rate` of their requests. The same version again with `mode: "canary"` moves a shadow
    rollout to canary, gated on its shadow figures: 409 `gate_not_met` (with `error.gates`, the figures
    and every gate's verdict) unless they pass or `force` is true.
    """
    gates = body.gates.model_dump(exclude_none=True) if body.gates is not None else None
    return _gated(request, lambda: state.rollouts.start(
        name, channel, body.version, body.percent, failure_threshold=body.failure_threshold, min_reports=body.min_reports,
        mode=body.mode, sample_rate=body.sample_rate, gates=gates, force=body.force,
    ))


@router.post("/models/{name}/channels/{channel}/rollout/promote", responses=responses(400, 404, 409))
def promote(
    name: ModelName, channel: ChannelName, request: Request, body: PromoteRequest | None = None,
    state: Services = Depends(auth.services),
) -> Any:
    """The rollout's version becomes the channel's version for every device, when its quality gates are
    met (409 `gate_not_met` with `error.gates` otherwise) or with `{"force": true}`."""
    force = body.force if body is not None else False
    return _gated(request, lambda: state.rollouts.promote(name, channel, force=force))


@router.get("/models/{name}/channels/{channel}/rollout/gates", responses=responses(400, 404, 409))
def rollout_gates(name: ModelName, channel: ChannelName, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """The quality gates' verdict on the rollout now: the figures, each gate's status, `passed`."""
    return state.rollouts.quality(name, channel)


def _gated(request: Request, step: Any) -> Any:
    """The step's answer; a 409 `gate_not_met` carrying the gates' figures when they refused it."""
    try:
        return step()
    except GateNotMetError as exc:
        request.state.error_code = exc.code
        return JSONResponse(exc.to_dict(), status_code=exc.status)


@router.post("/models/{name}/channels/{channel}/rollout/pause", responses=responses(400, 404, 409))
def pause(name: ModelName, channel: ChannelName, body: PauseRequest | None = None, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Stop sending the rollout's version to any device (they go back to the channel's version)."""
    return state.rollouts.pause(name, channel, body.reason if body else None)


@router.post("/models/{name}/channels/{channel}/rollout/resume", responses=responses(400, 404, 409))
def resume(name: ModelName, channel: ChannelName, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Continue a paused rollout at its percentage."""
    return state.rollouts.resume(name, channel)


@router.post("/models/{name}/channels/{channel}/rollback", responses=responses(400, 404, 409))
def rollback(name: ModelName, channel: ChannelName, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Drop the rollout in progress; with none, return the channel to its previous version."""
    return state.rollouts.rollback(name, channel)


# --- devices and TF Serving ------------------------------------------------------------------------


@router.get("/devices", responses=responses())
def list_devices(
    model: str | None = Query(None, max_length=MAX_MODEL_NAME), channel: str | None = Query(None, max_length=MAX_CHANNEL_NAME),
    state: Services = Depends(auth.services)
) -> list[dict[str, Any]]:
    return state.devices.list(model, channel)


@router.get("/devices/{device_id}", responses=responses(404))
def get_device(device_id: DeviceId, state: Services = Depends(auth.services)) -> dict[str, Any]:
    return state.devices.get(device_id)


@router.patch("/devices/{device_id}", responses=responses(400, 404))
def update_device(device_id: DeviceId, body: DeviceUpdate, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Move a device to another channel (its stream is told at once)."""
    return state.devices.update(device_id, body.channel)


@router.delete("/devices/{device_id}", responses=responses(404))
def revoke_device(device_id: DeviceId, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """Revoke a device's token."""
    return state.devices.revoke(device_id)


# --- enrolment tokens ----------------------------------------------------------------------------


@router.post("/enrollment-tokens", status_code=201, responses=responses(400, 404))
def create_enrollment_token(body: EnrollmentTokenRequest, state: Services = Depends(auth.services)) -> dict[str, Any]:
    """A new enrolment token (`et_...`, shown only in this answer): expires, enrols at most `max_uses`
    devices, optionally only of `model` and onto `channel`. Devices present it as the enrolment secret."""
    return _tokens(state).create(
        expires_in_s=body.expires_in_s, max_uses=body.max_uses, model=body.model, channel=body.channel, note=body.note
    )


@router.get("/enrollment-tokens", responses=responses())
def list_enrollment_tokens(state: Services = Depends(auth.services)) -> list[dict[str, Any]]:
    """Every enrolment token with its uses, expiry and state (never the token itself)."""
    return _tokens(state).list()


@router.delete("/enrollment-tokens/{token_id}", responses=responses(404))
def revoke_enrollment_token(
    token_id: Annotated[str, PathParam(min_length=1, max_length=24)],
    devices: bool = Query(False, description="also revoke every device enrolled with it (a leaked token)"),
    state: Services = Depends(auth.services),
) -> dict[str, Any]:
    """Revoke an enrolment token at once; `?devices=true` revokes the devices it enrolled too."""
    return _tokens(state).revoke(token_id, devices=devices)


def _tokens(state: Services) -> EnrollmentTokens:
    return EnrollmentTokens(state.db, on_change=state.devices.on_change)


@router.get("/serving", responses=responses())
def serving(state: Services = Depends(auth.services)) -> dict[str, Any]:
    """What the TF Serving config says, what is loaded, and any version that failed to load."""
    return {
        "config_file": str(state.repository.config_path),
        "repository": str(state.repository.models_dir),
        "base_path": state.repository.base_path,
        "models": {name: served.to_dict() for name, served in state.repository.written().items()},
        "available": {name: sorted(v) for name, v in state.reconciler.available.items()},
        "problems": dict(state.reconciler.problems),
    }
