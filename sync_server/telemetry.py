"""Device telemetry: one raw row per report, rolled up per hour in the same transaction, summed in SQL.

A report may carry an idempotency key (the `Idempotency-Key` header): the agent's outbox resends a
report until it is acknowledged, so a report whose key this device already used is answered
`duplicate` and changes nothing (neither the raw rows nor the rollups).

Every stored report is added to the hourly rollups of its (model, version, mode, channel, hour) by
`INSERT ... ON CONFLICT DO UPDATE SET n = n + excluded.n` (SQLite and PostgreSQL dialect inserts):
atomic under concurrent reports on PostgreSQL, serialised by `BEGIN IMMEDIATE` on SQLite. The hour and
the channel are the server's at receipt. `summary` and `sync_server.quality` read only the rollups, so
they cost the same at a million reports as at a thousand; raw rows are deleted after
`--telemetry-retention-days` (`sync_server.retention`), rollups after `--rollup-retention-days`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import case, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database
from .devices import require_assigned, require_shadow_assigned
from .errors import BadRequestError
from .models import (
    Device,
    Telemetry,
    TelemetryDevice,
    TelemetryHourly,
    TelemetryHourlyClass,
    TelemetryHourlyConfidence,
    TelemetryHourlyDevice,
    TelemetryHourlyInput,
    utcnow,
)
from .registry import find_model, require_version

#: What an idempotency key may be: 1 to 64 visible ASCII characters (a UUID is fine).
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,64}$")
#: The rollups' resolution, in seconds.
HOUR_S = 3600
#: Rows per multi-row upsert (well under SQLite's 32,766 bound parameters).
_CHUNK = 500

_KEY_COLUMNS = ("model_id", "version", "mode", "channel", "hour")
#: The `TelemetryHourly` columns an upsert adds up.
SUMMED = (
    "reports", "predictions", "fallbacks", "errors", "low_confidence", "low_confidence_predictions",
    "fallback_answers", "disagreements", "agreements", "latency_p50_weighted", "latency_p50_weight",
    "latency_p50_sum", "latency_p50_reports", "input_images",
)


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


def record(
    db: Database,
    device_id: str,
    model: str,
    report: dict[str, Any],
    idempotency_key: str | None = None,
    *,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """Store one report and add it to the hourly rollups, once per (device, idempotency key).

    `fallback_rate` defaults to fallbacks / predictions. A shadow report (`mode: "shadow"`) counts only
    for the version the server assigned the device as its shadow (403 `not_assigned`). `received_at`
    (default now) is for tests and benchmarks that place reports in past hours.
    """
    key = check_idempotency_key(idempotency_key)
    try:
        with db.write() as session:
            model_row = find_model(session, model)
            require_version(session, model_row, report["version"])
            _require_reporting(session, device_id, model, report)
            if key is not None and _seen(session, device_id, key):
                return {"recorded": True, "duplicate": True}
            channel = session.scalar(select(Device.channel).where(Device.id == device_id)) or ""
            row = _row(device_id, report, key, channel, received_at or utcnow())
            session.add(row)
            session.flush()  # a duplicate key fails here, before any rollup is touched
            roll_up(session, db.dialect, Rollup.of(model_row.id, row))
    except IntegrityError:
        # Two copies of one report raced past the check; the unique index kept one and this transaction,
        # rollups included, was rolled back. Anything else re-raises.
        if key is None:
            raise
        with db.read() as session:
            if not _seen(session, device_id, key):
                raise
        return {"recorded": True, "duplicate": True}
    return {"recorded": True, "duplicate": False}


def _require_reporting(session: Session, device_id: str, model: str, report: dict[str, Any]) -> None:
    """403 `not_assigned` unless the device may report about this version in this mode."""
    if report.get("mode", "serving") == "shadow":
        require_shadow_assigned(session, device_id, model, report["version"])
    else:
        require_assigned(session, device_id, model, report["version"])


def _seen(session: Session, device_id: str, key: str) -> bool:
    found = session.scalar(
        select(Telemetry.id).where(Telemetry.device_id == device_id, Telemetry.idempotency_key == key).limit(1)
    )
    return found is not None


def _row(device_id: str, report: dict[str, Any], key: str | None, channel: str, received_at: datetime) -> Telemetry:
    predictions = report["predictions"]
    rate = report.get("fallback_rate")
    if rate is None and predictions:
        rate = report["fallbacks"] / predictions
    latency = report.get("latency_ms") or {}
    classes = report.get("class_counts")
    return Telemetry(
        device_id=device_id,
        version=report["version"],
        received_at=received_at,
        period_s=report["period_s"],
        predictions=predictions,
        fallbacks=report["fallbacks"],
        errors=report.get("errors", 0),
        fallback_rate=rate,
        latency_p50_ms=latency.get("p50"),
        latency_p99_ms=latency.get("p99"),
        confidence_histogram=list(report.get("confidence_histogram") or []),
        idempotency_key=key,
        mode=report.get("mode") or "serving",
        shadow_of=report.get("shadow_of"),
        channel=channel,
        low_confidence=report.get("low_confidence"),
        fallback_answers=report.get("fallback_answers") or 0,
        disagreements=report.get("disagreements") or 0,
        agreements=report.get("agreements") or 0,
        class_counts=list(classes) if classes is not None else None,
        input_stats=dict(report["input_stats"]) if report.get("input_stats") else None,
    )


# ----------------------------------------------------------------------------------------------------------
# Rollups
# ----------------------------------------------------------------------------------------------------------


def hour_of(moment: datetime) -> int:
    """The UTC epoch second that `moment`'s hour starts at (the rollups' `hour`)."""
    from .db import as_utc

    seconds = int(as_utc(moment).timestamp())  # type: ignore[union-attr]
    return seconds - seconds % HOUR_S


@dataclass(frozen=True)
class Rollup:
    """What one report adds to the rollups of its key."""

    model_id: int
    version: int
    mode: str
    channel: str
    hour: int
    device_id: str
    predictions: int
    fallbacks: int
    errors: int
    low_confidence: int | None
    fallback_answers: int
    disagreements: int
    agreements: int
    p50: float | None
    p99: float | None
    histogram: Sequence[int]
    class_counts: Sequence[int] | None
    input_stats: dict[str, Any] | None

    @classmethod
    def of(cls, model_id: int, row: Telemetry) -> "Rollup":
        return cls(
            model_id=model_id, version=row.version, mode=row.mode or "serving", channel=row.channel or "",
            hour=hour_of(row.received_at), device_id=row.device_id, predictions=int(row.predictions),
            fallbacks=int(row.fallbacks), errors=int(row.errors or 0),
            low_confidence=None if row.low_confidence is None else int(row.low_confidence),
            fallback_answers=int(row.fallback_answers or 0), disagreements=int(row.disagreements or 0),
            agreements=int(row.agreements or 0), p50=row.latency_p50_ms, p99=row.latency_p99_ms,
            histogram=list(row.confidence_histogram or []), class_counts=row.class_counts, input_stats=row.input_stats,
        )

    @property
    def key(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "version": self.version, "mode": self.mode, "channel": self.channel, "hour": self.hour}

    def hourly_values(self) -> dict[str, Any]:
        p50, images = self.p50, int((self.input_stats or {}).get("images") or 0)
        return {
            **self.key,
            "reports": 1,
            "predictions": self.predictions,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "low_confidence": self.low_confidence or 0,
            "low_confidence_predictions": self.predictions if self.low_confidence is not None else 0,
            "fallback_answers": self.fallback_answers,
            "disagreements": self.disagreements,
            "agreements": self.agreements,
            "latency_p50_weighted": p50 * self.predictions if p50 is not None else 0.0,
            "latency_p50_weight": self.predictions if p50 is not None else 0,
            "latency_p50_sum": p50 if p50 is not None else 0.0,
            "latency_p50_reports": 1 if p50 is not None else 0,
            "latency_p99_max": self.p99,
            "histogram_bins": len(self.histogram),
            "class_slots": len(self.class_counts or ()),
            "input_images": images,
        }


def _insert(dialect: str):  # type: ignore[no-untyped-def]
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _larger(current, new):  # type: ignore[no-untyped-def]
    """SQL for the larger of a column and its excluded value (NULL on either side: the other)."""
    return case((current.is_(None), new), (new > current, new), else_=current)


def roll_up(executor: Any, dialect: str, item: Rollup) -> None:
    """Add `item` to the rollups (inside the caller's transaction; `executor`: a Session or Connection).

    Tables are always touched in one order (the hourly row first, then its children by index), so
    concurrent transactions on PostgreSQL queue on the hourly row instead of deadlocking. The upserts
    are built once per dialect and run with parameters (compiled once, cached; children as executemany).
    """
    upserts = _upserts(dialect)
    key = item.key
    executor.execute(upserts["hourly"], item.hourly_values())
    for name, index_name, counts in (("confidence", "bin", item.histogram), ("classes", "class_index", item.class_counts or ())):
        rows = [{**key, index_name: i, "n": int(n)} for i, n in enumerate(counts) if n]
        for start in range(0, len(rows), _CHUNK):
            executor.execute(upserts[name], rows[start:start + _CHUNK])
    stats = item.input_stats
    if stats and stats.get("pixels"):
        rows = [
            {**key, "channel_index": i, "pixels": int(stats["pixels"]), "pixel_sum": float(s), "pixel_sum_sq": float(q)}
            for i, (s, q) in enumerate(zip(stats["sum"], stats["sum_sq"]))
        ]
        if rows:
            executor.execute(upserts["input"], rows)
    executor.execute(upserts["hourly_device"], {**key, "device_id": item.device_id})
    executor.execute(upserts["device"], {
        "model_id": item.model_id, "version": item.version, "mode": item.mode, "channel": item.channel,
        "device_id": item.device_id, "first_hour": item.hour, "last_hour": item.hour,
    })


_UPSERTS: dict[str, dict[str, Any]] = {}


def _upserts(dialect: str) -> dict[str, Any]:
    """The rollups' INSERT ... ON CONFLICT statements for `dialect` (built once)."""
    if dialect in _UPSERTS:
        return _UPSERTS[dialect]
    insert = _insert(dialect)
    out: dict[str, Any] = {}
    hourly = TelemetryHourly.__table__
    stmt = insert(hourly)
    ex = stmt.excluded
    updates: dict[str, Any] = {name: hourly.c[name] + ex[name] for name in SUMMED}
    updates["latency_p99_max"] = _larger(hourly.c.latency_p99_max, ex.latency_p99_max)
    updates["histogram_bins"] = _larger(hourly.c.histogram_bins, ex.histogram_bins)
    updates["class_slots"] = _larger(hourly.c.class_slots, ex.class_slots)
    out["hourly"] = stmt.on_conflict_do_update(index_elements=list(_KEY_COLUMNS), set_=updates)
    for name, table, index_name in (("confidence", TelemetryHourlyConfidence.__table__, "bin"),
                                    ("classes", TelemetryHourlyClass.__table__, "class_index")):
        stmt = insert(table)
        out[name] = stmt.on_conflict_do_update(index_elements=[*_KEY_COLUMNS, index_name], set_={"n": table.c.n + stmt.excluded.n})
    table = TelemetryHourlyInput.__table__
    stmt = insert(table)
    out["input"] = stmt.on_conflict_do_update(
        index_elements=[*_KEY_COLUMNS, "channel_index"],
        set_={name: table.c[name] + stmt.excluded[name] for name in ("pixels", "pixel_sum", "pixel_sum_sq")},
    )
    out["hourly_device"] = insert(TelemetryHourlyDevice.__table__).on_conflict_do_nothing(
        index_elements=[*_KEY_COLUMNS, "device_id"])
    devices = TelemetryDevice.__table__
    stmt = insert(devices)
    out["device"] = stmt.on_conflict_do_update(
        index_elements=["model_id", "version", "mode", "channel", "device_id"],
        set_={
            "last_hour": _larger(devices.c.last_hour, stmt.excluded.last_hour),
            "first_hour": case((stmt.excluded.first_hour < devices.c.first_hour, stmt.excluded.first_hour),
                               else_=devices.c.first_hour),
        },
    )
    _UPSERTS[dialect] = out
    return out


def roll_up_existing(executor: Any, dialect: str) -> int:
    """Roll up every raw row (migration 0006: reports stored before the rollups existed; their channel is
    the device's channel now). Reads only columns that exist at that revision. Returns the rows rolled up."""
    t, d = Telemetry.__table__, Device.__table__
    query = select(
        t.c.device_id, t.c.version, t.c.received_at, t.c.predictions, t.c.fallbacks, t.c.errors,
        t.c.latency_p50_ms, t.c.latency_p99_ms, t.c.confidence_histogram, d.c.model_id, d.c.channel,
    ).join(d, d.c.id == t.c.device_id).order_by(t.c.id)
    executor.execute(t.update().where(t.c.channel.is_(None)).values(
        channel=select(d.c.channel).where(d.c.id == t.c.device_id).scalar_subquery()
    ))
    count = 0
    for row in executor.execute(query).all():
        roll_up(executor, dialect, Rollup(
            model_id=row.model_id, version=row.version, mode="serving", channel=row.channel or "",
            hour=hour_of(row.received_at), device_id=row.device_id, predictions=int(row.predictions),
            fallbacks=int(row.fallbacks), errors=int(row.errors or 0), low_confidence=None, fallback_answers=0,
            disagreements=0, agreements=0, p50=row.latency_p50_ms, p99=row.latency_p99_ms,
            histogram=list(row.confidence_histogram or []), class_counts=None, input_stats=None,
        ))
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------


def summary(db: Database, model: str, version: int | None = None) -> dict[str, Any]:
    """Per version, over every retained hour and channel (read from the rollups, in SQL): reports,
    devices, predictions, fallbacks, errors, fallback rate, summed histogram, p50 latency averaged by
    predictions and the worst p99; plus the drift and quality figures (`sync_server.quality`).

    `versions` holds what devices served; `shadow` the same figures of shadow reports (candidates run
    beside the serving version).
    """
    from .quality import summarise

    with db.read() as session:
        model_row = find_model(session, model)
        entries = summarise(session, model_row.id, version=version)
    return {
        "model": model,
        "versions": [e for e in entries if e["mode"] == "serving"],
        "shadow": [e for e in entries if e["mode"] == "shadow"],
    }
