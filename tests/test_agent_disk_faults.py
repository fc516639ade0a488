"""A kiosk's own faults are not a release's: kills and power cuts, a full disk, damaged files, leftovers.

Real parts only: a real `sync-server` process, real `edge-agent` processes killed with SIGKILL (or
crashing with SIGABRT inside the model), a real small tmpfs as the device's disk (mounted as root;
skipped with the reason elsewhere), files damaged on the disk.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentPaths, enroll
from edge_runtime.agent.config import Identity, save_identity
from edge_runtime.agent.outbox import Outbox, OutboxSender
from edge_runtime.agent.client import SyncClient
from edge_runtime.agent.options import RetryOptions
from edge_runtime.store import ModelRef, ModelStore
from tests.agent_support import ROOT, BundleMaker, Proxy, device_home, sync_server_process, wait_for
from tests.conftest import real_photo_path
from tests.server_fixtures import ENROLLMENT_SECRET, publisher  # noqa: F401  (fixture)
from tests.test_agent import fast_options

PHOTO = real_photo_path("rocket.jpg").read_bytes()

# An agent whose loader the test can slow down or make crash inside the interpreter, through files in
# its home: `slow-load-vN` (seconds to spend inside the load of version N), `abort-vN` (a request on
# version N aborts the process inside the interpreter: a real crash, SIGABRT).
RUNNER = r'''
import os, sys, threading, time
from pathlib import Path
from edge_runtime.agent import Agent, AgentOptions, HealthPolicy, RetryOptions, ServeOptions, TimeoutOptions
from edge_runtime.agent.cli import _configure_logging
from edge_runtime.agent.servable import make_loader

home = Path(sys.argv[1])
real = make_loader(home / "trusted.pub", home)

def loader(path):
    version = int(path.name)
    slow = home / f"slow-load-v{version}"
    if slow.exists():
        time.sleep(float(slow.read_text()))
    servable = real(path)
    run = servable.classifier.run
    def run_or_crash(prepared):
        if (home / f"abort-v{version}").exists() and threading.current_thread().name != "edge-agent-manager":
            os.abort()
        return run(prepared)
    servable.classifier.run = run_or_crash
    return servable

_configure_logging(False)
options = AgentOptions(
    home=home, serve=ServeOptions(port=0), poll_interval_s=0.3, fallback="never", telemetry_period_s=0.5,
    retry=RetryOptions(attempts=3, base_s=0.05, max_s=0.5),
    timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=1),
    health=HealthPolicy(probation_s=600, max_crashes=2, crash_retry_s=float(sys.argv[2])),
)
Agent.create_from_options(options, loader=loader).run_forever()
'''


@pytest.fixture(scope="module")
def server(publisher, tmp_path_factory):  # noqa: F811
    with sync_server_process(tmp_path_factory.mktemp("sync-server"), [publisher.public_key]) as running:
        yield running


@pytest.fixture(scope="module")
def bundles(publisher, tmp_path_factory):  # noqa: F811
    return BundleMaker(publisher, tmp_path_factory.mktemp("bundles"))


def enrolled(home: Path, server_url: str, model: str) -> str:
    return enroll(AgentPaths.at(home), server_url, ENROLLMENT_SECRET, model=model, name=f"kiosk-{model}").device_id


class AgentProcess:
    """`RUNNER` as a real process; `kill()` is a SIGKILL (what a power cut does to the process)."""

    def __init__(self, home: Path, crash_retry_s: float = 600.0) -> None:
        self.home = home
        self.crash_retry_s = crash_retry_s
        self.process: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        (self.home / "agent" / "run.json").unlink(missing_ok=True)
        log = open(self.home / "agent.log", "a")
        env = {**os.environ, "EDGE_CLASSIFY_HOME": str(self.home), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.process = subprocess.Popen([sys.executable, "-c", RUNNER, str(self.home), str(self.crash_retry_s)],
                                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self) -> dict | None:
        try:
            url = json.loads((self.home / "agent" / "run.json").read_text())["url"]
            connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=2)
            connection.request("GET", "/status")
            return json.loads(connection.getresponse().read())
        except (OSError, ValueError, KeyError):
            return None

    def serving(self) -> int | None:
        status = self.status()
        return status["serving"]["version"] if status and status.get("serving") else None

    def wait_serving(self, version: int, timeout: float = 40) -> dict:
        return wait_for(lambda: (s := self.status()) and (s.get("serving") or {}).get("version") == version and s,
                        timeout=timeout, what=f"the agent to serve v{version} (log: {self.log()[-1500:]})")

    def classify(self) -> int:
        status = self.status()
        assert status is not None
        connection = http.client.HTTPConnection(*status["url"].removeprefix("http://").split(":"), timeout=10)
        try:
            connection.request("POST", "/classify", body=PHOTO)
            return connection.getresponse().status
        except (OSError, http.client.HTTPException):
            return 0  # the process died answering
        finally:
            connection.close()

    def log(self) -> str:
        path = self.home / "agent.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def inside_the_interpreter(home: Path) -> list[tuple[ModelRef, str]]:
    """What the agent's call marker says is inside the interpreter now."""
    from edge_runtime.agent.servable import _parse_marker

    try:
        return _parse_marker((home / "agent" / "in_model").read_bytes())
    except OSError:
        return []


def agent_state(home: Path) -> dict:
    return json.loads((home / "agent" / "state.json").read_text())


# --- finding 2: a power cut is not a model crash --------------------------------------------------------


def test_kills_between_model_calls_during_probation_count_against_no_version(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("powercut", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    device_id = enrolled(home, server.url, "powercut")
    agent = AgentProcess(home).start()
    try:
        agent.wait_serving(1)
        server.publish(bundles.make("powercut", 2), publisher.saved_model)
        agent.wait_serving(2)
        assert agent.classify() == 200
        assert agent_state(home)["probation"]["version"] == 2
        for _ in range(2):  # two power cuts inside the probation window of a healthy switch
            agent.kill()
            agent.start().wait_serving(2)
        time.sleep(1.0)
        assert agent.serving() == 2, "a good version the server still assigns is not rolled back"
        state = agent_state(home)
        assert state["refused"] == {} and state["probation"]["crashes"] == 0
        assert agent.log().count("killed between model calls (a kill or a power cut): counted against no version") == 2
        assert server.device(device_id)["running_version"] == 2
    finally:
        agent.stop()
    assert "Traceback" not in agent.log()


def test_a_real_crash_inside_the_model_still_rolls_back_and_the_version_is_tried_again_later(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("segv", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    device_id = enrolled(home, server.url, "segv")
    agent = AgentProcess(home, crash_retry_s=4).start()
    try:
        agent.wait_serving(1)
        (home / "abort-v2").write_text("")
        server.publish(bundles.make("segv", 2), publisher.saved_model)
        agent.wait_serving(2)
        for serves_next in (2, 1):  # a request aborts the process inside the interpreter; after two, v1 is back
            assert agent.classify() == 0
            agent.process.wait(10)
            assert agent.process.returncode == -signal.SIGABRT
            agent.start().wait_serving(serves_next)
        refusal = agent_state(home)["refused"]["segv:2"]
        assert refusal["step"] == "health" and "crashed 2 times" in refusal["reason"] and refusal["transient"] is True
        report = wait_for(lambda: (s := server.status_of(device_id, 2)) and not s["running"] and s, what="the rollback report")
        assert report["message"].startswith("rolled back to v1:")
        assert "was inside the interpreter: counted as a crash" in agent.log()

        (home / "abort-v2").unlink()  # whatever made it crash is gone: the transient refusal ends
        agent.wait_serving(2, timeout=30)
        assert agent.classify() == 200
    finally:
        agent.stop()


def test_kills_during_a_load_refuse_the_version_only_for_a_while(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("slowload", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    enrolled(home, server.url, "slowload")
    agent = AgentProcess(home, crash_retry_s=3).start()
    try:
        agent.wait_serving(1)
        (home / "slow-load-v2").write_text("60")
        server.publish(bundles.make("slowload", 2), publisher.saved_model)
        for _ in range(2):  # the kiosk loses power twice while v2 loads
            agent.wait_serving(1)
            wait_for(lambda: (ModelRef("slowload", 2), "load") in inside_the_interpreter(home), timeout=40, what="v2 loading")
            agent.kill()
            agent.start()
        refused = wait_for(lambda: agent_state(home)["refused"].get("slowload:2"), timeout=40, what="v2 refused")
        assert refused["step"] == "load" and refused["transient"] is True
        assert agent.wait_serving(1)["refused"]["slowload:2"]["retry_at"] > time.time() - 5
        (home / "slow-load-v2").unlink()
        agent.wait_serving(2, timeout=30)  # tried again after the wait, and it loads
        assert agent_state(home)["refused"] == {}
    finally:
        agent.stop()
    assert "Traceback" not in agent.log()
