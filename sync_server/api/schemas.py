"""Request bodies of the JSON endpoints (validated by pydantic; errors become 422 `invalid_request`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollRequest(_Body):
    model: str = Field(description="the model this device runs")
    channel: str | None = Field(None, description="channel to follow (default: stable)")
    name: str | None = Field(None, max_length=200, description="a name for people (kiosk-12)")


class ChannelVersion(_Body):
    version: int = Field(ge=1)


class RolloutRequest(_Body):
    version: int = Field(ge=1, description="the candidate version")
    percent: float = Field(gt=0, le=100, description="share of the channel's devices that get it")
    failure_threshold: float | None = Field(None, ge=0, le=1, description="failed share of reports that pauses the rollout")
    min_reports: int | None = Field(None, ge=1, description="reports needed before the rollout can pause itself")


class PauseRequest(_Body):
    reason: str | None = Field(None, max_length=500)


class DeviceUpdate(_Body):
    channel: str


class StatusReport(_Body):
    version: int = Field(ge=1, description="the version this report is about")
    running: bool = Field(True, description="the device now runs this version")
    load_ok: bool = Field(description="the interpreter loaded the model")
    smoke_test_ok: bool | None = Field(None, description="the manifest's smoke test passed (null: not run)")
    message: str | None = Field(None, max_length=2000)
    details: dict[str, Any] | None = None


class Latency(_Body):
    p50: float | None = Field(None, ge=0)
    p95: float | None = Field(None, ge=0)
    p99: float | None = Field(None, ge=0)
    mean: float | None = Field(None, ge=0)


class TelemetryReport(_Body):
    version: int = Field(ge=1)
    period_s: float = Field(gt=0, description="seconds this report covers")
    predictions: int = Field(ge=0)
    fallbacks: int = Field(ge=0, description="photos sent to the server's full model")
    errors: int = Field(0, ge=0)
    fallback_rate: float | None = Field(None, ge=0, le=1, description="default: fallbacks / predictions")
    latency_ms: Latency | None = None
    confidence_histogram: list[int] = Field(default_factory=list, max_length=100, description="counts of top-1 confidence in equal bins over [0, 1]")
