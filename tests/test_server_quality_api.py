"""An operator publishes a version whose bundle carries its baseline, kiosks report a shifted field, and
the quality API and /metrics show how far it drifted, per channel, mode and hour."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sync_server import quality, telemetry
from sync_server.api.quality import parse_since
from sync_server.errors import BadRequestError
from sync_server.registry import find_model
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    _CACHE,
    _drop_postgres_at_exit,
    db_url,
    publisher,
    running_server,
    server_config,
)

#: The baseline of version 4: 10 validation photos per label, confidence mostly high, grey-ish photos.
PER_LABEL = 10
INPUT_MEAN, INPUT_STD = [120.0, 110.0, 100.0], [40.0, 40.0, 40.0]


def baseline_bundle(publisher, root: Path) -> tuple[Path, dict[str, Any]]:
    """Version 4 of the publisher's model with a baseline in its signed manifest (built once)."""
    if "quality-v4" in _CACHE:
        return _CACHE["quality-v4"]
    from converter import read_bundle, write_bundle
    from converter.baseline import Baseline

    labels = len(publisher.labels)
    images = PER_LABEL * labels
    doc = {
        "images": images, "confidence_threshold": 0.6, "class_counts": [PER_LABEL] * labels,
        "confidence_histogram": [0] * 5 + [images // 10] * 2 + [0, 0, images - 2 * (images // 10)],
        "low_confidence_rate": 0.2, "per_class_agreement": [1.0] * labels,
        "input": {"images": images, "pixels": images * 1000, "mean": INPUT_MEAN, "std": INPUT_STD},
    }
    bundle = read_bundle(publisher.bundles[1], publisher.public_key)
    manifest = dataclasses.replace(bundle.manifest, version=4, baseline=Baseline.from_dict(doc))
    path = write_bundle(root / "v4-baseline", bundle.read_model(), manifest, sign_key=publisher.private_key)
    _CACHE["quality-v4"] = (path, doc)
    return path, doc


def report(predictions: int, class_counts: list[int], *, version: int = 4, mean: list[float] = INPUT_MEAN, **fields: Any) -> dict[str, Any]:
    pixels = predictions * 1000
    return {
        "version": version, "period_s": 300, "predictions": predictions, "fallbacks": predictions // 10,
        "latency_ms": {"p50": 10.0, "p99": 30.0}, "class_counts": class_counts,
        "confidence_histogram": [0] * 5 + [predictions // 10] * 2 + [0, 0, predictions - 2 * (predictions // 10)],
        "low_confidence": predictions // 5, "fallback_answers": predictions // 10, "disagreements": predictions // 50,
        "input_stats": {"images": predictions, "pixels": pixels, "sum": [m * pixels for m in mean],
                        "sum_sq": [(m * m + 1600.0) * pixels for m in mean]},
        **fields,
    }


def jsd_point_mass_vs_uniform(n: int) -> float:
    """By hand: P = (1, 0, ..., 0), Q uniform over n: M = ((1 + 1/n)/2, 1/(2n), ...).
    KL(P||M) = log2(2 / (1 + 1/n)); KL(Q||M) = 1/n log2((1/n) / M0) + (n-1)/n log2(2)."""
    m0 = (1 + 1 / n) / 2
    return (math.log2(1 / m0) + (1 / n) * math.log2((1 / n) / m0) + (n - 1) / n * 1.0) / 2


def test_quality_figures_and_drift_against_the_bundle_baseline(db_url, publisher, tmp_path):
    bundle, base = baseline_bundle(publisher, tmp_path)
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1)
        assert server.publish(bundle, publisher.saved_model, channel="stable").status_code in (200, 201)
        server.set_channel(4, "canary")
        with server.services.db.read() as session:
            model_id = find_model(session, MODEL).id
            assert quality.version_quality(session, model_id, 4).reports == 0, "no reports yet: zeros, no figures"
        labels = len(publisher.labels)
        shop, hall, canary = server.enroll(), server.enroll(), server.enroll(channel="canary")

        # The shop sees only one kind of thing, darker in its first channel (2 baseline stds); the hall
        # sees the baseline's field; a report of the hall from three hours ago had the baseline's classes.
        skewed = [100] + [0] * (labels - 1)
        darker = [INPUT_MEAN[0] - 2 * INPUT_STD[0], *INPUT_MEAN[1:]]
        for device, body in ((shop, report(100, skewed, mean=darker)), (hall, report(100 * labels, [100] * labels)),
                             (canary, report(50, [50] + [0] * (labels - 1)))):
            sent = server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers, json=body)
            assert sent.status_code == 202, sent.text
        three_hours_ago = datetime.now(timezone.utc) - timedelta(hours=3)
        telemetry.record(server.services.db, hall.id, MODEL, report(40, [40] + [0] * (labels - 1)), received_at=three_hours_ago)

        answer = server.admin("GET", f"/v1/models/{MODEL}/quality", params={"channel": "stable", "since": "3600"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == MODEL and body["channel"] == "stable" and body["resolution_s"] == 3600
        window = datetime.fromisoformat(body["since"].replace("Z", "+00:00"))
        assert window.minute == window.second == 0 and datetime.now(timezone.utc) - window <= timedelta(hours=2), \
            "the window starts at the top of the hour an hour ago"
        (v4,) = body["versions"]
        predictions = 100 + 100 * labels
        assert (v4["version"], v4["mode"], v4["reports"], v4["devices"], v4["predictions"]) == (4, "serving", 2, 2, predictions)
        assert v4["fallback_rate"] == (10 + 10 * labels) / predictions
        assert v4["low_confidence_rate"] == (20 + 20 * labels) / predictions
        assert v4["disagreement_rate"] == (2 + 2 * labels) / (10 + 10 * labels)
        assert v4["latency_p50_ms"] == 10.0 and v4["latency_p99_ms"] == 30.0 and v4["shadow_agreement"] is None
        field = [100 + 100] + [100] * (labels - 1)  # shop's 100 on the first label plus the hall's uniform
        p = [c / sum(field) for c in field]
        m = [(a + 1 / labels) / 2 for a in p]
        by_hand = sum(0.5 * a * math.log2(a / b) + 0.5 * (1 / labels) * math.log2((1 / labels) / b) for a, b in zip(p, m))
        assert v4["class_jsd"] == pytest.approx(by_hand)
        assert v4["confidence_jsd"] == pytest.approx(0.0, abs=1e-9), "the same confidence shape as the baseline"
        # channel 0's mean: (100 x 40 + 100 x labels x 120) / (100 + 100 x labels); shift = |mean - 120| / 40
        mean0 = (100 * darker[0] + 100 * labels * INPUT_MEAN[0]) / predictions
        assert v4["input_shift"] == pytest.approx(abs(mean0 - INPUT_MEAN[0]) / INPUT_STD[0])

        everything = server.admin("GET", f"/v1/models/{MODEL}/quality", params={"channel": "stable"}).json()
        assert everything["since"] is None and everything["versions"][0]["reports"] == 3, "no since: every retained hour"
        hours = sorted({point["at"] for point in everything["series"]})
        assert len(hours) == 2 and all(h.endswith(":00:00Z") for h in hours)
        old = next(point for point in everything["series"] if point["at"] == hours[0])
        assert (old["reports"], old["devices"], old["predictions"]) == (1, 1, 40)
        assert old["class_jsd"] == pytest.approx(jsd_point_mass_vs_uniform(labels)), "one class only, by hand"
        day = server.admin("GET", f"/v1/models/{MODEL}/quality", params={"channel": "stable", "bucket_s": 86400}).json()
        assert sum(p["reports"] for p in day["series"]) == 3 and len(day["series"]) <= 2

        (canary_v4,) = server.admin("GET", f"/v1/models/{MODEL}/quality", params={"channel": "canary"}).json()["versions"]
        assert (canary_v4["channel"], canary_v4["reports"], canary_v4["devices"]) == ("canary", 1, 1)
        assert canary_v4["class_jsd"] == pytest.approx(jsd_point_mass_vs_uniform(labels))
        assert server.admin("GET", f"/v1/models/{MODEL}/quality", params={"mode": "shadow"}).json()["versions"] == []

        with server.services.db.read() as session:
            direct = quality.version_quality(session, model_id, 4, channel="stable", since=datetime.now(timezone.utc) - timedelta(hours=1))
        assert direct.to_dict() == v4, "the API answers exactly version_quality"

        summary = server.admin("GET", f"/v1/models/{MODEL}/telemetry", params={"version": 4}).json()["versions"][0]
        assert summary["has_baseline"] is True and summary["reports"] == 4 and summary["class_jsd"] is not None

        for bad, code in (({"since": "yesterday"}, 400), ({"since": "-5"}, 400), ({"mode": "canary"}, 422), ({"bucket_s": 60}, 422)):
            refused = server.admin("GET", f"/v1/models/{MODEL}/quality", params=bad)
            assert refused.status_code == code, (bad, refused.text)
        assert "neither an ISO 8601 time" in server.admin("GET", f"/v1/models/{MODEL}/quality",
                                                          params={"since": "yesterday"}).json()["error"]["message"]
        assert server.admin("GET", "/v1/models/nope/quality").json()["error"]["code"] == "unknown_model"
        assert server.client.get(f"/v1/models/{MODEL}/quality", headers=shop.headers).status_code == 403, "admins only"

        metrics = server.client.get("/metrics").text
        labels_ = f'channel="stable",mode="serving",model="{MODEL}",version="4"'
        assert f"sync_server_quality_devices{{{labels_}}} 2.0" in metrics
        for name in ("fallback_rate", "low_confidence_rate", "disagreement_rate", "class_jsd", "confidence_jsd", "input_shift"):
            line = next(line for line in metrics.splitlines() if line.startswith(f"sync_server_quality_{name}{{{labels_}}}"))
            assert float(line.split()[-1]) == pytest.approx(v4[name]), name
        assert f'sync_server_quality_class_jsd{{channel="canary",mode="serving",model="{MODEL}",version="4"}}' in metrics


def test_since_is_an_iso_time_or_seconds_back():
    now = datetime(2026, 12, 1, 12, 30, tzinfo=timezone.utc)
    assert parse_since("3600", now=now) == datetime(2026, 12, 1, 11, 30, tzinfo=timezone.utc)
    assert parse_since("2026-12-01T10:15:00Z") == datetime(2026, 12, 1, 10, 15, tzinfo=timezone.utc)
    assert parse_since("2026-12-01T10:15:00") == datetime(2026, 12, 1, 10, 15, tzinfo=timezone.utc), "no zone: UTC"
    assert parse_since(None) is None
    for bad in ("soon", "nan", "-1", "1e12"):
        with pytest.raises(BadRequestError):
            parse_since(bad)
    assert quality.window_start(datetime(2026, 12, 1, 10, 59, 59, tzinfo=timezone.utc)) == datetime(2026, 12, 1, 10, tzinfo=timezone.utc)


def test_shadow_reports_count_for_the_candidate_in_shadow_mode_only(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        server.publish_ok(publisher, 2)
        kiosk = server.enroll()
        labels = len(publisher.labels)
        shadow = report(40, [40] + [0] * (labels - 1), version=2, mode="shadow", shadow_of=1, agreements=36, fallbacks=0,
                        fallback_answers=0, disagreements=0)
        post = lambda body: server.client.post(f"/v1/devices/{kiosk.id}/telemetry", headers=kiosk.headers, json=body)  # noqa: E731
        early = post(shadow)
        assert early.status_code == 403 and early.json()["error"]["code"] == "not_assigned", "no shadow rollout yet"

        started = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout",
                               json={"version": 2, "percent": 100, "mode": "shadow", "sample_rate": 0.5})
        assert started.status_code == 200, started.text
        assert kiosk.assignment().json()["shadow"]["version"] == 2
        assert post(shadow).status_code == 202
        assert post(report(100, [100] + [0] * (labels - 1), version=1)).status_code == 202
        serving_v2 = post(report(10, [10] + [0] * (labels - 1), version=2))
        assert serving_v2.status_code == 403, "the kiosk runs v2 only in shadow: no serving report about it"

        body = server.admin("GET", f"/v1/models/{MODEL}/quality", params={"mode": "shadow"}).json()
        (candidate,) = body["versions"]
        assert (candidate["version"], candidate["mode"], candidate["predictions"]) == (2, "shadow", 40)
        assert candidate["shadow_agreement"] == 36 / 40 and candidate["fallback_rate"] == 0.0
        assert candidate["class_jsd"] is None, "the tiny bundles carry no baseline"
        assert {p["mode"] for p in body["series"]} == {"shadow"}
        summary = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()
        assert [v["version"] for v in summary["versions"]] == [1] and [v["version"] for v in summary["shadow"]] == [2]
        assert summary["shadow"][0]["agreements"] == 36
