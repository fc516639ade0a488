"""Telemetry: per-version counts of what the device classified, as the server's TelemetryReport.

The request path only adds to counters in memory. The outbox thread persists the open periods every
second (`checkpoint`) and, every `period_s`, moves each finished period into the outbox in the same
transaction (`close_due`). A crash therefore loses at most the last second of counts; a restart
continues the open periods it finds.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .outbox import Outbox

HISTOGRAM_BINS = 10
#: Upper bounds of the latency buckets: 0.25 ms doubling by √2 up to ~65 s, then one open bucket.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(0.25 * math.sqrt(2) ** i for i in range(37))


@dataclass
class PeriodStats:
    """What happened on one version since `started` (wall clock seconds)."""

    started: float
    predictions: int = 0
    fallbacks: int = 0
    errors: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latency_sum_ms: float = 0.0

    def add(self, score: float | None, latency_ms: float, fallback: bool, error: bool) -> None:
        if error:
            self.errors += 1
            return
        self.predictions += 1
        self.fallbacks += int(fallback)
        if score is not None:
            self.histogram[min(HISTOGRAM_BINS - 1, max(0, int(score * HISTOGRAM_BINS)))] += 1
        self.latency_sum_ms += latency_ms
        index = next((i for i, bound in enumerate(LATENCY_BOUNDS_MS) if latency_ms <= bound), len(LATENCY_BOUNDS_MS))
        self.latency_buckets[index] += 1

    def percentile(self, q: float) -> float | None:
        """The upper bound of the latency bucket holding quantile q (within √2 of the truth)."""
        total = sum(self.latency_buckets)
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(self.latency_buckets):
            seen += count
            if seen >= rank and count:
                return round(LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)], 3)
        return round(LATENCY_BOUNDS_MS[-1], 3)

    def report(self, version: int, now: float) -> dict[str, Any]:
        """The body of `POST /v1/devices/{id}/telemetry`."""
        return {
            "version": version,
            "period_s": round(max(0.001, now - self.started), 3),
            "predictions": self.predictions,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "fallback_rate": round(self.fallbacks / self.predictions, 6) if self.predictions else None,
            "latency_ms": {
                "p50": self.percentile(0.50),
                "p95": self.percentile(0.95),
                "p99": self.percentile(0.99),
                "mean": round(self.latency_sum_ms / self.predictions, 3) if self.predictions else None,
            },
            "confidence_histogram": list(self.histogram),
        }

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "PeriodStats":
        return cls(**json.loads(text))


class TelemetryRecorder:
    """Counts per version in memory; `checkpoint` and `close_due` run on the outbox thread."""

    def __init__(self, outbox: Outbox, path: str, period_s: float) -> None:
        self.outbox = outbox
        self.path = path  # /v1/devices/{id}/telemetry
        self.period_s = period_s
        self._lock = threading.Lock()
        self._open: dict[int, PeriodStats] = {}
        self._dirty: set[int] = set()
        with outbox.transaction() as db:  # continue what a previous run left open
            for version, data in db.execute("SELECT version, data FROM open_periods").fetchall():
                self._open[int(version)] = PeriodStats.from_json(data)

    def record(self, version: int, score: float | None, latency_ms: float, *, fallback: bool = False, error: bool = False) -> None:
        """Count one request (memory only: the request path never waits for the disk)."""
        with self._lock:
            stats = self._open.get(version)
            if stats is None:
                stats = self._open[version] = PeriodStats(started=time.time())
            stats.add(score, latency_ms, fallback, error)
            self._dirty.add(version)

    def tick(self) -> None:
        """Persist changed periods, then queue the finished ones."""
        self.checkpoint()
        self.close_due()

    def checkpoint(self) -> None:
        with self._lock:
            rows = [(v, self._open[v].to_json()) for v in self._dirty if v in self._open]
            self._dirty.clear()
        if rows:
            try:
                with self.outbox.transaction() as db:
                    db.executemany("INSERT OR REPLACE INTO open_periods (version, data) VALUES (?, ?)", rows)
            except BaseException:  # a full disk: the counts stay in memory and are saved next time
                with self._lock:
                    self._dirty.update(v for v, _ in rows)
                raise

    def close_due(self, *, force: bool = False) -> int:
        """Move periods older than `period_s` (all with `force`) into the outbox; returns how many."""
        now = time.time()
        with self._lock:
            due = {v: s for v, s in self._open.items() if force or now - s.started >= self.period_s}
            for version in due:
                del self._open[version]
                self._dirty.discard(version)
        if not due:
            return 0
        try:
            with self.outbox.transaction() as db:
                for version, stats in due.items():
                    if stats.predictions or stats.errors:
                        self.outbox.put("telemetry", self.path, stats.report(version, now), db=db)
                    db.execute("DELETE FROM open_periods WHERE version = ?", (version,))
        except BaseException:
            with self._lock:  # nothing was queued: keep counting into the same periods
                for version, stats in due.items():
                    self._open.setdefault(version, stats)
                    self._dirty.add(version)
            raise
        return len(due)
