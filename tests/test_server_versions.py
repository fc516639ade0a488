"""An operator deletes versions nothing uses any more, so the registry does not grow without end."""

from __future__ import annotations

import json

from sync_server.cli import main as cli_main
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    live_server,
    publisher,
    running_server,
    server_config,
)


def test_a_version_nothing_uses_is_deleted_with_its_files_and_its_number_stays_taken(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(2)
        server.set_channel(3)  # stable: 3, previous 2; nothing uses 1
        server.wait_serving_idle()
        services = server.services
        v1 = server.admin("GET", f"/v1/models/{MODEL}/versions/1").json()
        v2 = server.admin("GET", f"/v1/models/{MODEL}/versions/2").json()
        assert services.repository.path_of(MODEL, 1).is_dir()

        response = server.admin("DELETE", f"/v1/models/{MODEL}/versions/1")
        assert response.status_code == 200, response.text
        assert response.json()["deleted"] is True and response.json()["freed_bytes"] > 0

        assert server.admin("GET", f"/v1/models/{MODEL}/versions/1").json()["error"]["code"] == "unknown_version"
        assert server.admin("GET", f"/v1/models/{MODEL}").json()["versions"] == [2, 3]
        assert not services.repository.path_of(MODEL, 1).exists(), "its SavedModel left the TF Serving repository"
        shared = {f["sha256"] for f in v2["files"].values()}
        for file in v1["files"].values():
            stored = services.artifacts.path_of(file["sha256"]).is_file()
            assert stored == (file["sha256"] in shared), "files another version shares stay, the rest go"
        for file in v2["files"].values():  # the versions that remain are whole
            assert services.artifacts.path_of(file["sha256"]).is_file()

        # The same content may come back under its number; other content may not.
        conflict = server.publish(publisher.conflicting_v1, publisher.saved_model)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "version_conflict"
        assert "deleted" in conflict.json()["error"]["message"]
        restored = server.publish(publisher.bundles[1], publisher.saved_model)
        assert restored.status_code == 201 and restored.json()["created"] is True
        assert server.admin("GET", f"/v1/models/{MODEL}").json()["versions"] == [1, 2, 3]
        for file in v1["files"].values():
            assert server.client.get(file["url"], headers=server.admin_headers).status_code == 200


def test_versions_in_use_are_kept_and_the_answer_says_why(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(1)
        server.set_channel(2)  # stable: 2, previous 1
        server.set_channel(3, "canary")
        device = server.enroll(channel="canary")  # it was assigned canary's version 3
        server.wait_serving_idle()
        for version, channel in ((2, "stable"), (1, "stable"), (3, "canary")):
            refused = server.admin("DELETE", f"/v1/models/{MODEL}/versions/{version}").json()["error"]
            assert refused["code"] == "version_in_use" and channel in refused["message"], refused

        server.set_channel(1, "canary")  # 3 is now canary's previous version
        server.set_channel(2, "canary")  # and now nobody's
        assert device.report_status(3, running=True).status_code == 200  # a device still runs it
        server.wait_serving_idle()
        refused = server.admin("DELETE", f"/v1/models/{MODEL}/versions/3").json()["error"]
        assert refused["code"] == "version_running" and "1 device" in refused["message"]

        assert device.report_status(2, running=True).status_code == 200  # it moved on
        assert server.admin("DELETE", f"/v1/models/{MODEL}/versions/3").status_code == 200
        assert server.admin("DELETE", f"/v1/models/{MODEL}/versions/3").json()["error"]["code"] == "unknown_version"


def test_prune_keeps_the_newest_and_whatever_is_in_use(db_url, publisher, tmp_path, capsys):
    config = server_config(tmp_path / "data", db_url, publisher)
    with running_server(config) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(1)  # stable: 1, so 1 is in use; 2 is old and unused; 3 is the newest
        server.wait_serving_idle()
    args = ["prune", MODEL, "--keep", "1", "--data-dir", str(tmp_path / "data"), "--log-level", "warning"]
    if db_url:
        args += ["--database-url", db_url]
    assert cli_main([*args, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["deleted"] == [2] and dry["kept"][0]["code"] == "version_in_use", "a dry run checks too"
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{MODEL}: deleted version 2 (") and "kept version 1: version 1 of model" in out
    assert "in use by channel stable" in out
    with running_server(config) as server:
        assert server.admin("GET", f"/v1/models/{MODEL}").json()["versions"] == [1, 3], "and deletes only then"
    assert cli_main(["prune", MODEL, "--keep", "0", "--data-dir", str(tmp_path / "data")]) == 2
    assert "--keep must be at least 1" in capsys.readouterr().err
    elsewhere = tmp_path / "not-a-data-dir"
    assert cli_main(["prune", MODEL, "--data-dir", str(elsewhere)]) == 2
    assert "no sync-server data in" in capsys.readouterr().err and not elsewhere.exists(), "a typo creates nothing"


def test_prune_talks_to_a_running_server_too(db_url, publisher, tmp_path, capsys):
    with live_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, 3)
        server.set_channel(3)
        server.wait_serving_idle()
        args = ["prune", MODEL, "--keep", "2", "--server", server.url, "--admin-token", ADMIN_TOKEN, "--json"]
        assert cli_main(args) == 0
        assert json.loads(capsys.readouterr().out)["deleted"] == [1]
        assert server.admin("GET", f"/v1/models/{MODEL}").json()["versions"] == [2, 3]
        assert cli_main(["prune", "no-such-model", "--server", server.url, "--admin-token", ADMIN_TOKEN]) == 2
        assert "unknown model 'no-such-model'" in capsys.readouterr().err
