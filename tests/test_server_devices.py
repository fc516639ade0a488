"""A kiosk enrols, learns what to run (pushed or polled), downloads it resumably, and reports back."""

from __future__ import annotations

import json
import time
from typing import Iterator

import httpx

from sync_server.services import Services
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ENROLLMENT_SECRET,
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    live_server,
    publisher,
    running_server,
    server_config,
)


def test_enrolment_needs_the_secret_and_a_known_model(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1)
        enroll = "/v1/devices/enroll"
        wrong = server.client.post(enroll, headers={"Authorization": "Bearer guess"}, json={"model": MODEL})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "bad_enrollment_secret"
        missing = server.client.post(enroll, json={"model": MODEL})
        assert missing.status_code == 401 and "ENROLLMENT_SECRET" in missing.json()["error"]["message"]
        secret = {"Authorization": f"Bearer {ENROLLMENT_SECRET}"}
        unknown = server.client.post(enroll, headers=secret, json={"model": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
        bad_body = server.client.post(enroll, headers=secret, json={"model": MODEL, "colour": "red"})
        assert bad_body.status_code == 422 and "colour" in bad_body.json()["error"]["message"]

        device = server.enroll(name="kiosk-1")
        assert device.id.startswith("dev_") and device.token.startswith("dt_") and device.channel == "stable"
        stored = server.admin("GET", f"/v1/devices/{device.id}").json()
        assert stored["name"] == "kiosk-1" and device.token not in json.dumps(stored)


def test_every_device_call_is_authenticated_and_limited_to_its_own_data(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        alice, bob = server.enroll(), server.enroll()
        client = server.client

        assert client.get(f"/v1/devices/{alice.id}/assignment").json()["error"]["code"] == "missing_token"
        forged = client.get(f"/v1/devices/{alice.id}/assignment", headers={"Authorization": "Bearer dt_forged"})
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "bad_token"
        other = client.get(f"/v1/devices/{alice.id}/assignment", headers=bob.headers)
        assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
        assert client.get("/v1/models", headers=alice.headers).json()["error"]["code"] == "admin_only"
        admin_as_device = client.get(f"/v1/devices/{alice.id}/assignment", headers=server.admin_headers)
        assert admin_as_device.status_code == 403 and admin_as_device.json()["error"]["code"] == "device_only"
        assert client.post(f"/v1/devices/{alice.id}/status", headers=bob.headers, json={"version": 1, "load_ok": True}).status_code == 403

        assert server.admin("DELETE", f"/v1/devices/{bob.id}").json() == {"device_id": bob.id, "revoked": True}
        revoked = bob.assignment()
        assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "revoked_token"


def test_assignment_has_an_etag_and_answers_304_until_it_changes(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        device = server.enroll()
        empty = device.assignment()
        assert empty.status_code == 200 and empty.json()["version"] is None, "no channel yet: nothing to run"

        server.set_channel(1)
        first = device.assignment()
        body = first.json()
        assert body["version"] == 1 and body["channel"] == "stable" and body["rollout"] is False
        assert body["manifest"]["version"] == 1 and body["manifest"]["labels"] == list(publisher.labels)
        assert set(body["files"]) == {"model.tflite", "manifest.json", "manifest.sig", "labels.txt"}
        etag = first.headers["etag"]
        assert etag.startswith('"') and etag != empty.headers["etag"]

        unchanged = device.assignment(etag=etag)
        assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag

        server.set_channel(2)
        changed = device.assignment(etag=etag)
        assert changed.status_code == 200 and changed.json()["version"] == 2 and changed.headers["etag"] != etag


def test_artifacts_download_resumably_from_immutable_urls(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        device = server.enroll()
        files = device.assignment().json()["files"]
        model = (publisher.bundles[1] / "model.tflite").read_bytes()
        url, sha = files["model.tflite"]["url"], files["model.tflite"]["sha256"]
        get = lambda **headers: server.client.get(url, headers={**device.headers, **headers})  # noqa: E731

        full = get()
        assert full.status_code == 200 and full.content == model
        assert full.headers["etag"] == f'"{sha}"' and "immutable" in full.headers["cache-control"]
        assert full.headers["accept-ranges"] == "bytes"

        # An interrupted download resumes where it stopped.
        cut = len(model) // 3
        head = get(Range=f"bytes=0-{cut - 1}")
        assert head.status_code == 206 and head.headers["content-range"] == f"bytes 0-{cut - 1}/{len(model)}"
        rest = get(Range=f"bytes={cut}-", **{"If-Range": f'"{sha}"'})
        assert rest.status_code == 206 and head.content + rest.content == model
        assert get(Range="bytes=-10").content == model[-10:]
        assert get(Range=f"bytes={cut}-", **{"If-Range": '"other"'}).status_code == 200, "If-Range mismatch: whole file"
        assert get(Range="bytes=0-1,5-6").status_code == 200, "several ranges: whole file"
        assert get(Range="pages=1-2").content == model, "a Range we cannot read is ignored"
        past = get(Range=f"bytes={len(model)}-")
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(model)}"
        assert past.json()["error"]["code"] == "range_not_satisfiable"
        assert get(**{"If-None-Match": f'"{sha}"'}).status_code == 304
        head_only = server.client.head(url, headers=device.headers)
        assert head_only.status_code == 200 and head_only.content == b""

        # Only the assigned version's files. Another version's file and a hash nobody has get the same
        # answer, so a device cannot probe which files exist.
        v2_manifest = server.admin("GET", f"/v1/models/{MODEL}/versions/2").json()["files"]["manifest.json"]["url"]
        denied = server.client.get(v2_manifest, headers=device.headers)
        missing = server.client.get("/v1/artifacts/" + "0" * 64, headers=device.headers)
        assert denied.status_code == missing.status_code == 404
        assert denied.json()["error"]["code"] == missing.json()["error"]["code"] == "unknown_artifact"
        assert "assigned to device" in denied.json()["error"]["message"] and "assigned to device" in missing.json()["error"]["message"]
        assert server.client.get(v2_manifest, headers=server.admin_headers).status_code == 200
        assert server.client.get("/v1/artifacts/" + "0" * 64, headers=server.admin_headers).status_code == 404
        assert server.client.get("/v1/artifacts/not-a-hash", headers=device.headers).status_code == 404


def test_status_and_telemetry_reports_are_stored_and_summed(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        a, b = server.enroll(), server.enroll()
        assert a.report_status(1, load_ok=True, smoke_test_ok=True, details={"load_ms": 41}).status_code == 200
        unknown = a.report_status(9)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_version"

        for device, predictions, fallbacks in ((a, 100, 10), (b, 300, 15)):
            response = server.client.post(
                f"/v1/devices/{device.id}/telemetry", headers=device.headers,
                json={"version": 1, "period_s": 300, "predictions": predictions, "fallbacks": fallbacks,
                      "latency_ms": {"p50": 12.0, "p99": 40.0 + fallbacks}, "confidence_histogram": [0, 1, 2, 3, predictions - 6]},
            )
            assert response.status_code == 202, response.text
        bad = server.client.post(f"/v1/devices/{a.id}/telemetry", headers=a.headers, json={"version": 1, "period_s": 60, "predictions": -1, "fallbacks": 0})
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("field predictions:")

        summary = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()
        (v1,) = summary["versions"]
        assert (v1["devices"], v1["predictions"], v1["fallbacks"]) == (2, 400, 25)
        assert v1["fallback_rate"] == 25 / 400
        assert v1["confidence_histogram"] == [0, 2, 4, 6, 388]
        assert v1["latency_ms"] == {"p50_mean": 12.0, "p99_max": 55.0}
        detail = server.admin("GET", f"/v1/devices/{a.id}").json()
        assert detail["running_version"] == 1 and detail["status"][0]["smoke_test_ok"] is True


def test_a_resent_telemetry_report_counts_once(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        kiosk, other = server.enroll(), server.enroll()
        report = {"version": 1, "period_s": 300, "predictions": 100, "fallbacks": 10, "confidence_histogram": [10, 90]}

        def send(device, key: str | None = None):
            headers = {**device.headers, **({"Idempotency-Key": key} if key is not None else {})}
            return server.client.post(f"/v1/devices/{device.id}/telemetry", headers=headers, json=report)

        def predictions() -> int:
            (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry", params={"version": 1}).json()["versions"]
            return v1["predictions"]

        key = "3f0c2a4e-5b8d-4c1a-9e7f-0123456789ab"
        first = send(kiosk, key)
        assert first.status_code == 202 and first.json() == {"recorded": True, "duplicate": False}
        again = send(kiosk, key)  # the outbox resends after a crash, before it saw the answer
        assert again.status_code == 202 and again.json() == {"recorded": True, "duplicate": True}
        assert predictions() == 100, "the resent report is counted once"

        assert send(kiosk, "another-report").json()["duplicate"] is False
        assert send(other, key).json()["duplicate"] is False, "keys belong to one device"
        assert send(kiosk).status_code == 202 and send(kiosk).status_code == 202, "no key: every report counts"
        assert predictions() == 500

        too_long = send(kiosk, "k" * 65)
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "bad_idempotency_key"
        assert too_long.json()["error"]["message"].startswith("the Idempotency-Key header must be 1 to 64")
        assert send(kiosk, "a key\twith a tab").status_code == 400
        assert predictions() == 500, "a refused report stores nothing"

        status = server.client.post(f"/v1/devices/{kiosk.id}/status", headers={**kiosk.headers, "Idempotency-Key": key},
                                    json={"version": 1, "load_ok": True, "smoke_test_ok": True})
        assert status.status_code == 200 and status.json()["recorded"] is True, "status takes the header too (it is an upsert)"


def test_two_copies_of_a_report_racing_past_the_check_count_once(db_url, publisher, tmp_path, monkeypatch):
    import sync_server.telemetry as telemetry

    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        kiosk = server.enroll()
        send = lambda: server.client.post(  # noqa: E731
            f"/v1/devices/{kiosk.id}/telemetry", headers={**kiosk.headers, "Idempotency-Key": "k-1"},
            json={"version": 1, "period_s": 60, "predictions": 7, "fallbacks": 0},
        )
        assert send().json()["duplicate"] is False
        real_seen, calls = telemetry._seen, []

        def first_check_misses(*args):
            calls.append(args)
            return False if len(calls) == 1 else real_seen(*args)

        monkeypatch.setattr(telemetry, "_seen", first_check_misses)
        late = send()  # its check missed the first copy, as if both were in flight; the unique index decides
        assert late.status_code == 202 and late.json() == {"recorded": True, "duplicate": True}
        (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"]
        assert (v1["reports"], v1["predictions"]) == (1, 7) and len(calls) == 2


def _events(response: httpx.Response) -> Iterator[dict]:
    """Parse a text/event-stream into {"event", "id", "data"} dicts (comments skipped)."""
    event: dict = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            event[key] = value[1:] if value.startswith(" ") else value


def test_devices_are_told_at_once_when_their_assignment_changes(db_url, publisher, tmp_path):
    config = server_config(tmp_path / "data", db_url, publisher)
    with live_server(config) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(1)
        device = server.enroll()
        with httpx.Client(base_url=server.url, headers=device.headers, timeout=10) as http:
            with http.stream("GET", f"/v1/devices/{device.id}/events") as stream:
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
                events = _events(stream)
                first = next(events)
                assert first["event"] == "assignment" and first["data"]["version"] == 1
                assert first["id"] == device.assignment().headers["etag"]

                started = time.perf_counter()
                server.set_channel(2)
                second = next(events)
                assert second["data"]["version"] == 2 and second["data"]["manifest"]["version"] == 2
                assert time.perf_counter() - started < 1.0

                # A change made by another server instance on the same database arrives too.
                other = Services.build(config, with_predictor=False)
                try:
                    other.rollouts.set_version(MODEL, "stable", 3)
                finally:
                    other.close()
                third = next(events)
                assert third["data"]["version"] == 3

                # Moving the device to another channel is pushed as well.
                server.set_channel(1, "canary")
                moved = server.admin("PATCH", f"/v1/devices/{device.id}", json={"channel": "canary"})
                assert moved.status_code == 200
                fourth = next(events)
                assert (fourth["data"]["channel"], fourth["data"]["version"]) == ("canary", 1)

        # Polling with the last event's id (the ETag) is the fallback: nothing changed since.
        assert device.assignment(etag=fourth["id"]).status_code == 304


def test_after_a_change_one_read_answers_every_device_of_the_model(db_url, publisher, tmp_path, monkeypatch):
    """A publish wakes every push stream of the model at once: one thread reads the model's devices and
    channels, the others wait for that read instead of each asking the database."""
    import threading

    import pytest

    from sync_server.errors import AuthenticationError

    # (The watch for other instances' changes would empty the caches once more after each change.)
    with running_server(server_config(tmp_path / "data", db_url, publisher, push_poll_s=3600)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        enrolled = [server.enroll() for _ in range(6)]
        devices = server.services.devices
        identities = [devices.authenticate(d.token) for d in enrolled]
        reads = []
        read_roster = devices._read_roster

        def counted(model_id):
            reads.append(model_id)
            time.sleep(0.05)  # a slow database: the other threads arrive while it reads
            return read_roster(model_id)

        monkeypatch.setattr(devices, "_read_roster", counted)

        server.set_channel(2)
        answers = [None] * len(identities)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, devices.assignment(identities[i])))
                   for i in range(len(identities))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.version for a in answers] == [2] * len(identities) and len(reads) == 1
        assert all(devices.pushed_assignment(i).version == 2 for i in identities), "later wake-ups need no thread"

        # Every change starts a new read, and what changed is seen: a move to another channel, a revocation.
        server.set_channel(1, "canary")
        assert server.admin("PATCH", f"/v1/devices/{enrolled[0].id}", json={"channel": "canary"}).status_code == 200
        assert server.admin("DELETE", f"/v1/devices/{enrolled[1].id}").status_code == 200
        before = len(reads)
        moved = devices.assignment(identities[0])
        assert (moved.channel, moved.version) == ("canary", 1)
        with pytest.raises(AuthenticationError) as revoked:
            devices.assignment(identities[1])
        assert revoked.value.code == "revoked_token"
        assert devices.assignment(identities[2]).version == 2 and len(reads) == before + 1

        # A device enrolled after the read is not in it: it reads its own assignment.
        late = server.enroll()
        assert devices.assignment(devices.authenticate(late.token)).version == 2 and len(reads) == before + 1


def test_a_change_made_here_wakes_the_streams_once_and_one_made_elsewhere_still_arrives(db_url, publisher, tmp_path):
    """The watch for other instances' changes sees this instance's own revision move too; it must not
    wake every stream a second time for it."""
    config = server_config(tmp_path / "data", db_url, publisher, push_poll_s=0.05)
    with running_server(config) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = server.services.devices
        time.sleep(0.3)  # the watch has read the revision
        generation = devices._generation
        server.set_channel(2)
        time.sleep(0.5)  # ten polls of the watch
        assert devices._generation == generation + 1, "invalidated once, by the change itself"

        other = Services.build(config, with_predictor=False)
        try:
            other.rollouts.set_version(MODEL, "stable", 1)
        finally:
            other.close()
        deadline = time.monotonic() + 5
        while devices._generation == generation + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert devices._generation == generation + 2, "a change made by another instance still empties the caches"
