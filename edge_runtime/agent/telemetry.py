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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np

from .outbox import Outbox

HISTOGRAM_BINS = 10
#: Upper bounds of the latency buckets: 0.25 ms doubling by √2 up to ~65 s, then one open bucket.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(0.25 * math.sqrt(2) ** i for i in range(37))
#: Label indexes past this are not counted per class (the report's `class_counts` has at most this many).
MAX_CLASSES = 10_000
#: A serving period is keyed by its version; a shadow period by (candidate version, "shadow", serving version).
PeriodKey = Union[int, tuple[int, str, int]]

_LEVELS = np.arange(256, dtype=np.int64)
_SQUARES = _LEVELS * _LEVELS


def _parse_sums(fields: list[str]) -> tuple[int, list[int], list[int]]:
    """(pixels, sums, squares) from a journal line's three input-sum fields; ValueError when damaged."""
    sums = (int(fields[0]), [int(v) for v in fields[1].split(",")], [int(v) for v in fields[2].split(",")])
    if len(sums[1]) != len(sums[2]):
        raise ValueError("damaged input sums")
    return sums


def pixel_sums(pixels: np.ndarray) -> tuple[int, list[int], list[int]]:
    """(pixels per channel, per-channel sum, per-channel sum of squares) of fitted uint8 pixels: the
    figures `preprocessing.InputStats.add` adds, exactly (integers), from one 256-bin histogram per
    channel (about 4x faster than summing squares in float64)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or not 1 <= pixels.shape[2] <= 4:
        raise ValueError(f"pixel_sums needs uint8 height x width x channels pixels, got {pixels.dtype} {pixels.shape}")
    flat = pixels.reshape(-1, pixels.shape[2])
    sums, squares = [], []
    for channel in range(flat.shape[1]):
        counts = np.bincount(flat[:, channel], minlength=256)
        sums.append(int(counts @ _LEVELS))
        squares.append(int(counts @ _SQUARES))
    return int(flat.shape[0]), sums, squares


@dataclass
class PeriodStats:
    """What happened on one version since `started` (wall clock seconds).

    A shadow period (`shadow_of` set) counts a candidate run beside the serving version `shadow_of`:
    `predictions` are the samples it ran, `errors` the runs that failed, `agreements` the samples
    whose top-1 label was the serving version's.
    """

    started: float
    predictions: int = 0
    fallbacks: int = 0
    errors: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latency_sum_ms: float = 0.0
    class_counts: list[int] = field(default_factory=list)
    low_confidence: int = 0
    fallback_answers: int = 0
    disagreements: int = 0
    agreements: int = 0
    input_images: int = 0
    input_pixels: int = 0
    input_sum: list[float] = field(default_factory=list)
    input_sum_sq: list[float] = field(default_factory=list)
    shadow_of: int | None = None

    def add(self, score: float | None, latency_ms: float, fallback: bool, error: bool, *, label_index: int | None = None,
            low_confidence: bool = False, server_disagrees: bool | None = None,
            sums: tuple[int, list[int], list[int]] | None = None, agrees: bool | None = None) -> None:
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
        if label_index is not None and 0 <= label_index < MAX_CLASSES:
            if label_index >= len(self.class_counts):
                self.class_counts.extend([0] * (label_index + 1 - len(self.class_counts)))
            self.class_counts[label_index] += 1
        self.low_confidence += int(low_confidence)
        if server_disagrees is not None:
            self.fallback_answers += 1
            self.disagreements += int(server_disagrees)
        self.agreements += int(bool(agrees))
        if sums is not None:
            self._add_sums(*sums)

    def _add_sums(self, pixels: int, sums: list[int], squares: list[int]) -> None:
        if self.input_sum and len(self.input_sum) != len(sums):
            return  # another channel count than earlier photos (a new spec): not mixed in
        if not self.input_sum:
            self.input_sum, self.input_sum_sq = [0.0] * len(sums), [0.0] * len(sums)
        self.input_images += 1
        self.input_pixels += pixels
        self.input_sum = [a + b for a, b in zip(self.input_sum, sums)]
        self.input_sum_sq = [a + b for a, b in zip(self.input_sum_sq, squares)]

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
        body: dict[str, Any] = {
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
            "mode": "serving" if self.shadow_of is None else "shadow",
            "class_counts": list(self.class_counts),
            "low_confidence": self.low_confidence,
        }
        if self.shadow_of is None:
            body["fallback_answers"] = self.fallback_answers
            body["disagreements"] = self.disagreements
        else:
            body["shadow_of"] = self.shadow_of
            body["agreements"] = self.agreements
        if self.input_images:
            body["input_stats"] = {"images": self.input_images, "pixels": self.input_pixels,
                                   "sum": list(self.input_sum), "sum_sq": list(self.input_sum_sq)}
        return body

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "PeriodStats":
        """A saved period; one saved by an older agent lacks the newer counts (they start at zero)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def _row_key(key: PeriodKey) -> int:
    """The `open_periods` row of a period: its version, or a negative number for a shadow period."""
    if isinstance(key, int):
        return key
    version, _, shadow_of = key
    return -((version << 31) | shadow_of)


def _period_key(row: int) -> PeriodKey:
    if row >= 0:
        return row
    return (-row >> 31, "shadow", -row & ((1 << 31) - 1))


def _version(key: PeriodKey) -> int:
    return key if isinstance(key, int) else key[0]


class TelemetryRecorder:
    """Counts per version in memory and in a journal; `checkpoint` and `close_due` run on the outbox thread.

    Journal lines (space-separated, one per request, newline-terminated; a line without its newline
    was cut and is skipped):

        AT VERSION SCORE|- LATENCY FALLBACK ERROR                          an older agent's line
        AT VERSION SCORE|- LATENCY FALLBACK ERROR LABEL|- LOW DISAGREE|- IMAGES PIXELS S0,S1,S2|- Q0,Q1,Q2|-
        S AT VERSION SHADOW_OF LABEL|- SCORE|- AGREES LATENCY ERROR LOW    a shadow sample
    """

    def __init__(self, outbox: Outbox, path: str, period_s: float) -> None:
        self.outbox = outbox
        self.path = path  # /v1/devices/{id}/telemetry
        self.period_s = period_s
        self.folder = outbox.path.parent
        self._lock = threading.Lock()
        self._open: dict[PeriodKey, PeriodStats] = {}
        self._dirty: set[PeriodKey] = set()
        self._journal_full = False
        with outbox.transaction() as db:  # continue what a previous run left open
            for row, data in db.execute("SELECT version, data FROM open_periods").fetchall():
                self._open[_period_key(int(row))] = PeriodStats.from_json(data)
            row = db.execute("SELECT value FROM telemetry_meta WHERE key = 'covered_epoch'").fetchone()
        covered = int(row[0]) if row else -1
        epochs = self._journals()
        for epoch in sorted(e for e in epochs if e > covered):  # counted after the last checkpoint
            self._replay(self._journal(epoch))
        self._epoch = max([covered, *epochs]) + 1
        self._fd = self._open_journal(self._epoch)

    def record(self, version: int, score: float | None, latency_ms: float, *, fallback: bool = False, error: bool = False,
               label_index: int | None = None, low_confidence: bool = False, server_disagrees: bool | None = None,
               pixels: np.ndarray | None = None) -> None:
        """Count one request: in memory, and one line appended to the journal (no fsync: the request
        path never waits for the disk; the page cache keeps it through a kill of the process).

        `label_index`: the edge's top-1 label; `low_confidence`: its score was below the threshold the
        device used; `server_disagrees`: None when the server did not answer, else whether its top-1
        label differed from the edge's; `pixels`: the fitted uint8 pixels the model ran (input stats).
        """
        sums = pixel_sums(pixels) if pixels is not None and not error else None
        at = time.time()
        if sums is None:
            stats_text = "0 0 - -"
        else:
            stats_text = f"1 {sums[0]} {','.join(map(str, sums[1]))} {','.join(map(str, sums[2]))}"
        line = (f"{at:.3f} {version} {'-' if score is None else f'{score:.6f}'} {latency_ms:.3f} {int(fallback)} {int(error)} "
                f"{'-' if label_index is None else label_index} {int(low_confidence)} "
                f"{'-' if server_disagrees is None else int(server_disagrees)} {stats_text}\n")
        with self._lock:
            stats = self._open.get(version)
            if stats is None:
                stats = self._open[version] = PeriodStats(started=at)
            stats.add(score, latency_ms, fallback, error, label_index=label_index, low_confidence=low_confidence,
                      server_disagrees=server_disagrees, sums=sums)
            self._dirty.add(version)
            self._write(line)

    def record_shadow(self, version: int, shadow_of: int, *, label_index: int | None, score: float | None, agrees: bool,
                      latency_ms: float, error: bool = False, threshold: float | None = None,
                      pixels: np.ndarray | None = None) -> None:
        """Count one shadow sample: candidate `version` ran a photo the serving version `shadow_of` answered.

        Kept apart from `version`'s serving period and reported with mode "shadow". `agrees`: the
        candidate's top-1 label was the serving version's; `latency_ms`: the candidate's own inference
        time (off the request path); `error`: the candidate failed on it. With `threshold`, a score
        below it counts as low confidence. `pixels`: the fitted pixels it ran (input stats, so the
        candidate's input shift from its own baseline is measured in shadow too).
        """
        key: PeriodKey = (version, "shadow", shadow_of)
        low = threshold is not None and score is not None and score < threshold
        sums = pixel_sums(pixels) if pixels is not None and not error else None
        at = time.time()
        stats_text = "" if sums is None else f" {sums[0]} {','.join(map(str, sums[1]))} {','.join(map(str, sums[2]))}"
        line = (f"S {at:.3f} {version} {shadow_of} {'-' if label_index is None else label_index} "
                f"{'-' if score is None else f'{score:.6f}'} {int(agrees)} {latency_ms:.3f} {int(error)} {int(low)}{stats_text}\n")
        with self._lock:
            stats = self._open.get(key)
            if stats is None:
                stats = self._open[key] = PeriodStats(started=at, shadow_of=shadow_of)
            stats.add(score, latency_ms, False, error, label_index=label_index, low_confidence=low, agrees=agrees, sums=sums)
            self._dirty.add(key)
            self._write(line)

    def _write(self, line: str) -> None:
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
            due = {k: st for k, st in self._open.items() if close and (force or now - st.started >= self.period_s)}
            if not due and not self._dirty:
                return 0
            for key in due:
                del self._open[key]
            rows = [(_row_key(k), st.to_json()) for k, st in self._open.items()]
            dirty, self._dirty = self._dirty, set()
            covered = self._epoch  # every record so far is in `due` or `rows`; later ones go to a new journal
            self._epoch += 1
            old_fd, self._fd = self._fd, self._open_journal(self._epoch)
        os.close(old_fd)
        try:
            with self.outbox.transaction() as db:
                for key, stats in due.items():
                    if stats.predictions or stats.errors:
                        self.outbox.put("telemetry", self.path, stats.report(_version(key), now), db=db)
                    db.execute("DELETE FROM open_periods WHERE version = ?", (_row_key(key),))
                db.executemany("INSERT OR REPLACE INTO open_periods (version, data) VALUES (?, ?)", rows)
                db.execute("INSERT OR REPLACE INTO telemetry_meta (key, value) VALUES ('covered_epoch', ?)", (covered,))
        except BaseException:
            with self._lock:  # nothing was saved: keep counting into the same periods (the journals stay)
                for key, stats in due.items():
                    self._open.setdefault(key, stats)
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
        for line in text.split("\n")[:-1]:  # the last piece has no newline: empty, or a line cut by a power cut
            parts = line.split()
            try:
                if parts and parts[0] == "S":
                    self._replay_shadow(parts)
                else:
                    self._replay_serving(parts)
            except (IndexError, ValueError):
                continue  # damage: skipped

    def _replay_serving(self, parts: list[str]) -> None:
        if len(parts) not in (6, 13):  # 6: an older agent's line
            raise ValueError("not a journal line")
        at, version, score, latency = float(parts[0]), int(parts[1]), parts[2], float(parts[3])
        fallback, error = parts[4] == "1", parts[5] == "1"
        score_value = None if score == "-" else float(score)
        label_index, low, disagrees, sums = None, False, None, None
        if len(parts) == 13:
            label_index = None if parts[6] == "-" else int(parts[6])
            low = parts[7] == "1"
            disagrees = None if parts[8] == "-" else parts[8] == "1"
            if parts[9] == "1":
                sums = _parse_sums(parts[10:13])
        stats = self._open.get(version)
        if stats is None:
            stats = self._open[version] = PeriodStats(started=at)
        stats.add(score_value, latency, fallback, error, label_index=label_index, low_confidence=low,
                  server_disagrees=disagrees, sums=sums)
        self._dirty.add(version)

    def _replay_shadow(self, parts: list[str]) -> None:
        if len(parts) not in (10, 13):  # 10: without input sums (an older agent, or a failed sample)
            raise ValueError("not a shadow journal line")
        sums = _parse_sums(parts[10:13]) if len(parts) == 13 else None
        at, version, shadow_of = float(parts[1]), int(parts[2]), int(parts[3])
        label_index = None if parts[4] == "-" else int(parts[4])
        score = None if parts[5] == "-" else float(parts[5])
        agrees, latency, error, low = parts[6] == "1", float(parts[7]), parts[8] == "1", parts[9] == "1"
        key: PeriodKey = (version, "shadow", shadow_of)
        stats = self._open.get(key)
        if stats is None:
            stats = self._open[key] = PeriodStats(started=at, shadow_of=shadow_of)
        stats.add(score, latency, False, error, label_index=label_index, low_confidence=low, agrees=agrees, sums=sums)
        self._dirty.add(key)
