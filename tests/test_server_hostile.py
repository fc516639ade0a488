"""The sync server under hostile devices and failing parts: a device with a valid token tries to poison
a rollout, keep a version from being deleted, crash the server with big numbers, read what is not its
own; the disk fills up and the database goes away. Each answer is a clear 4xx or 503/507, never a 500.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from sync_server.bundles import unpack_archive
from sync_server.errors import BundleRejectedError
from sync_server.rollout import bucket
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    ENROLLMENT_SECRET,
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    live_server,
    publisher,
    running_server,
    server_config,
    tarball,
)

BIG = [2**31, 2**63, 10**30]


def _rollout(server, version: int, percent: float, **extra):
    response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": version, "percent": percent, **extra})
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------------------------------------
# Finding 3: rollout poisoning, per-device enrolment credentials
# ----------------------------------------------------------------------------------------------------------


def test_devices_outside_a_rollout_cannot_pause_it(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(6)]
        _rollout(server, 2, 1, failure_threshold=0.0, min_reports=1)
        outside = [d for d in devices if bucket(d.id, MODEL, "stable", 2) >= 1]
        assert len(outside) >= 5

        for device in outside:
            refused = device.report_status(2, load_ok=False, smoke_test_ok=None, message="interpreter: bad flatbuffer")
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["code"] == "not_assigned" and "never assigned version 2" in error["message"]
            telemetry = server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers,
                                           json={"version": 2, "period_s": 60, "predictions": 10, "fallbacks": 10})
            assert telemetry.status_code == 403 and telemetry.json()["error"]["code"] == "not_assigned"
        channel = server.admin("GET", f"/v1/models/{MODEL}/channels/stable").json()
        assert channel["rollout"]["state"] == "active", "five forged failures did not pause a 1 % rollout"
        assert server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"] == []

        # Once the rollout reaches them, their reports count: the failure pauses it.
        _rollout(server, 2, 100, failure_threshold=0.0, min_reports=1)
        paused = outside[0].report_status(2, load_ok=False, smoke_test_ok=None).json()["rollout_paused"]
        assert paused and paused.startswith("paused automatically: 1 of 1 devices")
        # After the pause the device is back on 1, but 2 was assigned to it once: its report still counts.
        assert outside[1].report_status(2, load_ok=True, smoke_test_ok=True, running=False).status_code == 200


def test_a_device_cannot_claim_to_run_a_version_it_never_got_and_so_keep_it(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(1)
        server.set_channel(2)
        server.set_channel(3, "canary")
        server.set_channel(2, "canary")  # 3 is canary's previous version; no stable device ever had it
        server.set_channel(1, "canary")
        device = server.enroll()
        forged = device.report_status(3, running=True)
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "not_assigned"
        assert device.report_status(2, running=True).status_code == 200, "its own channel's version is fine"
        server.wait_serving_idle()
        deleted = server.admin("DELETE", f"/v1/models/{MODEL}/versions/3")
        assert deleted.status_code == 200, deleted.text


def test_devices_enrol_with_expiring_revocable_tokens_an_admin_creates(db_url, publisher, tmp_path):
    # No fleet secret configured: only enrolment tokens open the door.
    config = server_config(tmp_path / "data", db_url, publisher, enrollment_secret=None)
    with running_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        enroll = lambda token, **body: server.client.post(  # noqa: E731
            "/v1/devices/enroll", headers={"Authorization": f"Bearer {token}"}, json={"model": MODEL, **body})
        assert not (tmp_path / "data" / "enrollment-secret").exists(), "no fleet secret is generated"
        assert enroll("enrol-secret-for-tests-0123456789").json()["error"]["code"] == "bad_enrollment_secret"

        made = server.admin("POST", "/v1/enrollment-tokens", json={"max_uses": 2, "model": MODEL, "channel": "canary", "note": "shop 12"})
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        assert token.startswith("et_") and made.json()["id"].startswith("enr_") and made.json()["uses"] == 0
        first = enroll(token, name="kiosk-1")
        assert first.status_code == 201 and first.json()["channel"] == "canary", "the token sets the channel"
        other_channel = enroll(token, channel="stable")
        assert other_channel.status_code == 403 and other_channel.json()["error"]["code"] == "token_not_for_channel"
        assert enroll(token).status_code == 201
        used_up = enroll(token)
        assert used_up.status_code == 401 and "already used for 2 device(s)" in used_up.json()["error"]["message"]
        listed = server.admin("GET", "/v1/enrollment-tokens").json()
        assert [(t["uses"], t["max_uses"], t["model"], t["note"]) for t in listed] == [(2, 2, MODEL, "shop 12")]
        assert token not in str(listed)

        short = server.admin("POST", "/v1/enrollment-tokens", json={"expires_in_s": 1}).json()
        time.sleep(1.2)
        expired = enroll(short["token"])
        assert expired.status_code == 401 and "expired at" in expired.json()["error"]["message"]

        leaked = server.admin("POST", "/v1/enrollment-tokens", json={"max_uses": 10}).json()
        victim = enroll(leaked["token"]).json()
        revoked = server.admin("DELETE", f"/v1/enrollment-tokens/{leaked['id']}", params={"devices": "true"})
        assert revoked.json() == {"id": leaked["id"], "revoked": True, "revoked_devices": 1}
        assert enroll(leaked["token"]).json()["error"]["message"].endswith("was revoked; ask for a new one")
        cut_off = server.client.get(f"/v1/devices/{victim['device_id']}/assignment", headers={"Authorization": f"Bearer {victim['token']}"})
        assert cut_off.status_code == 401 and cut_off.json()["error"]["code"] == "revoked_token"
        assert server.client.get(f"/v1/devices/{first.json()['device_id']}/assignment",
                                 headers={"Authorization": f"Bearer {first.json()['token']}"}).status_code == 200

        for_other_model = server.admin("POST", "/v1/enrollment-tokens", json={"model": "nope"})
        assert for_other_model.status_code == 404 and for_other_model.json()["error"]["code"] == "unknown_model"
        assert server.admin("DELETE", "/v1/enrollment-tokens/enr_unknown").status_code == 404


def test_the_fleet_secret_works_only_when_configured_and_the_cli_makes_tokens(publisher, tmp_path, capsys):
    from sync_server.cli import main as cli_main

    data = tmp_path / "data"
    assert cli_main(["enrollment-token", "create", "--data-dir", str(data), "--uses", "3", "--expires", "2h", "--note", "till"]) == 0
    token, summary = capsys.readouterr().out.splitlines()
    assert token.startswith("et_") and "enrols 3 device(s) until" in summary and summary.endswith("(the token is shown only now)")
    token_id = summary.split(":")[0]
    assert cli_main(["enrollment-token", "list", "--data-dir", str(data)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{token_id}  active   0/3 used") and line.rstrip().endswith("*/*  till")
    assert cli_main(["enrollment-token", "create", "--data-dir", str(data), "--expires", "soon"]) == 2
    assert capsys.readouterr().err == "error: --expires: 'soon' is not a duration such as 3600, 30m, 12h or 7d\n"

    with running_server(server_config(data, None, publisher, enrollment_secret="a-fleet-secret-0123456789")) as server:
        server.publish_ok(publisher, 1)
        enroll = lambda secret: server.client.post(  # noqa: E731
            "/v1/devices/enroll", headers={"Authorization": f"Bearer {secret}"}, json={"model": MODEL})
        assert enroll("a-fleet-secret-0123456789").status_code == 201, "configured explicitly: it works"
        assert enroll(token).status_code == 201, "a token made by the CLI works against the same data dir"

    assert cli_main(["enrollment-token", "revoke", token_id, "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out == f"{token_id} revoked\n"
    assert cli_main(["path", "--data-dir", str(data)]) == 0
    assert "enrolment secret        none (devices enrol with tokens: sync-server enrollment-token create)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Finding 4: big numbers
# ----------------------------------------------------------------------------------------------------------


def test_big_numbers_anywhere_get_a_4xx_and_the_connection_stays_open(db_url, publisher, tmp_path):
    with live_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        admin, dev = server.admin_headers, device.headers
        url = device.assignment().json()["files"]["model.tflite"]["url"]
        peers: set[tuple[str, int]] = set()

        def ask(method: str, path: str, headers: dict, **kwargs) -> httpx.Response:
            # One client, one kept-alive connection: a 500 would reset it.
            response = server.client.request(method, path, headers=headers, **kwargs)
            stream = response.extensions.get("network_stream")
            if stream is not None:
                peers.add(stream.get_extra_info("client_addr"))
            assert response.status_code < 500, f"{method} {path} {kwargs}: {response.status_code} {response.text}"
            return response

        for big in BIG:
            assert ask("GET", f"/v1/models/{MODEL}/versions/{big}", admin).status_code == 422
            assert ask("DELETE", f"/v1/models/{MODEL}/versions/{big}", admin).status_code == 422
            assert ask("GET", f"/v1/models/{MODEL}/telemetry", admin, params={"version": big}).status_code == 422
            assert ask("POST", f"/v1/models/{MODEL}/predict", dev, params={"version": big}, content=b"x").status_code == 422
            assert ask("PUT", f"/v1/models/{MODEL}/channels/stable", admin, json={"version": big}).status_code == 422
            assert ask("POST", f"/v1/models/{MODEL}/channels/stable/rollout", admin,
                       json={"version": 1, "percent": 5, "min_reports": big}).status_code == 422
            status = ask("POST", f"/v1/devices/{device.id}/status", dev, json={"version": big, "load_ok": True})
            assert status.status_code == 422 and status.json()["error"]["message"].startswith("field version:")
            details = ask("POST", f"/v1/devices/{device.id}/status", dev, json={"version": 1, "load_ok": True, "details": {"n": big * 2**40}})
            assert details.status_code == 422
            for field in ("predictions", "fallbacks", "errors"):
                body = {"version": 1, "period_s": 60, "predictions": 1, "fallbacks": 0, field: big * 1000}
                assert ask("POST", f"/v1/devices/{device.id}/telemetry", dev, json=body).status_code == 422
            histogram = {"version": 1, "period_s": 60, "predictions": 1, "fallbacks": 0, "confidence_histogram": [big * 1000]}
            assert ask("POST", f"/v1/devices/{device.id}/telemetry", dev, json=histogram).status_code == 422

        digits = "9" * 5000
        past = server.client.get(url, headers={**dev, "Range": f"bytes={digits}-"})
        assert past.status_code == 416 and past.json()["error"]["code"] == "range_not_satisfiable"
        whole = server.client.get(url, headers={**dev, "Range": f"bytes=0-{digits}"})
        assert whole.status_code == 206 and len(whole.content) == int(whole.headers["content-length"])
        suffix = server.client.get(url, headers={**dev, "Range": f"bytes=-{digits}"})
        assert suffix.status_code == 206 and suffix.content == whole.content
        huge_json = server.client.post(f"/v1/devices/{device.id}/status", headers={**dev, "Content-Type": "application/json"},
                                       content=b'{"version": ' + digits.encode() + b', "load_ok": true}')
        assert 400 <= huge_json.status_code < 500
        assert device.assignment().status_code == 200
        assert len(peers) <= 1, f"the kept-alive connection was reset: {peers}"


def test_a_signed_manifest_with_a_version_past_the_columns_range_is_refused(db_url, publisher, tmp_path):
    from converter import read_bundle, write_bundle

    base = read_bundle(publisher.bundles[1], publisher.public_key)
    big = write_bundle(tmp_path / "big", base.read_model(), dataclasses.replace(base.manifest, version=2**31), sign_key=publisher.private_key)
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        refused = server.publish(big, publisher.saved_model)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == {"code": "bad_bundle", "message": f"model version must be 1 to {2**31 - 1}, got {2**31}"}


def test_non_finite_telemetry_is_refused_and_the_latency_summary_stays_a_number(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        send = lambda text: server.client.post(  # noqa: E731
            f"/v1/devices/{device.id}/telemetry", headers={**device.headers, "Content-Type": "application/json"}, content=text)
        good = '{"version": 1, "period_s": 60, "predictions": 10, "fallbacks": 1, "latency_ms": {"p50": 12.0, "p99": 30.0}}'
        assert send(good).status_code == 202
        for bad in ("Infinity", "NaN", "-Infinity", "1e999"):
            refused = send(good.replace("30.0", bad))
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.json()["error"]["message"].startswith("field latency_ms.p99:")
        assert send(good.replace('"period_s": 60', '"period_s": Infinity')).status_code == 422
        status = server.client.post(f"/v1/devices/{device.id}/status", headers={**device.headers, "Content-Type": "application/json"},
                                    content='{"version": 1, "load_ok": true, "details": {"load_ms": NaN}}')
        assert status.status_code == 422 and "finite" in status.json()["error"]["message"]
        (v1,) = server.admin("GET", f"/v1/models/{MODEL}/telemetry").json()["versions"]
        assert v1["latency_ms"] == {"p50_mean": 12.0, "p99_max": 30.0}


# ----------------------------------------------------------------------------------------------------------
# Finding 7: database down, disk full
# ----------------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_database_that_is_down_answers_503_with_retry_after(publisher, tmp_path):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/nowhere?connect_timeout=2"
    config = server_config(tmp_path / "data", url, publisher, auto_migrate=False)
    with running_server(config, raise_server_exceptions=False) as server:
        for method, path, headers, body in (
            ("GET", f"/v1/models/{MODEL}", server.admin_headers, None),
            ("GET", "/v1/devices/dev_0123456789abcdef/assignment", {"Authorization": "Bearer dt_some-device-token"}, None),
            ("POST", "/v1/devices/enroll", {"Authorization": "Bearer et_some-enrolment-token"}, {"model": MODEL}),
        ):
            response = server.client.request(method, path, headers=headers, json=body)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"] == {
                "code": "database_unavailable", "message": "the database is unavailable right now; try again in a few seconds"}


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8): the full-disk test is skipped")
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test is skipped")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    """Write until the file system has 0 bytes free."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while handle.write(b"\0" * size):
                    pass
    with contextlib.suppress(OSError):
        for i in range(10_000):
            (folder / f"inode-{i}").write_bytes(b"")
    assert os.statvfs(folder).f_bavail == 0


def test_a_full_disk_answers_507_and_devices_still_read_their_assignment(publisher, tmp_path):
    with _small_tmpfs(tmp_path / "disk", "24m") as disk:
        with running_server(server_config(disk / "data", None, publisher), raise_server_exceptions=False) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.publish_ok(publisher, 2)
            device, kiosk = server.enroll(), server.enroll()
            _fill(disk)

            # Authentication writes last_seen_at, best effort: the device still learns what to run.
            assignment = device.assignment()
            assert assignment.status_code == 200 and assignment.json()["version"] == 1
            assert kiosk.assignment().json()["version"] == 1
            assert server.services.devices.last_seen_failures >= 1
            metrics = server.client.get("/metrics").text
            assert "sync_server_last_seen_write_failures_total 2.0" in metrics, "counted, once per device"

            publish = server.publish(publisher.bundles[3], publisher.saved_model)
            assert publish.status_code == 507, publish.text
            assert publish.json()["error"]["code"] == "disk_full" and "disk is full" in publish.json()["error"]["message"]
            writes = [device.report_status(1), server.client.post(
                "/v1/devices/enroll", headers={"Authorization": f"Bearer {ENROLLMENT_SECRET}"}, json={"model": MODEL})]
            writes.append(server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers,
                                             json={"version": 1, "period_s": 60, "predictions": 5, "fallbacks": 0}))
            for response in writes:  # a status report, an enrolment, a telemetry report
                assert response.status_code == 507, response.text
                assert response.json()["error"] == {
                    "code": "disk_full",
                    "message": "the server's disk is full: the database cannot store this change; free space on the "
                               "server (or grow its volume) and try again"}

            (disk / "filler").unlink()
            assert device.report_status(1).status_code == 200, "space again: writes work again"


# ----------------------------------------------------------------------------------------------------------
# Finding 8: smaller ones
# ----------------------------------------------------------------------------------------------------------


def test_the_event_stream_of_another_device_is_refused_before_it_starts(db_url, publisher, tmp_path):
    with live_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        alice, bob = server.enroll(), server.enroll()
        with server.client.stream("GET", f"/v1/devices/{alice.id}/events", headers=bob.headers) as stream:
            assert stream.status_code == 403 and stream.headers["content-type"] == "application/json"
            assert '"forbidden"' in stream.read().decode()
        long_id = server.client.get("/v1/devices/" + "d" * 5000 + "/events", headers=bob.headers)
        assert long_id.status_code == 422


def test_a_device_may_ask_predictions_only_of_versions_it_was_assigned(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, channel="stable")  # stable: 2, previous 1 (never this device's)
        device = server.enroll()
        refused = device.predict(b"\xff\xd8 not really a photo", version=1)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "not_assigned" and "never assigned version 1" in refused.json()["error"]["message"]


def _tar_of_empty_members(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"f{i}")
            tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


class _CountingReader(io.BytesIO):
    read_bytes = 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_an_archive_of_many_members_is_refused_after_reading_only_the_first(tmp_path):
    data = _tar_of_empty_members(5_000)
    reader = _CountingReader(data)
    with pytest.raises(BundleRejectedError) as refused:
        unpack_archive(reader, tmp_path / "out", max_bytes=1 << 30, what="SavedModel", max_members=100)
    assert refused.value.code == "bad_archive" and "more than 100 entries" in refused.value.message
    assert reader.read_bytes < 200 * 1024, f"read {reader.read_bytes} of {len(data)} bytes before refusing"
    assert len(list((tmp_path / "out").iterdir())) <= 100

    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"big{i}")
            info.size = 600_000
            tar.addfile(info, io.BytesIO(b"\0" * info.size))
    from sync_server.errors import PayloadTooLargeError

    with pytest.raises(PayloadTooLargeError, match="unpacks to more than 1000000 bytes"):
        unpack_archive(io.BytesIO(big.getvalue()), tmp_path / "out2", max_bytes=1_000_000, what="bundle")
    assert not (tmp_path / "out2" / "big1").exists(), "refused before the file past the limit was written"


def test_the_admin_token_can_come_from_a_file_and_the_flag_warns(tmp_path, capsys):
    from sync_server import ServerConfig
    from sync_server.cli import main as cli_main

    token_file = tmp_path / "admin-token.txt"
    token_file.write_text("admin-token-from-a-file-0123456789\n")
    config = ServerConfig(data_dir=tmp_path / "data", admin_token_file=token_file).with_secrets()
    assert config.admin_token == "admin-token-from-a-file-0123456789"
    assert not (tmp_path / "data" / "admin-token").exists()
    assert ServerConfig.load({}, {"SYNC_SERVER_ADMIN_TOKEN_FILE": str(token_file)}).admin_token_file == token_file

    assert cli_main(["path", "--data-dir", str(tmp_path / "data"), "--admin-token", ADMIN_TOKEN]) == 0
    assert capsys.readouterr().err.startswith("warning: --admin-token is visible to every user in the process list")
    assert cli_main(["path", "--data-dir", str(tmp_path / "data"), "--admin-token-file", str(token_file)]) == 0
    assert capsys.readouterr().err == ""
    token_file.write_text("short")
    from sync_server.errors import ConfigError

    with pytest.raises(ConfigError, match="must be at least 16 characters"):
        ServerConfig(data_dir=tmp_path / "data", admin_token_file=token_file).with_secrets()
