"""What the dashboard pages show, read from the server's parts: plain dicts, no HTML.

Devices are `online` when seen in the last `ONLINE_S` (a device's `last_seen_at` is written at most
once a minute). A device is `stalled` when it has not reported running its assigned version
`STALLED_S` after that assignment (counted from the later of its enrolment and its channel's last
change), or when it has not been seen for `LOST_S`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from .. import quality
from ..db import as_utc, iso
from ..models import Channel, Device, DeviceStatus
from ..registry import find_model
from ..rollout import assigned_version
from ..services import Services

ONLINE_S = 300
STALLED_S = 15 * 60
LOST_S = 3600
#: At most this many devices are listed on a model's page (the counts cover all of them).
MAX_DEVICES_LISTED = 500
#: The charts: (key in the series, title, unit); latency draws p50 and p99 on one chart.
CHARTS = (
    ("fallback_rate", "Fallback rate", "share"),
    ("low_confidence_rate", "Low-confidence rate", "share"),
    ("disagreement_rate", "Edge vs server disagreement", "share"),
    ("class_jsd", "Drift: predicted-class JSD vs baseline", "JSD"),
    ("input_shift", "Drift: input shift vs baseline", "baseline std"),
    ("latency_ms", "Latency (p50, p99)", "ms"),
    ("devices", "Devices reporting", "devices"),
)


@dataclass(frozen=True)
class DeviceState:
    online: bool
    stalled: str | None  # why, or None


def device_state(now: datetime, last_seen: datetime | None, assigned: int | None, running: int | None,
                 assigned_since: datetime) -> DeviceState:
    """Online and stalled, by the definitions in the module docstring."""
    seen_ago = (now - last_seen).total_seconds() if last_seen else None
    online = seen_ago is not None and seen_ago <= ONLINE_S
    stalled = None
    if seen_ago is not None and seen_ago > LOST_S:
        stalled = f"not seen for {_duration(seen_ago)}"
    elif assigned is not None and running != assigned and (now - assigned_since).total_seconds() > STALLED_S:
        stalled = f"not running v{assigned} {_duration((now - assigned_since).total_seconds())} after it was assigned"
    elif seen_ago is None and (now - assigned_since).total_seconds() > STALLED_S:
        stalled = "never seen since it enrolled"
    return DeviceState(online, stalled)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def overview(services: Services) -> list[dict[str, Any]]:
    """Every model with its versions, channels (and rollouts) and device counts."""
    models = services.registry.list_models()
    now = datetime.now(timezone.utc)
    with services.db.read() as session:
        for model in models:
            model_row = find_model(session, model["name"])
            rows = session.execute(
                select(Device.last_seen_at).where(Device.model_id == model_row.id, Device.revoked.is_(False))
            ).all()
            model["device_count"] = len(rows)
            model["online_count"] = sum(
                1 for (seen,) in rows if seen is not None and (now - as_utc(seen)).total_seconds() <= ONLINE_S  # type: ignore[operator]
            )
    return models


def model_page(services: Services, name: str, *, channel: str | None = None, hours: float = 24) -> dict[str, Any]:
    """Everything on a model's page except the chart series (those come as JSON); the quality figures
    cover the last `hours` of `channel` (None: every channel)."""
    model = services.registry.get_model(name)
    versions = [services.registry.get_version(name, v, with_manifest=False) for v in model["versions"]]
    channels = [services.rollouts.get(name, c) for c in sorted(model["channels"])]
    devices, per_version = _devices(services, name)
    figures = current_figures(services, name, channel=channel if channel in model["channels"] else None, hours=hours)
    for version in versions:
        version["figures"] = [f for f in figures if f["version"] == version["version"]]
        version["devices"] = per_version.get(version["version"], {"running": 0, "online": 0, "assigned": 0, "stalled": 0})
        version["channels"] = [c["channel"] for c in channels if c["version"] == version["version"]]
        version["candidate_of"] = [c["channel"] for c in channels if (c["rollout"] or {}).get("version") == version["version"]]
    return {
        "name": name,
        "created_at": model["created_at"],
        "versions": versions,
        "channels": channels,
        "devices": devices[:MAX_DEVICES_LISTED],
        "device_count": len(devices),
        "stalled_count": sum(1 for d in devices if d["stalled"]),
        "online_count": sum(1 for d in devices if d["online"]),
        "charts": [{"key": key, "title": title, "unit": unit} for key, title, unit in CHARTS],
        "thresholds": {"online_s": ONLINE_S, "stalled_s": STALLED_S, "lost_s": LOST_S},
    }


def _devices(services: Services, name: str) -> tuple[list[dict[str, Any]], dict[int, dict[str, int]]]:
    """The model's devices (not revoked) with their state, and counts per version, in three queries."""
    now = datetime.now(timezone.utc)
    with services.db.read() as session:
        model_row = find_model(session, name)
        channels = {c.name: c for c in session.scalars(select(Channel).where(Channel.model_id == model_row.id))}
        rows = session.scalars(
            select(Device).where(Device.model_id == model_row.id, Device.revoked.is_(False)).order_by(Device.created_at)
        ).all()
        running = dict(
            session.execute(
                select(DeviceStatus.device_id, DeviceStatus.version)
                .join(Device, Device.id == DeviceStatus.device_id)
                .where(Device.model_id == model_row.id, DeviceStatus.running.is_(True))
            ).all()
        )
        devices = []
        per_version: dict[int, dict[str, int]] = {}
        for device in rows:
            channel = channels.get(device.channel)
            assigned, in_rollout = assigned_version(channel, name, device.id)
            since = max(as_utc(device.created_at), as_utc(channel.updated_at) if channel else as_utc(device.created_at))  # type: ignore[type-var]
            last_seen = as_utc(device.last_seen_at)
            state = device_state(now, last_seen, assigned, running.get(device.id), since)  # type: ignore[arg-type]
            devices.append({
                "device_id": device.id,
                "name": device.name,
                "channel": device.channel,
                "assigned_version": assigned,
                "rollout": in_rollout,
                "running_version": running.get(device.id),
                "last_seen_at": iso(last_seen),
                "online": state.online,
                "stalled": state.stalled,
            })
            if running.get(device.id) is not None:
                counts = per_version.setdefault(running[device.id], {"running": 0, "online": 0, "assigned": 0, "stalled": 0})
                counts["running"] += 1
                counts["online"] += int(state.online)
            if assigned is not None:
                counts = per_version.setdefault(assigned, {"running": 0, "online": 0, "assigned": 0, "stalled": 0})
                counts["assigned"] += 1
                counts["stalled"] += int(state.stalled is not None)
    return devices, per_version


def current_figures(services: Services, name: str, *, channel: str | None, hours: float) -> list[dict[str, Any]]:
    """Per version and mode with reports in the last `hours` (one channel, or all): the quality figures."""
    since = datetime.now(timezone.utc) - timedelta(hours=hours)
    with services.db.read() as session:
        model_id = find_model(session, name).id
        return [q.to_dict() for q in quality.versions_quality(session, model_id, channel=channel, since=since)]


def chart_series(services: Services, name: str, *, channel: str | None, hours: float) -> dict[str, Any]:
    """The charts' data: hourly buckets (labels) and, per chart, one dataset per version and mode."""
    since = datetime.now(timezone.utc) - timedelta(hours=hours)
    with services.db.read() as session:
        model_id = find_model(session, name).id
        rows = quality.timeseries(session, model_id, channel=channel, since=since, bucket_s=3600)
    hours_ = [quality.window_start(since) + timedelta(hours=i) for i in range(int(hours) + 2)]  # type: ignore[operator]
    now = datetime.now(timezone.utc)
    buckets = sorted({iso(h) for h in hours_ if h <= now} | {str(r["at"]) for r in rows})  # type: ignore[misc]
    index = {at: i for i, at in enumerate(buckets)}
    charts: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in CHARTS}
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["version"]), str(row.get("mode") or "serving")), []).append(row)
    for (version, mode), items in sorted(groups.items()):
        label = f"v{version}" + (" shadow" if mode == "shadow" else "")
        for key, _, _ in CHARTS:
            fields = (("latency_p50_ms", " p50"), ("latency_p99_ms", " p99")) if key == "latency_ms" else ((key, ""),)
            for field, suffix in fields:
                data: list[float | None] = [None] * len(buckets)
                for item in items:
                    value = item.get(field)
                    data[index[str(item["at"])]] = None if value is None else float(value)
                if any(v is not None for v in data):
                    charts[key].append({"label": label + suffix, "version": version, "mode": mode, "data": data})
    return {"model": name, "channel": channel, "since": iso(since), "buckets": buckets, "charts": charts}
