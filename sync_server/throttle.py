"""Request throttling: a token bucket per credential for predictions, reports and enrolment.

    predict   POST /v1/models/{name}/predict[/pixels]        per device token (one bucket for both)
    reports   POST /v1/devices/{id}/status and /telemetry    per device token
    enroll    POST /v1/devices/enroll                        per enrolment credential

A bucket holds `burst` tokens and refills at `rate` per second; each request takes one. An empty
bucket answers 429 `rate_limited` with `Retry-After`: the whole seconds until a token is back, so a
client that waits that long gets through. The credential is the bearer token itself (hashed), checked
before anything else runs: a throttled request costs no database lookup and no body read, and one
device cannot use up another's allowance. The admin token is not throttled; a request without a
token is throttled by its client address.

Buckets are kept in memory, per server instance: behind a load balancer with N instances a device
gets up to N times the rate. At most `max_tracked` credentials are remembered (least recently used
are forgotten, which refills their bucket). Throttled requests are counted in `/metrics` as
`sync_server_throttled_requests_total{scope}`.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import ThrottleOptions


class TokenBuckets:
    """Token buckets of one kind (same rate and burst), one per key, for at most `max_keys` keys."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = float(rate_per_s)
        self.burst = int(burst)
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()  # key -> [tokens, at]
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 when there was one, else the seconds until there is one."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [float(self.burst), now]
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return 0.0
            return (1.0 - bucket[0]) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class _Rule:
    scope: str
    method: str
    path: re.Pattern[str]
    template: str  # the route template, for the request metrics


_RULES = (
    _Rule("predict", "POST", re.compile(r"^/v1/models/[^/]+/predict/?$"), "/v1/models/{name}/predict"),
    _Rule("predict", "POST", re.compile(r"^/v1/models/[^/]+/predict/pixels/?$"), "/v1/models/{name}/predict/pixels"),
    _Rule("reports", "POST", re.compile(r"^/v1/devices/[^/]+/status/?$"), "/v1/devices/{device_id}/status"),
    _Rule("reports", "POST", re.compile(r"^/v1/devices/[^/]+/telemetry/?$"), "/v1/devices/{device_id}/telemetry"),
    _Rule("enroll", "POST", re.compile(r"^/v1/devices/enroll/?$"), "/v1/devices/enroll"),
)

_WHAT = {"predict": "fallback predictions", "reports": "status and telemetry reports", "enroll": "enrolments"}


class Throttle:
    """The buckets of every scope, from `ThrottleOptions`; a scope with rate 0 is not limited."""

    def __init__(self, options: ThrottleOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.buckets: dict[str, TokenBuckets] = {}
        for scope in ("predict", "reports", "enroll"):
            rate = getattr(options, f"{scope}_per_s")
            if options.enabled and rate > 0:
                self.buckets[scope] = TokenBuckets(rate, getattr(options, f"{scope}_burst"), options.max_tracked, clock)

    def check(self, scope: str, credential: str) -> float:
        """0.0 when the request may go on, else the seconds the caller must wait."""
        buckets = self.buckets.get(scope)
        return 0.0 if buckets is None else buckets.take(credential)

    def message(self, scope: str, wait_s: float) -> str:
        buckets = self.buckets[scope]
        return (
            f"too many {_WHAT[scope]} with this credential: {buckets.rate:g} per second with bursts of {buckets.burst} "
            f"are allowed; retry after {retry_after(wait_s)} s"
        )


def retry_after(wait_s: float) -> int:
    """Whole seconds to wait: rounded up, so that waiting that long always finds a token."""
    return max(1, math.ceil(wait_s - 1e-9))


class ThrottleMiddleware:
    """Answers 429 before routing when the caller's bucket for the request's scope is empty."""

    def __init__(self, app: ASGIApp, throttle: Throttle, admin_token: str | None, on_throttled: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.throttle = throttle
        self._admin = (admin_token or "").encode("utf-8")
        self._on_throttled = on_throttled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = _rule_for(scope) if scope["type"] == "http" and self.throttle.buckets else None
        if rule is None:
            await self.app(scope, receive, send)
            return
        credential = self._credential(scope)
        wait_s = 0.0 if credential is None else self.throttle.check(rule.scope, credential)
        if wait_s <= 0:
            await self.app(scope, receive, send)
            return
        if self._on_throttled is not None:
            self._on_throttled(rule.scope)
        scope["route"] = _Template(rule.template)  # the request metrics name the route, not "unmatched"
        scope.setdefault("state", {})["error_code"] = "rate_limited"
        body = json.dumps({"error": {"code": "rate_limited", "message": self.throttle.message(rule.scope, wait_s)}}).encode()
        await send({
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after(wait_s)).encode()),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    def _credential(self, scope: Scope) -> str | None:
        """A hash of the bearer token (None for the admin), else the client's address."""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() == b"bearer" and token:
                    if self._admin and hmac.compare_digest(token, self._admin):
                        return None
                    return "token:" + hashlib.sha256(token).hexdigest()[:32]
                break
        client = scope.get("client")
        return f"addr:{client[0] if client else '?'}"


@dataclass(frozen=True)
class _Template:
    path: str


def _rule_for(scope: Scope) -> _Rule | None:
    method, path = scope.get("method"), scope.get("path", "")
    for rule in _RULES:
        if rule.method == method and rule.path.match(path):
            return rule
    return None

