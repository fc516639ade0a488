"""The quality gates' figures over an exact window: hourly rollups for the whole hours, raw reports for the first.

`quality.version_quality` reads the hourly rollups, so its window starts at the top of the hour `since`
falls in. A rollout that was resumed (or moved from shadow to canary) at 10:40 must be judged on the
reports since 10:40 only: the reports of 10:00-10:40 (those that paused it) must not count again. So
the first, partial hour comes from the raw reports received since `since` (at most one hour of them,
kept for days by the retention task) and the hours after it from the rollups, added up the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Device, Telemetry

if TYPE_CHECKING:
    from .quality import VersionQuality


def window_quality(
    session: Session, model_id: int, version: int, *, mode: str, channel: str | None, since: datetime | None
) -> "VersionQuality":
    """`quality.version_quality` over the reports received from `since` exactly (not from its hour)."""
    from . import quality
    from .telemetry import HOUR_S, Rollup, hour_of

    if since is None or since.timestamp() == hour_of(since):
        return quality.version_quality(session, model_id, version, mode=mode, channel=channel, since=since)
    next_hour = datetime.fromtimestamp(hour_of(since) + HOUR_S, tz=timezone.utc)
    sums = quality._sums(session, model_id, version=version, mode=mode, channel=channel, since=next_hour).get(
        (version, mode)
    ) or quality._Sums(histogram={}, classes={}, input={})
    query = (
        select(Telemetry)
        .join(Device, Device.id == Telemetry.device_id)
        .where(
            Device.model_id == model_id,
            Telemetry.version == version,
            Telemetry.mode == mode,
            Telemetry.received_at >= since,
            Telemetry.received_at < next_hour,
        )
    )
    if channel is not None:
        query = query.where(Telemetry.channel == channel)
    devices: set[str] = set()
    for row in session.scalars(query):
        _add(sums, Rollup.of(model_id, row))
        devices.add(row.device_id)
    sums.devices = max(sums.devices, len(devices))  # devices of the later hours are mostly the same ones
    return quality._quality(version, mode, channel, since, sums, quality._baseline(session, model_id, version))


def _add(sums, item) -> None:  # type: ignore[no-untyped-def]
    """Add one report (a `telemetry.Rollup`) to `quality._Sums` as the rollup upsert would."""
    values = item.hourly_values()
    for name, field in (
        ("reports", "reports"), ("predictions", "predictions"), ("fallbacks", "fallbacks"), ("errors", "errors"),
        ("low_confidence", "low_confidence"), ("low_confidence_predictions", "low_confidence_predictions"),
        ("fallback_answers", "fallback_answers"), ("disagreements", "disagreements"), ("agreements", "agreements"),
        ("latency_p50_weighted", "p50_weighted"), ("latency_p50_weight", "p50_weight"),
        ("latency_p50_sum", "p50_sum"), ("latency_p50_reports", "p50_reports"), ("input_images", "input_images"),
    ):
        setattr(sums, field, getattr(sums, field) + values[name])
    p99 = values["latency_p99_max"]
    if p99 is not None and (sums.p99_max is None or p99 > sums.p99_max):
        sums.p99_max = float(p99)
    sums.histogram_bins = max(sums.histogram_bins, values["histogram_bins"])
    sums.class_slots = max(sums.class_slots, values["class_slots"])
    histogram = sums.histogram if sums.histogram is not None else {}
    for index, count in enumerate(item.histogram):
        histogram[index] = histogram.get(index, 0) + int(count)
    sums.histogram = histogram
    classes = sums.classes if sums.classes is not None else {}
    for index, count in enumerate(item.class_counts or ()):
        classes[index] = classes.get(index, 0) + int(count)
    sums.classes = classes
    stats = item.input_stats
    inputs = sums.input if sums.input is not None else {}
    if stats and stats.get("pixels"):
        for index, (total, squares) in enumerate(zip(stats["sum"], stats["sum_sq"])):
            pixels, s, q = inputs.get(index, (0, 0.0, 0.0))
            inputs[index] = (pixels + int(stats["pixels"]), s + float(total), q + float(squares))
    sums.input = inputs
