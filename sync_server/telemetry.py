"""Device telemetry: periodic counts, confidence histogram, fallback rate and latency, summed per version.

A report may carry an idempotency key (the `Idempotency-Key` header): the agent's outbox resends a
report until it is acknowledged, so a report whose key this device already used is answered
`duplicate` and not stored again.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database
from .devices import require_assigned
from .errors import BadRequestError
from .models import Device, Telemetry
from .registry import find_model, require_version

#: What an idempotency key may be: 1 to 64 visible ASCII characters (a UUID is fine).
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,64}$")


def check_idempotency_key(key: str | None) -> str | None:
    """`key` if it is usable as an idempotency key (None stays None); BadRequestError otherwise."""
    if key is None or KEY_PATTERN.match(key):
        return key
    if len(key) > 64:
        problem = f"is {len(key)} characters long"
    elif not key:
        problem = "is empty"
    else:
        problem = "has a space, control or non-ASCII character"
    raise BadRequestError(
        f"the Idempotency-Key header must be 1 to 64 visible ASCII characters (a UUID is fine); this one {problem}",
        code="bad_idempotency_key",
    )


def record(db: Database, device_id: str, model: str, report: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
    """Store one report, once per (device, idempotency key); `fallback_rate` defaults to fallbacks / predictions."""
    key = check_idempotency_key(idempotency_key)
    try:
        with db.write() as session:
            require_version(session, find_model(session, model), report["version"])
            require_assigned(session, device_id, model, report["version"])  # 403: never assigned to it
            if key is not None and _seen(session, device_id, key):
                return {"recorded": True, "duplicate": True}
            session.add(_row(device_id, report, key))
    except IntegrityError:
        # Two copies of one report raced past the check; the unique index kept one. Anything else re-raises.
        if key is None:
            raise
        with db.read() as session:
            if not _seen(session, device_id, key):
                raise
        return {"recorded": True, "duplicate": True}
    return {"recorded": True, "duplicate": False}


def _seen(session: Session, device_id: str, key: str) -> bool:
    found = session.scalar(
        select(Telemetry.id).where(Telemetry.device_id == device_id, Telemetry.idempotency_key == key).limit(1)
    )
    return found is not None


def _row(device_id: str, report: dict[str, Any], key: str | None) -> Telemetry:
    predictions = report["predictions"]
    rate = report.get("fallback_rate")
    if rate is None and predictions:
        rate = report["fallbacks"] / predictions
    latency = report.get("latency_ms") or {}
    return Telemetry(
        device_id=device_id,
        version=report["version"],
        period_s=report["period_s"],
        predictions=predictions,
        fallbacks=report["fallbacks"],
        errors=report.get("errors", 0),
        fallback_rate=rate,
        latency_p50_ms=latency.get("p50"),
        latency_p99_ms=latency.get("p99"),
        confidence_histogram=list(report.get("confidence_histogram") or []),
        idempotency_key=key,
    )


def summary(db: Database, model: str, version: int | None = None) -> dict[str, Any]:
    """Per version: reports, devices, predictions, fallbacks, errors, fallback rate, summed histogram,
    p50 latency averaged by predictions and the worst p99."""
    with db.read() as session:
        model_row = find_model(session, model)
        query = select(Telemetry).join(Device, Device.id == Telemetry.device_id).where(Device.model_id == model_row.id)
        if version is not None:
            query = query.where(Telemetry.version == version)
        rows = [
            (r.version, r.device_id, r.predictions, r.fallbacks, r.errors, r.confidence_histogram, r.latency_p50_ms, r.latency_p99_ms)
            for r in session.scalars(query)
        ]
    per_version: dict[int, dict[str, Any]] = {}
    for version_, device_id, predictions, fallbacks, errors, confidences, p50, p99 in rows:
        item = per_version.setdefault(
            version_,
            {"reports": 0, "devices": set(), "predictions": 0, "fallbacks": 0, "errors": 0, "histogram": [], "p50": [], "p99": []},
        )
        item["reports"] += 1
        item["devices"].add(device_id)
        item["predictions"] += predictions
        item["fallbacks"] += fallbacks
        item["errors"] += errors
        histogram = item["histogram"]
        for i, count in enumerate(confidences or []):
            if i >= len(histogram):
                histogram.append(0)
            histogram[i] += int(count)
        if p50 is not None:
            item["p50"].append((p50, predictions))
        if p99 is not None:
            item["p99"].append(p99)
    versions = []
    for number in sorted(per_version):
        item = per_version[number]
        weight = sum(w for _, w in item["p50"]) or 1
        versions.append(
            {
                "version": number,
                "reports": item["reports"],
                "devices": len(item["devices"]),
                "predictions": item["predictions"],
                "fallbacks": item["fallbacks"],
                "errors": item["errors"],
                "fallback_rate": item["fallbacks"] / item["predictions"] if item["predictions"] else None,
                "confidence_histogram": item["histogram"],
                "latency_ms": {
                    "p50_mean": sum(v * w for v, w in item["p50"]) / weight if item["p50"] else None,
                    "p99_max": max(item["p99"]) if item["p99"] else None,
                },
            }
        )
    return {"model": model, "versions": versions}
