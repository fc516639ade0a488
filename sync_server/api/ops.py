"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import os

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from ..metrics import CONTENT_TYPE, gauge
from ..models import Device, DeviceStatus, Model
from ..rollout import assigned_version
from ..services import Services
from . import auth

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={
    200: {"description": "Ready: every check passed", "content": {"application/json": {}}},
    503: {"description": "Not ready: the body names each failing check", "content": {"application/json": {}}},
})
async def readyz(state: Services = Depends(auth.services)) -> JSONResponse:
    """Ready to serve: the database answers, the data directory is writable, the backend is up.

    TF Serving versions that did not load are listed under `problems` without failing readiness: the
    server still serves assignments and the versions that did load. A model in use with no version
    loaded at all (TF Serving restarted and is loading again) fails the `serving` check.
    """
    checks: dict[str, str] = {}
    try:
        await anyio.to_thread.run_sync(state.db.check)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"failing: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    checks["data_dir"] = "ok" if os.access(state.config.data_dir, os.W_OK) else f"failing: {state.config.data_dir} is not writable"
    if state.predictor is not None:
        problem = await state.predictor.ready()
        checks["backend"] = "ok" if problem is None else f"failing: {problem}"
        serving = state.reconciler.backend_problem()
        if serving is not None:  # reachable, but holding none of a model's versions in use (restarted?)
            checks["serving"] = f"failing: {serving}"
    ready = all(value == "ok" for value in checks.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "backend": state.predictor.kind if state.predictor else None,
        "problems": dict(state.reconciler.problems),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}},
})
def metrics(state: Services = Depends(auth.services)) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def state_gauges(state: Services):  # type: ignore[no-untyped-def]
    """Gauges computed at scrape time: rollouts, devices per version, TF Serving problems."""

    def collect():  # type: ignore[no-untyped-def]
        channels = state.rollouts.rollout_states()
        yield gauge(
            "sync_server_channel_version", "The version each channel serves", ["model", "channel"],
            [([c["model"], c["channel"]], float(c["version"])) for c in channels if c["version"] is not None],
        )
        samples = []
        for c in channels:
            current = c["rollout"]["state"] if c["rollout"] else "none"
            for s in ("none", "active", "paused"):
                samples.append(([c["model"], c["channel"], s], 1.0 if s == current else 0.0))
        yield gauge("sync_server_rollout_state", "1 for the rollout state of each channel", ["model", "channel", "state"], samples)
        yield gauge(
            "sync_server_rollout_percent", "Share of a channel's devices in its rollout", ["model", "channel", "version"],
            [([c["model"], c["channel"], str(c["rollout"]["version"])], float(c["rollout"]["percent"] or 0))
             for c in channels if c["rollout"]],
        )
        assigned, running = _device_counts(state)
        yield gauge("sync_server_devices_assigned", "Devices per assigned version", ["model", "version"],
                    [([m, v], float(n)) for (m, v), n in sorted(assigned.items())])
        yield gauge("sync_server_devices_running", "Devices per version they report running", ["model", "version"],
                    [([m, v], float(n)) for (m, v), n in sorted(running.items())])
        yield gauge("sync_server_push_streams", "Open Server-Sent Events streams", [], [([], float(state.hub.streams))])
        yield gauge("sync_server_serving_problems", "Models with a version TF Serving did not load", [],
                    [([], float(len(state.reconciler.problems)))])

    return collect


def _device_counts(state: Services) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    from ..models import Channel

    assigned: dict[tuple[str, str], int] = {}
    running: dict[tuple[str, str], int] = {}
    with state.db.read() as session:
        channels = {(c.model_id, c.name): c for c in session.scalars(select(Channel))}
        names = dict(session.execute(select(Model.id, Model.name)).all())
        for device_id, model_id, channel in session.execute(
            select(Device.id, Device.model_id, Device.channel).where(Device.revoked.is_(False))
        ):
            version, _ = assigned_version(channels.get((model_id, channel)), names[model_id], device_id)
            key = (names[model_id], "none" if version is None else str(version))
            assigned[key] = assigned.get(key, 0) + 1
        for model_id, version in session.execute(
            select(Device.model_id, DeviceStatus.version)
            .join(Device, Device.id == DeviceStatus.device_id)
            .where(DeviceStatus.running.is_(True), Device.revoked.is_(False))
        ):
            key = (names[model_id], str(version))
            running[key] = running.get(key, 0) + 1
    return assigned, running
