"""Admin endpoint: quality and drift figures per version, from the hourly telemetry rollups.

    GET /v1/models/{name}/quality?channel=&since=&mode=&bucket_s=

`since` is an ISO 8601 time (UTC when it names no zone) or a number of seconds back from now
(`since=86400`: the last day); windows have hourly resolution (`sync_server.quality`), and the answer's
`since` is where the window really starts.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from ..db import iso
from ..errors import BadRequestError
from ..quality import timeseries, versions_quality, window_start
from ..registry import find_model
from ..services import Services
from . import auth
from .schemas import MAX_CHANNEL_NAME, ModelName, responses

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(auth.admin)])

#: The longest look back a `since` may ask for (beyond any rollup retention).
MAX_SINCE_S = 3660 * 86400


def parse_since(text: str | None, *, now: datetime | None = None) -> datetime | None:
    """`since` as a UTC datetime: ISO 8601, or seconds back from `now`. BadRequestError (400 `bad_since`) otherwise."""
    if text is None or text == "":
        return None
    now = now or datetime.now(timezone.utc)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SINCE_S:
            raise BadRequestError(f"since={text!r}: seconds back must be 0 to {MAX_SINCE_S}", code="bad_since")
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequestError(
            f"since={text!r} is neither an ISO 8601 time (2026-12-01T10:00:00Z) nor a number of seconds back (3600)",
            code="bad_since",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@router.get("/models/{name}/quality", responses=responses(400, 404))
def quality(
    name: ModelName,
    channel: Annotated[str | None, Query(min_length=1, max_length=MAX_CHANNEL_NAME, description="one channel (default: all)")] = None,
    since: Annotated[str | None, Query(max_length=64, description="ISO 8601 time, or seconds back (default: all retained)")] = None,
    mode: Annotated[Literal["serving", "shadow"] | None, Query(description="serving or shadow (default: both)")] = None,
    bucket_s: Annotated[int, Query(ge=3600, le=31 * 86400, description="the series' bucket (whole hours; default 3600)")] = 3600,
    state: Services = Depends(auth.services),
) -> dict[str, Any]:
    """Per version and mode: reports, devices, fallback, low-confidence and disagreement rates, shadow
    agreement, class and confidence JSD and input shift against the bundle baseline, latency; and the
    same figures per time bucket (`series`)."""
    start = parse_since(since)
    with state.db.read() as session:
        model = find_model(session, name)
        versions = versions_quality(session, model.id, channel=channel, since=start, mode=mode)
        series = timeseries(session, model.id, channel=channel, since=start, bucket_s=bucket_s)
    return {
        "model": name,
        "channel": channel,
        "since": iso(window_start(start)),
        "resolution_s": 3600,
        "versions": [v.to_dict() for v in versions],
        "series": [s for s in series if mode is None or s["mode"] == mode],
    }
