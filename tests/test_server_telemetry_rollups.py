"""Kiosks report telemetry; the server rolls every report up per hour, counts a resent report once, keeps
the sums right under concurrent reports, and deletes expired rows while the figures stay."""

from __future__ import annotations

import concurrent.futures
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
from alembic import command
from alembic.config import Config
from sqlalchemy import select, text

from sync_server import telemetry
from sync_server.config import RetentionOptions, ThrottleOptions
from sync_server.db import MIGRATIONS_DIR, Database
from sync_server.models import (
    Device,
    ModelVersion,
    Telemetry,
    TelemetryDevice,
    TelemetryHourly,
    TelemetryHourlyClass,
    TelemetryHourlyConfidence,
    TelemetryHourlyDevice,
    TelemetryHourlyInput,
)
from sync_server.retention import purge
from tests.agent_support import wait_for
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    live_server,
    publisher,
    running_server,
    server_config,
)


def report(predictions: int = 100, **fields: Any) -> dict[str, Any]:
    """A report of the new agent: counts, histogram, class counts, input sums."""
    body: dict[str, Any] = {
        "version": 1, "period_s": 300, "predictions": predictions, "fallbacks": predictions // 10,
        "latency_ms": {"p50": 12.0, "p99": 40.0},
        "confidence_histogram": [0] * 6 + [predictions // 10, predictions // 5, predictions // 5,
                                           predictions - predictions // 10 - 2 * (predictions // 5)],
        "class_counts": [predictions // 2, predictions - predictions // 2], "low_confidence": predictions // 5,
        "fallback_answers": predictions // 10, "disagreements": predictions // 20,
        "input_stats": {"images": predictions, "pixels": predictions * 100, "sum": [120.0 * predictions * 100] * 3,
                        "sum_sq": [16000.0 * predictions * 100] * 3},
    }
    body.update(fields)
    return body


def send(server, device, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {**device.headers, **({"Idempotency-Key": key} if key else {})}
    return server.client.post(f"/v1/devices/{device.id}/telemetry", headers=headers, json=body)


def rollups(db: Database) -> dict[str, Any]:
    """Everything in the rollup tables, keyed, for comparing with the raw rows."""
    out: dict[str, Any] = {}
    with db.read() as session:
        hourly = TelemetryHourly.__table__
        out["hourly"] = {
            (r.version, r.mode, r.channel, r.hour): {c: getattr(r, c) for c in (
                "reports", "predictions", "fallbacks", "errors", "low_confidence", "low_confidence_predictions",
                "fallback_answers", "disagreements", "agreements", "latency_p50_weight", "latency_p50_reports",
                "latency_p99_max", "histogram_bins", "class_slots", "input_images")}
            | {"p50_weighted": round(r.latency_p50_weighted, 6)}
            for r in session.execute(select(hourly))
        }
        for name, model, index in (("confidence", TelemetryHourlyConfidence, "bin"), ("classes", TelemetryHourlyClass, "class_index")):
            out[name] = {(r.version, r.mode, r.channel, r.hour, getattr(r, index)): r.n for r in session.scalars(select(model))}
        out["input"] = {(r.version, r.mode, r.channel, r.hour, r.channel_index): (r.pixels, round(r.pixel_sum, 3))
                        for r in session.scalars(select(TelemetryHourlyInput))}
        out["devices"] = {(r.version, r.mode, r.channel, r.hour, r.device_id) for r in session.scalars(select(TelemetryHourlyDevice))}
        out["device_hours"] = {(r.version, r.mode, r.channel, r.device_id): (r.first_hour, r.last_hour)
                               for r in session.scalars(select(TelemetryDevice))}
    return out


def sums_of_raw_rows(db: Database) -> dict[str, Any]:
    """The same sums computed here, in Python, from the raw rows (the oracle)."""
    out: dict[str, Any] = {"hourly": {}, "confidence": defaultdict(int), "classes": defaultdict(int), "input": {},
                           "devices": set(), "device_hours": {}}
    with db.read() as session:
        rows = list(session.scalars(select(Telemetry)))
        session.expunge_all()  # read them after the session ends
    for r in rows:
        hour = telemetry.hour_of(r.received_at)
        key = (r.version, r.mode, r.channel, hour)
        item = out["hourly"].setdefault(key, dict.fromkeys((
            "reports", "predictions", "fallbacks", "errors", "low_confidence", "low_confidence_predictions",
            "fallback_answers", "disagreements", "agreements", "latency_p50_weight", "latency_p50_reports",
            "histogram_bins", "class_slots", "input_images", "p50_weighted"), 0) | {"latency_p99_max": None})
        item["reports"] += 1
        for name in ("predictions", "fallbacks", "errors", "fallback_answers", "disagreements", "agreements"):
            item[name] += getattr(r, name)
        if r.low_confidence is not None:
            item["low_confidence"] += r.low_confidence
            item["low_confidence_predictions"] += r.predictions
        if r.latency_p50_ms is not None:
            item["latency_p50_weight"] += r.predictions
            item["latency_p50_reports"] += 1
            item["p50_weighted"] = round(item["p50_weighted"] + r.latency_p50_ms * r.predictions, 6)
        if r.latency_p99_ms is not None:
            item["latency_p99_max"] = max(item["latency_p99_max"] or 0.0, r.latency_p99_ms)
        item["histogram_bins"] = max(item["histogram_bins"], len(r.confidence_histogram))
        item["class_slots"] = max(item["class_slots"], len(r.class_counts or []))
        for i, n in enumerate(r.confidence_histogram):
            if n:
                out["confidence"][(*key, i)] += n
        for i, n in enumerate(r.class_counts or []):
            if n:
                out["classes"][(*key, i)] += n
        if r.input_stats:
            item["input_images"] += r.input_stats["images"]
            for i, total in enumerate(r.input_stats["sum"]):
                pixels, summed = out["input"].get((*key, i), (0, 0.0))
                out["input"][(*key, i)] = (pixels + r.input_stats["pixels"], round(summed + total, 3))
        out["devices"].add((*key, r.device_id))
        first, last = out["device_hours"].get((r.version, r.mode, r.channel, r.device_id), (hour, hour))
        out["device_hours"][(r.version, r.mode, r.channel, r.device_id)] = (min(first, hour), max(last, hour))
    out["confidence"], out["classes"] = dict(out["confidence"]), dict(out["classes"])
    return out


def test_reports_roll_up_per_hour_to_exactly_the_sums_of_their_raw_rows(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        server.publish_ok(publisher, 2, channel="canary")
        db = server.services.db
        shop, hall = server.enroll(), server.enroll()
        canary = server.enroll(channel="canary")
        assert send(server, shop, report(100), key="r-1").status_code == 202
        assert send(server, shop, report(40, latency_ms={"p50": 30.0, "p99": 90.0})).status_code == 202
        assert send(server, hall, report(200, class_counts=[0, 150, 50, 0, 0])).status_code == 202
        old_agent = {"version": 1, "period_s": 60, "predictions": 10, "fallbacks": 1, "confidence_histogram": [2, 8]}
        assert send(server, hall, old_agent).status_code == 202, "reports without the new fields still count"
        assert send(server, canary, report(80, version=2)).status_code == 202
        two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
        telemetry.record(db, shop.id, MODEL, report(60), received_at=two_hours_ago)

        assert rollups(db) == sums_of_raw_rows(db)
        with db.read() as session:
            assert session.scalar(select(Telemetry.channel).where(Telemetry.device_id == canary.id)) == "canary", \
                "the channel is the device's at receipt"

        before = rollups(db)
        again = send(server, shop, report(100), key="r-1")
        assert again.json() == {"recorded": True, "duplicate": True}
        assert rollups(db) == before, "a resent report changes no rollup"

        (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry", params={"version": 1}).json()["versions"]
        assert (v1["reports"], v1["devices"], v1["predictions"]) == (5, 2, 410)
        assert v1["fallbacks"] == 10 + 4 + 20 + 1 + 6 and v1["fallback_rate"] == 41 / 410
        assert v1["low_confidence"] == 20 + 8 + 40 + 12 and v1["low_confidence_rate"] == 80 / 400, \
            "the rate's denominator leaves out the old agent's predictions (it did not count low confidence)"
        assert v1["class_counts"] == [50 + 20 + 0 + 30, 50 + 20 + 150 + 30, 50, 0, 0]
        assert v1["confidence_histogram"][0:2] == [2, 8] and sum(v1["confidence_histogram"]) == 410
        assert v1["latency_ms"] == {"p50_mean": (12 * 100 + 30 * 40 + 12 * 200 + 12 * 60) / 400, "p99_max": 90.0}
        assert v1["disagreement_rate"] == (5 + 2 + 10 + 3) / 40 and v1["input"]["mean"] == [120.0, 120.0, 120.0]
        assert v1["shadow_agreement"] is None and v1["class_jsd"] is None, "no baseline in these bundles"


def test_concurrent_reports_and_racing_resends_sum_correctly(db_url, publisher, tmp_path):
    config = server_config(tmp_path / "data", db_url, publisher, throttle=ThrottleOptions(enabled=False))
    with live_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        devices = [server.enroll() for _ in range(6)]
        sends = [(device, n, f"{device.id}-{n}") for device in devices for n in range(12)]
        sends = sends + sends  # every report twice: the outbox resends while the first copy is in flight
        random.Random(7).shuffle(sends)

        def post(item):  # type: ignore[no-untyped-def]
            device, n, key = item
            return send(server, device, report(10 + n), key=key)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(post, sends))
        assert all(a.status_code == 202 for a in answers), [a.text for a in answers if a.status_code != 202][:3]
        assert sum(a.json()["duplicate"] for a in answers) == len(sends) // 2, "each report was stored once"

        db = server.services.db
        assert rollups(db) == sums_of_raw_rows(db)
        (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"]
        assert v1["reports"] == 6 * 12 and v1["predictions"] == 6 * sum(10 + n for n in range(12)) and v1["devices"] == 6


def test_retention_deletes_expired_raw_rows_and_rollups_in_batches_and_keeps_recent_ones(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        kiosk = server.enroll()
        db = server.services.db
        now = datetime.now(timezone.utc)
        ages = {"500 days": timedelta(days=500), "20 days": timedelta(days=20), "1 hour": timedelta(hours=1)}
        for (name, age), predictions in zip(ages.items(), (1000, 200, 30)):
            for i in range(3):
                telemetry.record(db, kiosk.id, MODEL, report(predictions), f"{name.replace(' ', '-')}-{i}", received_at=now - age)

        result = purge(db, RetentionOptions(telemetry_days=14, rollup_days=400, batch_rows=2), now=now)
        assert result.telemetry_rows == 6 and result.batches >= 3 + 1, "six raw rows in batches of two, then rollups"
        with db.read() as session:
            kept = sorted(r.predictions for r in session.scalars(select(Telemetry)))
            hours = sorted(session.scalars(select(TelemetryHourly.hour)))
        assert kept == [30, 30, 30], "raw rows older than 14 days are gone"
        assert hours == sorted({telemetry.hour_of(now - ages["20 days"]), telemetry.hour_of(now - ages["1 hour"])})
        (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"]
        assert v1["predictions"] == 3 * 200 + 3 * 30, "the 20-day-old figures live on in the rollups"
        assert purge(db, RetentionOptions(), now=now) == type(result)(0, 0, 0), "nothing left to delete"


def test_the_server_runs_retention_in_the_background(publisher, tmp_path):
    config = server_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", publisher,
                           retention=RetentionOptions(telemetry_days=1, interval_s=0.2))
    with running_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        kiosk = server.enroll()
        db = server.services.db
        telemetry.record(db, kiosk.id, MODEL, report(50), received_at=datetime.now(timezone.utc) - timedelta(days=3))
        assert send(server, kiosk, report(7)).status_code == 202

        def raw() -> list[int]:
            with db.read() as session:
                return sorted(session.scalars(select(Telemetry.predictions)))

        wait_for(lambda: raw() == [7], timeout=10, what="the 3-day-old raw row deleted by the retention task")


def test_bad_report_fields_are_refused_with_one_clear_line(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        kiosk = server.enroll()
        cases = {
            "class_counts": (report(class_counts=[1] * 10_001), "field class_counts: List should have at most 10000 items"),
            "negative class": (report(class_counts=[1, -1]), "field class_counts.1: Input should be greater than or equal to 0"),
            "low_confidence": (report(10, low_confidence=11), "low_confidence (11) may not exceed predictions (10)"),
            "answers": (report(10, fallback_answers=2), "fallback_answers (2) may not exceed fallbacks (1)"),
            "disagreements": (report(100, disagreements=11), "disagreements (11) may not exceed fallback_answers (10)"),
            "agreements": (report(10, agreements=11), "agreements (11) may not exceed predictions (10)"),
            "shadow_of": (report(mode="shadow"), "a report with mode shadow needs shadow_of"),
            "mode": (report(mode="canary"), "field mode: Input should be 'serving' or 'shadow'"),
            "channels": (report(input_stats={"images": 1, "pixels": 1, "sum": [1.0] * 5, "sum_sq": [1.0] * 5}),
                         "field input_stats.sum: List should have at most 4 items"),
            "sums": (report(input_stats={"images": 1, "pixels": 2, "sum": [600.0], "sum_sq": [1.0]}),
                     "channel 0: the sums are outside what 2 pixels of 0..255 can add up to"),
            "mismatch": (report(input_stats={"images": 1, "pixels": 2, "sum": [1.0, 2.0], "sum_sq": [1.0]}),
                         "sum has 2 channels and sum_sq 1; they must match"),
            "huge": (report(agreements=10**13), "field agreements: Input should be less than or equal to 1000000000000"),
        }
        for what, (body, expected) in cases.items():
            refused = send(server, kiosk, body)
            assert refused.status_code == 422, (what, refused.text)
            message = refused.json()["error"]["message"]
            assert expected in message and "\n" not in message, (what, message)
        nan = server.client.post(f"/v1/devices/{kiosk.id}/telemetry", headers={**kiosk.headers, "Content-Type": "application/json"},
                                 content='{"version": 1, "period_s": 1, "predictions": 1, "fallbacks": 0, '
                                         '"input_stats": {"images": 1, "pixels": 1, "sum": [NaN], "sum_sq": [1]}}')
        assert nan.status_code == 422 and nan.json()["error"]["message"].startswith("field input_stats.sum.0:")
        assert server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"] == [], "nothing was stored"


def test_migration_0006_rolls_up_the_telemetry_stored_before_it(db_url):
    db = Database(db_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with db.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0005")
            connection.execute(text("INSERT INTO models (id, name, created_at) VALUES (1, 'shop', '2026-01-01')"))
            connection.execute(text(
                "INSERT INTO model_versions (id, model_id, version, manifest_sha256, manifest, saved_model_digest, labels, "
                "float_spec, created_at) VALUES (1, 1, 1, 'a', :manifest, 'b', '[]', '{}', '2026-01-01')"),
                {"manifest": '{"version": 1, "baseline": {"images": 4, "class_counts": [1, 3]}}'})
            connection.execute(text("INSERT INTO devices (id, model_id, channel, token_sha256, revoked, created_at) "
                                    "VALUES ('dev_1', 1, 'stable', 't', false, '2026-01-01')"))
            for predictions in (10, 20):
                connection.execute(text(
                    "INSERT INTO telemetry (device_id, version, received_at, period_s, predictions, fallbacks, errors, "
                    "latency_p50_ms, latency_p99_ms, confidence_histogram) "
                    "VALUES ('dev_1', 1, '2026-11-30 10:20:00+00:00', 60, :p, 1, 0, 5.0, 9.0, '[1, 2]')"), {"p": predictions})
            connection.commit()
        db.migrate()
        assert rollups(db) == sums_of_raw_rows(db)
        assert telemetry.summary(db, "shop")["versions"][0]["predictions"] == 30
        with db.read() as session:
            assert session.scalar(select(Device.channel)) == "stable"
            assert session.scalar(select(ModelVersion.baseline)) == {"images": 4, "class_counts": [1, 3]}, \
                "the baseline is read from the manifests already published"
    finally:
        db.dispose()
