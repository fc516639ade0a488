"""What one quality-gate evaluation costs in a rollout's first hour, when its window is exact.

    python bench/bench_gates.py [--reports 20000] [--devices 1000] [--db sqlite,postgresql] [--runs 5]

For each database: an empty schema, a model with versions 1 and 2, `--devices` devices on channel
`stable`, and a canary rollout of v2 to 20 % started one minute past the top of the hour. It then
stores `--reports` telemetry reports received since that start (80 % about v1, 20 % about v2, with
class counts, histogram and input sums), as `telemetry.record` would (raw row and rollups, in one
transaction here), and times, median of `--runs` after one warm-up, in the same run:
  - `Rollouts.quality()`: the gates' verdict on the exact window (raw reports since the start, SQL sums;
    the candidate's distributions read row by row), what a gate check after a report costs;
  - the same two versions' `quality.version_quality()` from the rollups (the hour the start fell in):
    what it would cost if the window could start at the top of the hour.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from sync_server.config import QualityGates, RolloutOptions  # noqa: E402
from sync_server.db import Database  # noqa: E402
from sync_server.models import Channel, Device, Model, ModelVersion, Telemetry, utcnow  # noqa: E402
from sync_server.quality import version_quality  # noqa: E402
from sync_server.rollout import ACTIVE, CANARY, Rollouts  # noqa: E402
from sync_server.telemetry import HOUR_S, Rollup, hour_of, roll_up  # noqa: E402

LABELS = 10
BASELINE = {"images": 600, "confidence_threshold": 0.6, "class_counts": [60] * LABELS,
            "confidence_histogram": [0, 0, 0, 0, 0, 12, 36, 90, 180, 282], "low_confidence_rate": 0.08,
            "per_class_agreement": [1.0] * LABELS,
            "input": {"images": 600, "pixels": 5529600, "mean": [121.0, 118.0, 110.0], "std": [60.0, 58.0, 61.0]}}


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    import psycopg

    name = f"bench_gates_{secrets.token_hex(4)}"
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def median_ms(call: Callable[[], object], runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(kind: str, reports: int, devices: int, runs: int) -> None:
    with database(kind) as url:
        db = Database(url)
        db.migrate()
        now = utcnow()
        start = now.replace(minute=0, second=0, microsecond=0) + timedelta(minutes=1)
        if start > now - timedelta(minutes=5):  # keep the reports in the past, in the start's hour
            start -= timedelta(seconds=HOUR_S)
        with db.write() as session:
            model = Model(name="shop")
            session.add(model)
            session.flush()
            for version in (1, 2):
                session.add(ModelVersion(model_id=model.id, version=version, manifest_sha256="0" * 64, manifest={},
                                         saved_model_digest="0" * 64, labels=[f"l{i}" for i in range(LABELS)],
                                         float_spec={}, baseline=BASELINE))
            session.add(Channel(model_id=model.id, name="stable", version=1, rollout_version=2, rollout_percent=20.0,
                                rollout_state=ACTIVE, rollout_mode=CANARY, rollout_gates={}, rollout_started_at=start))
            ids = [f"dev_{i:016x}" for i in range(devices)]
            for device_id in ids:
                session.add(Device(id=device_id, model_id=model.id, channel="stable", token_sha256=secrets.token_hex(32)))
            model_id = model.id
        loaded = time.perf_counter()
        with db.write() as session:
            step = timedelta(minutes=50) / reports
            for i in range(reports):
                version = 2 if i % 5 == 0 else 1
                row = Telemetry(device_id=ids[i % devices], version=version, received_at=start + step * i, period_s=60.0,
                                predictions=100, fallbacks=5, errors=0, fallback_rate=0.05, latency_p50_ms=4.0,
                                latency_p99_ms=9.0, confidence_histogram=[0] * 5 + [8, 0, 0, 0, 92], mode="serving",
                                channel="stable", low_confidence=8, fallback_answers=5, disagreements=0, agreements=0,
                                class_counts=[10] * LABELS,
                                input_stats={"images": 100, "pixels": 921600, "sum": [1.1e8, 1.08e8, 1.0e8],
                                             "sum_sq": [1.6e10, 1.6e10, 1.5e10]})
                session.add(row)
                session.flush()
                roll_up(session, db.dialect, Rollup.of(model_id, row))
        load_s = time.perf_counter() - loaded
        if kind == "postgresql":  # what autovacuum would have done by now
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        rollouts = Rollouts(db, RolloutOptions(), gates=QualityGates())
        verdict = rollouts.quality("shop", "stable")
        assert verdict["candidate"]["predictions"] == 100 * len(range(0, reports, 5)), verdict["candidate"]
        exact = median_ms(lambda: rollouts.quality("shop", "stable"), runs)

        def hourly() -> None:
            with db.read() as session:
                version_quality(session, model_id, 2, mode="serving", channel="stable", since=start)
                version_quality(session, model_id, 1, mode="serving", channel="stable", since=start)

        rolled = median_ms(hourly, runs)
        with db.read() as session:
            count = len(session.scalars(select(Telemetry.id)).all())
        db.dispose()
        print(f"{kind:<10} {count} reports in the rollout's first hour (loaded in {load_s:.0f} s): "
              f"gate check on the exact window {exact:.1f} ms, the two versions from the hourly rollups {rolled:.1f} ms "
              f"({exact / rolled:.1f}x); verdict passed={verdict['passed']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for kind in args.db.split(","):
        run(kind.strip(), args.reports, args.devices, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
