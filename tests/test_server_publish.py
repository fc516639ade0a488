"""A publisher uploads signed bundles with their SavedModels; the server keeps only what verifies."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from sync_server.cli import main as cli_main
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    _drop_postgres_at_exit,
    copy_saved_model,
    db_url,
    publisher,
    running_server,
    server_config,
    tarball,
)


def test_publish_over_http_stores_artifacts_by_hash_and_the_saved_model_for_tf_serving(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        response = server.publish(publisher.bundles[1], publisher.saved_model, channel="stable")
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["name"], body["version"], body["created"]) == (MODEL, 1, True)
        assert body["labels"] == list(publisher.labels)
        assert body["channel"]["version"] == 1

        # Bundle files live under their content hash, behind immutable URLs.
        for name in ("model.tflite", "manifest.json", "manifest.sig", "labels.txt"):
            entry = body["files"][name]
            content = (publisher.bundles[1] / name).read_bytes()
            assert entry["sha256"] == hashlib.sha256(content).hexdigest()
            assert entry["size"] == len(content)
            assert entry["url"] == f"/v1/artifacts/{entry['sha256']}"
            stored = server.services.artifacts.path_of(entry["sha256"])
            assert stored.read_bytes() == content

        # The full SavedModel is in the TF Serving repository as REPO/NAME/VERSION/.
        version_dir = server.services.repository.path_of(MODEL, 1)
        assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
        assert not any(p.name.startswith(".") for p in version_dir.parent.iterdir()), "no half-copied folder left"

        listed = server.admin("GET", "/v1/models").json()
        assert listed[0]["name"] == MODEL and listed[0]["versions"] == [1]
        detail = server.admin("GET", f"/v1/models/{MODEL}/versions/1").json()
        assert detail["manifest"]["name"] == MODEL and detail["manifest"]["version"] == 1


def test_publishing_the_same_version_again_is_idempotent_but_other_content_is_refused(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        assert server.publish(publisher.bundles[1], publisher.saved_model).status_code == 201
        again = server.publish(publisher.bundles[1], publisher.saved_model)
        assert again.status_code == 200 and again.json()["created"] is False

        conflict = server.publish(publisher.conflicting_v1, publisher.saved_model)
        assert conflict.status_code == 409
        assert conflict.json()["error"]["code"] == "version_conflict"
        assert "already exists" in conflict.json()["error"]["message"]
        # The stored version is untouched.
        detail = server.admin("GET", f"/v1/models/{MODEL}/versions/1").json()
        assert detail["manifest"]["created"] != "2000-01-01T00:00:00Z"


@pytest.mark.parametrize(
    "which, code",
    [
        ("unsigned", "unsigned_bundle"),
        ("tampered", "hash_mismatch"),
        ("stranger", "bad_signature"),
    ],
)
def test_bundles_that_do_not_verify_are_refused(which, code, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        response = server.publish(getattr(publisher, which), publisher.saved_model)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == code
        assert server.admin("GET", "/v1/models").json() == []
        assert not server.services.repository.models_dir.exists() or not any(server.services.repository.models_dir.iterdir())


def test_a_saved_model_that_is_not_the_bundles_source_is_refused(publisher, tmp_path):
    relabelled = copy_saved_model(publisher.saved_model, tmp_path / "relabelled")
    labels = list(reversed(publisher.labels))
    (relabelled / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    retrained = copy_saved_model(publisher.saved_model, tmp_path / "retrained")
    weights = next((retrained / "variables").glob("*.data-*"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        for folder in (relabelled, retrained):
            response = server.publish(publisher.bundles[1], folder)
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "saved_model_mismatch", response.json()


def test_bad_uploads_get_a_json_error_that_names_the_problem(publisher, tmp_path):
    config = server_config(tmp_path / "data", None, publisher)
    with running_server(config) as server:
        missing = server.client.post("/v1/models", headers=server.admin_headers, files={"bundle": ("b.tgz", tarball(publisher.bundles[1]))})
        assert missing.status_code == 400
        assert "saved_model" in missing.json()["error"]["message"]

        not_tar = server.client.post(
            "/v1/models", headers=server.admin_headers,
            files={"bundle": ("b.tgz", b"this is not a tar archive"), "saved_model": ("m.tgz", tarball(publisher.saved_model))},
        )
        assert not_tar.status_code == 422 and not_tar.json()["error"]["code"] == "bad_archive"

        escaping = io.BytesIO()
        with tarfile.open(fileobj=escaping, mode="w") as tar:
            info = tarfile.TarInfo("../../escape.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        evil = server.client.post(
            "/v1/models", headers=server.admin_headers,
            files={"bundle": ("b.tar", escaping.getvalue()), "saved_model": ("m.tgz", tarball(publisher.saved_model))},
        )
        assert evil.status_code == 422 and not (tmp_path / "escape.txt").exists()

        not_multipart = server.client.post("/v1/models", headers=server.admin_headers, content=b"{}")
        assert not_multipart.status_code == 400 and not_multipart.json()["error"]["code"] == "bad_upload"


def test_uploads_over_the_limit_are_refused_before_they_are_stored(publisher, tmp_path):
    config = server_config(tmp_path / "data", None, publisher, limits=__import__("sync_server").UploadLimits(max_upload_bytes=50_000))
    with running_server(config) as server:
        response = server.publish(publisher.bundles[1], publisher.saved_model)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        assert "50000" in response.json()["error"]["message"]
        assert server.admin("GET", "/v1/models").json() == []


def test_publishing_needs_the_admin_token_and_a_trusted_key(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        anonymous = server.client.post("/v1/models")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_token"
        wrong = server.publish(publisher.bundles[1], publisher.saved_model, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "bad_token"
        assert wrong.headers["www-authenticate"].startswith("Bearer")
    with running_server(server_config(tmp_path / "bare", None, None)) as server:
        response = server.publish(publisher.bundles[1], publisher.saved_model)
        assert response.status_code == 422 and response.json()["error"]["code"] == "no_trusted_keys"


def test_unknown_models_and_versions_are_404_with_what_exists(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        unknown_model = server.admin("GET", "/v1/models/nope")
        assert unknown_model.status_code == 404 and unknown_model.json()["error"]["code"] == "unknown_model"
        unknown_version = server.admin("GET", f"/v1/models/{MODEL}/versions/9")
        assert unknown_version.status_code == 404
        assert unknown_version.json()["error"] == {"code": "unknown_version", "message": f"model '{MODEL}' has no version 9 (published: 1, 2)"}


def test_publish_from_the_command_line_then_serve_it(publisher, tmp_path, capsys):
    data = tmp_path / "data"
    args = ["publish", str(publisher.bundles[1]), "--saved-model", str(publisher.saved_model), "--channel", "stable",
            "--data-dir", str(data), "--publisher-keys", str(publisher.public_key)]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip() == f"{MODEL} version 1 published; channel stable -> version 1"
    assert cli_main(args) == 0
    assert "already published" in capsys.readouterr().out

    # The TF Serving config was written, and a server on the same data directory serves the version.
    config_text = (data / "tf-serving" / "models.config").read_text()
    assert f'name: "{MODEL}"' in config_text and 'version_labels { key: "stable" value: 1 }' in config_text
    with running_server(server_config(data, None, publisher)) as server:
        assert server.admin("GET", f"/v1/models/{MODEL}").json()["channels"]["stable"]["version"] == 1

    # Errors are one line, exit status 2.
    assert cli_main(["publish", str(publisher.tampered), "--saved-model", str(publisher.saved_model),
                     "--data-dir", str(data), "--publisher-keys", str(publisher.public_key)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a bundle file does not match its manifest") and err.count("\n") == 1
    assert cli_main(["publish", str(tmp_path / "nope"), "--saved-model", str(publisher.saved_model), "--data-dir", str(data)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_publish_from_the_command_line_to_a_running_server(publisher, tmp_path, capsys):
    from tests.server_fixtures import ADMIN_TOKEN, live_server

    with live_server(server_config(tmp_path / "data", None, publisher)) as server:
        url = server.url
        code = cli_main(["publish", str(publisher.bundles[2]), "--saved-model", str(publisher.saved_model),
                         "--server", url, "--admin-token", ADMIN_TOKEN, "--json"])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["version"] == 2 and result["created"] is True
        code = cli_main(["publish", str(publisher.stranger), "--saved-model", str(publisher.saved_model),
                         "--server", url, "--admin-token", ADMIN_TOKEN])
        assert code == 2 and "signature does not verify" in capsys.readouterr().err



def test_a_publisher_key_file_may_hold_a_key_ring(publisher, tmp_path):
    """Rotation on the server side: one trusted-keys file with the current and the next key accepts
    bundles signed by either."""
    ring = tmp_path / "publishers.pub"
    ring.write_bytes(publisher.stranger_public_key.read_bytes() + publisher.public_key.read_bytes())
    config = server_config(tmp_path / "data", None, None, publisher_keys=(ring,))
    with running_server(config) as server:
        assert len(server.services.registry.keys) == 2
        assert server.publish(publisher.bundles[1], publisher.saved_model).status_code == 201
        assert server.publish(publisher.stranger, publisher.saved_model).status_code == 201


def test_tf_serving_can_read_what_the_server_writes_when_it_runs_as_another_user(publisher, tmp_path):
    """TF Serving often runs as its own user: version folders are 0755 and their files 0644, even when
    the upload carried private modes."""
    private = copy_saved_model(publisher.saved_model, tmp_path / "private")
    for path in [private, *private.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.services.registry.publish(publisher.bundles[1], private)
        repository = server.services.repository
        version_dir = repository.path_of(MODEL, 1)
        for folder in (repository.models_dir, version_dir.parent, version_dir, *(p for p in version_dir.rglob("*") if p.is_dir())):
            assert oct(folder.stat().st_mode & 0o777) == "0o755", folder
        files = [p for p in version_dir.rglob("*") if p.is_file()]
        assert files and all(oct(f.stat().st_mode & 0o777) == "0o644" for f in files)
