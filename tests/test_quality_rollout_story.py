"""Issue 14's "done means": a rollout gated on model quality, end to end against a real sync-server.

An operator publishes two versions of the demo model, each converted with its validation baseline.
A fleet of devices (plain HTTP clients speaking the device API) serves v1 and runs v2 in shadow; the
shadow figures are healthy, so the rollout moves to a 20 % canary. Then the photos change: the
devices on v2 see dim pictures, answer with less confidence and spread their answers over classes
the baseline rarely saw. The rollout pauses itself, says why, the canary devices go back to v1,
and the quality API shows the drift figures per version.

The devices' figures are built from the bundle's own baseline (a healthy device answers like the
validation run did) and their input statistics from real photos through `preprocessing.InputStats`,
so nothing below is a number typed in by hand: every expected figure is computed from what the
devices sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from converter.baseline import HISTOGRAM_BINS, Baseline
from preprocessing import InputStats, list_labeled_images, preprocess_pixels
from sync_server.rollout import bucket
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    ENROLLMENT_SECRET,
    _drop_postgres_at_exit,
    db_url,
    serve_process,
)

pytestmark = pytest.mark.slow

MODEL = "shop"
CHANNEL = "stable"
DEVICES = 30
#: Photos each device classifies per report period.
PER_PERIOD = 120
SAMPLE_RATE = 0.1
CANARY_PERCENT = 20


# ----------------------------------------------------------------------------------------------------------
# The operator's side: two converted versions with baselines
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    bundles: dict[int, Path]
    baselines: dict[int, Baseline]
    labels: tuple[str, ...]
    public_key: Path
    saved_model: Path
    photos: tuple[Path, ...]  # photos the devices see (the demo data set's test split)
    spec: Any  # the float PreprocessSpec: what InputStats is measured on


@pytest.fixture(scope="module")
def release(tiny_saved_model: Path, demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """v1 and v2 of the demo model, each converted and validated (so each carries its baseline)."""
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair

    root = tmp_path_factory.mktemp("story")
    private, public = write_keypair(root / "publisher")
    # The threshold: a top-1 score a little above chance. The tiny session model is barely trained,
    # so the usual 0.5 would call every answer low-confidence and leave nothing to rise.
    labels = tuple((tiny_saved_model / "labels.txt").read_text().split())
    threshold = round(1.0 / len(labels) + 0.001, 3)
    bundles, baselines = {}, {}
    for version in (1, 2):
        result = convert(tiny_saved_model, ConvertOptions(
            out=root / f"v{version}", name=MODEL, version=version, confidence_threshold=threshold,
            validation=ValidationOptions(images=demo_dataset / "val", min_agreement=0.75, min_class_agreement=0.0),
            signing=SigningOptions(key=private),
        ))
        assert result.manifest.baseline is not None, "a validated conversion writes a baseline"
        bundles[version], baselines[version] = result.bundle, result.manifest.baseline
    photos = list_labeled_images(demo_dataset / "test", labels).paths
    return Release(bundles, baselines, labels, public, tiny_saved_model, tuple(photos), result.manifest.float_preprocess_spec)


# ----------------------------------------------------------------------------------------------------------
# The devices' side: what a period of classifying looks like, as the agent would report it
# ----------------------------------------------------------------------------------------------------------


def spread(shares: list[float], total: int) -> list[int]:
    """`total` split in proportion to `shares` (largest remainder): counts that add up exactly."""
    weight = sum(shares)
    raw = [total * s / weight for s in shares]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def input_report(release: Release, *, dim: float = 1.0) -> dict[str, Any]:
    """InputStats sums over the fitted pixels of the photos a device saw (dimmed by `dim`)."""
    stats = InputStats()
    for path in release.photos:
        pixels = preprocess_pixels(path, release.spec)
        stats.add((pixels.astype(np.float32) * dim).astype(np.uint8) if dim != 1.0 else pixels)
    return stats.to_report()


@dataclass(frozen=True)
class Period:
    """What one device's agent reports for a period: its answers, as the telemetry fields."""

    class_counts: list[int]
    confidence_histogram: list[int]
    low_confidence: int
    input_stats: dict[str, Any]

    @classmethod
    def like_baseline(cls, baseline: Baseline, photos: int, inputs: dict[str, Any]) -> "Period":
        """A healthy period: answers distributed as in the validation run."""
        low = round(photos * baseline.low_confidence_rate)
        return cls(spread([float(c) for c in baseline.class_counts], photos),
                   spread([float(c) for c in baseline.confidence_histogram], photos), low, inputs)

    @classmethod
    def shifted(cls, baseline: Baseline, photos: int, inputs: dict[str, Any]) -> "Period":
        """A drifted period: 40 % more answers under the threshold, and those answers spread evenly over
        every label instead of following the baseline; their scores sit in the lowest bins."""
        low = min(photos, round(photos * baseline.low_confidence_rate) + round(photos * 0.4))
        usual = spread([float(c) for c in baseline.class_counts], photos - low)
        odd = spread([1.0] * len(baseline.class_counts), low)
        confident = spread([float(c) for c in baseline.confidence_histogram], photos - low)
        unsure = spread([1.0, 1.0] + [0.0] * (HISTOGRAM_BINS - 2), low)
        return cls([a + b for a, b in zip(usual, odd)], [a + b for a, b in zip(confident, unsure)], low, inputs)

    def serving(self, version: int) -> dict[str, Any]:
        predictions = sum(self.class_counts)
        answered = self.low_confidence  # every low-confidence photo goes to the server, which answers
        return {
            "version": version, "period_s": 60.0, "mode": "serving",
            "predictions": predictions, "fallbacks": self.low_confidence, "errors": 0,
            "latency_ms": {"p50": 3.0, "p95": 5.0, "p99": 7.0, "mean": 3.4},
            "confidence_histogram": self.confidence_histogram, "class_counts": self.class_counts,
            "low_confidence": self.low_confidence, "fallback_answers": answered,
            "disagreements": answered // 20, "input_stats": self.input_stats,
        }

    def shadow(self, version: int, shadow_of: int, agreements: int) -> dict[str, Any]:
        return {
            "version": version, "period_s": 60.0, "mode": "shadow", "shadow_of": shadow_of,
            "predictions": sum(self.class_counts), "fallbacks": 0, "errors": 0,
            "latency_ms": {"p50": 3.1, "p95": 5.2, "p99": 7.5, "mean": 3.5},
            "confidence_histogram": self.confidence_histogram, "class_counts": self.class_counts,
            "low_confidence": self.low_confidence, "agreements": agreements, "input_stats": self.input_stats,
        }


@dataclass
class SimulatedDevice:
    """An enrolled device speaking the device API over HTTP (what edge_runtime's agent does)."""

    http: httpx.Client  # the fleet shares one connection pool; each device has its own token
    id: str
    token: str
    sent: list[dict[str, Any]]
    installed: int | None = None

    @classmethod
    def enrol(cls, http: httpx.Client, name: str) -> "SimulatedDevice":
        response = http.post("/v1/devices/enroll", headers={"Authorization": f"Bearer {ENROLLMENT_SECRET}"},
                             json={"model": MODEL, "channel": CHANNEL, "name": name})
        assert response.status_code == 201, response.text
        return cls(http, response.json()["device_id"], response.json()["token"], [])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def assignment(self) -> dict[str, Any]:
        response = self.http.get(f"/v1/devices/{self.id}/assignment", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    def sync(self) -> dict[str, Any]:
        """Ask for the assignment and, like the agent, install a new version and say it loaded."""
        assignment = self.assignment()
        if assignment["version"] != self.installed:
            status = self.http.post(f"/v1/devices/{self.id}/status", headers=self.headers,
                                    json={"version": assignment["version"], "load_ok": True, "smoke_test_ok": True})
            assert status.status_code == 200, status.text
            self.installed = assignment["version"]
        return assignment

    def post(self, report: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/v1/devices/{self.id}/telemetry", headers=self.headers, json=report)

    def report(self, report: dict[str, Any]) -> None:
        response = self.post(report)
        assert response.status_code == 202, response.text
        self.sent.append(report)


class Operator:
    """The operator's admin API calls (an httpx client with the admin token)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, path, **kwargs)
        assert response.status_code in (200, 201), f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def channel(self) -> dict[str, Any]:
        return self.ok("GET", f"/v1/models/{MODEL}/channels/{CHANNEL}")


def jensen_shannon(p_counts: list[float], q_counts: list[float]) -> float:
    """JSD, base 2, of two count vectors (the test's own, to check the server's figure)."""
    p = np.asarray(p_counts, np.float64) / sum(p_counts)
    q = np.asarray(q_counts, np.float64) / sum(q_counts)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return (kl(p) + kl(q)) / 2


def summed(reports: list[dict[str, Any]], field: str) -> Any:
    values = [r[field] for r in reports]
    if isinstance(values[0], list):
        return [sum(column) for column in zip(*values)]
    return sum(values)


def figures(quality: dict[str, Any], version: int, mode: str) -> dict[str, Any]:
    found = [v for v in quality["versions"] if v["version"] == version and v["mode"] == mode]
    assert len(found) == 1, f"quality has no single entry for v{version} {mode}: {quality['versions']}"
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# The story
# ----------------------------------------------------------------------------------------------------------


def test_a_rollout_goes_shadow_then_canary_and_pauses_itself_when_its_answers_drift(release, db_url, tmp_path):
    env = {
        "SYNC_SERVER_DATA_DIR": str(tmp_path / "data"), "SYNC_SERVER_DATABASE_URL": db_url,
        "SYNC_SERVER_ADMIN_TOKEN": ADMIN_TOKEN, "SYNC_SERVER_ENROLLMENT_SECRET": ENROLLMENT_SECRET,
        "SYNC_SERVER_PUBLISHER_KEYS": str(release.public_key), "SYNC_SERVER_EMBEDDED_PRELOAD": "off",
        "SYNC_SERVER_LOG_LEVEL": "warning", "SYNC_SERVER_THROTTLE": "off",
    }
    healthy_inputs, dim_inputs = input_report(release), input_report(release, dim=0.35)
    base1, base2 = release.baselines[1], release.baselines[2]
    with serve_process([], tmp_path / "server.log", env=env, ready_path="/healthz") as (url, _process), \
            httpx.Client(base_url=url, timeout=30) as http, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as admin:
        from sync_server.client import SyncServerClient

        with SyncServerClient(url, ADMIN_TOKEN) as publisher:
            publisher.publish(release.bundles[1], release.saved_model, channel=CHANNEL)
            publisher.publish(release.bundles[2], release.saved_model)
        operator = Operator(admin)
        base = f"/v1/models/{MODEL}/channels/{CHANNEL}"
        fleet = [SimulatedDevice.enrol(http, f"kiosk-{i:02d}") for i in range(DEVICES)]
        for device in fleet:
            first = device.sync()
            assert (first["version"], first.get("shadow")) == (1, None)
            assert Baseline.from_dict(first["manifest"]["baseline"]) == base1, "devices get the signed baseline"

        # Before any shadow rollout, a report about v2 in shadow is refused: nobody asked for it.
        early = fleet[0].post(Period.like_baseline(base2, 12, healthy_inputs).shadow(2, 1, 12))
        assert early.status_code == 403 and early.json()["error"]["code"] == "not_assigned", early.text

        # 1. Shadow: every device keeps serving v1 and runs v2 on a tenth of its photos.
        shadow = operator.ok("POST", base + "/rollout",
                             json={"version": 2, "percent": 100, "mode": "shadow", "sample_rate": SAMPLE_RATE})
        assert shadow["rollout"]["mode"] == "shadow" and shadow["rollout"]["state"] == "active", shadow
        assert shadow["version"] == 1
        for device in fleet:
            assignment = device.assignment()
            assert assignment["version"] == 1, "shadow never changes what a device serves"
            assert assignment["shadow"]["version"] == 2
            assert assignment["shadow"]["sample_rate"] == pytest.approx(SAMPLE_RATE)
            assert Baseline.from_dict(assignment["shadow"]["manifest"]["baseline"]) == base2
            assert set(assignment["shadow"]["files"]) == set(assignment["files"]), "the same shape as the served files"
            assert assignment["shadow"]["files"]["manifest.json"]["sha256"] != assignment["files"]["manifest.json"]["sha256"]

        # Too early for the canary: no shadow figures yet, so the gate refuses the step and says why.
        early_step = operator.call("POST", base + "/rollout", json={"version": 2, "percent": CANARY_PERCENT, "mode": "canary"})
        assert early_step.status_code == 409 and early_step.json()["error"]["code"] == "gate_not_met", early_step.text
        verdict = early_step.json()["error"]["gates"]
        assert not verdict["passed"] and verdict["not_enough_data"] and not verdict["failed"], verdict
        assert operator.channel()["rollout"]["mode"] == "shadow", "a refused step changes nothing"

        samples = round(PER_PERIOD * SAMPLE_RATE)
        for _period in range(2):
            for device in fleet:
                device.report(Period.like_baseline(base1, PER_PERIOD, healthy_inputs).serving(1))
                candidate = Period.like_baseline(base2, samples, healthy_inputs)
                device.report(candidate.shadow(2, 1, agreements=samples))  # the same weights: they always agree

        # 2. Canary at 20 %: gated on the shadow figures, which are healthy.
        canary = operator.ok("POST", base + "/rollout", json={"version": 2, "percent": CANARY_PERCENT, "mode": "canary"})
        assert (canary["rollout"]["mode"], canary["rollout"]["percent"], canary["rollout"]["state"]) == (
            "canary", CANARY_PERCENT, "active"), canary
        cohort = [d for d in fleet if bucket(d.id, MODEL, CHANNEL, 2) < CANARY_PERCENT]
        rest = [d for d in fleet if d not in cohort]
        assert cohort and rest, "30 devices at 20 % put some on each side"
        assignments = {d.id: d.sync() for d in fleet}
        assert {i: a["version"] for i, a in assignments.items()} == {d.id: 2 if d in cohort else 1 for d in fleet}
        assert all(assignments[d.id].get("shadow") is None for d in cohort), "the canary serves v2: no shadow of itself"

        # 3. The canary's photos turn dim: v2 answers with less confidence, over the wrong classes.
        rounds = 0
        while sum(sum(r["class_counts"]) for d in cohort for r in d.sent if r["version"] == 2 and r["mode"] == "serving") < 400:
            for device in cohort:
                device.report(Period.shifted(base2, PER_PERIOD, dim_inputs).serving(2))
            for device in rest:
                device.report(Period.like_baseline(base1, PER_PERIOD, healthy_inputs).serving(1))
            rounds += 1
        deadline = time.monotonic() + 30
        while (rollout := operator.channel()["rollout"])["state"] != "paused":
            assert time.monotonic() < deadline, f"the rollout never paused itself: {rollout}"
            time.sleep(0.2)
        reason = rollout["reason"]
        assert reason.startswith("paused automatically"), reason
        for figure in ("low-confidence rate", "class distribution drift", "input shift"):
            assert figure in reason, f"the reason names {figure!r}: {reason}"
        assert rollout["mode"] == "canary" and rollout["percent"] == CANARY_PERCENT
        assert all(d.sync()["version"] == 1 for d in fleet), "a paused rollout goes to no device"

        # 4. The quality API shows why, per version: the figures are what the devices sent.
        quality = operator.ok("GET", f"/v1/models/{MODEL}/quality", params={"channel": CHANNEL})
        v1 = figures(quality, 1, "serving")
        v2 = figures(quality, 2, "serving")
        v2_shadow = figures(quality, 2, "shadow")
        sent = [r for d in fleet for r in d.sent]
        v1_sent = [r for r in sent if r["version"] == 1]
        v2_sent = [r for r in sent if r["version"] == 2 and r["mode"] == "serving"]
        shadow_sent = [r for r in sent if r["mode"] == "shadow"]
        assert v1["predictions"] == summed(v1_sent, "predictions")
        assert v2["predictions"] == summed(v2_sent, "predictions")
        assert v2_shadow["predictions"] == summed(shadow_sent, "predictions")
        assert v2_shadow["shadow_agreement"] == pytest.approx(1.0)
        assert v2["low_confidence_rate"] == pytest.approx(summed(v2_sent, "low_confidence") / v2["predictions"])
        assert v2["low_confidence_rate"] - v1["low_confidence_rate"] > 0.05
        assert v2["class_jsd"] == pytest.approx(jensen_shannon(summed(v2_sent, "class_counts"), list(base2.class_counts)), abs=1e-6)
        assert v1["class_jsd"] == pytest.approx(jensen_shannon(summed(v1_sent, "class_counts"), list(base1.class_counts)), abs=1e-6)
        assert v2["class_jsd"] > 0.10 > v1["class_jsd"]
        dim, bright = InputStats.from_report(dim_inputs), InputStats.from_report(healthy_inputs)
        assert v2["input_shift"] == pytest.approx(
            max(abs(m - b) / max(s, 1.0) for m, b, s in zip(dim.mean, base2.input.mean, base2.input.std)), rel=1e-3)
        assert v1["input_shift"] == pytest.approx(
            max(abs(m - b) / max(s, 1.0) for m, b, s in zip(bright.mean, base1.input.mean, base1.input.std)), abs=1e-3)
        assert quality["series"], "the figures over time are there for the dashboard"
        assert {(s["version"], s["mode"]) for s in quality["series"]} >= {(1, "serving"), (2, "serving"), (2, "shadow")}

        # 5. ... and Prometheus scrapes the same drift figures, per model, version, channel and mode.
        from prometheus_client.parser import text_string_to_metric_families

        scraped = {
            (sample.name, sample.labels.get("version"), sample.labels.get("mode")): sample.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
            for sample in family.samples
            if sample.name.startswith("sync_server_quality_") and sample.labels.get("model") == MODEL
            and sample.labels.get("channel") == CHANNEL
        }
        assert scraped[("sync_server_quality_class_jsd", "2", "serving")] == pytest.approx(v2["class_jsd"])
        assert scraped[("sync_server_quality_input_shift", "2", "serving")] == pytest.approx(v2["input_shift"])
        assert scraped[("sync_server_quality_low_confidence_rate", "1", "serving")] == pytest.approx(v1["low_confidence_rate"])
        assert scraped[("sync_server_quality_shadow_agreement", "2", "shadow")] == pytest.approx(1.0)
