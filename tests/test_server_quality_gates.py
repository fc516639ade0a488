"""The quality gates: each gate's verdict on figures a fleet could report, the options an operator sets,
and the throttle that keeps a flood of reports to one evaluation per channel."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from sync_server.config import QualityGates, RolloutOptions, ServerConfig, ThrottleOptions
from sync_server.errors import ConfigError
from sync_server.gates import FAIL, NOT_ENOUGH_DATA, NOT_MEASURED, PASS, evaluate_gates
from sync_server.quality import VersionQuality
from tests.test_server_shadow_rollout import fleet, releases  # noqa: F401  (a fixture)
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    publisher,
    running_server,
    server_config,
)


def figures(version: int, mode: str = "serving", predictions: int = 1000, **values: Any) -> VersionQuality:
    """What the devices reported about a version: healthy unless `values` say otherwise."""
    healthy: dict[str, Any] = dict(
        version=version, mode=mode, channel="stable", since=None, reports=10, devices=5, predictions=predictions,
        fallback_rate=0.10, low_confidence_rate=0.08, fallback_answers=predictions // 4, disagreement_rate=0.02,
        shadow_agreement=0.97 if mode == "shadow" else None, class_jsd=0.01, confidence_jsd=0.01, input_shift=0.1,
        latency_p50_ms=4.0, latency_p99_ms=9.0,
    )
    healthy.update(values)
    return VersionQuality(**healthy)


def verdicts(result) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {check.gate: check.status for check in result.checks}


GATES = QualityGates()


def test_a_healthy_canary_passes_every_gate_and_a_healthy_shadow_its_own():
    canary = evaluate_gates(figures(2), figures(1), GATES, mode="canary")
    assert verdicts(canary) == dict.fromkeys(
        ["fallback_rate", "low_confidence_rate", "disagreement_rate", "class_jsd", "input_shift"], PASS)
    assert canary.passed and not canary.failed and canary.summary() == "quality gates met for version 2 (canary)"
    shadow = evaluate_gates(figures(2, "shadow", predictions=300), figures(1), GATES, mode="shadow")
    assert verdicts(shadow) == dict.fromkeys(["low_confidence_rate", "shadow_agreement", "class_jsd", "input_shift"], PASS)
    assert shadow.passed


@pytest.mark.parametrize(
    ("gate", "bad", "label"),
    [
        ("fallback_rate", 0.16, "fallback rate"),
        ("low_confidence_rate", 0.41, "low-confidence rate"),
        ("disagreement_rate", 0.09, "edge-vs-server disagreement"),
    ],
)
def test_a_rate_more_than_its_margin_above_the_current_versions_fails(gate, bad, label):
    current = figures(1, predictions=900, fallback_answers=450)
    candidate = figures(2, predictions=640, fallback_answers=320, **{gate: bad})
    result = evaluate_gates(candidate, current, GATES, mode="canary")
    assert verdicts(result)[gate] == FAIL and [c.gate for c in result.failed] == [gate]
    (check,) = result.failed
    mine, theirs = getattr(candidate, gate), getattr(current, gate)
    margin = getattr(GATES, {"fallback_rate": "max_fallback_rate_increase", "low_confidence_rate": "max_low_confidence_increase",
                             "disagreement_rate": "max_disagreement_increase"}[gate])
    unit = "fallback answers" if gate == "disagreement_rate" else "predictions"
    samples = (candidate.fallback_answers, current.fallback_answers) if gate == "disagreement_rate" else (640, 900)
    assert check.message == (f"{label} {mine:.2f} vs {theirs:.2f} on version 1 ({mine - theirs:+.2f}, above the "
                             f"+{margin:.2f} margin) over {samples[0]} and {samples[1]} {unit}")
    assert (check.candidate, check.current, check.limit, check.samples) == (mine, theirs, margin, samples)
    within = evaluate_gates(figures(2, **{gate: theirs + margin}), current, GATES, mode="canary")
    assert verdicts(within)[gate] == PASS, "exactly at the margin still passes"


def test_drift_from_the_bundle_baseline_and_a_shadow_that_disagrees_fail():
    drifted = evaluate_gates(figures(2, class_jsd=0.23, input_shift=2.4), figures(1), GATES, mode="canary")
    assert [c.gate for c in drifted.failed] == ["class_jsd", "input_shift"]
    assert drifted.failed[0].message == ("class distribution drift 0.23 JSD from version 2's bundle baseline (above the "
                                         "0.10 maximum) over 1000 predictions")
    assert drifted.failed[1].message == ("input shift 2.40 baseline stds from version 2's bundle baseline (above the "
                                         "1.00 maximum) over 1000 predictions")
    shadow = evaluate_gates(figures(2, "shadow", predictions=640, shadow_agreement=0.71), figures(1), GATES, mode="shadow")
    assert [c.gate for c in shadow.failed] == ["shadow_agreement"]
    assert shadow.failed[0].message == ("shadow agreement 0.71 with version 1 (below the 0.90 minimum) over 640 samples "
                                        "of version 2")
    assert shadow.summary() == shadow.failed[0].message


def test_too_few_predictions_on_either_side_is_not_enough_data_which_blocks_but_never_fails():
    few = evaluate_gates(figures(2, predictions=150, low_confidence_rate=0.9), figures(1), GATES, mode="canary")
    assert not few.failed, "a small sample never pauses, however bad it looks"
    assert not few.passed and set(verdicts(few).values()) == {NOT_ENOUGH_DATA}
    assert few.waiting[0].message == "fallback rate: not enough data (150 and 1000 predictions; 200 needed on each side)"
    quiet_current = evaluate_gates(figures(2), figures(1, predictions=12), GATES, mode="canary")
    assert verdicts(quiet_current)["low_confidence_rate"] == NOT_ENOUGH_DATA
    assert verdicts(quiet_current)["class_jsd"] == PASS, "the baseline side needs no current version"
    few_answers = evaluate_gates(figures(2, fallback_answers=30, disagreement_rate=0.5), figures(1, fallback_answers=300),
                                 GATES, mode="canary")
    assert verdicts(few_answers)["disagreement_rate"] == NOT_MEASURED and few_answers.passed, (
        "fallbacks are rare by design: too few answers neither pause nor hold a promotion")
    (check,) = [c for c in few_answers.checks if c.gate == "disagreement_rate"]
    assert check.message == ("edge-vs-server disagreement: not measured (only 30 and 300 fallback answers; 200 needed "
                             "on each side)")
    smaller = dataclasses.replace(GATES, min_predictions=100)
    assert evaluate_gates(figures(2, predictions=150), figures(1), smaller, mode="canary").passed


def test_figures_that_do_not_exist_are_not_measured_and_do_not_block():
    old_agents = figures(2, low_confidence_rate=None, fallback_answers=0, disagreement_rate=None, class_jsd=None,
                         input_shift=None)
    result = evaluate_gates(old_agents, figures(1), GATES, mode="canary")
    assert verdicts(result) == {"fallback_rate": PASS, "low_confidence_rate": NOT_MEASURED, "disagreement_rate": NOT_MEASURED,
                                "class_jsd": NOT_MEASURED, "input_shift": NOT_MEASURED}
    assert result.passed
    no_version = evaluate_gates(figures(2), None, GATES, mode="canary")
    assert verdicts(no_version)["fallback_rate"] == NOT_MEASURED and no_version.current_version is None
    body = no_version.to_dict()
    assert body["current"] is None and body["candidate"]["version"] == 2 and body["gates"] == GATES.to_dict()
    json.dumps(body)  # the 409 answer carries it


def test_gates_come_from_json_a_file_or_flags_and_bad_values_are_one_clear_line(tmp_path):
    assert QualityGates.parse('{"min_predictions": 500}') == dataclasses.replace(QualityGates(), min_predictions=500)
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"max_class_jsd": 0.2, "window_s": 1800}))
    config = ServerConfig.load({"quality_gates": QualityGates.parse(str(path)), "quality_gates.min_predictions": 50}, environ={})
    assert (config.quality_gates.max_class_jsd, config.quality_gates.window_s, config.quality_gates.min_predictions) == (0.2, 1800, 50)
    env = ServerConfig.load({}, environ={"SYNC_SERVER_GATE_WINDOW": "600", "SYNC_SERVER_QUALITY_GATES": '{"max_input_shift": 2}'})
    assert (env.quality_gates.window_s, env.quality_gates.max_input_shift) == (600.0, 2.0)
    with pytest.raises(ConfigError, match="quality gate min_shadow_agreement must be 0..1"):
        QualityGates(min_shadow_agreement=1.5)
    with pytest.raises(ConfigError, match="unknown quality gate bogus"):
        QualityGates().with_overrides({"bogus": 1})
    with pytest.raises(ConfigError, match="SYNC_SERVER_QUALITY_GATES"):
        ServerConfig.load({}, environ={"SYNC_SERVER_QUALITY_GATES": "{not json"})

    for flag, value, message in (
        ("--quality-gates", '{"max_class_jsd": 3}', "quality gate max_class_jsd must be 0..1, got 3"),
        ("--quality-gates", str(tmp_path / "missing.json"), "not a JSON object and not a readable file"),
        ("--gate-min-predictions", "0", "quality gate min_predictions must be a whole number of at least 1, got 0"),
    ):
        run = subprocess.run([sys.executable, "-m", "sync_server", "path", "--data-dir", str(tmp_path / "d"), flag, value],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_a_flood_of_reports_costs_one_evaluation_and_the_burst_is_still_judged_when_it_ends(publisher, tmp_path):
    interval = 3.0
    config = server_config(tmp_path / "data", None, publisher, throttle=ThrottleOptions(enabled=False),
                           rollout=RolloutOptions(quality_check_s=interval))
    with running_server(config) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        cohort, others = fleet(server, 2, 50.0, each_side=2)
        base = f"/v1/models/{MODEL}/channels/stable"
        assert server.admin("POST", base + "/rollout", json={"version": 2, "percent": 50}).status_code == 200
        rollouts = server.services.rollouts

        def send(device, version: int, predictions: int, low: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
            body = {"version": version, "period_s": 60.0, "predictions": predictions, "fallbacks": 0, "low_confidence": low}
            response = server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers, json=body)
            assert response.status_code == 202, response.text
            return response.json()

        for device in others:
            send(device, 1, 150, 12)  # v1 as usual: 8 % unsure
        started = time.monotonic()
        answers = [send(cohort[i % len(cohort)], 2, 20, 9) for i in range(12)]  # v2 unsure of 45 %
        elapsed = time.monotonic() - started
        assert elapsed < interval, f"the burst took {elapsed:.1f} s; the test needs it inside one interval"
        assert rollouts.quality_evaluations == 0, "every report of the burst came inside the interval"
        assert all("rollout_paused" not in a for a in answers)

        deadline = time.monotonic() + 3 * interval
        while (rollout := server.admin("GET", base).json()["rollout"])["state"] != "paused":
            assert time.monotonic() < deadline, f"the burst was never judged: {rollout}"
            time.sleep(0.1)
        assert rollouts.quality_evaluations == 1, "one trailing evaluation judged the whole burst"
        mine, theirs = 9 / 20, 12 / 150
        assert rollout["reason"] == (
            f"paused automatically: low-confidence rate {mine:.2f} vs {theirs:.2f} on version 1 ({mine - theirs:+.2f}, "
            f"above the +0.05 margin) over {12 * 20} and {150 * len(others)} predictions")


def test_figures_from_a_restart_are_exact_and_agree_with_the_rollups(publisher, releases, tmp_path):
    """The gates' exact window (raw reports for the first hour) against the rollups' own figures."""
    from sqlalchemy import select

    from sync_server.models import Model
    from sync_server.models import utcnow as now
    from sync_server.drift import jensen_shannon
    from sync_server.quality import version_quality
    from sync_server.rollout_quality import window_quality

    config = server_config(tmp_path / "data", None, publisher, throttle=ThrottleOptions(enabled=False))
    with running_server(config) as server:
        assert server.publish(releases[1], publisher.saved_model).status_code == 201
        server.set_channel(1)
        devices = [server.enroll() for _ in range(3)]
        labels = len(publisher.labels)

        def send(device, predictions: int, low: int, classes: list[int], p50: float) -> None:  # type: ignore[no-untyped-def]
            pixels = predictions * 64
            body = {"version": 1, "period_s": 60.0, "predictions": predictions, "fallbacks": predictions // 10,
                    "fallback_answers": predictions // 20, "disagreements": 1, "low_confidence": low,
                    "class_counts": classes, "confidence_histogram": [0] * 8 + [low, predictions - low],
                    "latency_ms": {"p50": p50, "p99": p50 * 3},
                    "input_stats": {"images": predictions, "pixels": pixels, "sum": [100.0 * pixels] * 3,
                                    "sum_sq": [12000.0 * pixels] * 3}}
            response = server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers, json=body)
            assert response.status_code == 202, response.text

        before = now()
        for i, device in enumerate(devices):
            send(device, 100 + i, 10 + i, [100 + i] + [0] * (labels - 1), 3.0 + i)
        restart = now()
        later = [(200, 90), (150, 60)]
        for device, (predictions, low) in zip(devices, later):
            send(device, predictions, low, [0] * (labels - 1) + [predictions], 7.0)

        with server.services.db.read() as session:
            model_id = session.scalar(select(Model.id).where(Model.name == MODEL))
            everything = version_quality(session, model_id, 1, channel="stable")
            exact_all = window_quality(session, model_id, 1, mode="serving", channel="stable", since=before)
            fresh = window_quality(session, model_id, 1, mode="serving", channel="stable", since=restart)
            sums_only = window_quality(session, model_id, 1, mode="serving", channel="stable", since=restart,
                                       distributions=False)
        assert dataclasses.replace(exact_all, since=None) == everything, "the same reports, the same figures"
        assert fresh.reports == len(later) and fresh.predictions == sum(p for p, _ in later)
        assert fresh.low_confidence_rate == pytest.approx(sum(lo for _, lo in later) / sum(p for p, _ in later))
        assert fresh.latency_p50_ms == pytest.approx(7.0)
        assert everything.class_jsd is not None and everything.input_shift is not None, "the bundle has a baseline"
        assert fresh.class_jsd != exact_all.class_jsd, "the later reports put every answer on another label"
        baseline = json.loads((releases[1] / "manifest.json").read_text())["baseline"]["class_counts"]
        sent_later = [sum(p for p, _ in later) if i == labels - 1 else 0 for i in range(labels)]
        assert fresh.class_jsd == pytest.approx(jensen_shannon(sent_later, baseline)), "only the later reports' classes"
        assert (sums_only.predictions, sums_only.low_confidence_rate) == (fresh.predictions, fresh.low_confidence_rate)
