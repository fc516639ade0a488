"""Telemetry retention: raw reports and hourly rollups older than their retention are deleted in batches.

Raw rows (`telemetry`) go after `--telemetry-retention-days` (default 14): the figures live on in the
rollups, which go after `--rollup-retention-days` (default 400). Each batch is its own short
transaction (at most `batch_rows` raw rows, or the rollup rows of the oldest hours up to about that
many), so a first purge of a big backlog never holds a long write lock. `run` is the background
task (`Services.start`, supervised: a failure is logged and the loop starts again).

A report resent after its raw row expired is no longer recognised by its idempotency key: agents'
outboxes give up long before 14 days.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select

from .config import RetentionOptions
from .db import Database
from .models import (
    Telemetry,
    TelemetryDevice,
    TelemetryHourly,
    TelemetryHourlyClass,
    TelemetryHourlyConfidence,
    TelemetryHourlyDevice,
    TelemetryHourlyInput,
)
from .tasks import every, supervised
from .telemetry import hour_of

log = logging.getLogger("sync_server.retention")

#: Rollup tables and the column their age is read from (children before their hourly row).
_ROLLUPS = (
    (TelemetryHourlyConfidence, "hour"),
    (TelemetryHourlyClass, "hour"),
    (TelemetryHourlyInput, "hour"),
    (TelemetryHourlyDevice, "hour"),
    (TelemetryHourly, "hour"),
    (TelemetryDevice, "last_hour"),
)
#: The first purge after start waits this long (at most the interval), so starting is not slowed.
FIRST_PURGE_S = 60.0


@dataclass(frozen=True)
class PurgeResult:
    """What one purge deleted."""

    telemetry_rows: int
    rollup_rows: int
    batches: int


def purge(db: Database, options: RetentionOptions, *, now: datetime | None = None) -> PurgeResult:
    """Delete raw telemetry older than `options.telemetry_days` and rollups older than
    `options.rollup_days` (whole hours: an hour goes once all of it is older), in bounded batches."""
    now = now or datetime.now(timezone.utc)
    batch = max(1, int(options.batch_rows))
    raw_cut = now - timedelta(days=options.telemetry_days)
    rollup_cut = hour_of(now - timedelta(days=options.rollup_days))
    raw = rollups = batches = 0
    while True:
        with db.read() as session:
            ids = list(session.scalars(
                select(Telemetry.id).where(Telemetry.received_at < raw_cut).order_by(Telemetry.id).limit(batch)
            ))
        if not ids:
            break
        with db.write() as session:
            raw += session.execute(delete(Telemetry).where(Telemetry.id.in_(ids))).rowcount or 0  # type: ignore[attr-defined]
        batches += 1
    for model, column_name in _ROLLUPS:
        column = getattr(model, column_name)
        while True:
            with db.read() as session:
                hours = list(session.scalars(select(column).where(column < rollup_cut).order_by(column).limit(batch)))
            if not hours:
                break
            with db.write() as session:
                rollups += session.execute(delete(model).where(column <= hours[-1])).rowcount or 0  # type: ignore[attr-defined]
            batches += 1
    if raw or rollups:
        log.info("expired telemetry deleted", extra={"telemetry_rows": raw, "rollup_rows": rollups, "batches": batches})
    return PurgeResult(raw, rollups, batches)


async def run(db: Database, options: RetentionOptions, executor: concurrent.futures.Executor) -> None:
    """Purge every `options.interval_s` seconds (in `executor`), supervised: a failure is logged and the
    loop restarts (after a minute at most). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    first_s = min(FIRST_PURGE_S, options.interval_s)

    async def step() -> None:
        await loop.run_in_executor(executor, purge, db, options)

    await supervised("telemetry-retention", lambda: every(options.interval_s, step, first_s=first_s),
                     restart_s=min(FIRST_PURGE_S, options.interval_s), log=log)
