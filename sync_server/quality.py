"""Quality figures per version, mode and channel, computed in SQL from the hourly telemetry rollups.

    version_quality(session, model_id, version, mode=, channel=, since=)   one VersionQuality
    timeseries(session, model_id, channel=, since=, bucket_s=)             the figures per version, mode, bucket
    drift_gauges(db)                                                        Prometheus gauges (scrape time, cached)

Windows have hourly resolution: the rollups sum reports per hour of receipt, so `since` is rounded down
to the start of its hour and a window holds every report received from then on (up to an hour more
than asked). Drift (`class_jsd`, `confidence_jsd`, `input_shift`, see `sync_server.drift`) compares
with the version's bundle baseline (`model_versions.baseline`); versions published without one have
None there.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from . import drift
from .db import Database, iso
from .models import (
    Model,
    ModelVersion,
    TelemetryDevice,
    TelemetryHourly,
    TelemetryHourlyClass,
    TelemetryHourlyConfidence,
    TelemetryHourlyDevice,
    TelemetryHourlyInput,
)
from .telemetry import HOUR_S, hour_of

MODES = ("serving", "shadow")
#: The window of the Prometheus gauges (the quality gates' default window).
DEFAULT_WINDOW_S = 3600.0
#: How long a scrape's figures are reused.
GAUGE_CACHE_S = 5.0


@dataclass(frozen=True)
class VersionQuality:
    """What the devices reported about one version in one mode (and channel) since a time."""

    version: int
    mode: str  # "serving" | "shadow"
    channel: str | None
    since: datetime | None
    reports: int
    devices: int
    predictions: int
    fallback_rate: float | None
    low_confidence_rate: float | None
    fallback_answers: int
    disagreement_rate: float | None  # disagreements / fallback_answers
    shadow_agreement: float | None  # agreements / predictions (mode shadow)
    class_jsd: float | None  # vs the bundle baseline (None: no baseline or no class counts)
    confidence_jsd: float | None
    input_shift: float | None
    latency_p50_ms: float | None  # prediction-weighted mean of reported p50
    latency_p99_ms: float | None  # worst reported p99

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = iso(self.since)
        return out


# ----------------------------------------------------------------------------------------------------------
# Sums from the rollups
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """The rollups of one group (version, mode[, bucket]) added up."""

    reports: int = 0
    predictions: int = 0
    fallbacks: int = 0
    errors: int = 0
    low_confidence: int = 0
    low_confidence_predictions: int = 0
    fallback_answers: int = 0
    disagreements: int = 0
    agreements: int = 0
    p50_weighted: float = 0.0
    p50_weight: int = 0
    p50_sum: float = 0.0
    p50_reports: int = 0
    p99_max: float | None = None
    histogram_bins: int = 0
    class_slots: int = 0
    input_images: int = 0
    devices: int = 0
    histogram: dict[int, int] | None = None
    classes: dict[int, int] | None = None
    input: dict[int, tuple[int, float, float]] | None = None  # channel index -> (pixels, sum, sum_sq)

    def histogram_list(self) -> list[int]:
        bins = self.histogram or {}
        length = max([self.histogram_bins, *(i + 1 for i in bins)])
        return [int(bins.get(i, 0)) for i in range(length)]

    def class_list(self) -> list[int]:
        classes = self.classes or {}
        length = max([self.class_slots, *(i + 1 for i in classes)])
        return [int(classes.get(i, 0)) for i in range(length)]

    @property
    def p50_mean(self) -> float | None:
        if self.p50_weight:
            return self.p50_weighted / self.p50_weight
        return self.p50_sum / self.p50_reports if self.p50_reports else None


def _filtered(query, table, model_id: int, version: int | None, mode: str | None, channel: str | None,
              since_hour: int | None, hour_column: str = "hour"):  # type: ignore[no-untyped-def]
    query = query.where(table.c.model_id == model_id)
    if version is not None:
        query = query.where(table.c.version == version)
    if mode is not None:
        query = query.where(table.c.mode == mode)
    if channel is not None:
        query = query.where(table.c.channel == channel)
    if since_hour is not None:
        query = query.where(table.c[hour_column] >= since_hour)
    return query


def _sums(
    session: Session,
    model_id: int,
    *,
    version: int | None = None,
    mode: str | None = None,
    channel: str | None = None,
    since: datetime | None = None,
    bucket_s: int | None = None,
) -> dict[tuple, _Sums]:
    """The rollups added up per (version, mode) or, with `bucket_s`, per (version, mode, bucket start)."""
    since_hour = hour_of(since) if since is not None else None

    def groups(table) -> list:  # type: ignore[no-untyped-def]
        columns = [table.c.version, table.c.mode]
        if bucket_s is not None:
            columns.append((table.c.hour - table.c.hour % bucket_s).label("bucket"))
        return columns

    def run(table, *extra, index=None):  # type: ignore[no-untyped-def]
        keys = groups(table)
        by = keys + ([table.c[index]] if index else [])
        query = _filtered(select(*by, *extra), table, model_id, version, mode, channel, since_hour)
        return session.execute(query.group_by(*by)).all(), len(keys)

    out: dict[tuple, _Sums] = {}
    h = TelemetryHourly.__table__
    rows, width = run(
        h,
        *(func.sum(h.c[name]) for name in (
            "reports", "predictions", "fallbacks", "errors", "low_confidence", "low_confidence_predictions",
            "fallback_answers", "disagreements", "agreements", "latency_p50_weighted", "latency_p50_weight",
            "latency_p50_sum", "latency_p50_reports", "input_images")),
        func.max(h.c.latency_p99_max), func.max(h.c.histogram_bins), func.max(h.c.class_slots),
    )
    for row in rows:
        key = tuple(int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in row[:width])
        (reports, predictions, fallbacks, errors, low, low_pred, answers, disagree, agree, p50w, p50n, p50s, p50r,
         images, p99, bins, slots) = row[width:]
        out[key] = _Sums(
            reports=int(reports or 0), predictions=int(predictions or 0), fallbacks=int(fallbacks or 0),
            errors=int(errors or 0), low_confidence=int(low or 0), low_confidence_predictions=int(low_pred or 0),
            fallback_answers=int(answers or 0), disagreements=int(disagree or 0), agreements=int(agree or 0),
            p50_weighted=float(p50w or 0), p50_weight=int(p50n or 0), p50_sum=float(p50s or 0), p50_reports=int(p50r or 0),
            input_images=int(images or 0), p99_max=None if p99 is None else float(p99), histogram_bins=int(bins or 0),
            class_slots=int(slots or 0), histogram={}, classes={}, input={},
        )
    if not out:
        return out

    def keyed(row, width_):  # type: ignore[no-untyped-def]
        return tuple(int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in row[:width_])

    c = TelemetryHourlyConfidence.__table__
    rows, width = run(c, func.sum(c.c.n), index="bin")
    for row in rows:
        if (item := out.get(keyed(row, width))) is not None:
            item.histogram[int(row[width])] = int(row[width + 1])  # type: ignore[index]
    k = TelemetryHourlyClass.__table__
    rows, width = run(k, func.sum(k.c.n), index="class_index")
    for row in rows:
        if (item := out.get(keyed(row, width))) is not None:
            item.classes[int(row[width])] = int(row[width + 1])  # type: ignore[index]
    i = TelemetryHourlyInput.__table__
    rows, width = run(i, func.sum(i.c.pixels), func.sum(i.c.pixel_sum), func.sum(i.c.pixel_sum_sq), index="channel_index")
    for row in rows:
        if (item := out.get(keyed(row, width))) is not None:
            item.input[int(row[width])] = (int(row[width + 1]), float(row[width + 2]), float(row[width + 3]))  # type: ignore[index]

    if bucket_s is None:
        # Devices since `since`: those whose latest reported hour is in the window (no hour scan).
        d = TelemetryDevice.__table__
        query = _filtered(select(d.c.version, d.c.mode, func.count(distinct(d.c.device_id))), d, model_id, version, mode,
                          channel, since_hour, hour_column="last_hour")
        rows = session.execute(query.group_by(d.c.version, d.c.mode)).all()
    else:
        d = TelemetryHourlyDevice.__table__
        bucket = (d.c.hour - d.c.hour % bucket_s).label("bucket")
        query = _filtered(select(d.c.version, d.c.mode, bucket, func.count(distinct(d.c.device_id))), d, model_id,
                          version, mode, channel, since_hour)
        rows = session.execute(query.group_by(d.c.version, d.c.mode, bucket)).all()
    for row in rows:
        if (item := out.get(keyed(row, len(row) - 1))) is not None:
            item.devices = int(row[-1])
    return out


def _baselines(session: Session, model_id: int) -> dict[int, dict[str, Any] | None]:
    rows = session.execute(select(ModelVersion.version, ModelVersion.baseline).where(ModelVersion.model_id == model_id))
    return {int(v): b for v, b in rows}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _quality(version: int, mode: str, channel: str | None, since: datetime | None, sums: _Sums,
             baseline: dict[str, Any] | None) -> VersionQuality:
    classes, histogram = sums.class_list(), sums.histogram_list()
    class_jsd = confidence_jsd = shift = None
    if baseline:
        if any(classes) and baseline.get("class_counts"):
            class_jsd = drift.jensen_shannon(classes, baseline["class_counts"])
        if any(histogram) and baseline.get("confidence_histogram"):
            confidence_jsd = drift.confidence_jsd(histogram, baseline["confidence_histogram"])
        if sums.input:
            channels = [sums.input[i] for i in sorted(sums.input)]
            shift = drift.input_shift([p for p, _, _ in channels], [s for _, s, _ in channels], sums.input_images,
                                      baseline.get("input"))
    return VersionQuality(
        version=version,
        mode=mode,
        channel=channel,
        since=since,
        reports=sums.reports,
        devices=sums.devices,
        predictions=sums.predictions,
        fallback_rate=_ratio(sums.fallbacks, sums.predictions),
        low_confidence_rate=_ratio(sums.low_confidence, sums.low_confidence_predictions),
        fallback_answers=sums.fallback_answers,
        disagreement_rate=_ratio(sums.disagreements, sums.fallback_answers),
        shadow_agreement=_ratio(sums.agreements, sums.predictions) if mode == "shadow" else None,
        class_jsd=class_jsd,
        confidence_jsd=confidence_jsd,
        input_shift=shift,
        latency_p50_ms=sums.p50_mean,
        latency_p99_ms=sums.p99_max,
    )


def _baseline(session: Session, model_id: int, version: int) -> dict[str, Any] | None:
    return session.scalar(select(ModelVersion.baseline).where(ModelVersion.model_id == model_id, ModelVersion.version == version))


# ----------------------------------------------------------------------------------------------------------
# The public figures
# ----------------------------------------------------------------------------------------------------------


def window_start(since: datetime | None) -> datetime | None:
    """The start of the hour `since` falls in: where a window over the hourly rollups really begins."""
    if since is None:
        return None
    return datetime.fromtimestamp(hour_of(since), tz=timezone.utc)


def version_quality(
    session: Session,
    model_id: int,
    version: int,
    *,
    mode: str = "serving",
    channel: str | None = None,
    since: datetime | None = None,
) -> VersionQuality:
    """The figures of `version` in `mode` (one channel, or all), over the hours from `since` (rounded down
    to its hour; None: every retained hour). No reports: zero counts and None rates."""
    sums = _sums(session, model_id, version=version, mode=mode, channel=channel, since=since).get((version, mode), _Sums())
    return _quality(version, mode, channel, window_start(since), sums, _baseline(session, model_id, version))


def versions_quality(
    session: Session,
    model_id: int,
    *,
    channel: str | None = None,
    since: datetime | None = None,
    mode: str | None = None,
) -> list[VersionQuality]:
    """`version_quality` of every (version, mode) with reports in the window, in two SQL round trips per table."""
    baselines = _baselines(session, model_id)
    sums = _sums(session, model_id, mode=mode, channel=channel, since=since)
    start = window_start(since)
    return [_quality(v, m, channel, start, s, baselines.get(v)) for (v, m), s in sorted(sums.items())]


def timeseries(
    session: Session,
    model_id: int,
    *,
    channel: str | None = None,
    since: datetime | None = None,
    bucket_s: int = HOUR_S,
) -> list[dict[str, Any]]:
    """The figures per (version, mode, bucket), oldest first: `VersionQuality.to_dict()` plus "at" (the
    bucket's start, ISO). `bucket_s` is rounded up to whole hours (the rollups' resolution); buckets are
    aligned to the UTC epoch (a day bucket starts at 00:00 UTC)."""
    bucket = max(HOUR_S, -(-int(bucket_s) // HOUR_S) * HOUR_S)
    baselines = _baselines(session, model_id)
    sums = _sums(session, model_id, channel=channel, since=since, bucket_s=bucket)
    series = []
    for (v, m, start), s in sorted(sums.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        item = _quality(v, m, channel, window_start(since), s, baselines.get(v)).to_dict()
        item["at"] = iso(datetime.fromtimestamp(start, tz=timezone.utc))
        series.append(item)
    return series


def summarise(session: Session, model_id: int, *, version: int | None = None) -> list[dict[str, Any]]:
    """Every (version, mode) over all retained hours and channels: the telemetry summary's entries
    (`telemetry.summary`), its old fields first, then the quality figures, class counts and input means."""
    baselines = _baselines(session, model_id)
    entries = []
    for (v, m), s in sorted(_sums(session, model_id, version=version).items()):
        quality = _quality(v, m, None, None, s, baselines.get(v))
        channels = [s.input[i] for i in sorted(s.input or {})]
        entries.append({
            "version": v,
            "mode": m,
            "reports": s.reports,
            "devices": s.devices,
            "predictions": s.predictions,
            "fallbacks": s.fallbacks,
            "errors": s.errors,
            "fallback_rate": quality.fallback_rate,
            "confidence_histogram": s.histogram_list(),
            "latency_ms": {"p50_mean": s.p50_mean, "p99_max": s.p99_max},
            "low_confidence": s.low_confidence,
            "low_confidence_rate": quality.low_confidence_rate,
            "fallback_answers": s.fallback_answers,
            "disagreements": s.disagreements,
            "disagreement_rate": quality.disagreement_rate,
            "agreements": s.agreements,
            "shadow_agreement": quality.shadow_agreement,
            "class_counts": s.class_list(),
            "class_jsd": quality.class_jsd,
            "confidence_jsd": quality.confidence_jsd,
            "input": {
                "images": s.input_images,
                "mean": [total / pixels for pixels, total, _ in channels if pixels],
            },
            "input_shift": quality.input_shift,
            "has_baseline": baselines.get(v) is not None,
        })
    return entries


# ----------------------------------------------------------------------------------------------------------
# Prometheus
# ----------------------------------------------------------------------------------------------------------

#: gauge name -> (help, VersionQuality field)
GAUGES: dict[str, tuple[str, str]] = {
    "sync_server_quality_fallback_rate": ("Share of predictions sent to the server's full model", "fallback_rate"),
    "sync_server_quality_low_confidence_rate": ("Share of predictions under the device's confidence threshold", "low_confidence_rate"),
    "sync_server_quality_disagreement_rate": ("Share of server-answered fallbacks whose top-1 label differed from the edge's", "disagreement_rate"),
    "sync_server_quality_shadow_agreement": ("Share of shadow samples whose top-1 label matched the serving version's", "shadow_agreement"),
    "sync_server_quality_class_jsd": ("Jensen-Shannon divergence (base 2) of predicted classes from the bundle baseline", "class_jsd"),
    "sync_server_quality_confidence_jsd": ("Jensen-Shannon divergence (base 2) of the confidence histogram from the bundle baseline", "confidence_jsd"),
    "sync_server_quality_input_shift": ("Largest per-channel shift of the mean input pixel from the baseline, in baseline stds", "input_shift"),
    "sync_server_quality_devices": ("Devices that reported", "devices"),
    "sync_server_quality_predictions": ("Predictions reported", "predictions"),
}


def quality_figures(db: Database, window_s: float = DEFAULT_WINDOW_S, *, now: datetime | None = None) -> list[tuple[str, str, VersionQuality]]:
    """(model, channel, figures) of every version, channel and mode with reports in the last `window_s`."""
    since = (now or datetime.now(timezone.utc)).timestamp() - window_s
    since_at = datetime.fromtimestamp(since, tz=timezone.utc)
    h = TelemetryHourly.__table__
    out = []
    with db.read() as session:
        keys = session.execute(
            select(Model.id, Model.name, h.c.channel).join(h, h.c.model_id == Model.id)
            .where(h.c.hour >= hour_of(since_at)).distinct()
        ).all()
        for model_id, name, channel in sorted(keys, key=lambda k: (k[1], k[2])):
            for quality in versions_quality(session, model_id, channel=channel, since=since_at):
                out.append((name, channel, quality))
    return out


def drift_gauges(db: Database, window_s: float = DEFAULT_WINDOW_S, *, cache_s: float = GAUGE_CACHE_S) -> Callable[[], Iterable[Any]]:
    """A scrape-time collector (for `Metrics.add_state`): the GAUGES per model, version, channel and mode
    over the last `window_s`, recomputed at most every `cache_s` seconds."""
    from .metrics import gauge

    lock = threading.Lock()
    cached: dict[str, Any] = {"at": None, "figures": []}

    def collect() -> Iterable[Any]:
        with lock:
            if cached["at"] is None or time.monotonic() - cached["at"] >= cache_s:
                cached["figures"], cached["at"] = quality_figures(db, window_s), time.monotonic()
            figures: Sequence[tuple[str, str, VersionQuality]] = cached["figures"]
        labels = ["model", "version", "channel", "mode"]
        for name, (help_, field_name) in GAUGES.items():
            samples = [
                ([model, str(q.version), channel, q.mode], float(value))
                for model, channel, q in figures
                if (value := getattr(q, field_name)) is not None
            ]
            yield gauge(name, f"{help_} (last {window_s:g} s, hourly resolution)", labels, samples)

    return collect
