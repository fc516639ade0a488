"""A kiosk's own faults are not a release's: kills and power cuts, a full disk, damaged files, leftovers.

Real parts only: a real `sync-server` process, real `edge-agent` processes killed with SIGKILL (or
crashing with SIGABRT inside the model), a real small tmpfs as the device's disk (mounted as root;
skipped with the reason elsewhere), files damaged on the disk.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
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
from tests.agent_fixtures import bundles, fill_disk, small_disk  # noqa: F401  (fixtures)
from tests.agent_support import ROOT, Proxy, device_home, sync_server_process, wait_for
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


# --- finding 3: a full disk is disk_full, never a bad release --------------------------------------------


class Lines(logging.Handler):
    """The agent's log lines (its logger does not always propagate to pytest's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def count(self, text: str, level: int = logging.WARNING) -> int:
        return sum(1 for r in self.records if r.levelno >= level and text in r.getMessage())

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info]


@pytest.fixture
def agent_log():
    lines = Lines()
    logger = logging.getLogger("edge_agent")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


def server_details(server, device_id: str, version: int) -> dict | None:  # noqa: ANN001
    """The `details` of the device's last status report about `version`, from the server's database."""
    with sqlite3.connect(server.data_dir / "sync-server.db") as db:
        row = db.execute("SELECT details FROM device_status WHERE device_id = ? AND version = ?", (device_id, version)).fetchone()
    return json.loads(row[0]) if row and row[0] else None


def serving_version(agent: Agent) -> int | None:
    return agent.handle.current.version if agent.handle.current else None


def test_a_version_bigger_than_the_disk_is_disk_full_and_a_later_small_version_installs(server, bundles, publisher, small_disk,
                                                                                      agent_log):  # noqa: F811
    server.publish(bundles.make("fulldisk", 1), publisher.saved_model)
    home = device_home(small_disk, publisher)
    device_id = enrolled(home, server.url, "fulldisk")
    with Agent.create_from_options(fast_options(home)) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 served")
        server.publish(bundles.make("fulldisk", 2, pad=4 * 1024 * 1024), publisher.saved_model)  # 4 MiB on a 3 MiB disk
        report = wait_for(lambda: (s := server.status_of(device_id, 1)) and (s["message"] or "").startswith("disk_full") and s,
                          what="the disk_full report")
        assert report["running"] and report["load_ok"], "the report is about the version that runs, and it runs fine"
        assert report["message"].startswith("disk_full: cannot install v2: model.tflite needs ")
        details = server_details(server, device_id, 1)
        assert details["state"] == "disk_full" and details["assigned"] == 2 and details["needed"] > details["free"]
        time.sleep(2.0)  # retries go on (backoff capped at 0.5 s here)
        assert agent.manager.last_error.startswith("disk_full") and serving_version(agent) == 1
        assert agent.state.refused(ModelRef("fulldisk", 2)) is None, "a full disk refuses nothing"
        assert server.status_of(device_id, 2) is None, "nothing the server counts against v2"
        assert agent_log.count("disk_full: cannot install fulldisk v2") == 1, "said once, not per retry"
        usage = shutil.disk_usage(small_disk)
        assert usage.free > 1024 * 1024, f"no part file is left filling the disk ({usage.free} bytes free)"

        server.publish(bundles.make("fulldisk", 3), publisher.saved_model)
        wait_for(lambda: serving_version(agent) == 3, timeout=30, what="the small v3 installed after the big v2")
        assert agent.manager.disk_full is None
        assert wait_for(lambda: server.device(device_id)["running_version"] == 3, what="v3 reported running")
    assert agent_log.tracebacks() == []


def test_a_full_outbox_keeps_counts_in_memory_says_so_once_and_sends_them_when_there_is_room(server, bundles, publisher,
                                                                                           small_disk, agent_log):  # noqa: F811
    server.publish(bundles.make("fullbox", 1), publisher.saved_model)
    home = device_home(small_disk, publisher)
    enrolled(home, server.url, "fullbox")
    with Agent.create_from_options(fast_options(home, telemetry_period_s=1.0)) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 served")
        filler = fill_disk(small_disk)  # something else on the device fills the disk to the last byte
        for _ in range(5):
            assert classify(agent.url) == 200
        time.sleep(2.5)  # several telemetry periods and outbox ticks on a full disk
        filler.unlink()
        summary = wait_for(lambda: (v := server.telemetry("fullbox")["versions"]) and v[0]["predictions"] >= 5 and v[0],
                           timeout=30, what="the counts to reach the server")
        assert summary["predictions"] == 5
    assert agent_log.count("telemetry waits in memory") == 1
    assert agent_log.tracebacks() == [], "no traceback per retry"


def classify(url: str) -> int:
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=10)
    try:
        connection.request("POST", "/classify", body=PHOTO)
        return connection.getresponse().status
    finally:
        connection.close()


# --- findings 4, 5 and 8: damage is repaired, leftovers removed --------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_current_version_is_served_from_the_previous_one_and_downloaded_again(server, bundles, publisher, tmp_path,
                                                                                       agent_log):  # noqa: F811
    server.publish(bundles.make("repair", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    device_id = enrolled(home, server.url, "repair")
    with Agent.create_from_options(fast_options(home)) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 served")
        server.publish(bundles.make("repair", 2), publisher.saved_model)
        wait_for(lambda: serving_version(agent) == 2, what="v2 served")
    store = ModelStore(home)
    _damage(store.path_of(ModelRef("repair", 2)) / "model.tflite", "truncate")  # the SD card loses half a file

    with Agent.create_from_options(fast_options(home)) as agent:
        assert serving_version(agent) in (1, 2), "something intact serves from the start"
        wait_for(lambda: serving_version(agent) == 2 and agent.store.check(ModelRef("repair", 2)) is None,
                 what="v2 downloaded again and served")
        assert agent.state.refused(ModelRef("repair", 2)) is None
        assert any(e["kind"] == "damaged" for e in agent.manager.events)

    for version in (1, 2):  # every version damaged; the server is online
        _damage(store.path_of(ModelRef("repair", version)) / "model.tflite", "flip")
    with Agent.create_from_options(fast_options(home)) as agent:
        wait_for(lambda: serving_version(agent) == 2, timeout=30, what="v2 downloaded again with nothing intact")
        assert classify(agent.url) == 200
        assert agent.state.refused(ModelRef("repair", 2)) is None
    report = server.status_of(device_id, 2)
    assert report["running"] and not (report["message"] or "").startswith("refused")
    assert agent_log.tracebacks() == []


def test_damaged_pointer_state_and_outbox_and_leftovers_of_killed_work_are_repaired_at_start(server, bundles, publisher,
                                                                                            tmp_path, agent_log):  # noqa: F811
    server.publish(bundles.make("mended", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    device_id = enrolled(home, server.url, "mended")
    with Agent.create_from_options(fast_options(home)) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 served")
    paths = AgentPaths.at(home)
    (home / "state.json").write_bytes(b"null")
    paths.state.write_bytes(os.urandom(200))
    for suffix in ("-wal", "-shm"):
        Path(f"{paths.outbox}{suffix}").unlink(missing_ok=True)
    paths.outbox.write_bytes(b"SQLite format 3\0" + os.urandom(3000))
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    leftovers = [home / "models" / "mended" / f".staging-2-{dead_pid}-abc", home / f".state-{dead_pid}-x",
                 paths.agent_dir / ".state.json-k3j4", paths.downloads / "bundle-mended-9", paths.downloads / f"{'e' * 64}.part"]
    leftovers[0].mkdir(parents=True)
    (leftovers[0] / "model.tflite").write_bytes(b"half")
    leftovers[3].mkdir(parents=True)
    for path in (leftovers[1], leftovers[2], leftovers[4]):
        path.write_bytes(b"half")

    with Agent.create_from_options(fast_options(home)) as agent:
        assert serving_version(agent) == 1, "the pointer was rebuilt from the intact versions"
        assert agent.outbox.recovered and "moved it aside" in agent.outbox.recovered
        assert len(list(paths.agent_dir.glob("outbox.sqlite.damaged-*"))) == 1
        details = wait_for(lambda: (d := server_details(server, device_id, 1)) and "outbox_lost" in d and d, what="the loss reported")
        assert "reports queued in it are lost" in details["outbox_lost"]
        wait_for(lambda: not any(p.exists() for p in leftovers), what="the leftovers removed")
    assert json.loads((home / "state.json").read_text())["current"] == {"name": "mended", "version": 1}
    assert agent_log.tracebacks() == []


# --- finding 6: a report the server refuses is kept, and shown ---------------------------------------------


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error": {"code": "not_found", "message": "no such route (a proxy)"}}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def test_reports_the_server_refuses_go_to_a_dead_letter_table_that_status_shows(tmp_path, capsys):
    from edge_runtime.agent.cli import main

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    home = tmp_path / "kiosk"
    paths = AgentPaths.at(home)
    save_identity(paths, Identity(url, "dev_1", "token", "shop", "stable", "till-1"))
    outbox = Outbox(paths.outbox)
    for n in range(6):
        outbox.put("status", "/v1/devices/dev_1/status", {"version": 1, "n": n})
    sender = OutboxSender(outbox, SyncClient(url, "token", timeout_s=2), RetryOptions(attempts=1, base_s=0.05, max_s=0.1))
    try:
        sender.flush()
    finally:
        proxy.shutdown()
    assert outbox.count() == 0 and outbox.dead_count() == 6, "out of the queue, but not lost"
    assert sorted(json.loads(json.dumps(m))["kind"] for m in outbox.dead_letters()) == ["status"] * 6
    outbox.close()
    assert main(["status", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "dead letters  6 reports the server refused (newest: status at " in out and ", 404: " in out
    assert main(["status", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dead_letters"]["count"] == 6


def test_a_kill_right_after_requests_loses_no_telemetry_count(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("counts", 1), publisher.saved_model)
    home = device_home(tmp_path, publisher)
    enrolled(home, server.url, "counts")
    agent = AgentProcess(home).start()
    try:
        agent.wait_serving(1)
        for burst in range(3):  # each burst is killed within milliseconds of its last answer
            assert [agent.classify() for _ in range(4)] == [200] * 4
            agent.kill()
            agent.start().wait_serving(1)
        summary = wait_for(lambda: (v := server.telemetry("counts")["versions"]) and v[0]["predictions"] >= 12 and v[0],
                           timeout=30, what="every count at the server")
        time.sleep(1.0)
        assert server.telemetry("counts")["versions"][0]["predictions"] == 12, "nothing lost, nothing counted twice"
    finally:
        agent.stop()
