"""An operator runs the server: configuration, health, metrics, logs, OpenAPI, errors, migrations."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sync_server import ConfigError, ServerConfig
from sync_server.cli import main as cli_main
from sync_server.config import SETTINGS
from sync_server.db import Database
from sync_server.logs import configure_logging
from sync_server.models import Base
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    MODEL,
    _drop_postgres_at_exit,
    db_url,
    photo_bytes,
    publisher,
    running_server,
    server_config,
)


def test_options_come_from_defaults_environment_and_flags(tmp_path):
    env = {
        "SYNC_SERVER_DATA_DIR": str(tmp_path / "env-data"),
        "SYNC_SERVER_MAX_BATCH_SIZE": "7",
        "SYNC_SERVER_BATCHING": "off",
        "SYNC_SERVER_TF_SERVING_URL": "http://tf-serving:8501",
        "SYNC_SERVER_PUBLISHER_KEYS": os.pathsep.join(["/keys/a.pub", "/keys/b.pub"]),
    }
    config = ServerConfig.load({"port": 9000, "batching.max_batch_size": 64}, env)
    assert config.data_dir == tmp_path / "env-data" and config.port == 9000
    assert config.batching.max_batch_size == 64, "a flag beats the environment"
    assert config.batching.enabled is False and config.tf_serving.url == "http://tf-serving:8501"
    assert [str(p) for p in config.publisher_keys] == ["/keys/a.pub", "/keys/b.pub"]
    assert config.resolved_database_url == f"sqlite:///{tmp_path / 'env-data' / 'sync-server.db'}"
    assert ServerConfig.load({}, {}).batching.max_batch_size == 32

    with pytest.raises(ConfigError, match="SYNC_SERVER_MAX_BATCH_SIZE='many'"):
        ServerConfig.load({}, {"SYNC_SERVER_MAX_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="TF Serving URL must start with http"):
        ServerConfig.load({}, {"SYNC_SERVER_TF_SERVING_URL": "tf-serving:8501"})
    with pytest.raises(ConfigError, match="admin token must be at least 16"):
        ServerConfig(data_dir=tmp_path, admin_token="short")
    assert len({s.env for s in SETTINGS}) == len(SETTINGS) and all(s.env.startswith("SYNC_SERVER_") for s in SETTINGS)


def test_secrets_are_generated_once_and_private(tmp_path):
    first = ServerConfig(data_dir=tmp_path).with_secrets()
    second = ServerConfig(data_dir=tmp_path).with_secrets()
    assert first.admin_token == second.admin_token and len(first.admin_token) >= 32
    assert first.enrollment_secret != first.admin_token
    assert stat.S_IMODE((tmp_path / "admin-token").stat().st_mode) == 0o600


def test_the_command_line_says_where_state_lives_and_fails_in_one_line(tmp_path, capsys):
    assert cli_main(["path", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"TF Serving config file  {tmp_path / 'tf-serving' / 'models.config'}" in out
    assert f"admin token             {tmp_path / 'admin-token'}" in out
    assert cli_main(["migrate", "--data-dir", str(tmp_path)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert cli_main(["migrate", "--data-dir", str(tmp_path), "--database-url", "mysql://x/y"]) == 2
    assert capsys.readouterr().err == "error: unsupported database 'mysql': use sqlite:///PATH or postgresql://...\n"
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--port", "eighty"])
    assert exited.value.code == 2


def test_migrations_build_exactly_the_models_schema(db_url):
    database = Database(db_url)
    try:
        database.migrate()
        database.migrate()  # idempotent
        with database.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        database.dispose()


def test_health_readiness_openapi_and_json_errors(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        client = server.client
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["checks"] == {"database": "ok", "data_dir": "ok", "backend": "ok"}
        assert ready["backend"] == "embedded"

        spec = client.get("/openapi.json").json()
        for path in ("/v1/devices/enroll", "/v1/devices/{device_id}/assignment", "/v1/devices/{device_id}/events",
                     "/v1/artifacts/{sha256}", "/v1/models/{name}/predict", "/v1/models/{name}/channels/{channel}/rollout"):
            assert path in spec["paths"], path
        assert "multipart/form-data" in spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]
        assert "text/html" in client.get("/docs").headers["content-type"]

        assert client.get("/v1/nope").json() == {"error": {"code": "not_found", "message": "no such endpoint: GET /v1/nope"}}
        assert client.delete("/healthz").json()["error"]["code"] == "method_not_allowed"
        malformed = server.admin("PUT", f"/v1/models/{MODEL}/channels/stable", content=b"{not json", headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422 and malformed.json()["error"]["message"] == "the request body is not valid JSON"
        too_big = server.admin("PUT", f"/v1/models/{MODEL}/channels/stable", json={"version": 1, "pad": "x" * (1 << 20)})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
        assert "x-request-id" in client.get("/healthz").headers


def test_an_unexpected_failure_is_a_500_json_error_without_a_traceback(publisher, demo_dataset, tmp_path):
    class Broken:
        kind = "broken"

        async def predict(self, name, version, batch):
            raise ZeroDivisionError("secret internals")

        async def model_status(self, name):
            return {}

        async def ready(self):
            return None

        async def aclose(self):
            pass

    config = server_config(tmp_path / "data", None, publisher)
    with running_server(config, predictor=Broken(), raise_server_exceptions=False) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        response = device.predict(photo_bytes(demo_dataset, "mug"))
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal" and response.headers["x-request-id"] in error["message"]
        assert "secret internals" not in response.text and "Traceback" not in response.text


def test_metrics_cover_requests_latency_batches_rollouts_and_devices(publisher, demo_dataset, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        devices = [server.enroll() for _ in range(4)]
        server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": 2, "percent": 50})
        etag = devices[0].assignment().headers["etag"]
        assert devices[0].assignment(etag=etag).status_code == 304
        assert devices[0].predict(photo_bytes(demo_dataset, "mug")).status_code == 200
        devices[0].report_status(devices[0].assigned_version())

        text = server.client.get("/metrics").text
        assert 'sync_server_requests_total{method="GET",route="/v1/devices/{device_id}/assignment",status="304"} 1.0' in text
        assert 'sync_server_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/models/{name}/predict"}' in text
        assert 'sync_server_predict_batch_size_count{backend="embedded"} 1.0' in text
        assert f'sync_server_predictions_total{{model="{MODEL}",outcome="ok"}} 1.0' in text
        assert f'sync_server_rollout_state{{channel="stable",model="{MODEL}",state="active"}} 1.0' in text
        assert f'sync_server_rollout_percent{{channel="stable",model="{MODEL}",version="2"}} 50.0' in text
        assigned = {v: float(n) for v, n in __import__("re").findall(
            rf'sync_server_devices_assigned{{model="{MODEL}",version="(\d)"}} ([\d.]+)', text)}
        assert sum(assigned.values()) == 4.0
        assert f'sync_server_channel_version{{channel="stable",model="{MODEL}"}} 1.0' in text


def test_logs_are_one_json_object_per_line(publisher, tmp_path, capsys):
    configure_logging("info", "json")
    try:
        with running_server(server_config(tmp_path / "data", None, publisher)) as server:
            server.client.get("/v1/models", headers={"Authorization": "Bearer wrong-token"})
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    finally:
        for name in ("sync_server", "uvicorn.error"):
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    started = next(line for line in lines if line["msg"] == "sync-server started")
    assert started["backend"] == "embedded" and started["level"] == "info"
    request = next(line for line in lines if line["msg"] == "request" and line["path"] == "/v1/models")
    assert request["status"] == 401 and request["error_code"] == "bad_token" and request["route"] == "/v1/models"
    assert request["logger"] == "sync_server.access" and len(request["request_id"]) == 16 and "ms" in request


def test_importing_the_package_is_cheap_and_its_surface_is_listed():
    import subprocess
    import sys

    code = (
        "import sys, sync_server; "
        "heavy = [m for m in ('fastapi', 'tensorflow', 'sqlalchemy', 'httpx') if m in sys.modules]; "
        "missing = [n for n in sync_server.__all__ if not hasattr(sync_server, n)]; "
        "print(heavy, missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] []"


def test_the_demo_starts_a_server_publishes_and_gets_a_fallback_prediction(publisher, demo_dataset, tmp_path, capsys):
    photo = sorted((demo_dataset / "test" / "mug").iterdir())[0]
    args = ["demo", "--bundle", str(publisher.bundles[1]), "--saved-model", str(publisher.saved_model), "--photo", str(photo),
            "--data-dir", str(tmp_path / "demo"), "--publisher-keys", str(publisher.public_key)]
    assert cli_main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("sync-server on http://127.0.0.1:") and f"{MODEL} version 1 published to channel stable" in line
    assert "fallback prediction in" in line and line.count("\n") == 0
    assert cli_main(args) == 0, "a second run reuses the data directory"
    assert "already published" in capsys.readouterr().out


def test_the_compose_file_speaks_the_servers_settings_and_layout():
    """docker compose cannot run on these machines (no Docker engine); keep the file from drifting instead."""
    import re
    from pathlib import Path

    from sync_server.config import SETTINGS, ServerConfig
    from sync_server.serving_repo import ServingRepository

    text = (Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text()
    known = {setting.env for setting in SETTINGS}
    used = set(re.findall(r"^\s+(SYNC_SERVER_[A-Z_]+):", text, flags=re.MULTILINE))
    assert used and used <= known, f"unknown settings in docker-compose.yml: {sorted(used - known)}"
    assert "image: tensorflow/serving" in text and "image: postgres" in text
    # TF Serving must read the config file where sync-server writes it, inside the shared volume.
    data_dir = Path(re.search(r"SYNC_SERVER_DATA_DIR: (\S+)", text).group(1))
    written = ServingRepository(ServerConfig(data_dir=data_dir).serving_dir).config_path
    assert f"--model_config_file={written}" in text


def test_stopping_cancels_a_task_that_swallowed_its_first_cancellation():
    """Python 3.11's asyncio.wait_for can lose a cancellation; shutting down must not hang on it."""
    import asyncio

    from sync_server.tasks import cancel_and_wait

    async def stubborn(ignore: int) -> str:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if ignore:
                    ignore -= 1
                    continue  # what a swallowed cancellation looks like from outside
                raise

    async def scenario() -> list[bool]:
        tasks = [asyncio.create_task(stubborn(2)), asyncio.create_task(stubborn(0))]
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(tasks, round_s=0.05), timeout=5)
        return [t.cancelled() for t in tasks]

    assert asyncio.run(scenario()) == [True, True]
