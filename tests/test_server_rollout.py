"""An operator moves a model through channels: set, staged rollout, promote, pause, resume, roll back."""

from __future__ import annotations

import secrets

import pytest

from sync_server.rollout import bucket
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    publisher,
    running_server,
    server_config,
)
from tests.tf_serving_standin import read_model_config


def test_buckets_are_stable_uniform_and_differ_between_rollouts():
    ids = [f"dev_{secrets.token_hex(8)}" for _ in range(20_000)]
    share = sum(bucket(d, MODEL, "stable", 2) < 10 for d in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [bucket(d, MODEL, "stable", 2) for d in ids[:50]] == [bucket(d, MODEL, "stable", 2) for d in ids[:50]]
    first = {d for d in ids if bucket(d, MODEL, "stable", 2) < 10}
    second = {d for d in ids if bucket(d, MODEL, "stable", 3) < 10}
    assert len(first & second) < len(first) * 0.2, "each rollout picks its own devices"


def test_a_staged_rollout_reaches_its_share_and_devices_never_flip(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(24)]
        assert {d.assigned_version() for d in devices} == {1}

        previous: set[str] = set()
        for percent in (10, 40, 75, 100):
            response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": 2, "percent": percent})
            assert response.status_code == 200, response.text
            assert response.json()["rollout"] == {**response.json()["rollout"], "version": 2, "percent": percent, "state": "active"}
            on_v2 = {d.id for d in devices if d.assigned_version() == 2}
            expected = {d.id for d in devices if bucket(d.id, MODEL, "stable", 2) < percent}
            assert on_v2 == expected
            assert previous <= on_v2, "raising the percentage only adds devices"
            previous = on_v2
        assert len(previous) == 24
        assert {d.assigned_version() for d in devices} == {2}, "asking again gives the same answer"

        channel = server.admin("GET", f"/v1/models/{MODEL}/channels/stable").json()
        assert channel["devices"] == {"2": 24}
        assert [e["action"] for e in channel["history"]][:4] == ["rollout"] * 4


def test_promote_pause_resume_and_rollback_take_effect_at_once(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(1)
        device = server.enroll()
        base = f"/v1/models/{MODEL}/channels/stable"

        assert server.admin("POST", base + "/rollout", json={"version": 2, "percent": 100}).status_code == 200
        assert device.assigned_version() == 2

        paused = server.admin("POST", base + "/rollout/pause", json={"reason": "checking a complaint"}).json()
        assert paused["rollout"]["state"] == "paused" and paused["rollout"]["reason"] == "checking a complaint"
        assert device.assigned_version() == 1, "a paused rollout goes to no device"
        assert server.admin("POST", base + "/rollout/pause").json()["error"]["code"] == "already_paused"

        assert server.admin("POST", base + "/rollout/resume").json()["rollout"]["state"] == "active"
        assert device.assigned_version() == 2

        promoted = server.admin("POST", base + "/rollout/promote").json()
        assert (promoted["version"], promoted["previous_version"], promoted["rollout"]) == (2, 1, None)
        assert device.assigned_version() == 2

        server.admin("POST", base + "/rollout", json={"version": 3, "percent": 100})
        assert device.assigned_version() == 3
        rolled = server.admin("POST", base + "/rollback").json()
        assert (rolled["version"], rolled["rollout"]) == (2, None), "rollback first drops the rollout"
        assert device.assigned_version() == 2
        rolled = server.admin("POST", base + "/rollback").json()
        assert (rolled["version"], rolled["previous_version"]) == (1, None), "then returns to the previous version"
        assert device.assigned_version() == 1

        nothing = server.admin("POST", base + "/rollback")
        assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "nothing_to_roll_back"
        no_rollout = server.admin("POST", base + "/rollout/promote")
        assert no_rollout.status_code == 409 and no_rollout.json()["error"]["code"] == "no_rollout"
        current = server.admin("POST", base + "/rollout", json={"version": 1, "percent": 5})
        assert current.status_code == 409 and current.json()["error"]["code"] == "already_current"
        unknown = server.admin("POST", base + "/rollout", json={"version": 9, "percent": 5})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_version"
        bad = server.admin("POST", base + "/rollout", json={"version": 2, "percent": 150})
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("field percent:")
        bad_channel = server.admin("PUT", f"/v1/models/{MODEL}/channels/Not%20OK", json={"version": 1})
        assert bad_channel.status_code == 400 and bad_channel.json()["error"]["code"] == "bad_channel"
        assert server.admin("GET", f"/v1/models/{MODEL}/channels/beta").json()["error"]["code"] == "unknown_channel"

        actions = [e["action"] for e in server.admin("GET", base).json()["history"]]
        assert actions == ["rollback", "rollback", "rollout", "promote", "resume", "pause", "rollout", "set"]


def test_a_rollout_pauses_itself_when_too_many_devices_fail(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(3)]
        server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout",
                     json={"version": 2, "percent": 100, "failure_threshold": 0.5, "min_reports": 2})

        first = devices[0].report_status(2, load_ok=True, smoke_test_ok=True).json()
        assert first == {"recorded": True, "duplicate": False, "rollout_paused": None}
        second = devices[1].report_status(2, load_ok=True, smoke_test_ok=False, message="smoke test: mug -> bottle").json()
        assert second["rollout_paused"] is None, "1 of 2 failed: 50% is not above the threshold"
        third = devices[2].report_status(2, load_ok=False, smoke_test_ok=None, message="interpreter: bad flatbuffer").json()
        assert third["rollout_paused"].startswith("paused automatically: 2 of 3 devices failed")

        channel = server.admin("GET", f"/v1/models/{MODEL}/channels/stable").json()
        assert channel["rollout"]["state"] == "paused" and channel["history"][0]["action"] == "auto_pause"
        assert {d.assigned_version() for d in devices} == {1}, "every device goes back to the channel's version"
        metrics = server.client.get("/metrics").text
        assert f'sync_server_rollout_state{{channel="stable",model="{MODEL}",state="paused"}} 1.0' in metrics
        assert f'sync_server_devices_running{{model="{MODEL}",version="2"}} 3.0' in metrics


def test_a_resent_failure_report_does_not_pause_a_resumed_rollout_again(db_url, publisher, tmp_path):
    """The agent's outbox resends a report until it sees the answer; after the operator resumed a paused
    rollout, such a copy of an old failure must not count as a new one."""
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(3)]
        base = f"/v1/models/{MODEL}/channels/stable"
        server.admin("POST", base + "/rollout",
                     json={"version": 2, "percent": 100, "failure_threshold": 0.5, "min_reports": 2})
        assert devices[0].report_status(2, key="ok-0").json()["rollout_paused"] is None
        failure = dict(load_ok=False, smoke_test_ok=None, message="interpreter: bad flatbuffer", key="fail-1")
        assert devices[1].report_status(2, **failure).json()["rollout_paused"] is None
        paused = devices[2].report_status(2, load_ok=False, smoke_test_ok=None, key="fail-2").json()
        assert paused["rollout_paused"].startswith("paused automatically: 2 of 3 devices failed")

        assert server.admin("POST", base + "/rollout/resume").json()["rollout"]["state"] == "active"
        assert devices[0].report_status(2, key="ok-0b").json() == {"recorded": True, "duplicate": False,
                                                                   "rollout_paused": None}
        for _ in range(2):  # the ACKs were lost: both failure reports arrive again
            resent = devices[1].report_status(2, **failure).json()
            assert resent == {"recorded": True, "duplicate": True, "rollout_paused": None}
            assert devices[2].report_status(2, load_ok=False, smoke_test_ok=None, key="fail-2").json()["duplicate"]
        assert server.admin("GET", base).json()["rollout"]["state"] == "active", "old failures count once"

        # A new failure, with its own key, is news: 1 of 2 reports since the resume is not above 50%,
        # a second one is.
        assert devices[1].report_status(2, **{**failure, "key": "fail-1b"}).json()["rollout_paused"] is None
        again = devices[2].report_status(2, load_ok=False, smoke_test_ok=None, key="fail-2b").json()
        assert again["duplicate"] is False and again["rollout_paused"].startswith("paused automatically: 2 of 3")


def test_a_status_report_with_an_unusable_idempotency_key_is_refused_by_name(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1)
        server.set_channel(1)
        device = server.enroll()
        response = device.report_status(1, key="x" * 65)
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_idempotency_key"
        assert "Idempotency-Key" in response.json()["error"]["message"]


def test_a_rollout_pauses_itself_when_devices_roll_the_candidate_back(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(3)]
        server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout",
                     json={"version": 2, "percent": 100, "failure_threshold": 0.5, "min_reports": 2})

        def roll_back(device):
            # What the agent sends when v2 loaded and passed its smoke test, then failed its health check.
            paused = device.report_status(2, load_ok=True, smoke_test_ok=True, running=False, message="rolled back to v1",
                                          details={"rolled_back": True, "rolled_back_to": 1}).json()["rollout_paused"]
            assert device.report_status(1, load_ok=True, smoke_test_ok=None).json()["rollout_paused"] is None
            return paused

        assert devices[0].report_status(2, load_ok=True, smoke_test_ok=True, details={"rolled_back": "no"}).json()["rollout_paused"] is None
        assert roll_back(devices[1]) is None, "1 of 2 rolled back: 50% is not above the threshold"
        paused = roll_back(devices[2])
        assert paused.startswith("paused automatically: 2 of 3 devices failed to load, failed to smoke-test or rolled back version 2")

        channel = server.admin("GET", f"/v1/models/{MODEL}/channels/stable").json()
        assert channel["rollout"]["state"] == "paused" and channel["history"][0]["action"] == "auto_pause"
        assert {d.assigned_version() for d in devices} == {1}
        (v2,) = [s for s in server.admin("GET", f"/v1/devices/{devices[2].id}").json()["status"] if s["version"] == 2]
        assert v2["rolled_back"] is True and v2["running"] is False


def test_devices_can_be_moved_between_channels(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1, "stable")
        server.set_channel(2, "canary")
        device = server.enroll(name="kiosk-12")
        assert device.assigned_version() == 1
        moved = server.admin("PATCH", f"/v1/devices/{device.id}", json={"channel": "canary"}).json()
        assert moved["channel"] == "canary" and moved["assigned_version"] == 2
        assert device.assigned_version() == 2
        listing = server.admin("GET", "/v1/devices", params={"channel": "canary"}).json()
        assert [d["device_id"] for d in listing] == [device.id] and listing[0]["name"] == "kiosk-12"


def test_the_tf_serving_config_follows_the_channels(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        config_file = server.services.repository.config_path

        def served() -> tuple[set[int], dict[str, int]]:
            server.wait_serving_idle()
            (config,) = read_model_config(config_file.read_text())
            assert config.name == MODEL
            assert config.base_path == str(server.services.repository.models_dir.resolve() / MODEL)
            assert config.policy[0] == "specific"
            return config.policy[1], config.labels

        server.set_channel(1)
        assert served() == ({1}, {"stable": 1})
        server.set_channel(2, "canary")
        assert served() == ({1, 2}, {"stable": 1, "canary": 2})
        server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": 3, "percent": 10})
        assert served() == ({1, 2, 3}, {"stable": 1, "canary": 2}), "the candidate loads; labels name channel versions"
        server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout/promote")
        assert served() == ({1, 2, 3}, {"stable": 3, "canary": 2}), "the previous version stays loaded for rollback"
        server.set_channel(3, "canary")
        server.set_channel(3, "stable")
        assert served() == ({1, 2, 3}, {"stable": 3, "canary": 3})
        server.set_channel(3, "stable")
        server.admin("POST", f"/v1/models/{MODEL}/channels/canary/rollback")
        served_versions, labels = served()
        assert labels == {"stable": 3, "canary": 2}
        state = server.admin("GET", "/v1/serving").json()
        assert state["models"][MODEL]["labels"] == labels and state["problems"] == {}


@pytest.mark.parametrize("percent", [0, -5])
def test_a_rollout_needs_a_positive_share(percent, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": 2, "percent": percent})
        assert response.status_code == 422 and "percent" in response.json()["error"]["message"]
