"""A kiosk's agent against a sync server that misbehaves (tests/misbehaving_server.py, a real HTTP
server on loopback): malformed assignments, dripping answers and downloads, wrong sizes, 429/503 storms
with Retry-After, garbage and oversized push streams, a newer assignment during a download, a full disk
(a real 2 MB tmpfs). Whatever the server does, no loop dies, every exchange ends by its deadline, and the
agent converges on the assigned version once the server serves a valid one."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentOptions, AgentPaths, RetryOptions, ServeOptions, TimeoutOptions
from edge_runtime.agent.client import SyncClient
from edge_runtime.agent.config import Identity, save_identity
from edge_runtime.agent.download import Downloader, RemoteFile
from edge_runtime.agent.errors import DiskFullError, DownloadError, ServerUnreachableError
from edge_runtime.agent.servable import ServableHandle
from edge_runtime.agent.serving import Classify, LocalApi
from edge_runtime.agent.source import AssignmentSource
from edge_runtime.agent.supervisor import Supervisor
from edge_runtime.store import ModelRef
from tests.agent_fixtures import bundles, stand_in  # noqa: F401  (fixtures)
from tests.agent_support import device_home, wait_for
from tests.misbehaving_server import MisbehavingServer, drip, garbage_stream, hold, long_line, reply
from tests.server_fixtures import publisher  # noqa: F401  (fixture)

FAST_RETRY = RetryOptions(attempts=3, base_s=0.05, max_s=0.5)


def options(home: Path, **overrides) -> AgentOptions:
    values = dict(home=home, serve=ServeOptions(port=0), poll_interval_s=0.2, retry=FAST_RETRY, push=False,
                  timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=1, exchange_s=5),
                  telemetry_period_s=0.5, fallback="never")
    values.update(overrides)
    return AgentOptions(**values)


def following(source_or_agent_options: AgentOptions, server: MisbehavingServer, **kwargs):
    """An `AssignmentSource` of the stand-in; returns (source, delivered assignments, refusals)."""
    delivered, refused = [], []
    client = SyncClient(server.url, "token", timeout_s=5, exchange_s=source_or_agent_options.timeouts.exchange_s)
    source = AssignmentSource(client, server.device_id, source_or_agent_options, delivered.append,
                              on_refused=lambda version, reason: refused.append((version, reason)), **kwargs)
    return source, delivered, refused


def fake_files() -> dict:
    return {name: {"sha256": "a" * 64, "size": 1, "url": f"/v1/artifacts/{'a' * 64}"}
            for name in ("model.tflite", "manifest.json", "labels.txt")}


def enrolled(tmp_path: Path, publisher, server: MisbehavingServer) -> Path:  # noqa: F811
    home = device_home(tmp_path, publisher)
    save_identity(AgentPaths.at(home), Identity(server=server.url, device_id=server.device_id, token="token", model="m",
                                                channel="stable", name="kiosk-faults"))
    return home


def get_json(url: str, path: str) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def serving(agent: Agent) -> int | None:
    current = agent.handle.current
    return current.version if current else None


# --- finding 1: a malformed assignment must not stop following ------------------------------------------


def test_an_assignment_whose_files_is_a_list_is_refused_with_a_reason_and_polling_goes_on(stand_in, tmp_path):
    source, delivered, refused = following(options(tmp_path), stand_in)
    stand_in.assign({"model": "m", "version": 2, "files": [{"name": "model.tflite"}]})
    source.start()
    try:
        wait_for(lambda: refused, what="the malformed assignment to be refused")
        assert refused[0][0] == 2 and "files" in refused[0][1]
        polls = stand_in.count("GET", "/assignment")
        wait_for(lambda: stand_in.count("GET", "/assignment") >= polls + 3, timeout=5, what="more polls after the bad answer")
        assert len(refused) == 1, "the same bad assignment is reported once"
        assert source.following().startswith("stalled since ") and "files" in source.following()

        for bad in (b"\xff\xfe not json", b"[" * 100_000, {"model": "m", "version": True}, {"model": "m", "version": 3, "files": {
                "model.tflite": {"sha256": "a" * 64, "size": "big", "url": "/x"}}}, {"model": ["m"], "version": 1}):
            stand_in.assign(bad)
            wait_for(lambda: stand_in.count("GET", "/assignment") >= polls + 2, timeout=5, what="a poll")
            polls = stand_in.count("GET", "/assignment")
        assert source.alive(), "the follower thread is alive"

        stand_in.assign({"model": "m", "version": 3, "files": fake_files()})
        wait_for(lambda: delivered and delivered[-1].version == 3, what="the valid assignment")
        assert source.following() == "ok"
    finally:
        source.stop()


def test_the_agent_reports_a_malformed_assignment_says_it_is_stalled_and_converges_when_the_server_mends_it(
        stand_in, bundles, publisher, tmp_path, capsys):  # noqa: F811
    from edge_runtime.agent.cli import main

    home = enrolled(tmp_path, publisher, stand_in)
    good = stand_in.bundle_assignment(bundles.make("m", 1), "m", 1)
    stand_in.assign({**good, "files": list(good["files"].values())})
    with Agent.create_from_options(options(home)) as agent:
        report = wait_for(lambda: next((b for p, b in stand_in.reports if p.endswith("/status")), None), what="a status report")
        assert report["version"] == 1 and report["running"] is False and report["message"].startswith("refused (assignment)")
        status, health = get_json(agent.url, "/healthz")
        assert health["following"].startswith("stalled since ") and "files" in health["following"]
        assert main(["status", "--home", str(home)]) == 0
        assert "; following: stalled since " in capsys.readouterr().out

        stand_in.assign(good)
        wait_for(lambda: serving(agent) == 1, what="v1 served once the assignment is valid")
        assert get_json(agent.url, "/healthz")[1]["following"] == "ok"
        assert get_json(agent.url, "/status")[1]["following"] == "ok"
        switched = wait_for(lambda: [b for p, b in stand_in.reports if p.endswith("/status") and b["running"]], what="a report")
        assert switched[-1]["details"]["following"] == "ok"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_loop_that_dies_anyway_is_restarted_and_reported():
    runs, restarts = [], []

    def loop() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("a bug nobody foresaw")
        time.sleep(30)

    threads: dict[str, threading.Thread] = {}

    def start() -> None:
        threads["loop"] = threading.Thread(target=loop, daemon=True)
        threads["loop"].start()

    start()
    supervisor = Supervisor(check_s=0.05, on_restart=lambda name, why: restarts.append((name, why)))
    supervisor.watch("follower", lambda: threads["loop"].is_alive(), start)
    supervisor.start()
    try:
        wait_for(lambda: len(runs) == 2 and restarts, timeout=5, what="the loop to be restarted and reported")
        assert restarts == [("follower", "the follower loop stopped")]
        assert supervisor.restarts == {"follower": 1}
    finally:
        supervisor.stop()


# --- finding 1 and 6: deadlines and Retry-After ---------------------------------------------------------


def test_a_json_answer_that_drips_a_byte_at_a_time_fails_at_the_overall_deadline(stand_in):
    stand_in.assign({"model": "m", "version": None, "files": None, "padding": "x" * 200})
    stand_in.on("GET", "/assignment", drip(0.1))
    client = SyncClient(stand_in.url, "token", timeout_s=5, exchange_s=1.0)
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError, match=r"no complete answer within 1 s"):
        client.request("GET", f"/v1/devices/{stand_in.device_id}/assignment")
    assert time.monotonic() - started < 3.0, "the deadline is the whole exchange, not one read (the drip takes 20 s)"


def test_a_report_answer_that_drips_does_not_hold_the_outbox_and_its_retry_after_is_honoured(stand_in, tmp_path):
    from edge_runtime.agent.outbox import Outbox, OutboxSender

    outbox = Outbox(tmp_path / "outbox.sqlite")
    path = f"/v1/devices/{stand_in.device_id}/status"
    outbox.put("status", path, {"version": 1, "running": True, "load_ok": True})
    stand_in.on("POST", "/status", drip(0.1), times=1)  # the answer takes 1.2 s; the deadline is 0.5 s
    stand_in.on("POST", "/status", reply(503, {"error": {"code": "busy", "message": "later"}}, {"Retry-After": "1"}), times=1)
    sender = OutboxSender(outbox, SyncClient(stand_in.url, "token", timeout_s=5, exchange_s=0.5), RetryOptions(attempts=3, base_s=0.05, max_s=2))
    try:
        started = time.monotonic()
        assert sender.flush() == 0 and time.monotonic() - started < 1.5, "the dripping answer failed at the deadline"
        assert "no complete answer within 0.5 s" in sender.last_error
        sender._next_try = 0.0
        assert sender.flush() == 0 and "HTTP 503" not in sender.last_error and "later (busy)" in sender.last_error
        assert sender._next_try - time.monotonic() >= 0.9, "the next try waits as Retry-After says"
        sender.kick()  # the follower reached the server meanwhile: that does not cut the server's Retry-After short
        assert sender._next_try - time.monotonic() >= 0.8
        assert sender.flush() == 1 and outbox.count() == 0
    finally:
        outbox.close()


def test_a_push_stream_that_drips_is_cut_at_its_silence_deadline_and_polling_takes_over(stand_in, tmp_path):
    stand_in.assign({"model": "m", "version": 1, "files": fake_files()})
    stand_in.on("GET", "/events", drip(0.1))  # "event: assignment\n" alone takes 1.8 s
    fast = options(tmp_path, push=True, timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=1, fallback_s=1, exchange_s=5))
    source, delivered, _ = following(fast, stand_in)
    started = time.monotonic()
    source.start()
    try:
        wait_for(lambda: delivered, timeout=10, what="the assignment, polled")
        wait_for(lambda: "no complete event or keepalive for 1 s" in (source.status()["last_error"] or ""), timeout=5,
                 what="the dripping stream cut")
        assert time.monotonic() - started < 5
    finally:
        source.stop()


def test_a_429_or_503_storm_is_waited_out_as_retry_after_says_within_bounds(stand_in, tmp_path):
    stand_in.assign({"model": "m", "version": 1, "files": fake_files()})
    stand_in.on("GET", "/assignment", reply(429, {"error": {"code": "slow_down", "message": "too many"}}, {"Retry-After": "1"}), times=2)
    stand_in.on("GET", "/assignment", reply(503, "<html>busy</html>", {"Retry-After": "86400"}), times=1)
    source, delivered, _ = following(options(tmp_path, retry=RetryOptions(attempts=3, base_s=0.05, max_s=1.5)), stand_in)
    source.start()
    try:
        wait_for(lambda: delivered, timeout=10, what="the assignment after the storm")
    finally:
        source.stop()
    times = [seen.at for seen in stand_in.requests if seen.path.endswith("/assignment")][:4]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.95 and gaps[1] >= 0.95, f"Retry-After: 1 was honoured ({gaps})"
    assert 1.4 <= gaps[2] <= 3.5, f"Retry-After: 86400 was capped at the longest backoff, 1.5 s ({gaps})"
    assert delivered[0].version == 1 and source.following() == "ok"


# --- downloads: throughput floor, wrong sizes, a newer assignment ---------------------------------------


def _fetch_in_thread(downloader: Downloader, remote: RemoteFile, limit_s: float):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["path"] = downloader.fetch(remote)
        except Exception as exc:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        downloader.stop.set()
    return outcome, time.monotonic() - started


def test_a_download_that_drips_is_abandoned_below_the_throughput_floor_and_resumes_later(stand_in, tmp_path):
    data = os.urandom(300_000)
    entry = stand_in.add_file(data)
    remote = RemoteFile("model.tflite", entry["sha256"], entry["size"], entry["url"])
    stand_in.on("GET", "/v1/artifacts/", drip(0.05, 2000), times=3)  # 40 KB/s: below a 100 KB/s floor
    client = SyncClient(stand_in.url, "token", timeout_s=5)
    downloader = Downloader(client, tmp_path / "downloads", RetryOptions(attempts=2, base_s=0.05, max_s=0.1), 5,
                            floor_bps=100_000, window_s=0.5)
    outcome, took = _fetch_in_thread(downloader, remote, 10)
    assert "error" in outcome and "slower than" in str(outcome["error"]), outcome
    assert took < 5
    part = downloader.part_path(entry["sha256"])
    kept = part.stat().st_size
    assert 0 < kept < len(data), "the part file is kept"

    stand_in.clear()
    path = downloader.fetch(remote)
    assert path.read_bytes() == data
    ranges = [seen.headers.get("Range") for seen in stand_in.requests if seen.path.startswith("/v1/artifacts/")]
    assert ranges[-1] == f"bytes={kept}-", "the later try resumed from the part file"


def test_a_declared_size_too_large_fails_a_few_tries_and_not_sixty_full_downloads(stand_in, tmp_path):
    data = os.urandom(200_000)
    entry = stand_in.add_file(data)
    remote = RemoteFile("model.tflite", entry["sha256"], entry["size"] + 1000, entry["url"])
    client = SyncClient(stand_in.url, "token", timeout_s=5)
    downloader = Downloader(client, tmp_path / "downloads", RetryOptions(attempts=3, base_s=0.05, max_s=0.1), 5)
    outcome, took = _fetch_in_thread(downloader, remote, 10)
    error = outcome.get("error")
    assert isinstance(error, DownloadError) and error.corrupt, outcome
    assert "201000" in str(error) and "200000" in str(error), str(error)
    gets = stand_in.count("GET", "/v1/artifacts/")
    assert gets <= 3, f"{gets} requests for a file of the wrong size"
    assert not downloader.part_path(entry["sha256"]).exists()


def test_a_wrong_size_is_refused_with_its_reason_and_a_newer_assignment_still_installs(stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.bundle_assignment(bundles.make("m", 1), "m", 1)
    v1["files"]["model.tflite"] = {**v1["files"]["model.tflite"], "size": v1["files"]["model.tflite"]["size"] + 1000}
    stand_in.assign(v1)
    with Agent.create_from_options(options(home)) as agent:
        refusal = wait_for(lambda: agent.state.refused(ModelRef("m", 1)), timeout=15, what="v1 refused")
        assert refusal["step"] == "files" and "bytes" in refusal["reason"]
        assert stand_in.count("GET", "/v1/artifacts/") <= 8
        stand_in.serve_bundle(bundles.make("m", 2), "m", 2)
        wait_for(lambda: serving(agent) == 2, timeout=15, what="v2 installed after the refusal")


def test_a_newer_assignment_supersedes_a_download_in_flight(stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.bundle_assignment(bundles.make("m", 1), "m", 1)
    model = v1["files"]["model.tflite"]
    never = threading.Event()
    stand_in.on("GET", model["url"], hold(model["size"] // 2, never), times=1)  # v1's download stalls halfway
    slow = options(home, timeouts=TimeoutOptions(request_s=5, download_s=30, stream_s=5, fallback_s=1, exchange_s=5))
    stand_in.assign(v1)
    with Agent.create_from_options(slow) as agent:
        part = home / "downloads" / f"{model['sha256']}.part"
        wait_for(lambda: part.is_file() and part.stat().st_size == model["size"] // 2, what="half of v1's model")
        started = time.monotonic()
        stand_in.serve_bundle(bundles.make("m", 2), "m", 2)  # same weights: v2 resumes the part file
        wait_for(lambda: serving(agent) == 2, timeout=10, what="v2 served while v1's download still hangs")
        assert time.monotonic() - started < 10
        ranges = [s.headers.get("Range") for s in stand_in.requests if s.path == model["url"]]
        assert ranges[-1] == f"bytes={model['size'] // 2}-", "v2 resumed what v1 had downloaded"
        assert any(e["kind"] == "superseded" for e in agent.manager.events)
    never.set()


# --- finding 3: the disk side of downloads, on a real 2 MB file system ----------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m"):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip() or result.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_download_bigger_than_the_disk_raises_disk_full_and_leaves_no_part_file(stand_in, tmp_path):
    with tmpfs(tmp_path / "small-disk") as disk:
        big = stand_in.add_file(os.urandom(3 * 1024 * 1024))
        downloader = Downloader(SyncClient(stand_in.url, "token", timeout_s=5), disk / "downloads", FAST_RETRY, 5)
        with pytest.raises(DiskFullError) as caught:
            downloader.fetch(RemoteFile("model.tflite", big["sha256"], big["size"], big["url"]))
        assert caught.value.needed >= big["size"] and caught.value.free < big["size"]
        assert "disk" in str(caught.value) and "free" in str(caught.value)
        assert stand_in.count("GET", "/v1/artifacts/") == 0, "nothing was downloaded that could not fit"
        assert not any((disk / "downloads").iterdir())


def test_a_disk_that_fills_during_a_download_raises_disk_full_and_frees_the_part_file(stand_in, tmp_path):
    with tmpfs(tmp_path / "small-disk") as disk:
        data = os.urandom(1024 * 1024)
        entry = stand_in.add_file(data)
        go_on = threading.Event()
        stand_in.on("GET", "/v1/artifacts/", hold(100_000, go_on, then_rest=True), times=1)
        downloader = Downloader(SyncClient(stand_in.url, "token", timeout_s=5), disk / "downloads", FAST_RETRY, 5)
        remote = RemoteFile("model.tflite", entry["sha256"], entry["size"], entry["url"])
        part = downloader.part_path(entry["sha256"])
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(error=_raises(downloader.fetch, remote)), daemon=True)
        thread.start()
        wait_for(lambda: part.is_file() and part.stat().st_size == 100_000, what="the first bytes on disk")
        filler = disk / "other-app.log"  # another program fills the disk meanwhile
        with open(filler, "wb") as out:
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * 65536)
        filler.unlink()
        with open(filler, "wb") as out:  # leave ~300 KB free: less than the rest of the download
            out.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 300_000))
        go_on.set()
        thread.join(10)
        assert isinstance(outcome.get("error"), DiskFullError), outcome
        assert not part.exists(), "the part file does not keep the disk full"


def _raises(call, *args):  # noqa: ANN001, ANN202
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


# --- finding 7: bounded push-stream input ---------------------------------------------------------------


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_128_mb_line_on_the_push_stream_does_not_raise_memory_and_polling_takes_over(stand_in, tmp_path):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    before = _peak_rss_mb()
    stand_in.assign({"model": "m", "version": 1, "files": fake_files()})
    stand_in.on("GET", "/events", long_line(128 * 1024 * 1024))
    source, delivered, _ = following(options(tmp_path, push=True), stand_in)
    source.start()
    try:
        wait_for(lambda: delivered, timeout=20, what="the assignment, polled")
        wait_for(lambda: "longer than" in (source.status()["last_error"] or "") or stand_in.count("GET", "/events") >= 2,
                 timeout=10, what="the stream refused")
    finally:
        source.stop()
    grown = _peak_rss_mb() - before
    assert grown < 40, f"the peak RSS grew by {grown:.0f} MB"
    assert source.following() == "ok"


def test_a_garbage_push_stream_falls_back_to_polling_with_backoff(stand_in, tmp_path):
    stand_in.assign({"model": "m", "version": 1, "files": fake_files()})
    stand_in.on("GET", "/events", garbage_stream(256 * 1024))
    source, delivered, _ = following(options(tmp_path, push=True, retry=RetryOptions(attempts=3, base_s=0.3, max_s=1.0)), stand_in)
    source.start()
    try:
        wait_for(lambda: delivered, timeout=10, what="the assignment, polled")
        time.sleep(2.5)
        assert "garbage" in (source.status()["last_error"] or ""), source.status()
        assert stand_in.count("GET", "/events") <= 5, "reconnects back off"
        assert stand_in.count("GET", "/assignment") >= 3, "it polls meanwhile"
        assert source.alive()
    finally:
        source.stop()


# --- finding 9: kept-alive answers are not held back ----------------------------------------------------


def test_kept_alive_answers_are_not_held_back_by_nagle_and_delayed_ack(tmp_path):
    agent_options = AgentOptions(home=tmp_path, serve=ServeOptions(port=0), fallback="never")
    classify = Classify(ServableHandle(), agent_options, fallback=None, record=lambda *a, **k: None, health=lambda *a, **k: None)
    api = LocalApi(classify, lambda: {}, agent_options)
    api.start()
    host, port = api.url.removeprefix("http://").split(":")
    try:
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        took = []
        for _ in range(15):
            started = time.perf_counter()
            connection.request("POST", "/classify", body=b"\xff\xd8 not a photo")
            response = connection.getresponse()
            response.read()
            took.append((time.perf_counter() - started) * 1000)
            assert response.status == 503
        connection.close()
    finally:
        api.stop()
    assert statistics.median(took) < 20, f"kept-alive answers took {statistics.median(took):.1f} ms (a delayed ACK is 40 ms)"
