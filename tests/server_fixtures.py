"""Fixtures and helpers for the sync server's tests: signed bundles, databases, servers, devices.

Test modules import the fixtures they use (`from tests.server_fixtures import ...`). Expensive
things (the converted bundles, the PostgreSQL database) are built once per test session and cached
here, whichever module asks first.

    publisher          signed bundles v1..v3 of model "shop" (v1 converted from tiny_saved_model), bad ones
    db_url             a fresh database per test: SQLite file, or a fresh schema in a PostgreSQL database
    server_config()    a ServerConfig for a test (fixed tokens, fast polling, no preloading)
    running_server()   create_app + TestClient, as a `Server` harness with story-like helpers
    live_server()      the same app under uvicorn on a free port (for SSE and real concurrency)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx
import pytest

with warnings.catch_warnings():  # starlette warns that it would rather use httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sync_server import ServerConfig, create_app
from sync_server.client import tar_folder

MODEL = "shop"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
ENROLLMENT_SECRET = "enrol-secret-for-tests-0123456789"
PG_HOST = "127.0.0.1"
PG_PORT = 5432

_CACHE: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publisher:
    """Everything a publisher has: a key pair, a SavedModel and bundles made from it."""

    saved_model: Path
    private_key: Path
    public_key: Path
    stranger_public_key: Path
    bundles: dict[int, Path]  # version -> bundle signed by the publisher key
    unsigned: Path  # v5 without manifest.sig
    tampered: Path  # v6 whose model.tflite was changed after signing
    stranger: Path  # v7 signed by a key the server does not trust
    conflicting_v1: Path  # v1 again, with other content (another `created` time)
    labels: tuple[str, ...]


def _build_publisher(root: Path, saved_model: Path) -> Publisher:
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, read_bundle, write_bundle, write_keypair

    private, public = write_keypair(root / "publisher")
    stranger_private, stranger_public = write_keypair(root / "stranger")
    first = convert(
        saved_model,
        ConvertOptions(
            out=root / "v1", validation=ValidationOptions(skip=True), signing=SigningOptions(key=private), name=MODEL, version=1
        ),
    ).bundle
    bundle = read_bundle(first, public)
    model = bundle.read_model()
    bundles = {1: first}
    for version in (2, 3):
        bundles[version] = write_bundle(root / f"v{version}", model, dataclasses.replace(bundle.manifest, version=version), sign_key=private)
    unsigned = write_bundle(root / "unsigned", model, dataclasses.replace(bundle.manifest, version=5), sign_key=None)
    tampered = write_bundle(root / "tampered", model, dataclasses.replace(bundle.manifest, version=6), sign_key=private)
    data = bytearray((tampered / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(data))
    stranger = write_bundle(root / "stranger-v7", model, dataclasses.replace(bundle.manifest, version=7), sign_key=stranger_private)
    conflicting = write_bundle(
        root / "v1-other", model, dataclasses.replace(bundle.manifest, created="2000-01-01T00:00:00Z"), sign_key=private
    )
    return Publisher(saved_model, private, public, stranger_public, bundles, unsigned, tampered, stranger, conflicting, bundle.labels)


@pytest.fixture(scope="session")
def publisher(tiny_saved_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    """Signed bundles of the tiny model (built once per session, whichever module asks first)."""
    if "publisher" not in _CACHE:
        _CACHE["publisher"] = _build_publisher(tmp_path_factory.mktemp("publisher"), tiny_saved_model)
    return _CACHE["publisher"]


def tarball(folder: Path) -> bytes:
    key = f"tar:{folder}"
    if key not in _CACHE:
        _CACHE[key] = tar_folder(folder)
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# Databases
# ----------------------------------------------------------------------------------------------------------


def _postgres_database() -> str:
    """The URL of a PostgreSQL database made for this test session (skips when PostgreSQL is away)."""
    if "pg" in _CACHE:
        if isinstance(_CACHE["pg"], Exception):
            pytest.skip(str(_CACHE["pg"]))
        return _CACHE["pg"]
    import psycopg

    name = f"sync_server_test_{secrets.token_hex(5)}"
    last: Exception | None = None
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            last = exc
            continue
        url = f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
        _CACHE["pg"] = url
        _CACHE["pg_drop"] = (user, name)
        return url
    reason = f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable ({str(last).splitlines()[0] if last else 'no user worked'}); skipping its half"
    _CACHE["pg"] = RuntimeError(reason)
    pytest.skip(reason)


def drop_postgres_database() -> None:
    if "pg_drop" not in _CACHE:
        return
    import psycopg

    user, name = _CACHE.pop("pg_drop")
    with contextlib.suppress(psycopg.Error):
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _drop_postgres_at_exit() -> Iterator[None]:
    yield
    drop_postgres_database()


def fresh_database_url(kind: str, tmp_path: Path) -> str:
    """A database nobody else uses: a new SQLite file, or a new schema in the session's PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'sync-server.db'}"
    import psycopg

    base = _postgres_database()
    schema = f"t_{secrets.token_hex(6)}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, _drop_postgres_at_exit: None) -> str:
    """Each test runs once on SQLite and once on PostgreSQL, each time on an empty database."""
    return fresh_database_url(request.param, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------------------


def server_config(data_dir: Path, database_url: str | None, publisher: Publisher | None = None, **overrides: Any) -> ServerConfig:
    """A config for tests: fixed tokens, quick polling, no background model loading."""
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        enrollment_secret=ENROLLMENT_SECRET,
        publisher_keys=(publisher.public_key,) if publisher else (),
        push_poll_s=0.1,
        embedded_preload=False,
        log_format="text",
    )
    values.update(overrides)
    return ServerConfig(**values)


@dataclass
class Device:
    """An enrolled device and the calls it makes."""

    server: "Server"
    id: str
    token: str
    model: str
    channel: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def assignment(self, etag: str | None = None) -> httpx.Response:
        headers = dict(self.headers)
        if etag:
            headers["If-None-Match"] = etag
        return self.server.client.get(f"/v1/devices/{self.id}/assignment", headers=headers)

    def assigned_version(self) -> int | None:
        response = self.assignment()
        assert response.status_code == 200, response.text
        return response.json()["version"]

    def report_status(self, version: int, load_ok: bool = True, smoke_test_ok: bool | None = True,
                      key: str | None = None, **extra: Any) -> httpx.Response:
        body = {"version": version, "load_ok": load_ok, "smoke_test_ok": smoke_test_ok, **extra}
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        return self.server.client.post(f"/v1/devices/{self.id}/status", headers=headers, json=body)

    def predict(self, photo: bytes, **params: Any) -> httpx.Response:
        return self.server.client.post(
            f"/v1/models/{self.model}/predict", headers={**self.headers, "Content-Type": "application/octet-stream"},
            content=photo, params=params,
        )


@dataclass
class Server:
    """A server under test, driven through its HTTP API (a TestClient, or httpx against uvicorn)."""

    app: Any
    client: TestClient | httpx.Client
    url: str | None = None
    admin_headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    @property
    def services(self) -> Any:
        return self.app.state.services

    def publish(self, bundle: Path, saved_model: Path, channel: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        files = {"bundle": ("bundle.tar.gz", tarball(bundle)), "saved_model": ("saved_model.tar.gz", tarball(saved_model))}
        return self.client.post("/v1/models", headers=headers or self.admin_headers, files=files, data={"channel": channel} if channel else None)

    def publish_ok(self, publisher: Publisher, *versions: int, channel: str | None = None) -> None:
        for version in versions:
            response = self.publish(publisher.bundles[version], publisher.saved_model, channel=channel)
            assert response.status_code in (200, 201), response.text

    def admin(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, headers={**self.admin_headers, **(headers or {})}, **kwargs)

    def set_channel(self, version: int, channel: str = "stable", model: str = MODEL) -> dict[str, Any]:
        response = self.admin("PUT", f"/v1/models/{model}/channels/{channel}", json={"version": version})
        assert response.status_code == 200, response.text
        return response.json()

    def enroll(self, model: str = MODEL, channel: str | None = None, name: str | None = None) -> Device:
        body: dict[str, Any] = {"model": model}
        if channel:
            body["channel"] = channel
        if name:
            body["name"] = name
        response = self.client.post("/v1/devices/enroll", headers={"Authorization": f"Bearer {ENROLLMENT_SECRET}"}, json=body)
        assert response.status_code == 201, response.text
        data = response.json()
        return Device(self, data["device_id"], data["token"], data["model"], data["channel"])

    def wait_serving_idle(self, timeout: float = 30.0) -> None:
        """Block until the TF Serving reconciler has nothing pending."""
        reconciler = self.services.reconciler
        deadline = time.monotonic() + timeout
        time.sleep(0.05)
        while time.monotonic() < deadline:
            if reconciler.idle.is_set():
                return
            time.sleep(0.02)
        raise TimeoutError("the TF Serving reconciler did not settle")


@contextlib.contextmanager
def running_server(config: ServerConfig, predictor: Any = None, raise_server_exceptions: bool = True) -> Iterator[Server]:
    app = create_app(config, predictor=predictor)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield Server(app, client)


@contextlib.contextmanager
def live_server(config: ServerConfig, predictor: Any = None) -> Iterator[Server]:
    """The app under uvicorn on 127.0.0.1 and a free port, driven by an httpx client (`server.url`)."""
    import uvicorn

    app = create_app(config, predictor=predictor)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=30)
    try:
        yield Server(app, client, url)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)


def photo_bytes(dataset: Path, label: str | None = None, index: int = 0) -> bytes:
    """A test photo (JPEG) from the demo data set."""
    folder = dataset / "test"
    paths = sorted((folder / label).iterdir()) if label else sorted(p for p in folder.rglob("*") if p.is_file())
    return paths[index].read_bytes()


def copy_saved_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@contextlib.contextmanager
def serve_process(
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/readyz",
    ready_timeout_s: float = 120.0,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m sync_server serve --port P ARGS` in its own process (environment: ours plus `env`);
    yields (url, process) once `ready_path` answers 200, and stops it afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "sync_server", "serve", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent, preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
