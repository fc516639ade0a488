"""A demo fleet for the dashboard: two versions with baselines, a staged rollout, devices, hours of telemetry.

Written straight into a server's data directory (through `Services`, as `sync-server publish` does
without a running server) before the server process starts, so that the charts have past hours:
telemetry is recorded with `received_at` in the past. Used by tests/test_dashboard_browser.py and
scripts/dashboard_screenshot.py.

    v1   the channel `stable`'s version: steady figures
    v2   rolling out to `percent` of stable; from `drift_from_h` hours ago its answers drift (more
         low-confidence answers and fallbacks, a skewed class distribution, brighter photos)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import update

from sync_server import ServerConfig
from sync_server.devices import DeviceIdentity
from sync_server.models import Device
from sync_server.services import Services

MODEL = "shop"
CHANNEL = "stable"
BASE_MEAN = (121.0, 118.0, 110.0)
BASE_STD = (60.0, 58.0, 61.0)


@dataclass(frozen=True)
class DemoFleet:
    """What `seed` made: device ids per version they run, and every device's token."""

    on_v1: tuple[str, ...]
    on_v2: tuple[str, ...]
    lost: str | None
    tokens: dict[str, str]
    labels: int


def baseline_bundles(source: Path, public_key: Path, private_key: Path, root: Path) -> dict[int, Path]:
    """v1 and v2 of the model in bundle `source`, each carrying a baseline, signed with `private_key`."""
    from converter import read_bundle, write_bundle
    from converter.baseline import Baseline, InputBaseline

    bundle = read_bundle(source, public_key)
    labels = len(bundle.labels)
    baseline = Baseline(
        images=600,
        confidence_threshold=0.6,
        class_counts=tuple([600 // labels] * labels),
        confidence_histogram=(0, 0, 3, 6, 12, 27, 48, 84, 150, 270),
        low_confidence_rate=0.08,
        per_class_agreement=tuple([1.0] * labels),
        input=InputBaseline(600, 600 * 32 * 32, BASE_MEAN, BASE_STD),
    )
    out = {}
    for version in (1, 2):
        manifest = dataclasses.replace(bundle.manifest, version=version, baseline=baseline)
        out[version] = write_bundle(root / f"demo-v{version}", bundle.read_model(), manifest, sign_key=private_key)
    return out


def report(version: int, rng: random.Random, labels: int, drift: float) -> dict[str, Any]:
    """One device's hourly report: `drift` 0 is the baseline's world, 1 a clearly shifted one."""
    predictions = rng.randint(250, 350)
    low = round(predictions * (0.07 + 0.13 * drift + rng.uniform(-0.01, 0.01)))
    fallbacks = round(predictions * (0.04 + 0.06 * drift + rng.uniform(-0.005, 0.005)))
    weights = [1.0 + (6.0 * drift if i == 0 else 0.0) + rng.uniform(-0.1, 0.1) for i in range(labels)]
    counts = [0] * labels
    for _ in range(predictions):
        counts[rng.choices(range(labels), weights)[0]] += 1
    pixels = 40 * 32 * 32
    mean = [m + 40.0 * drift + rng.uniform(-2, 2) for m in BASE_MEAN]
    return {
        "version": version,
        "period_s": 3600.0,
        "predictions": predictions,
        "fallbacks": fallbacks,
        "errors": 0,
        "latency_ms": {"p50": 7.5 + version + rng.uniform(-0.5, 0.5), "p99": 18.0 + 3 * version + rng.uniform(-1, 1)},
        "confidence_histogram": [0, 0, 1, 2, 4, 8, 16, 30, 60, max(0, predictions - 121)],
        "class_counts": counts,
        "low_confidence": low,
        "fallback_answers": fallbacks,
        "disagreements": round(fallbacks * (0.1 + 0.3 * drift)),
        "input_stats": {
            "images": 40,
            "pixels": pixels,
            "sum": [m * pixels for m in mean],
            "sum_sq": [(s * s + m * m) * pixels for m, s in zip(mean, BASE_STD)],
        },
    }


def seed(config: ServerConfig, bundles: dict[int, Path], saved_model: Path, *, devices: int = 10, percent: float = 40,
         hours: int = 8, drift_from_h: int = 4, pause_reason: str | None = None, lost_device: bool = False,
         gates: dict[str, Any] | None = None, seed_: int = 0) -> DemoFleet:
    """Publish, stage the rollout, enrol `devices` devices and record `hours` hours of their telemetry
    (all before the rollout's start: its quality gates, with `gates`, judge only reports after it)."""
    from sync_server import telemetry

    rng = random.Random(seed_)
    services = Services.build(config, with_predictor=False)
    try:
        services.db.migrate()
        for version in (1, 2):
            services.registry.publish(bundles[version], saved_model)
        services.rollouts.set_version(MODEL, CHANNEL, 1)
        services.rollouts.start(MODEL, CHANNEL, 2, percent / 2, gates=gates)
        services.rollouts.start(MODEL, CHANNEL, 2, percent, gates=gates)
        labels = len(services.registry.get_version(MODEL, 1, with_manifest=False)["labels"])
        fleet: dict[int, list[str]] = {1: [], 2: []}
        ids: list[str] = []
        tokens: dict[str, str] = {}
        number = 0
        while len(ids) < devices or not fleet[1] or not fleet[2]:  # a rollout of 1..99 % has devices on both sides
            number += 1
            enrolled = services.devices.enroll(config.enrollment_secret, MODEL, CHANNEL, f"kiosk-{number:02d}")
            device_id = enrolled["device_id"]
            model_id = services.devices.authenticate(enrolled["token"]).model_id  # type: ignore[union-attr]
            identity = DeviceIdentity(device_id, MODEL, model_id, CHANNEL)
            version = services.devices.assignment(identity).version or 1
            services.devices.record_status(identity, version, running=True, load_ok=True, smoke_test_ok=True, message=None, details=None)
            fleet[version].append(device_id)
            ids.append(device_id)
            tokens[device_id] = enrolled["token"]
        now = datetime.now(timezone.utc)
        for hour in range(hours, 0, -1):
            drift = 0.0 if hour > drift_from_h else (drift_from_h - hour + 1) / drift_from_h
            at = now - timedelta(hours=hour - 1, minutes=rng.uniform(1, 20))
            for version, members in fleet.items():
                for device_id in members:
                    report_ = report(version, rng, labels, drift if version == 2 else 0.0)
                    telemetry.record(services.db, device_id, MODEL, report_, received_at=at)
        lost = None
        if lost_device:
            lost = fleet[1][-1]
            with services.db.write() as session:
                session.execute(update(Device).where(Device.id == lost).values(last_seen_at=now - timedelta(hours=2, minutes=10)))
        if pause_reason:
            services.rollouts.pause(MODEL, CHANNEL, pause_reason)
        return DemoFleet(tuple(fleet[1]), tuple(fleet[2]), lost, tokens, labels)
    finally:
        services.close()


__all__ = ["MODEL", "CHANNEL", "DemoFleet", "baseline_bundles", "report", "seed"]
