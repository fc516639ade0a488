"""Request bodies and parameter bounds of the API (validated by pydantic; errors become 422 `invalid_request`).

Every input is bounded here, so that no number, string or list a caller sends can reach the database
out of its column's range (a version is a 32-bit integer on PostgreSQL), a JSON encoder as NaN, or
memory unbounded. `responses(...)` declares, per route, the error statuses it can answer.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The largest version number: versions are INTEGER columns, 32-bit signed on PostgreSQL.
MAX_VERSION = 2**31 - 1
#: The largest count one telemetry report may carry (well inside BIGINT and a JSON double's exact range).
MAX_COUNT = 10**12
#: The most predicted-class counts one telemetry report may carry (labels of a model).
MAX_CLASS_COUNTS = 10_000
#: The most pixels per channel one report's input statistics may count (10^15: exact in a double).
MAX_PIXELS = 10**15
#: The longest period one telemetry report may cover (a year, in seconds).
MAX_PERIOD_S = 366 * 86400.0
#: The largest latency a device may report (a day, in milliseconds).
MAX_LATENCY_MS = 86_400_000.0
#: The largest `details` object of a status report, as compact JSON.
MAX_DETAILS_BYTES = 16 * 1024
MAX_MODEL_NAME = 100  # bundles.NAME_PATTERN
MAX_CHANNEL_NAME = 64  # rollout.CHANNEL_PATTERN
MAX_DEVICE_ID = 40  # models.Device.id

Version = Annotated[int, Path(ge=1, le=MAX_VERSION, description="a version number (1 to 2^31-1)")]
ModelName = Annotated[str, Path(min_length=1, max_length=MAX_MODEL_NAME, description="a model name")]
ChannelName = Annotated[str, Path(min_length=1, max_length=MAX_CHANNEL_NAME, description="a channel name")]
DeviceId = Annotated[str, Path(min_length=1, max_length=MAX_DEVICE_ID, description="a device id (dev_...)")]
Sha256 = Annotated[str, Path(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$", description="a SHA-256 content hash")]
VersionQuery = Annotated[int | None, Query(ge=1, le=MAX_VERSION, description="a version number (1 to 2^31-1)")]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. `unknown_version`")
    message: str = Field(description="one sentence that names the problem")


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


_DESCRIPTIONS = {
    304: "not modified (the ETag matches)",
    400: "malformed input: a bad header, archive or query",
    401: "no token, or one the server does not know",
    403: "a valid token that may not do this",
    404: "unknown model, version, channel, device, artifact or token",
    409: "the request contradicts the stored state",
    413: "the body is larger than the limit",
    416: "the range is outside the file",
    422: "a field is missing, out of its bounds, or the upload does not verify",
    429: "too many requests (Retry-After)",
    502: "the prediction backend answered with an error",
    503: "the database or the prediction backend is unavailable (Retry-After)",
    507: "the server's disk is full",
}

#: What any route that reads the token and the database can answer.
COMMON = (401, 403, 413, 422, 429, 503, 507)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route: the common errors and `statuses`, each with the error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(COMMON) | set(statuses)):
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[status]}
        if status != 304:
            entry["model"] = ErrorBody
        out[status] = entry
    return out


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EnrollRequest(_Body):
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME, description="the model this device runs")
    channel: str | None = Field(None, min_length=1, max_length=MAX_CHANNEL_NAME, description="channel to follow (default: stable)")
    name: str | None = Field(None, max_length=200, description="a name for people (kiosk-12)")


class EnrollmentTokenRequest(_Body):
    """An enrolment token an admin hands to the people who set devices up."""

    expires_in_s: int = Field(7 * 86400, ge=1, le=366 * 86400, description="seconds until it stops working (default a week)")
    max_uses: int = Field(1, ge=1, le=100_000, description="devices it may enrol (default 1)")
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME, description="only devices of this model")
    channel: str | None = Field(None, min_length=1, max_length=MAX_CHANNEL_NAME, description="devices enrolled with it follow this channel")
    note: str | None = Field(None, max_length=200, description="what it is for (shop 12's kiosks)")


class ChannelVersion(_Body):
    version: int = Field(ge=1, le=MAX_VERSION)


class GateOverrides(_Body):
    """A rollout's own quality gates; fields left out keep the server's (`--quality-gates`)."""

    window_s: float | None = Field(None, gt=0, le=MAX_PERIOD_S, description="seconds of telemetry the gates look at")
    min_predictions: int | None = Field(None, ge=1, le=MAX_COUNT, description="predictions each side needs before a gate judges")
    max_fallback_rate_increase: float | None = Field(None, ge=0, le=1)
    max_low_confidence_increase: float | None = Field(None, ge=0, le=1)
    max_disagreement_increase: float | None = Field(None, ge=0, le=1)
    min_shadow_agreement: float | None = Field(None, ge=0, le=1)
    max_class_jsd: float | None = Field(None, ge=0, le=1, description="Jensen-Shannon divergence (base 2) from the bundle baseline")
    max_input_shift: float | None = Field(None, ge=0, le=1000, description="input mean shift from the bundle baseline, in its stds")


class RolloutRequest(_Body):
    version: int = Field(ge=1, le=MAX_VERSION, description="the candidate version")
    percent: float = Field(gt=0, le=100, description="share of the channel's devices that get it")
    failure_threshold: float | None = Field(None, ge=0, le=1, description="failed share of reports that pauses the rollout")
    min_reports: int | None = Field(None, ge=1, le=1_000_000, description="reports needed before the rollout can pause itself")
    mode: Literal["canary", "shadow"] = Field(
        "canary", description="canary: its share of devices runs it; shadow: they run it beside the channel's version, off the request path"
    )
    sample_rate: float | None = Field(None, gt=0, le=1, description="shadow: share of a device's requests the candidate also runs on (default 0.1)")
    gates: GateOverrides | None = Field(None, description="this rollout's own quality gates (kept until given again)")
    force: bool = Field(False, description="move a shadow rollout to canary even if its quality gates are not met")


class PromoteRequest(_Body):
    force: bool = Field(False, description="promote even if the quality gates are not met")


class PauseRequest(_Body):
    reason: str | None = Field(None, max_length=500)


class DeviceUpdate(_Body):
    channel: str = Field(min_length=1, max_length=MAX_CHANNEL_NAME)


class StatusReport(_Body):
    version: int = Field(ge=1, le=MAX_VERSION, description="the version this report is about")
    running: bool = Field(True, description="the device now runs this version")
    load_ok: bool = Field(description="the interpreter loaded the model")
    smoke_test_ok: bool | None = Field(None, description="the manifest's smoke test passed (null: not run)")
    message: str | None = Field(None, max_length=2000)
    details: dict[str, Any] | None = Field(None, description=f"free-form JSON, at most {MAX_DETAILS_BYTES} bytes, finite numbers")

    @field_validator("details")
    @classmethod
    def _bounded_details(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        try:
            encoded = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except ValueError:
            raise ValueError("must hold finite numbers only (no NaN or Infinity)") from None
        if len(encoded) > MAX_DETAILS_BYTES:
            raise ValueError(f"is {len(encoded)} bytes as JSON; at most {MAX_DETAILS_BYTES}")
        _check_ints(value)
        return value


def _check_ints(value: Any, depth: int = 0) -> None:
    """Integers in free-form JSON stay within 64 bits (SQLite's JSON) and nesting stays shallow."""
    if depth > 16:
        raise ValueError("is nested more than 16 levels deep")
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError("holds an integer beyond 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must hold finite numbers only (no NaN or Infinity)")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        _check_ints(item, depth + 1)


class Latency(_Body):
    p50: float | None = Field(None, ge=0, le=MAX_LATENCY_MS)
    p95: float | None = Field(None, ge=0, le=MAX_LATENCY_MS)
    p99: float | None = Field(None, ge=0, le=MAX_LATENCY_MS)
    mean: float | None = Field(None, ge=0, le=MAX_LATENCY_MS)


class TelemetryReport(_Body):
    version: int = Field(ge=1, le=MAX_VERSION)
    period_s: float = Field(gt=0, le=MAX_PERIOD_S, description="seconds this report covers")
    predictions: int = Field(ge=0, le=MAX_COUNT)
    fallbacks: int = Field(ge=0, le=MAX_COUNT, description="photos sent to the server's full model")
    errors: int = Field(0, ge=0, le=MAX_COUNT)
    fallback_rate: float | None = Field(None, ge=0, le=1, description="default: fallbacks / predictions")
    latency_ms: Latency | None = None
    confidence_histogram: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] = Field(
        default_factory=list, max_length=100, description="counts of top-1 confidence in equal bins over [0, 1]"
    )
    mode: Literal["serving", "shadow"] = Field("serving", description="shadow: a report about the candidate the device runs beside its version")
    shadow_of: int | None = Field(None, ge=1, le=MAX_VERSION, description="mode shadow: the serving version it was compared with")
    class_counts: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] | None = Field(
        None, max_length=MAX_CLASS_COUNTS, description="predicted top-1 label index counts, in labels order"
    )
    low_confidence: int | None = Field(None, ge=0, le=MAX_COUNT, description="predictions under the device's confidence threshold")
    fallback_answers: int = Field(0, ge=0, le=MAX_COUNT, description="fallbacks the server answered")
    disagreements: int = Field(0, ge=0, le=MAX_COUNT, description="answered fallbacks whose server top-1 label differed from the edge's")
    agreements: int = Field(0, ge=0, le=MAX_COUNT, description="mode shadow: samples whose top-1 label matched the serving version's")
    input_stats: InputStatsReport | None = Field(None, description="sums over the prepared pixels (preprocessing.InputStats)")

    @model_validator(mode="after")
    def _consistent(self) -> "TelemetryReport":
        def at_most(part: str, whole: str) -> None:
            small, large = getattr(self, part), getattr(self, whole)
            if small is not None and small > large:
                raise ValueError(f"{part} ({small}) may not exceed {whole} ({large})")

        at_most("low_confidence", "predictions")
        at_most("fallback_answers", "fallbacks")
        at_most("disagreements", "fallback_answers")
        at_most("agreements", "predictions")
        if self.mode == "shadow" and self.shadow_of is None:
            raise ValueError("a report with mode shadow needs shadow_of: the serving version the candidate was compared with")
        if self.mode == "serving" and self.shadow_of is not None:
            raise ValueError("shadow_of belongs to reports with mode shadow")
        return self


class InputStatsReport(_Body):
    """`preprocessing.InputStats.to_report()`: per-channel sums over the prepared pixels (0..255 scale)."""

    images: int = Field(ge=0, le=MAX_COUNT)
    pixels: int = Field(ge=0, le=MAX_PIXELS, description="pixels counted per channel")
    sum: list[float] = Field(min_length=1, max_length=4, description="per channel (at most 4), the sum of pixel values")
    sum_sq: list[float] = Field(min_length=1, max_length=4, description="per channel, the sum of squared pixel values")

    @model_validator(mode="after")
    def _consistent(self) -> "InputStatsReport":
        if len(self.sum) != len(self.sum_sq):
            raise ValueError(f"sum has {len(self.sum)} channels and sum_sq {len(self.sum_sq)}; they must match")
        for i, (total, squares) in enumerate(zip(self.sum, self.sum_sq)):
            if not 0 <= total <= 255 * self.pixels or not 0 <= squares <= 255 * 255 * self.pixels:
                raise ValueError(f"channel {i}: the sums are outside what {self.pixels} pixels of 0..255 can add up to")
        return self


TelemetryReport.model_rebuild()
