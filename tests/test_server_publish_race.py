"""Two server instances on one PostgreSQL database and one data directory publish the same version at
the same moment, each with its own SavedModel: one wins, the other is refused, and TF Serving's
folder always holds what the registry recorded.

Each instance is a real process (`Services` built from a `ServerConfig`, as `sync-server serve` and
`sync-server publish` build it); they wait on a start line, then publish together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from sync_server.db import Database
from sync_server.models import Model, ModelVersion
from sync_server.serving_repo import saved_model_digest
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    ENROLLMENT_SECRET,
    MODEL,
    _drop_postgres_at_exit,
    fresh_database_url,
    publisher,
)

TRIES = 10

#: One server instance: for each try, build the services, say ready, wait for the start line, publish.
INSTANCE = r"""
import json, sys, time
from pathlib import Path
from sync_server import ServerConfig
from sync_server.errors import SyncServerError
from sync_server.services import Services

plan = json.loads(Path(sys.argv[1]).read_text())
me = sys.argv[2]
for attempt in plan["tries"]:
    config = ServerConfig(data_dir=Path(attempt["data"]), database_url=attempt["db"], admin_token=plan["admin"],
                          enrollment_secret=plan["enrol"], publisher_keys=(Path(plan["key"]),), log_format="text")
    services = Services.build(config, with_predictor=False)
    try:
        services.db.migrate()
        Path(attempt["dir"], "ready-" + me).touch()
        deadline = time.monotonic() + 60
        while not Path(attempt["dir"], "go").exists() and time.monotonic() < deadline:
            time.sleep(0.0002)
        try:
            result = services.registry.publish(Path(plan["bundle"]), Path(plan["saved_model_" + me]))
            outcome = {"created": result.created}
        except SyncServerError as exc:
            outcome = {"code": exc.code, "message": exc.message}
    finally:
        services.close()
    Path(attempt["dir"], "partial-" + me).write_text(json.dumps(outcome))
    Path(attempt["dir"], "partial-" + me).rename(Path(attempt["dir"], "result-" + me))  # whole, or not there
"""


def _variant(saved_model: Path, target: Path, note: str) -> Path:
    """The same model with one more file in assets.extra/: it still verifies against the bundle (the
    source fingerprint does not cover assets.extra/), but its content digest differs."""
    shutil.copytree(saved_model, target)
    (target / "assets.extra").mkdir(exist_ok=True)
    (target / "assets.extra" / "built-by.txt").write_text(note)
    return target


def _wait_for(paths: list[Path], timeout: float, instances: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for process in instances:
            if process.poll() not in (None, 0):
                raise AssertionError(f"an instance died: {process.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {[p.name for p in paths if not p.exists()]}"
        time.sleep(0.005)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_two_instances_publishing_one_version_at_once_leave_tf_serving_what_the_registry_recorded(
    database, publisher, tmp_path, _drop_postgres_at_exit
):
    models = {who: _variant(publisher.saved_model, tmp_path / f"saved-model-{who}", f"instance {who}\n") for who in "ab"}
    digests = {who: saved_model_digest(path) for who, path in models.items()}
    assert digests["a"] != digests["b"]
    tries = []
    for n in range(TRIES):
        folder = tmp_path / f"try-{n}"
        folder.mkdir()
        db = fresh_database_url("postgresql", folder) if database == "postgresql" else f"sqlite:///{folder / 'data' / 'sync-server.db'}"
        (folder / "data").mkdir()
        schema = Database(db)
        try:
            schema.migrate()  # before the race: the race is about publishing, not two first migrations
        finally:
            schema.dispose()
        tries.append({"dir": str(folder), "data": str(folder / "data"), "db": db})
    plan = {
        "tries": tries, "admin": ADMIN_TOKEN, "enrol": ENROLLMENT_SECRET, "key": str(publisher.public_key),
        "bundle": str(publisher.bundles[1]), "saved_model_a": str(models["a"]), "saved_model_b": str(models["b"]),
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    instances = [
        subprocess.Popen([sys.executable, "-c", INSTANCE, str(plan_file), who], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for who in "ab"
    ]
    outcomes = []
    try:
        for attempt in tries:
            folder = Path(attempt["dir"])
            _wait_for([folder / "ready-a", folder / "ready-b"], 120, instances)
            (folder / "go").touch()
            _wait_for([folder / "result-a", folder / "result-b"], 120, instances)
            results = {who: json.loads((folder / f"result-{who}").read_text()) for who in "ab"}

            db = Database(attempt["db"])
            try:
                with db.read() as session:
                    recorded = session.scalars(
                        select(ModelVersion.saved_model_digest).join(Model).where(Model.name == MODEL, ModelVersion.version == 1)
                    ).all()
            finally:
                db.dispose()
            version_dir = Path(attempt["data"]) / "tf-serving" / "models" / MODEL / "1"
            on_disk = saved_model_digest(version_dir)
            winner = next(who for who in "ab" if digests[who] == recorded[0])
            loser = "b" if winner == "a" else "a"
            outcomes.append((winner, results))
            assert len(recorded) == 1
            assert on_disk == recorded[0], f"TF Serving's folder holds instance {loser}'s SavedModel, the registry {winner}'s"
            assert results[winner] == {"created": True}
            assert results[loser]["code"] == "version_conflict", results
            assert "different SavedModel" in results[loser]["message"]
            leftovers = [p.name for p in version_dir.parent.iterdir() if p.name != "1"]
            assert leftovers == [], f"the losing instance left {leftovers} in the TF Serving repository"
    finally:
        for process in instances:
            if len(outcomes) < TRIES:  # a failed try: the instances would wait for start lines that never come
                process.kill()
            process.wait(timeout=60)
    assert len(outcomes) == TRIES
    wins = {who: sum(1 for winner, _ in outcomes if winner == who) for who in "ab"}
    print(f"{database}: {TRIES} tries, all consistent; instance a won {wins['a']}, b won {wins['b']}")
