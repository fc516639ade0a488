"""Telemetry: per-version counts of what the device classified, as the server's TelemetryReport.

The request path adds to counters in memory and appends one line per request to a journal
(`HOME/agent/telemetry-<n>.journal`, written without fsync). The outbox thread saves the open
periods every second (`checkpoint`, fsynced) and starts a new journal; every `period_s` it moves each
finished period into the outbox in the same transaction (`close_due`). A restart continues the open
periods it finds and replays the journals written after the last checkpoint. So:

- a kill -9 (or any crash of the process) loses no count: the journal lines are in the page cache;
- a power cut loses at most the counts of the requests answered in the last second (the journal
  since the last checkpoint may not have reached the disk), and a line cut by it is skipped.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    """Counts per version in memory and in a journal; `checkpoint` and `close_due` run on the outbox thread."""

    def __init__(self, outbox: Outbox, path: str, period_s: float) -> None:
        self.outbox = outbox
        self.path = path  # /v1/devices/{id}/telemetry
        self.period_s = period_s
        self.folder = outbox.path.parent
        self._lock = threading.Lock()
        self._open: dict[int, PeriodStats] = {}
        self._dirty: set[int] = set()
        self._journal_full = False
        with outbox.transaction() as db:  # continue what a previous run left open
            for version, data in db.execute("SELECT version, data FROM open_periods").fetchall():
                self._open[int(version)] = PeriodStats.from_json(data)
            row = db.execute("SELECT value FROM telemetry_meta WHERE key = 'covered_epoch'").fetchone()
        covered = int(row[0]) if row else -1
        epochs = self._journals()
        for epoch in sorted(e for e in epochs if e > covered):  # counted after the last checkpoint
            self._replay(self._journal(epoch))
        self._epoch = max([covered, *epochs]) + 1
        self._fd = self._open_journal(self._epoch)

    def record(self, version: int, score: float | None, latency_ms: float, *, fallback: bool = False, error: bool = False) -> None:
        """Count one request: in memory, and one line appended to the journal (no fsync: the request
        path never waits for the disk; the page cache keeps it through a kill of the process)."""
        with self._lock:
            stats = self._open.get(version)
            if stats is None:
                stats = self._open[version] = PeriodStats(started=time.time())
            stats.add(score, latency_ms, fallback, error)
            self._dirty.add(version)
            line = f"{time.time():.3f} {version} {'-' if score is None else f'{score:.6f}'} {latency_ms:.3f} {int(fallback)} {int(error)}\n"
            try:
                os.write(self._fd, line.encode())
                self._journal_full = False
            except OSError:  # a full disk: the count is in memory and is saved at the next checkpoint
                self._journal_full = True

    def tick(self) -> None:
        """Persist changed periods, then queue the finished ones."""
        self.checkpoint()
        self.close_due()

    def checkpoint(self) -> None:
        """Save the open periods (fsynced) and start a new journal: what was journaled is now in the database."""
        self._persist(close=False)

    def close_due(self, *, force: bool = False) -> int:
        """Move periods older than `period_s` (all with `force`) into the outbox; returns how many."""
        return self._persist(close=True, force=force)

    def _persist(self, *, close: bool, force: bool = False) -> int:
        now = time.time()
        with self._lock:
            due = {v: st for v, st in self._open.items() if close and (force or now - st.started >= self.period_s)}
            if not due and not self._dirty:
                return 0
            for version in due:
                del self._open[version]
            rows = [(v, st.to_json()) for v, st in self._open.items()]
            dirty, self._dirty = self._dirty, set()
            covered = self._epoch  # every record so far is in `due` or `rows`; later ones go to a new journal
            self._epoch += 1
            old_fd, self._fd = self._fd, self._open_journal(self._epoch)
        os.close(old_fd)
        try:
            with self.outbox.transaction() as db:
                for version, stats in due.items():
                    if stats.predictions or stats.errors:
                        self.outbox.put("telemetry", self.path, stats.report(version, now), db=db)
                    db.execute("DELETE FROM open_periods WHERE version = ?", (version,))
                db.executemany("INSERT OR REPLACE INTO open_periods (version, data) VALUES (?, ?)", rows)
                db.execute("INSERT OR REPLACE INTO telemetry_meta (key, value) VALUES ('covered_epoch', ?)", (covered,))
        except BaseException:
            with self._lock:  # nothing was saved: keep counting into the same periods (the journals stay)
                for version, stats in due.items():
                    self._open.setdefault(version, stats)
                self._dirty |= dirty | set(due)
            raise
        for epoch in self._journals():
            if epoch <= covered:
                self._journal(epoch).unlink(missing_ok=True)
        return len(due)

    # --- the journal ----------------------------------------------------------------------------

    def _journal(self, epoch: int) -> Path:
        return self.folder / f"telemetry-{epoch}.journal"

    def _journals(self) -> list[int]:
        found = []
        for path in self.folder.glob("telemetry-*.journal"):
            number = path.name[len("telemetry-"):-len(".journal")]
            if number.isdigit():
                found.append(int(number))
        return found

    def _open_journal(self, epoch: int) -> int:
        try:
            return os.open(self._journal(epoch), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            return os.open(os.devnull, os.O_WRONLY)  # a full disk: memory and checkpoints only

    def _replay(self, path: Path) -> None:
        try:
            text = path.read_bytes()[: 64 << 20].decode("utf-8", errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            parts = line.split()
            try:
                at, version, score, latency = float(parts[0]), int(parts[1]), parts[2], float(parts[3])
                fallback, error = parts[4] == "1", parts[5] == "1"
                score_value = None if score == "-" else float(score)
            except (IndexError, ValueError):
                continue  # a line cut by a kill, or damage: skipped
            stats = self._open.get(version)
            if stats is None:
                stats = self._open[version] = PeriodStats(started=at)
            stats.add(score_value, latency, fallback, error)
            self._dirty.add(version)
