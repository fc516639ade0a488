"""The database schema, as SQLAlchemy 2 ORM classes. Migrations in `migrations/versions/` create it.

    models ─┬─ model_versions ── version_files      a published bundle: manifest, labels, float spec,
            │                                       and the content hash of each bundle file
            ├─ channels ── rollout_events           per-model channels: the version, the previous one,
            │                                       a staged rollout (candidate, percent, state)
            ├─ enrollment_tokens                    expiring, revocable credentials for enrolling devices
            ├─ devices ─┬─ device_status            the latest load / smoke-test / rollback report per version
            │           └─ telemetry                periodic counts, confidence histogram, latency; at most
            │                                       one row per (device, idempotency key)
            ├─ telemetry_hourly ── _confidence,     hourly rollups of telemetry per version, mode, channel;
            │    _classes, _input, _devices         bins, classes, input channels and devices by index
            └─ telemetry_devices                    each device's first and latest hour per version, mode, channel
    server_state                                    counters shared by all instances (assignment revision)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A model name; versions and channels hang off it."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list["ModelVersion"]] = relationship(back_populates="model", order_by="ModelVersion.version")
    channels: Mapped[list["Channel"]] = relationship(back_populates="model", order_by="Channel.name")


class ModelVersion(Base):
    """One published, verified bundle and its SavedModel; immutable once written."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    saved_model_digest: Mapped[str] = mapped_column(String(64))
    labels: Mapped[list[str]] = mapped_column(JSON)
    float_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The manifest's "baseline" (the converter's validation statistics); None for older bundles.
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    model: Mapped[Model] = relationship(back_populates="versions")
    files: Mapped[list["VersionFile"]] = relationship(back_populates="model_version", order_by="VersionFile.name")


class VersionFile(Base):
    """A file of a bundle, stored by content hash in the artifact store."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    model_version: Mapped[ModelVersion] = relationship(back_populates="files")


class DeletedVersion(Base):
    """A version an operator deleted. Its number is not reused for other content: devices may still
    hold the old bundle under that number. Publishing the same content again restores it."""

    __tablename__ = "deleted_versions"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    saved_model_digest: Mapped[str] = mapped_column(String(64))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Channel(Base):
    """A named stream of versions of one model (`stable`, `canary`, ...) and its staged rollout, if any."""

    __tablename__ = "channels"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_channels_model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollout_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollout_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    rollout_state: Mapped[str | None] = mapped_column(String(16), nullable=True)  # active | paused
    rollout_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    rollout_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failure_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_reports: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollout_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)  # canary (null) | shadow
    rollout_sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)  # shadow: share of requests
    rollout_gates: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # overrides of QualityGates
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="channels")


class RolloutEvent(Base):
    """The history of a channel: every set, rollout, promote, pause, resume and rollback."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Device(Base):
    """An enrolled device: the model it runs, its channel, and the hash of its token."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The enrolment token this device enrolled with (None: the fleet secret).
    enrollment_token_id: Mapped[str | None] = mapped_column(String(24), nullable=True, index=True)

    model: Mapped[Model] = relationship()


class EnrollmentToken(Base):
    """A credential an admin created for enrolling devices: expires, may be used `max_uses` times, may
    be limited to one model (and set the channel), and can be revoked. Only its SHA-256 is kept."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str | None] = mapped_column(String(200), nullable=True)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeviceStatus(Base):
    """A device's latest report about one version: did it load, did its smoke test pass, did the device
    roll it back (its health check failed after it loaded)."""

    __tablename__ = "device_status"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    running: Mapped[bool] = mapped_column(Boolean, default=False)
    load_ok: Mapped[bool] = mapped_column(Boolean)
    smoke_test_ok: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The idempotency key of the report that last changed this row: a resent copy changes nothing.
    report_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Telemetry(Base):
    """One periodic telemetry report of a device; `idempotency_key` (unique per device) makes resends count once.

    Raw rows are kept for `--telemetry-retention-days`; the figures are read from the hourly rollups
    below, which the same transaction updates."""

    __tablename__ = "telemetry"
    __table_args__ = (
        Index("uq_telemetry_device_idempotency_key", "device_id", "idempotency_key", unique=True),
        Index("ix_telemetry_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    period_s: Mapped[float] = mapped_column(Float)
    predictions: Mapped[int] = mapped_column(BigInteger)
    fallbacks: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    fallback_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence_histogram: Mapped[list[int]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mode: Mapped[str] = mapped_column(String(16), default="serving", server_default="serving")  # serving | shadow
    shadow_of: Mapped[int | None] = mapped_column(Integer, nullable=True)  # shadow: the serving version compared with
    channel: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the device's channel when received
    low_confidence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: not reported (older agents)
    fallback_answers: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    disagreements: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    agreements: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    class_counts: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    input_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # InputStats.to_report()


# --- hourly telemetry rollups -----------------------------------------------------------------------------
# One row per (model, version, mode, channel, hour), upserted (n = n + excluded.n) in the transaction that
# stores the raw report. `hour` is the UTC epoch second the hour starts at (an integer: the same on SQLite
# and PostgreSQL, and bucketed by plain arithmetic). Histogram bins, class counts and input channels live in
# child tables keyed by their index, so SQL can SUM them.


class TelemetryHourly(Base):
    """Sums of every count of the reports received in one hour, per version, mode and channel."""

    __tablename__ = "telemetry_hourly"
    __table_args__ = (Index("ix_telemetry_hourly_hour", "hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reports: Mapped[int] = mapped_column(BigInteger, default=0)
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    fallbacks: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    low_confidence: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Predictions of the reports that carried `low_confidence` (the rate's denominator).
    low_confidence_predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    fallback_answers: Mapped[int] = mapped_column(BigInteger, default=0)
    disagreements: Mapped[int] = mapped_column(BigInteger, default=0)
    agreements: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Sum of p50 x predictions and of those predictions: the prediction-weighted mean p50.
    latency_p50_weighted: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p50_weight: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Sum and number of reported p50s (the plain mean, when every such report had 0 predictions).
    latency_p50_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_p50_reports: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_p99_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    histogram_bins: Mapped[int] = mapped_column(Integer, default=0)  # the longest confidence histogram reported
    class_slots: Mapped[int] = mapped_column(Integer, default=0)  # the longest class_counts reported
    input_images: Mapped[int] = mapped_column(BigInteger, default=0)


class TelemetryHourlyConfidence(Base):
    """Summed confidence histogram bins of a `TelemetryHourly` row (only bins with a count)."""

    __tablename__ = "telemetry_hourly_confidence"
    __table_args__ = (Index("ix_telemetry_hourly_confidence_hour", "hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    bin: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class TelemetryHourlyClass(Base):
    """Summed predicted-class counts of a `TelemetryHourly` row (only classes with a count)."""

    __tablename__ = "telemetry_hourly_classes"
    __table_args__ = (Index("ix_telemetry_hourly_classes_hour", "hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    class_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class TelemetryHourlyInput(Base):
    """Summed input statistics (`preprocessing.InputStats` sums) per image channel of a `TelemetryHourly` row."""

    __tablename__ = "telemetry_hourly_input"
    __table_args__ = (Index("ix_telemetry_hourly_input_hour", "hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    channel_index: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0..3 (R, G, B, A)
    pixels: Mapped[int] = mapped_column(BigInteger, default=0)
    pixel_sum: Mapped[float] = mapped_column(Float, default=0.0)
    pixel_sum_sq: Mapped[float] = mapped_column(Float, default=0.0)


class TelemetryHourlyDevice(Base):
    """A device that reported in that hour (insert-or-ignore): devices per hour. The hour comes second in
    the key (a row per device and hour: the big rollup), so a window reads one covering range of it."""

    __tablename__ = "telemetry_hourly_devices"
    __table_args__ = (Index("ix_telemetry_hourly_devices_hour", "hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(40), primary_key=True)


class TelemetryDevice(Base):
    """Each device's first and latest hour of reports per version, mode and channel: devices since any
    hour without scanning hours (`last_hour >= since`)."""

    __tablename__ = "telemetry_devices"
    __table_args__ = (Index("ix_telemetry_devices_last_hour", "last_hour"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    first_hour: Mapped[int] = mapped_column(BigInteger)
    last_hour: Mapped[int] = mapped_column(BigInteger)


class ServerState(Base):
    """Named counters shared by every instance; `assignment_revision` grows with every assignment change."""

    __tablename__ = "server_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
