"""The quality gates' figures from the moment a rollout (re)started: rollups for whole hours, raw reports
for the first one.

`quality.version_quality` reads the hourly rollups, so its window starts at the top of the hour `since`
falls in. A rollout resumed (or moved from shadow to canary) at 10:40 must be judged on the reports
since 10:40 only: the reports of 10:00-10:40, those that paused it, must not count again. So the first,
partial hour is summed in SQL from the raw reports received since `since` (kept for days by the
retention task, indexed by time), and the hours after it come from the rollups. Only the candidate's
distributions (confidence histogram, class counts, input sums: JSON columns) are read row by row, and
only for that first hour; the current version's gates need sums alone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, distinct, func, select
from sqlalchemy.orm import Session

from .models import Device, Telemetry

if TYPE_CHECKING:
    from .quality import VersionQuality


def window_quality(
    session: Session,
    model_id: int,
    version: int,
    *,
    mode: str,
    channel: str | None,
    since: datetime | None,
    distributions: bool = True,
) -> "VersionQuality":
    """`quality.version_quality` over the reports received from `since` exactly (not from its hour).

    With `distributions` False the partial hour adds counts and rates only (no class, histogram or
    input figures from it): enough for the gates that compare with the current version.
    """
    from . import quality
    from .telemetry import HOUR_S, hour_of

    if since is None or since.timestamp() == hour_of(since):
        return quality.version_quality(session, model_id, version, mode=mode, channel=channel, since=since)
    next_hour = datetime.fromtimestamp(hour_of(since) + HOUR_S, tz=timezone.utc)
    sums = quality._sums(session, model_id, version=version, mode=mode, channel=channel, since=next_hour).get(
        (version, mode)
    ) or quality._Sums(histogram={}, classes={}, input={})
    t = Telemetry
    where = [
        Device.model_id == model_id,
        t.version == version,
        t.mode == mode,
        t.received_at >= since,
        t.received_at < next_hour,
    ]
    if channel is not None:
        where.append(t.channel == channel)
    reported = t.low_confidence.is_not(None)
    timed = t.latency_p50_ms.is_not(None)
    row = session.execute(
        select(
            func.count(),
            func.sum(t.predictions),
            func.sum(t.fallbacks),
            func.sum(t.errors),
            func.sum(case((reported, t.low_confidence), else_=0)),
            func.sum(case((reported, t.predictions), else_=0)),
            func.sum(t.fallback_answers),
            func.sum(t.disagreements),
            func.sum(t.agreements),
            func.sum(case((timed, t.latency_p50_ms * t.predictions), else_=0.0)),
            func.sum(case((timed, t.predictions), else_=0)),
            func.sum(case((timed, t.latency_p50_ms), else_=0.0)),
            func.count(t.latency_p50_ms),
            func.max(t.latency_p99_ms),
            func.count(distinct(t.device_id)),
        )
        .select_from(t)
        .join(Device, Device.id == t.device_id)
        .where(*where)
    ).one()
    (reports, predictions, fallbacks, errors, low, low_predictions, answers, disagreements, agreements,
     p50_weighted, p50_weight, p50_sum, p50_reports, p99, devices) = row
    if not reports:
        return quality._quality(version, mode, channel, since, sums, quality._baseline(session, model_id, version))
    sums.reports += int(reports)
    sums.predictions += int(predictions or 0)
    sums.fallbacks += int(fallbacks or 0)
    sums.errors += int(errors or 0)
    sums.low_confidence += int(low or 0)
    sums.low_confidence_predictions += int(low_predictions or 0)
    sums.fallback_answers += int(answers or 0)
    sums.disagreements += int(disagreements or 0)
    sums.agreements += int(agreements or 0)
    sums.p50_weighted += float(p50_weighted or 0.0)
    sums.p50_weight += int(p50_weight or 0)
    sums.p50_sum += float(p50_sum or 0.0)
    sums.p50_reports += int(p50_reports or 0)
    if p99 is not None and (sums.p99_max is None or float(p99) > sums.p99_max):
        sums.p99_max = float(p99)
    sums.devices = max(sums.devices, int(devices or 0))  # the later hours' devices are mostly the same ones
    if distributions:
        rows = session.execute(
            select(t.confidence_histogram, t.class_counts, t.input_stats)
            .join(Device, Device.id == t.device_id)
            .where(*where)
        )
        for histogram, classes, stats in rows:
            _add_distributions(sums, histogram or (), classes or (), stats)
    return quality._quality(version, mode, channel, since, sums, quality._baseline(session, model_id, version))


def _add_distributions(sums: Any, histogram: Any, classes: Any, stats: dict[str, Any] | None) -> None:
    """Add one report's histogram, class counts and input sums to `quality._Sums` as the rollups would."""
    sums.histogram = sums.histogram if sums.histogram is not None else {}
    sums.classes = sums.classes if sums.classes is not None else {}
    sums.input = sums.input if sums.input is not None else {}
    sums.histogram_bins = max(sums.histogram_bins, len(histogram))
    sums.class_slots = max(sums.class_slots, len(classes))
    for index, count in enumerate(histogram):
        sums.histogram[index] = sums.histogram.get(index, 0) + int(count)
    for index, count in enumerate(classes):
        sums.classes[index] = sums.classes.get(index, 0) + int(count)
    if stats:
        sums.input_images += int(stats.get("images") or 0)
    if stats and stats.get("pixels"):
        for index, (total, squares) in enumerate(zip(stats["sum"], stats["sum_sq"])):
            pixels, s, q = sums.input.get(index, (0, 0.0, 0.0))
            sums.input[index] = (pixels + int(stats["pixels"]), s + float(total), q + float(squares))
