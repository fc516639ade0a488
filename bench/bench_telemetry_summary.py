"""The telemetry summary and quality figures at fleet scale: a million reports, on SQLite and PostgreSQL.

    python bench/bench_telemetry_summary.py [--rows 1000000] [--devices 1000] [--days 40] [--db sqlite,postgresql]
                                            [--runs 5] [--old-runs 3] [--json out.json]

For each database it:
  1. migrates an empty database (SQLite: a temporary file; PostgreSQL: a database `bench_telemetry_<hex>`
     made on 127.0.0.1:5432 next to `test`, dropped at the end);
  2. bulk-loads `--rows` raw telemetry rows (devices x reports over `--days`, 3 versions rolled out over
     time, 2 channels, 10 classes; executemany on SQLite, COPY on PostgreSQL) and their hourly rollups,
     summed here with numpy (the same sums `telemetry.roll_up` makes one report at a time);
  3. times, median of `--runs` after one warm-up: `telemetry.summary()` (all versions, all time),
     `quality.version_quality()` over the last hour, day and all time, `quality.timeseries()` (a week
     hourly, all time daily); and the summary as it was before the rollups (Python over every raw row,
     median of `--old-runs`), in the same run; and the write path, `telemetry.record()` (raw row plus
     rollup upserts) against the raw row alone, at that table size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select, text  # noqa: E402
from sqlalchemy.orm import load_only  # noqa: E402

from sync_server import quality, telemetry  # noqa: E402
from sync_server.db import Database  # noqa: E402
from sync_server.models import Device, Telemetry  # noqa: E402

MODEL = "fleet"
CLASSES = 10
BINS = 10
CHANNELS = ("stable", "canary")
VERSIONS = 3
PIXELS_PER_IMAGE = 224 * 224
PG = dict(host="127.0.0.1", port=5432, dbname="test")

RAW_COLUMNS = (
    "device_id", "version", "received_at", "period_s", "predictions", "fallbacks", "errors", "fallback_rate",
    "latency_p50_ms", "latency_p99_ms", "confidence_histogram", "idempotency_key", "mode", "shadow_of", "channel",
    "low_confidence", "fallback_answers", "disagreements", "agreements", "class_counts", "input_stats",
)


# ----------------------------------------------------------------------------------------------------------
# The fleet's reports
# ----------------------------------------------------------------------------------------------------------


class Fleet:
    """Reports of `devices` devices, `rows` in all, evenly over `days` ending now; generated in chunks."""

    def __init__(self, rows: int, devices: int, days: float, seed: int = 14) -> None:
        self.devices = devices
        self.per_device = rows // devices
        self.rows = self.per_device * devices
        self.end = int(time.time())
        self.start = self.end - int(days * 86400)
        self.step = (self.end - self.start) / self.per_device
        self.rng = np.random.default_rng(seed)
        self.class_p = np.array([0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03])
        self.bin_p = np.array([0.0, 0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.17, 0.25, 0.35])

    def device_id(self, d: int) -> str:
        return f"dev_{d:016x}"

    def chunks(self, size: int = 100_000) -> Iterator[dict[str, np.ndarray]]:
        """Columns of consecutive reports (in time order: report r of every device, then r + 1)."""
        for first in range(0, self.rows, size):
            k = np.arange(first, min(self.rows, first + size))
            d, r = k % self.devices, k // self.devices
            t = self.start + (r * self.step + d * self.step / self.devices).astype(np.int64)
            canary = d >= self.devices // 2
            # v1 first, then v2, then v3; canary devices get each new version a sixth of the time earlier.
            lead = np.where(canary, self.per_device // (2 * VERSIONS), 0)
            version = 1 + np.minimum(VERSIONS - 1, (r + lead) * VERSIONS // self.per_device)
            n = len(k)
            predictions = self.rng.integers(20, 200, n)
            fallbacks = (predictions * self.rng.uniform(0, 0.2, n)).astype(np.int64)
            disagreements = (fallbacks * self.rng.uniform(0, 0.3, n)).astype(np.int64)
            low = (predictions * self.rng.uniform(0, 0.3, n)).astype(np.int64)
            p50 = self.rng.uniform(5, 20, n).round(3)
            mean = self.rng.normal(120, 5, (n, 3))
            pixels = predictions * PIXELS_PER_IMAGE
            yield {
                "device": d, "t": t, "channel": canary.astype(np.int64), "version": version, "predictions": predictions,
                "fallbacks": fallbacks, "errors": (self.rng.uniform(0, 1, n) < 0.01).astype(np.int64), "low": low,
                "disagreements": disagreements, "p50": p50, "p99": (p50 * 3).round(3),
                "histogram": self.rng.multinomial(predictions, self.bin_p), "classes": self.rng.multinomial(predictions, self.class_p),
                "pixels": pixels, "sum": mean * pixels[:, None], "sum_sq": (mean ** 2 + 55 ** 2) * pixels[:, None],
            }


def raw_rows(chunk: dict[str, np.ndarray], fleet: Fleet) -> list[tuple]:
    out = []
    cols = {name: chunk[name].tolist() for name in ("device", "t", "channel", "version", "predictions", "fallbacks", "errors",
                                                      "low", "disagreements", "p50", "p99", "pixels")}
    histogram, classes, sums, squares = (chunk[name].tolist() for name in ("histogram", "classes", "sum", "sum_sq"))
    for i in range(len(cols["t"])):
        predictions = cols["predictions"][i]
        out.append((
            fleet.device_id(cols["device"][i]), cols["version"][i], datetime.fromtimestamp(cols["t"][i], tz=timezone.utc),
            fleet.step, predictions, cols["fallbacks"][i], cols["errors"][i], cols["fallbacks"][i] / predictions,
            cols["p50"][i], cols["p99"][i], json.dumps(histogram[i]), None, "serving", None, CHANNELS[cols["channel"][i]],
            cols["low"][i], cols["fallbacks"][i], cols["disagreements"][i], 0, json.dumps(classes[i]),
            json.dumps({"images": predictions, "pixels": cols["pixels"][i], "sum": [round(v, 1) for v in sums[i]],
                        "sum_sq": [round(v, 1) for v in squares[i]]}),
        ))
    return out


class Rollups:
    """The hourly rollups of every chunk, summed with numpy (what `telemetry.roll_up` adds report by report)."""

    def __init__(self) -> None:
        self.hourly: dict[tuple[int, int, int], np.ndarray] = {}  # (version, channel, hour) -> sums
        self.pairs: list[np.ndarray] = []

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        hour = chunk["t"] - chunk["t"] % 3600
        code = (chunk["version"] * 2 + chunk["channel"]) * 10**11 + hour
        keys, inverse = np.unique(code, return_inverse=True)
        p = chunk["predictions"]
        columns = [np.ones_like(p), p, chunk["fallbacks"], chunk["errors"], chunk["low"], p, chunk["fallbacks"],
                   chunk["disagreements"], chunk["p50"] * p, p, chunk["p50"], np.ones_like(p), p,
                   *chunk["histogram"].T, *chunk["classes"].T, *chunk["sum"].T, *chunk["sum_sq"].T, chunk["pixels"]]
        sums = np.stack([np.bincount(inverse, weights=c.astype(np.float64), minlength=len(keys)) for c in columns], axis=1)
        p99 = np.full(len(keys), -1.0)
        np.maximum.at(p99, inverse, chunk["p99"])
        for j, key in enumerate(keys.tolist()):
            group = (key // 10**11 // 2, key // 10**11 % 2, key % 10**11)
            row = np.append(sums[j], p99[j])
            if group in self.hourly:
                old = self.hourly[group]
                row[:-1] += old[:-1]
                row[-1] = max(row[-1], old[-1])
            self.hourly[group] = row
        self.pairs.append(np.unique(code * 10**5 + chunk["device"]))

    def tables(self, model_id: int, fleet: Fleet) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {"telemetry_hourly": [], "telemetry_hourly_confidence": [], "telemetry_hourly_classes": [],
                                       "telemetry_hourly_input": [], "telemetry_hourly_devices": [], "telemetry_devices": []}
        for (version, channel, hour), s in sorted(self.hourly.items()):
            key = (model_id, version, "serving", CHANNELS[channel], hour)
            out["telemetry_hourly"].append((*key, *(int(v) for v in s[0:8]), float(s[8]), int(s[9]), float(s[10]), int(s[11]),
                                            float(s[-1]), BINS, CLASSES, int(s[12])))
            out["telemetry_hourly_confidence"] += [(*key, i, int(s[13 + i])) for i in range(BINS) if s[13 + i]]
            out["telemetry_hourly_classes"] += [(*key, i, int(s[23 + i])) for i in range(CLASSES) if s[23 + i]]
            out["telemetry_hourly_input"] += [(*key, i, int(s[-2]), float(s[33 + i]), float(s[36 + i])) for i in range(3)]
        pairs = np.unique(np.concatenate(self.pairs))
        device, code = pairs % 10**5, pairs // 10**5
        group, hour = code // 10**11, code % 10**11
        for g, h, d in zip(group.tolist(), hour.tolist(), device.tolist()):
            out["telemetry_hourly_devices"].append((model_id, h, g // 2, "serving", CHANNELS[g % 2], fleet.device_id(d)))
        span: dict[tuple[int, int], list[int]] = {}
        for g, h, d in zip(group.tolist(), hour.tolist(), device.tolist()):
            first_last = span.setdefault((g, d), [h, h])
            first_last[0], first_last[1] = min(first_last[0], h), max(first_last[1], h)
        for (g, d), (first, last) in sorted(span.items()):
            out["telemetry_devices"].append((model_id, g // 2, "serving", CHANNELS[g % 2], fleet.device_id(d), first, last))
        return out


HOURLY_COLUMNS = ("model_id", "version", "mode", "channel", "hour", "reports", "predictions", "fallbacks", "errors",
                  "low_confidence", "low_confidence_predictions", "fallback_answers", "disagreements", "latency_p50_weighted",
                  "latency_p50_weight", "latency_p50_sum", "latency_p50_reports", "latency_p99_max", "histogram_bins",
                  "class_slots", "input_images")
_KEY = ("model_id", "version", "mode", "channel", "hour")
TABLE_COLUMNS = {
    "telemetry_hourly": HOURLY_COLUMNS,
    "telemetry_hourly_confidence": (*_KEY, "bin", "n"),
    "telemetry_hourly_classes": (*_KEY, "class_index", "n"),
    "telemetry_hourly_input": (*_KEY, "channel_index", "pixels", "pixel_sum", "pixel_sum_sq"),
    "telemetry_hourly_devices": ("model_id", "hour", "version", "mode", "channel", "device_id"),
    "telemetry_devices": ("model_id", "version", "mode", "channel", "device_id", "first_hour", "last_hour"),
}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def bulk_insert(db: Database, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """executemany on SQLite, COPY on PostgreSQL."""
    if not rows:
        return
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if db.dialect == "postgresql":
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cursor.execute("BEGIN")
            marks = ", ".join("?" for _ in columns)
            cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                               [tuple(v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in row) for row in rows])
            cursor.execute("COMMIT")
        raw.commit()
    finally:
        raw.close()


def load(db: Database, fleet: Fleet) -> dict[str, Any]:
    """The model, versions with baselines, devices, raw rows and rollups; returns what was loaded and how fast."""
    started = time.perf_counter()
    baseline = {"images": 1000, "confidence_threshold": 0.6, "class_counts": [300, 200, 100, 100, 80, 70, 50, 40, 30, 30],
                "confidence_histogram": [0, 0, 10, 20, 40, 60, 100, 170, 250, 350], "low_confidence_rate": 0.1,
                "per_class_agreement": [1.0] * CLASSES,
                "input": {"images": 1000, "pixels": 1000 * PIXELS_PER_IMAGE, "mean": [120.0] * 3, "std": [55.0] * 3}}
    with db.write() as session:
        session.execute(text("INSERT INTO models (id, name, created_at) VALUES (1, :name, :at)"), {"name": MODEL, "at": datetime.now(timezone.utc)})
        for v in range(1, VERSIONS + 1):
            session.execute(text(
                "INSERT INTO model_versions (id, model_id, version, manifest_sha256, manifest, saved_model_digest, labels, float_spec, "
                "created_at, baseline) VALUES (:v, 1, :v, :sha, :manifest, 'x', :labels, '{}', :at, :baseline)"),
                {"v": v, "sha": f"{v:064x}", "manifest": json.dumps({"version": v, "baseline": baseline}),
                 "labels": json.dumps([f"c{i}" for i in range(CLASSES)]), "at": datetime.now(timezone.utc), "baseline": json.dumps(baseline)})
    bulk_insert(db, "devices", ("id", "model_id", "channel", "token_sha256", "revoked", "created_at"),
                [(fleet.device_id(d), 1, CHANNELS[int(d >= fleet.devices // 2)], f"{d:064x}", False, datetime.now(timezone.utc))
                 for d in range(fleet.devices)])
    rollups = Rollups()
    for chunk in fleet.chunks():
        rollups.add(chunk)
        bulk_insert(db, "telemetry", RAW_COLUMNS, raw_rows(chunk, fleet))
    raw_s = time.perf_counter() - started
    counts = {}
    for table, rows in rollups.tables(1, fleet).items():
        bulk_insert(db, table, TABLE_COLUMNS[table], rows)
        counts[table] = len(rows)
    with db.engine.connect() as connection:  # what autovacuum would have done by now (index-only scans)
        if db.dialect == "postgresql":
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        else:
            connection.execute(text("ANALYZE"))
            connection.commit()
    return {"raw_rows": fleet.rows, "rollup_rows": counts, "load_s": round(time.perf_counter() - started, 1), "raw_load_s": round(raw_s, 1)}


# ----------------------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------------------


def old_summary(db: Database, model: str) -> dict[str, Any]:
    """The summary before the rollups (commit 47bf872's telemetry.summary): Python over every raw row."""
    from sync_server.registry import find_model

    with db.read() as session:
        model_row = find_model(session, model)
        query = (select(Telemetry).options(load_only(
            Telemetry.version, Telemetry.device_id, Telemetry.predictions, Telemetry.fallbacks, Telemetry.errors,
            Telemetry.confidence_histogram, Telemetry.latency_p50_ms, Telemetry.latency_p99_ms))
            .join(Device, Device.id == Telemetry.device_id).where(Device.model_id == model_row.id))
        rows = [(r.version, r.device_id, r.predictions, r.fallbacks, r.errors, r.confidence_histogram, r.latency_p50_ms, r.latency_p99_ms)
                for r in session.scalars(query)]
    per_version: dict[int, dict[str, Any]] = {}
    for version_, device_id, predictions, fallbacks, errors, confidences, p50, p99 in rows:
        item = per_version.setdefault(version_, {"reports": 0, "devices": set(), "predictions": 0, "fallbacks": 0, "errors": 0,
                                                 "histogram": [], "p50": [], "p99": []})
        item["reports"] += 1
        item["devices"].add(device_id)
        item["predictions"] += predictions
        item["fallbacks"] += fallbacks
        item["errors"] += errors
        histogram = item["histogram"]
        for i, count in enumerate(confidences or []):
            if i >= len(histogram):
                histogram.append(0)
            histogram[i] += int(count)
        if p50 is not None:
            item["p50"].append((p50, predictions))
        if p99 is not None:
            item["p99"].append(p99)
    return {"model": model, "versions": [{"version": v, "reports": i["reports"], "devices": len(i["devices"]),
                                          "predictions": i["predictions"]} for v, i in sorted(per_version.items())]}


def median_s(call: Callable[[], Any], runs: int, warm: bool = True) -> tuple[float, Any]:
    result = call() if warm else None
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(db: Database, fleet: Fleet, runs: int, old_runs: int) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    out: dict[str, Any] = {}

    def session_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
        def call() -> Any:
            with db.read() as session:
                return function(session, 1, *args, **kwargs)
        return call

    seconds, new = median_s(lambda: telemetry.summary(db, MODEL), runs)
    out["summary"] = seconds
    cases = {
        "version_quality (last hour)": session_call(quality.version_quality, VERSIONS, channel="stable", since=now - timedelta(hours=1)),
        "version_quality (last day)": session_call(quality.version_quality, VERSIONS, channel="stable", since=now - timedelta(days=1)),
        "version_quality (all time)": session_call(quality.version_quality, VERSIONS),
        "timeseries (a week, hourly)": session_call(quality.timeseries, since=now - timedelta(days=7)),
        "timeseries (all time, daily)": session_call(quality.timeseries, bucket_s=86400),
    }
    for name, call in cases.items():
        out[name], _ = median_s(call, runs)
    seconds, old = median_s(lambda: old_summary(db, MODEL), old_runs, warm=False)
    out["old summary (Python over raw rows)"] = seconds
    mine = [(v["version"], v["reports"], v["devices"], v["predictions"]) for v in new["versions"]]
    theirs = [(v["version"], v["reports"], v["devices"], v["predictions"]) for v in old["versions"]]
    assert mine == theirs, f"the rollups disagree with the raw rows: {mine} != {theirs}"
    out["write: record() (raw row + rollups)"], out["write: raw row only (before)"] = write_costs(db, fleet, runs=200)
    return out


def write_costs(db: Database, fleet: Fleet, runs: int) -> tuple[float, float]:
    """Median seconds of one report through `telemetry.record` against the raw-row insert it did before."""
    device = fleet.device_id(0)
    with db.write() as session:  # the device may report about its current version
        session.execute(text("INSERT INTO channels (model_id, name, version, updated_at) VALUES (1, 'stable', :v, :at)"),
                        {"v": VERSIONS, "at": datetime.now(timezone.utc)})
    body = {"version": VERSIONS, "period_s": 300, "predictions": 100, "fallbacks": 5, "latency_ms": {"p50": 9.0, "p99": 30.0},
            "confidence_histogram": [0, 0, 1, 2, 4, 6, 10, 17, 25, 35], "class_counts": [30, 20, 10, 10, 8, 7, 5, 4, 3, 3],
            "low_confidence": 9, "fallback_answers": 5, "disagreements": 1,
            "input_stats": {"images": 100, "pixels": 100 * PIXELS_PER_IMAGE, "sum": [1.2e8] * 3, "sum_sq": [1.7e10] * 3}}
    with_rollups, raw_only = [], []
    for i in range(runs):
        started = time.perf_counter()
        telemetry.record(db, device, MODEL, body, f"bench-{i}")
        with_rollups.append(time.perf_counter() - started)
        started = time.perf_counter()
        with db.write() as session:  # what record() did before: the checks and one row
            from sync_server.devices import require_assigned
            from sync_server.registry import find_model, require_version

            model_row = find_model(session, MODEL)
            require_version(session, model_row, VERSIONS)
            require_assigned(session, device, MODEL, VERSIONS)
            telemetry._seen(session, device, f"raw-{i}")
            session.add(telemetry._row(device, body, f"raw-{i}", "stable", datetime.now(timezone.utc)))
        raw_only.append(time.perf_counter() - started)
    return statistics.median(with_rollups), statistics.median(raw_only)


# ----------------------------------------------------------------------------------------------------------
# Databases
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str) -> Iterator[Database]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as folder:
            db = Database(f"sqlite:///{folder}/bench.db")
            try:
                yield db
            finally:
                db.dispose()
        return
    import psycopg

    name = f"bench_telemetry_{secrets.token_hex(4)}"
    user = None
    for candidate in ("postgres", "root"):
        try:
            with psycopg.connect(user=candidate, autocommit=True, connect_timeout=3, **PG) as conn:  # type: ignore[arg-type]
                conn.execute(f'CREATE DATABASE "{name}"')
            user = candidate
            break
        except psycopg.Error:
            continue
    if user is None:
        raise SystemExit("PostgreSQL at 127.0.0.1:5432 (db test) is unreachable")
    db = Database(f"postgresql+psycopg://{user}@{PG['host']}:{PG['port']}/{name}")
    try:
        yield db
    finally:
        db.dispose()
        with psycopg.connect(user=user, autocommit=True, **PG) as conn:  # type: ignore[arg-type]
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=float, default=40.0)
    parser.add_argument("--db", default="sqlite,postgresql", help="sqlite, postgresql or both (comma-separated)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--old-runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"rows": args.rows, "devices": args.devices, "days": args.days, "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()}
    for kind in args.db.split(","):
        fleet = Fleet(args.rows, args.devices, args.days)
        with database(kind) as db:
            db.migrate()
            loaded = load(db, fleet)
            print(f"{kind}: loaded {loaded['raw_rows']:,} raw rows in {loaded['raw_load_s']} s; rollup rows "
                  + ", ".join(f"{t} {n:,}" for t, n in loaded["rollup_rows"].items()), flush=True)
            timings = measure(db, fleet, args.runs, args.old_runs)
        results[kind] = {"loaded": loaded, "seconds": timings}
        old = timings["old summary (Python over raw rows)"]
        for name, seconds in timings.items():
            ratio = f"  ({old / seconds:,.0f}x faster than the old summary)" if name == "summary" else ""
            print(f"  {name:<42} {seconds * 1000:>10.1f} ms{ratio}", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average before/after: {results['load_average']} / {results['load_average_after']} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
