"""Chaos: the kiosk loses power at random points of many updates, and still ends on its assigned model.

A real `sync-server` process assigns versions at random (channel moves among published versions); a
real `edge-agent` process is started and killed with SIGKILL after a random delay, again and again.
After every kill the store must name a verified version (or none yet). After the last kill the agent
is started once more and must run the assigned version, verified and loadable, within
`CONVERGENCE_S`, with no leftovers of the interrupted work.

`EDGE_CHAOS_KILLS` sets the number of kills (default 24: well under a minute on a loaded 2-core box);
`EDGE_CHAOS_SEED` the random seed (printed, to replay a failure).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime.agent import AgentPaths, enroll
from edge_runtime.errors import BundleRejectedError
from edge_runtime.store import ModelRef, ModelStore
from tests.agent_support import ROOT, BundleMaker, device_home, sync_server_process, wait_for
from tests.conftest import real_photo_path
from tests.server_fixtures import ENROLLMENT_SECRET, publisher  # noqa: F401  (fixture)

KILLS = int(os.environ.get("EDGE_CHAOS_KILLS", "24"))
SEED = int(os.environ.get("EDGE_CHAOS_SEED", str(int(time.time()))))
VERSIONS = (1, 2, 3, 4)
#: After the last restart, the device runs the assigned version within this many seconds: start-up,
#: one download and load, at most one backoff (0.5 s here, `RetryOptions.max_s` in general) and, in
#: the rare case that two kills landed inside loads of the same version, `--crash-retry` (2 s here).
CONVERGENCE_S = 30.0
PHOTO = real_photo_path("rocket.jpg").read_bytes()


@pytest.fixture(scope="module")
def server(publisher, tmp_path_factory):  # noqa: F811
    with sync_server_process(tmp_path_factory.mktemp("sync-server"), [publisher.public_key]) as running:
        yield running


def _start(home: Path) -> subprocess.Popen:
    (home / "agent" / "run.json").unlink(missing_ok=True)
    env = {**os.environ, "EDGE_CLASSIFY_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "edge_runtime.agent", "run", "--port", "0", "--poll-interval", "0.3", "--backoff-max", "0.5",
               "--telemetry-period", "0.5", "--fallback", "never", "--crash-retry", "2"]
    with open(home / "agent.log", "a") as log:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _status(home: Path) -> dict | None:
    try:
        url = json.loads((home / "agent" / "run.json").read_text())["url"]
        connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=2)
        connection.request("GET", "/status")
        return json.loads(connection.getresponse().read())
    except (OSError, ValueError, KeyError):
        return None


def _mid_update(home: Path) -> bool:
    """True when the kill interrupted work: a partial download, a staging copy, a pointer being written."""
    downloads = home / "downloads"
    models = home / "models" / "chaos"
    return (any(downloads.iterdir()) if downloads.is_dir() else False) or (
        models.is_dir() and any(p.name.startswith(".") for p in models.iterdir())) or any(home.glob(".state-*"))


def _current_is_verified(store: ModelStore, key: Path) -> ModelRef | None:
    state = store.state()
    if state.current is None:
        return None
    bundle, fell_back = store.load_current(key)  # signature, sizes and sha256
    assert fell_back is None, fell_back
    return ModelRef(bundle.name, bundle.version)


def test_random_kills_during_many_updates_end_on_the_assigned_version(server, publisher, tmp_path_factory):  # noqa: F811
    rng = random.Random(SEED)
    print(f"\n[chaos] seed {SEED}, {KILLS} kills")
    bundles = BundleMaker(publisher, tmp_path_factory.mktemp("chaos-bundles"))
    for version in VERSIONS:
        bundle = bundles.make("chaos", version, pad=version * 1024 * 1024)  # sizes differ: downloads take a while
        server.publish(bundle, publisher.saved_model, channel="stable" if version == 1 else None)
    root = tmp_path_factory.mktemp("chaos-device")
    home = device_home(root, publisher)
    identity = enroll(AgentPaths.at(home), server.url, ENROLLMENT_SECRET, model="chaos", name="kiosk-chaos")
    store, key = ModelStore(home), home / "trusted.pub"

    assigned = 1
    mid_update = during_update = 0
    started = time.monotonic()
    for kill in range(KILLS):
        agent = _start(home)
        if rng.random() < 0.25:  # power lost at any moment of the start-up
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # the kiosk is up; a new assignment arrives and power goes during the update
            wait_for(lambda: (home / "agent" / "run.json").is_file() or agent.poll() is not None, timeout=30, what="the agent up")
            assigned = rng.choice([v for v in VERSIONS if v != assigned])
            server.set_channel("chaos", assigned)
            time.sleep(rng.uniform(0.0, 0.6))
            during_update += bool((_status(home) or {}).get("updating"))
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        mid_update += _mid_update(home)
        try:
            _current_is_verified(store, key)
        except BundleRejectedError as exc:  # pragma: no cover - the invariant failing
            pytest.fail(f"after kill {kill + 1} (seed {SEED}) the current model does not verify: {exc}")
    chaos_s = time.monotonic() - started

    assigned = rng.choice([v for v in VERSIONS if v != assigned])  # the last restart has an update to make
    server.set_channel("chaos", assigned)
    restarted = time.monotonic()
    agent = _start(home)
    try:
        status = wait_for(lambda: (s := _status(home)) and (s.get("serving") or {}).get("version") == assigned and s,
                          timeout=CONVERGENCE_S, what=f"v{assigned} served after the last restart (seed {SEED})")
        converged_s = time.monotonic() - restarted
        assert _current_is_verified(store, key) == ModelRef("chaos", assigned)
        connection = http.client.HTTPConnection(*status["url"].removeprefix("http://").split(":"), timeout=10)
        connection.request("POST", "/classify", body=PHOTO)
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["model"] == {"name": "chaos", "version": assigned}
        wait_for(lambda: server.device(identity.device_id)["running_version"] == assigned, what="the server told")
        assert status["refused"] == {} or all(r.get("transient") for r in status["refused"].values())
        leftovers = [p for p in (home / "models" / "chaos").iterdir() if p.name.startswith(".")] + list(home.glob(".state-*"))
        assert leftovers == [], f"leftovers of killed work: {leftovers}"
        assert len(store.versions()) <= 2 + 1, "versions beyond current and previous are pruned"
    finally:
        agent.terminate()
        code = agent.wait(15)
    log = (home / "agent.log").read_text(errors="replace")
    assert code == 0 and "Traceback" not in log, log[-3000:]
    print(f"[chaos] {KILLS} kills survived ({during_update} while the agent said it was updating, {mid_update} left partial "
          f"work on the disk) in {chaos_s:.1f} s; "
          f"v{assigned} served {converged_s:.2f} s after the last restart (bound {CONVERGENCE_S:.0f} s)")
