"""An operator runs a candidate in shadow, moves it to a canary when its figures are good, watches it
pause itself when its answers shift, resumes it and promotes it: the quality gates decide each step.

The devices are HTTP clients speaking the device API. Every figure a test expects is computed from the
reports its devices sent (and the bundles' own baselines), never typed in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sync_server.config import RolloutOptions, ThrottleOptions
from sync_server.rollout import bucket
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    Device,
    Publisher,
    Server,
    _drop_postgres_at_exit,
    db_url,
    publisher,
    running_server,
    server_config,
)

CHANNEL = "stable"
BASE = f"/v1/models/{MODEL}/channels/{CHANNEL}"
SHADOW_PERCENT = 50.0


# ----------------------------------------------------------------------------------------------------------
# Two versions whose bundles carry a baseline, and devices that report like it (or not)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def releases(publisher: Publisher, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1 and 2 of the tiny model, signed, each with a validation baseline in its manifest."""
    from converter import read_bundle, write_bundle
    from converter.baseline import Baseline, InputBaseline

    root = tmp_path_factory.mktemp("baselined")
    bundle = read_bundle(publisher.bundles[1], publisher.public_key)
    labels = len(bundle.labels)
    baseline = Baseline(
        images=600, confidence_threshold=0.6, class_counts=tuple(600 // labels for _ in range(labels)),
        confidence_histogram=(0, 0, 0, 0, 0, 12, 36, 90, 180, 282), low_confidence_rate=0.08,
        per_class_agreement=tuple(1.0 for _ in range(labels)),
        input=InputBaseline(images=600, pixels=600 * 96 * 96, mean=(121.0, 118.0, 110.0), std=(60.0, 58.0, 61.0)),
    )
    model = bundle.read_model()
    return {
        version: write_bundle(root / f"v{version}", model,
                              dataclasses.replace(bundle.manifest, version=version, baseline=baseline),
                              sign_key=publisher.private_key)
        for version in (1, 2)
    }


@dataclasses.dataclass
class Period:
    """What one device saw in one report period: `predictions` answers, `low` of them under the
    threshold, classes spread like the baseline (or all on one label), inputs like the baseline's (or dim)."""

    predictions: int
    low: int
    labels: int
    skewed: bool = False
    dim: bool = False

    def body(self, version: int, *, mode: str = "serving", shadow_of: int | None = None,
             agreements: int | None = None) -> dict[str, Any]:
        if self.skewed:
            classes = [self.predictions] + [0] * (self.labels - 1)
        else:
            classes = [self.predictions // self.labels] * self.labels
            classes[0] += self.predictions - sum(classes)
        mean = [121.0, 118.0, 110.0] if not self.dim else [121.0 * 0.35, 118.0 * 0.35, 110.0 * 0.35]
        pixels = self.predictions * 96 * 96
        body: dict[str, Any] = {
            "version": version, "period_s": 60.0, "predictions": self.predictions, "fallbacks": 0,
            "low_confidence": self.low, "class_counts": classes, "mode": mode,
            "confidence_histogram": [0] * 5 + [self.low, 0, 0, 0, self.predictions - self.low],
            "input_stats": {"images": self.predictions, "pixels": pixels, "sum": [m * pixels for m in mean],
                            "sum_sq": [(m * m + 3600.0) * pixels for m in mean]},
        }
        if mode == "shadow":
            body["shadow_of"] = shadow_of
            body["agreements"] = agreements
        return body


def report(device: Device, body: dict[str, Any]) -> Any:
    return device.server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers, json=body)


def report_ok(device: Device, body: dict[str, Any]) -> dict[str, Any]:
    response = report(device, body)
    assert response.status_code == 202, response.text
    return response.json()


def fleet(server: Server, cohort_version: int, percent: float, each_side: int = 4) -> tuple[list[Device], list[Device]]:
    """Devices enrolled until at least `each_side` fall in and out of a rollout of `cohort_version` at `percent`."""
    inside: list[Device] = []
    outside: list[Device] = []
    while len(inside) < each_side or len(outside) < each_side:
        device = server.enroll()
        (inside if bucket(device.id, MODEL, CHANNEL, cohort_version) < percent else outside).append(device)
    return inside, outside


def ok(server: Server, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = server.admin(method, path, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def low_rate(sent: list[dict[str, Any]]) -> tuple[float, int]:
    predictions = sum(r["predictions"] for r in sent)
    return sum(r["low_confidence"] for r in sent) / predictions, predictions


def story_config(tmp_path: Path, db_url: str, publisher: Publisher, **overrides: Any) -> Any:
    return server_config(tmp_path / "data", db_url, publisher, throttle=ThrottleOptions(enabled=False),
                         rollout=RolloutOptions(quality_check_s=0.0), **overrides)


def publish_releases(server: Server, releases: dict[int, Path], publisher: Publisher) -> None:
    for version in (1, 2):
        response = server.publish(releases[version], publisher.saved_model)
        assert response.status_code in (200, 201), response.text
    server.set_channel(1)


# ----------------------------------------------------------------------------------------------------------
# The stories
# ----------------------------------------------------------------------------------------------------------


def test_shadow_then_canary_pauses_on_a_shift_resumes_afresh_and_promotes_on_good_figures(db_url, publisher, releases, tmp_path):
    with running_server(story_config(tmp_path, db_url, publisher)) as server:
        publish_releases(server, releases, publisher)
        labels = len(publisher.labels)
        cohort, others = fleet(server, 2, SHADOW_PERCENT)
        before = {d.id: d.assignment().headers["ETag"] for d in cohort + others}

        # Nobody runs v2 yet: a shadow report about it is refused.
        early = report(cohort[0], Period(20, 2, labels).body(2, mode="shadow", shadow_of=1, agreements=20))
        assert early.status_code == 403 and early.json()["error"]["code"] == "not_assigned"

        # 1. Shadow at 50 %: the cohort keeps serving v1 and gets v2 as its shadow; the others see no change.
        started = ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": SHADOW_PERCENT, "mode": "shadow",
                                                             "sample_rate": 0.25})
        assert started["version"] == 1
        rollout = started["rollout"]
        assert (rollout["mode"], rollout["percent"], rollout["sample_rate"], rollout["state"], rollout["gated"]) == (
            "shadow", SHADOW_PERCENT, 0.25, "active", True)
        shadows: dict[str, dict[str, Any]] = {}
        for device in cohort:
            response = device.assignment()
            assert response.headers["ETag"] != before[device.id], "the shadow changes the cohort's ETag"
            view = response.json()
            assert view["version"] == 1 and view["shadow"]["version"] == 2 and view["shadow"]["sample_rate"] == 0.25
            assert view["shadow"]["manifest"]["version"] == 2 and view["shadow"]["manifest"]["baseline"]["images"] == 600
            shadows[device.id] = view["shadow"]
        for device in others:
            assert device.assignment(etag=before[device.id]).status_code == 304, "outside the cohort nothing changed"
            assert device.assignment().json()["shadow"] is None
        assert ok(server, "GET", BASE)["shadow_devices"] == {"2": len(cohort)}

        # Only the cohort may report about v2, and only in shadow: it never served v2.
        outsider = report(others[0], Period(20, 2, labels).body(2, mode="shadow", shadow_of=1, agreements=20))
        assert outsider.status_code == 403 and outsider.json()["error"]["code"] == "not_assigned"
        served = report(cohort[0], Period(20, 2, labels).body(2))
        assert served.status_code == 403 and served.json()["error"]["code"] == "not_assigned"

        # 2. To canary: refused while the shadow figures are missing.
        refused = server.admin("POST", BASE + "/rollout", json={"version": 2, "percent": SHADOW_PERCENT, "mode": "canary"})
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "gate_not_met" and "not enough data" in error["message"]
        assert error["gates"]["passed"] is False and "shadow_agreement" in error["gates"]["not_enough_data"]
        assert error["gates"]["candidate"]["predictions"] == 0

        # The devices report for a while: v1 as before, v2 in shadow agreeing with it on 24 of 25 samples.
        sent: list[tuple[str, dict[str, Any]]] = []
        while sum(b["predictions"] for _, b in sent if b["mode"] == "shadow") < 200:
            for device in cohort + others:
                body = Period(100, 8, labels).body(1)
                report_ok(device, body)
                sent.append((device.id, body))
            for device in cohort:
                body = Period(25, 2, labels).body(2, mode="shadow", shadow_of=1, agreements=24)
                report_ok(device, body)
                sent.append((device.id, body))
        verdict = ok(server, "GET", BASE + "/rollout/gates")
        shadow_sent = [b for _, b in sent if b["mode"] == "shadow"]
        assert verdict["passed"] is True, verdict["summary"]
        assert verdict["candidate"]["predictions"] == sum(b["predictions"] for b in shadow_sent)
        assert verdict["candidate"]["shadow_agreement"] == pytest.approx(
            sum(b["agreements"] for b in shadow_sent) / sum(b["predictions"] for b in shadow_sent))
        assert ok(server, "GET", BASE)["rollout"]["state"] == "active", "good shadow figures pause nothing"

        # 3. Canary at 50 %: the same devices now serve v2, with the very manifest and files they shadowed.
        canary = ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": SHADOW_PERCENT, "mode": "canary"})
        assert (canary["rollout"]["mode"], canary["rollout"]["state"], canary["rollout"]["sample_rate"]) == ("canary", "active", None)
        for device in cohort:
            view = device.assignment().json()
            assert (view["version"], view["shadow"]) == (2, None)
            assert (view["manifest"], view["files"]) == (shadows[device.id]["manifest"], shadows[device.id]["files"])
        assert {d.assigned_version() for d in others} == {1}
        early_promote = server.admin("POST", BASE + "/rollout/promote")
        assert early_promote.status_code == 409 and "not enough data" in early_promote.json()["error"]["message"], (
            "the canary is judged on its own serving figures, counted from the step")

        # 4. The canary's photos turn dim: v2 answers with less confidence. The rollout pauses itself.
        canary_v2: list[dict[str, Any]] = []
        canary_v1: list[dict[str, Any]] = []
        paused = None
        while paused is None:
            for device in others:
                body = Period(100, 8, labels).body(1)
                report_ok(device, body)
                canary_v1.append(body)
            for device in cohort:
                body = Period(100, 41, labels, skewed=True, dim=True).body(2)
                paused = report_ok(device, body).get("rollout_paused") or paused
                canary_v2.append(body)
                if paused:
                    break
            assert sum(b["predictions"] for b in canary_v2) < 2000, "the rollout never paused itself"
        mine, mine_n = low_rate(canary_v2)
        theirs, theirs_n = low_rate(canary_v1)
        assert mine_n >= 200 and theirs_n >= 200
        expected = (f"low-confidence rate {mine:.2f} vs {theirs:.2f} on version 1 ({mine - theirs:+.2f}, above the +0.05 "
                    f"margin) over {mine_n} and {theirs_n} predictions")
        assert paused.startswith("paused automatically: ") and expected in paused, paused
        assert "class distribution drift" in paused and "input shift" in paused, paused
        channel = ok(server, "GET", BASE)
        assert channel["rollout"]["state"] == "paused" and channel["rollout"]["reason"] == paused
        assert channel["history"][0]["action"] == "gate_pause" and channel["history"][0]["reason"] == paused
        assert {d.assigned_version() for d in cohort + others} == {1}, "a paused rollout goes to no device"

        # 5. Resumed, it is judged afresh: the dim period (same hour, same rollout) no longer counts.
        assert ok(server, "POST", BASE + "/rollout/resume")["rollout"]["state"] == "active"
        assert {d.assigned_version() for d in cohort} == {2}
        fresh: list[dict[str, Any]] = []
        while sum(b["predictions"] for b in fresh) < 200:
            for device in others:
                report_ok(device, Period(100, 8, labels).body(1))
            for device in cohort:
                body = Period(100, 9, labels).body(2)
                assert report_ok(device, body).get("rollout_paused") is None
                fresh.append(body)
        verdict = ok(server, "GET", BASE + "/rollout/gates")
        assert verdict["candidate"]["predictions"] == sum(b["predictions"] for b in fresh), "only reports since the resume"
        assert verdict["passed"] is True, verdict["summary"]

        # 6. Promoted on good figures: every device serves v2.
        promoted = ok(server, "POST", BASE + "/rollout/promote")
        assert (promoted["version"], promoted["previous_version"], promoted["rollout"]) == (2, 1, None)
        assert {d.assigned_version() for d in cohort + others} == {2}
        actions = [e["action"] for e in ok(server, "GET", BASE)["history"]]
        assert actions == ["promote", "resume", "gate_pause", "canary", "shadow", "set"]


def test_an_operator_may_force_a_step_and_the_history_says_so(db_url, publisher, releases, tmp_path):
    with running_server(story_config(tmp_path, db_url, publisher)) as server:
        publish_releases(server, releases, publisher)
        cohort, others = fleet(server, 2, 30.0, each_side=2)
        ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": 30, "mode": "shadow",
                                                   "gates": {"min_predictions": 50}})
        view = ok(server, "GET", BASE)["rollout"]
        assert view["gate_overrides"] == {"min_predictions": 50} and view["gates"]["min_predictions"] == 50
        assert view["sample_rate"] == 0.1, "the default share of requests a shadow runs on"
        assert view["gates"]["max_class_jsd"] == 0.1, "fields not overridden keep the server's"

        forced = ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": 30, "mode": "canary", "force": True})
        assert forced["rollout"]["mode"] == "canary" and forced["rollout"]["gate_overrides"] == {"min_predictions": 50}
        event = ok(server, "GET", BASE)["history"][0]
        assert event["action"] == "canary" and event["reason"].startswith("forced past the quality gates: ")
        assert "not enough data (0 and 0 predictions; 50 needed on each side)" in event["reason"]
        assert {d.assigned_version() for d in cohort} == {2} and {d.assigned_version() for d in others} == {1}

        back = server.admin("POST", BASE + "/rollout", json={"version": 2, "percent": 30, "mode": "shadow"})
        assert back.status_code == 409 and back.json()["error"]["code"] == "bad_mode_change"
        refused = server.admin("POST", BASE + "/rollout/promote", json={})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_not_met"
        promoted = ok(server, "POST", BASE + "/rollout/promote", json={"force": True})
        assert promoted["version"] == 2
        assert ok(server, "GET", BASE)["history"][0]["reason"].startswith("forced past the quality gates: ")


def test_a_paused_shadow_leaves_the_devices_but_their_late_reports_still_count(db_url, publisher, releases, tmp_path):
    with running_server(story_config(tmp_path, db_url, publisher)) as server:
        publish_releases(server, releases, publisher)
        labels = len(publisher.labels)
        cohort = [server.enroll(), server.enroll()]  # at 100 %, every device is in the cohort
        ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": 100, "mode": "shadow"})
        assert all(d.assignment().json()["shadow"]["version"] == 2 for d in cohort)
        ok(server, "POST", BASE + "/rollout/pause", json={"reason": "looking at the figures"})
        assert all(d.assignment().json()["shadow"] is None for d in cohort), "a paused shadow runs nowhere"
        late = report_ok(cohort[0], Period(30, 3, labels).body(2, mode="shadow", shadow_of=1, agreements=30))
        assert late["recorded"] is True, "what a device ran in shadow before the pause may still be reported"
        resumed = ok(server, "POST", BASE + "/rollout/resume")
        assert resumed["rollout"]["state"] == "active"
        assert ok(server, "GET", BASE)["history"][0]["action"] == "shadow_resume"
        assert all(d.assignment().json()["shadow"]["version"] == 2 for d in cohort)
        ok(server, "POST", BASE + "/rollback")
        gone = report_ok(cohort[1], Period(30, 3, labels).body(2, mode="shadow", shadow_of=1, agreements=30))
        assert gone["recorded"] is True, "a version once given in shadow stays reportable after a rollback"
        never = report(cohort[1], Period(30, 3, labels).body(2))
        assert never.status_code == 403, "but it was never served"

        bad = server.admin("POST", BASE + "/rollout", json={"version": 2, "percent": 10, "sample_rate": 0.5})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_mode"
        bad = server.admin("POST", BASE + "/rollout", json={"version": 2, "percent": 10, "mode": "dark"})
        assert bad.status_code == 422
        bad = server.admin("POST", BASE + "/rollout", json={"version": 2, "percent": 10, "mode": "shadow",
                                                            "gates": {"min_shadow_agreement": 1.5}})
        assert bad.status_code == 422 and "min_shadow_agreement" in bad.json()["error"]["message"]


def test_a_shadow_that_devices_refuse_pauses_itself(db_url, publisher, releases, tmp_path):
    with running_server(story_config(tmp_path, db_url, publisher)) as server:
        publish_releases(server, releases, publisher)
        devices = [server.enroll() for _ in range(4)]
        ok(server, "POST", BASE + "/rollout", json={"version": 2, "percent": 100, "mode": "shadow",
                                                   "failure_threshold": 0.5, "min_reports": 2})

        def say(device: Device, state: str, **fields: Any) -> dict[str, Any]:
            # What the agent does: a status report about the version it serves, saying what became of the shadow.
            response = device.report_status(1, details={"shadow": {"version": 2, "state": state, **fields}})
            assert response.status_code == 200, response.text
            return response.json()

        assert say(devices[0], "declined", cause="model_size", reason="larger than the limit")["rollout_paused"] is None
        assert say(devices[1], "running", sample_rate=0.1)["rollout_paused"] is None
        assert say(devices[2], "refused", step="load", reason="bad flatbuffer")["rollout_paused"] is None, (
            "1 of 2 (the declined device does not count): 50 % is not above the threshold")
        reason = say(devices[3], "refused", step="smoke_test", reason="mug -> bottle")["rollout_paused"]
        assert reason == ("paused automatically: 2 of 3 devices refused version 2 in shadow or failed running it (67%, "
                          "above the 50% threshold)")
        channel = ok(server, "GET", BASE)
        assert (channel["rollout"]["state"], channel["history"][0]["action"]) == ("paused", "auto_pause")
        assert all(d.assignment().json()["shadow"] is None for d in devices)
