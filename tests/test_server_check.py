"""An operator's server was killed in the middle of publishes; `sync-server check` finds what was left
behind and what disagrees, `--repair` removes the leftovers, and the next check is clean.

The kills are real: a `sync-server serve` process gets SIGKILL while it unpacks an upload, copies a
SavedModel into the TF Serving repository, or has just renamed it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from sync_server.cli import main as cli_main
from sync_server.db import Database
from sync_server.models import Model, ModelVersion
from sync_server.serving_repo import saved_model_digest
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    ENROLLMENT_SECRET,
    MODEL,
    _drop_postgres_at_exit,
    copy_saved_model,
    db_url,
    publisher,
    running_server,
    server_config,
    tarball,
)

#: Padding that makes a publish take long enough to be killed in each of its phases.
PADDING_BYTES = 24 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`sync-server serve` in its own process, on the data directory `data`."""

    def __init__(self, data: Path, key: Path) -> None:
        self.port = _free_port()
        env = {**os.environ, "SYNC_SERVER_ADMIN_TOKEN": ADMIN_TOKEN, "SYNC_SERVER_ENROLLMENT_SECRET": ENROLLMENT_SECRET,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sync_server", "serve", "--data-dir", str(data), "--port", str(self.port),
             "--publisher-keys", str(key), "--log-format", "text", "--log-level", "warning", "--embedded-preload", "off"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, self.process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _publish_in_background(url: str, bundle: bytes, saved_model: bytes) -> threading.Thread:
    def post() -> None:
        try:
            httpx.post(url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                       files={"bundle": ("b.tgz", bundle), "saved_model": ("m.tgz", saved_model)}, timeout=120)
        except httpx.HTTPError:
            pass  # the server died under it: that is the point

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _kill_when(server: ServerProcess, condition, timeout: float = 60.0) -> bool:
    """SIGKILL the server as soon as `condition()` holds (or at the timeout); whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            server.kill()
            return True
        time.sleep(0.001)
    server.kill()
    return False


def _check(data: Path, *args: str, capsys) -> tuple[int, dict]:
    with capsys.disabled():
        print(capsys.readouterr().out, end="")  # what the test printed before, to the terminal
    code = cli_main(["check", "--data-dir", str(data), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def _recorded(data: Path) -> dict[int, str]:
    db = Database(f"sqlite:///{data / 'sync-server.db'}")
    try:
        with db.read() as session:
            rows = session.execute(select(ModelVersion.version, ModelVersion.saved_model_digest).join(Model)
                                   .where(Model.name == MODEL)).all()
    finally:
        db.dispose()
    return {int(v): d for v, d in rows}


def _hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_kills_during_publish_leave_leftovers_that_check_finds_and_repair_removes(publisher, tmp_path, capsys):
    big = copy_saved_model(publisher.saved_model, tmp_path / "big-saved-model")
    (big / "assets.extra").mkdir()
    (big / "assets.extra" / "padding.bin").write_bytes(os.urandom(PADDING_BYTES))
    upload = tarball(big)
    data = tmp_path / "data"
    models_dir = data / "tf-serving" / "models" / MODEL
    staging = data / "tmp"

    def uploading() -> bool:
        return staging.is_dir() and any(p.name.startswith("upload-") and (p / "saved_model").exists() for p in staging.iterdir())

    def copying() -> bool:
        return any(p.name.startswith(f".{version}-incoming-") for p in _hidden(models_dir))

    def placed() -> bool:
        return (models_dir / str(version)).is_dir()

    phases = [(1, uploading), (1, copying), (2, copying), (2, placed), (3, copying)]
    hits = []
    for version, phase in phases:
        server = ServerProcess(data, publisher.public_key)
        _publish_in_background(server.url, tarball(publisher.bundles[version]), upload)
        hits.append((version, phase.__name__, _kill_when(server, phase)))
    assert sum(hit for *_, hit in hits) >= 3, f"the kills did not land during the publishes: {hits}"

    # What the kills left, seen directly on disk.
    recorded = _recorded(data)
    incoming = [p for p in _hidden(models_dir) if "-incoming-" in p.name]
    uploads = [p for p in staging.iterdir() if p.name.startswith("upload-")] if staging.is_dir() else []
    orphans = [p for p in models_dir.iterdir() if p.name.isdigit() and int(p.name) not in recorded]
    left = (f"after {len(phases)} kills {hits}: {len(incoming)} incoming folders, {len(uploads)} upload folders, "
            f"{len(orphans)} unrecorded version folders, recorded versions {sorted(recorded)}")
    assert incoming, f"a kill during the copy leaves a hidden incoming folder ({left})"

    code, report = _check(data, capsys=capsys)
    found = {(f["code"], f["path"]) for f in report["findings"]}
    assert code == 1 and not report["clean"]
    for path in incoming:
        assert ("incoming_folder", str(path)) in found
    for path in orphans:
        assert ("orphan_folder", str(path)) in found
    assert not any(f["repaired"] for f in report["findings"]), "without --repair nothing is removed"
    assert all(p.exists() for p in incoming + orphans)
    # Upload folders of a minute ago may belong to a publish still running elsewhere: left alone.
    assert not any(c == "upload_staging" for c, _ in found)

    # Every server is stopped, so uploads of any age are left over.
    code, report = _check(data, "--repair", "--upload-grace", "0", capsys=capsys)
    assert code == 0 and report["clean"], report
    assert {f["path"] for f in report["findings"] if f["repaired"]} >= {str(p) for p in incoming + orphans + uploads}
    assert _hidden(models_dir) == [] and not any(staging.iterdir()) and not any((data / "artifacts" / "tmp").iterdir())

    code, report = _check(data, capsys=capsys)
    assert (code, report["findings"]) == (0, [])
    for version, digest in _recorded(data).items():  # what stays is what the registry recorded
        assert saved_model_digest(models_dir / str(version)) == digest


def test_a_server_starting_removes_temporaries_nobody_holds_and_only_reports_disagreements(publisher, tmp_path, caplog):
    data = tmp_path / "data"
    with running_server(server_config(data, None, publisher)) as server:
        server.publish_ok(publisher, 1)
        repository = server.services.repository
    # A publish killed while copying, and a version folder nothing records (a kill after the rename).
    incoming = repository.path_of(MODEL, 2).parent / ".2-incoming-x1y2z3"
    shutil.copytree(publisher.saved_model, incoming)
    orphan = repository.path_of(MODEL, 7)
    shutil.copytree(publisher.saved_model, orphan)
    with running_server(server_config(data, None, publisher)) as server:
        deadline = time.monotonic() + 30
        while server.services.last_check is None:
            assert time.monotonic() < deadline, "the start-up check did not run"
            time.sleep(0.02)
        report = server.services.last_check
    assert not incoming.exists(), "nobody held the incoming folder: provably left over, removed"
    assert orphan.is_dir(), "a folder without a row is only reported at start (a wrong --database-url must not cost folders)"
    assert [(f.code, f.repaired) for f in report.findings] == [("incoming_folder", True), ("orphan_folder", False)]
    assert "run `sync-server check`" in caplog.text


def test_check_reports_every_disagreement_and_publishing_again_restores_what_is_missing(db_url, publisher, tmp_path, capsys):
    data = tmp_path / "data"
    database = ("--database-url", db_url)
    with running_server(server_config(data, db_url, publisher)) as server:
        server.publish_ok(publisher, 1, 2, channel="stable")
        server.wait_serving_idle()
        services = server.services
        v1 = server.admin("GET", f"/v1/models/{MODEL}/versions/1").json()
        repository, artifacts = services.repository, services.artifacts
    # An operator's slips and a failing disk, on real files.
    shutil.rmtree(repository.path_of(MODEL, 2))                                  # a version folder lost
    weights = next((repository.path_of(MODEL, 1) / "variables").glob("*.data-*"))
    damaged = bytearray(weights.read_bytes())
    damaged[0] ^= 0xFF
    weights.write_bytes(bytes(damaged))                                          # a SavedModel damaged
    tflite = artifacts.path_of(v1["files"]["model.tflite"]["sha256"])
    tflite.chmod(0o644)
    tflite.write_bytes(b"not the model")                                        # an artifact damaged
    stray = artifacts.path_of("ab" * 32)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"nobody's")                                               # a file nothing names
    config = repository.config_path.read_text()
    repository.config_path.write_text(config.replace("versions: 2", "versions: 2\n        versions: 9"))  # an unknown version

    code, report = _check(data, *database, capsys=capsys)
    codes = sorted(f["code"] for f in report["findings"])
    assert code == 1
    # model.tflite is the same file in both versions: each is told its copy is damaged.
    assert codes == ["artifact_mismatch", "artifact_mismatch", "missing_saved_model", "orphan_artifact",
                     "saved_model_mismatch", "unknown_config_version"], report
    assert all("publish it again" in f["message"] for f in report["findings"]
               if f["code"] in ("artifact_mismatch", "missing_saved_model", "saved_model_mismatch"))

    code, report = _check(data, "--repair", *database, capsys=capsys)
    assert code == 1, "what the registry records is never deleted: the damaged files stay reported"
    assert sorted(f["code"] for f in report["findings"] if f["repaired"]) == ["orphan_artifact", "unknown_config_version"]
    assert not stray.exists() and "versions: 9" not in repository.config_path.read_text()

    with running_server(server_config(data, db_url, publisher)) as server:
        for version in (1, 2):  # the same content again: idempotent, and it puts back what was lost
            response = server.publish(publisher.bundles[version], publisher.saved_model)
            assert response.status_code == 200 and response.json()["created"] is False
    code, report = _check(data, *database, capsys=capsys)
    assert (code, report["findings"]) == (0, [])


def test_check_refuses_a_data_dir_without_a_server(tmp_path, capsys):
    assert cli_main(["check", "--data-dir", str(tmp_path / "nothing")]) == 2
    assert "no sync-server data" in capsys.readouterr().err


@pytest.mark.parametrize("repair", [False, True])
def test_a_check_never_touches_what_a_live_publish_holds(publisher, tmp_path, capsys, repair):
    from sync_server.claims import claimed_tempdir

    data = tmp_path / "data"
    with running_server(server_config(data, None, publisher)) as server:
        server.publish_ok(publisher, 1)
        parent = server.services.repository.models_dir / MODEL
    folder, claim = claimed_tempdir(parent, ".2-incoming-")  # as a publish in another process holds it
    with claim:
        code, report = _check(data, *(["--repair"] if repair else []), capsys=capsys)
        assert folder.is_dir() and report["findings"] == [] and code == 0
    code, report = _check(data, "--repair", capsys=capsys)
    assert not folder.exists() and [f["code"] for f in report["findings"]] == ["incoming_folder"]


def test_a_live_upload_is_never_taken_for_a_leftover_even_with_no_grace(publisher, tmp_path, capsys):
    from sync_server.bundles import staging_dir

    data = tmp_path / "data"
    with running_server(server_config(data, None, publisher)) as server:
        server.publish_ok(publisher, 1)
    upload, claim = staging_dir(data / "tmp")  # as a server unpacking a slow upload holds it
    (upload / "saved_model").mkdir()
    with claim:
        code, report = _check(data, "--repair", "--upload-grace", "0", capsys=capsys)
        assert upload.is_dir() and report["findings"] == [] and code == 0
    code, report = _check(data, "--repair", "--upload-grace", "0", capsys=capsys)  # its server died
    assert not upload.exists() and [f["code"] for f in report["findings"]] == ["upload_staging"]
