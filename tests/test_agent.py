"""A kiosk runs `edge-agent` against a real `sync-server` process: it follows publishes with no failed
request, resumes a killed download, refuses bad bundles, rolls a bad version back, and loses no report."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentOptions, AgentPaths, HealthPolicy, RetryOptions, ServeOptions, TimeoutOptions, enroll
from edge_runtime.agent.outbox import Outbox
from edge_runtime.agent.servable import Servable, make_loader
from edge_runtime.store import ModelRef
from tests.agent_fixtures import bundles  # noqa: F401  (fixtures)
from tests.agent_support import ROOT, Proxy, device_home, sync_server_process, wait_for
from tests.conftest import real_photo_path
from tests.server_fixtures import ENROLLMENT_SECRET, publisher  # noqa: F401  (fixture)

PHOTO = real_photo_path("rocket.jpg").read_bytes()


@pytest.fixture(scope="module")
def server(publisher, tmp_path_factory):  # noqa: F811
    """One sync-server process for the module; every test uses its own model name."""
    keys = [publisher.public_key, publisher.stranger_public_key]
    with sync_server_process(tmp_path_factory.mktemp("sync-server"), keys) as running:
        yield running


def fast_options(home: Path, **overrides) -> AgentOptions:
    """Options for tests: a free port, quick polls and retries, half-second telemetry periods."""
    values = dict(
        home=home,
        serve=ServeOptions(port=0),
        poll_interval_s=0.3,
        retry=RetryOptions(attempts=3, base_s=0.05, max_s=0.5),
        timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=1),
        telemetry_period_s=0.5,
        fallback="never",
    )
    values.update(overrides)
    return AgentOptions(**values)


def classify(url: str, photo: bytes = PHOTO) -> tuple[int, dict]:
    parts = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=10)
    try:
        connection.request("POST", "/classify", body=photo, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def serving_version(agent: Agent) -> int | None:
    current = agent.handle.current
    return current.version if current else None


def enrolled_device(tmp_path: Path, publisher, server_url: str, model: str) -> tuple[Path, str]:  # noqa: F811
    home = device_home(tmp_path, publisher)
    identity = enroll(AgentPaths.at(home), server_url, ENROLLMENT_SECRET, model=model, name=f"kiosk-{model}")
    return home, identity.device_id


# --- a publish reaches a running agent, which switches while a client keeps classifying -----------------


def test_a_publish_reaches_the_agent_and_it_switches_without_a_failed_request(server, bundles, publisher, tmp_path, capsys):  # noqa: F811
    from edge_runtime.agent.cli import main

    server.publish(bundles.make("swap", 1), publisher.saved_model)
    home, device_id = enrolled_device(tmp_path, publisher, server.url, "swap")
    with Agent.create_from_options(fast_options(home)) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 to be served")
        answers: list[tuple[float, int, int | None, float]] = []
        stop = threading.Event()

        def keep_classifying() -> None:
            host, port = agent.url.removeprefix("http://").split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=10)  # one kept-alive connection
            while not stop.is_set():
                started = time.perf_counter()
                connection.request("POST", "/classify", body=PHOTO)
                response = connection.getresponse()
                body = json.loads(response.read())
                answers.append((time.monotonic(), response.status, (body.get("model") or {}).get("version"),
                                time.perf_counter() - started))
            connection.close()

        clients = [threading.Thread(target=keep_classifying) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(0.5)
        published = time.monotonic()
        server.publish(bundles.make("swap", 2), publisher.saved_model)
        wait_for(lambda: answers and answers[-1][2] == 2, what="answers from v2")
        switched = next(t for t, _, version, _ in answers if version == 2) - published
        time.sleep(0.5)
        stop.set()
        for client in clients:
            client.join()

        statuses = {status for _, status, _, _ in answers}
        versions = [version for _, _, version, _ in answers]
        assert statuses == {200}, "no request failed during the switch"
        assert set(versions) == {1, 2}, "every answer names the version that made it"
        first_v2 = versions.index(2)
        assert versions[first_v2:].count(1) <= 1, "after the switch, v1 only finishes the other client's request in flight"
        slowest = max(seconds for *_, seconds in answers)
        assert slowest < 2.0, f"a request waited {slowest:.2f} s during the switch"
        assert switched < 15, f"the switch took {switched:.1f} s after the publish"

        status = wait_for(lambda: server.status_of(device_id, 2), what="the v2 status report")
        assert status["running"] and status["load_ok"] and status["smoke_test_ok"]
        assert server.device(device_id)["running_version"] == 2
        assert sorted(p.name for p in (home / "models" / "swap").iterdir()) == ["1", "2"]

        assert main(["status", "--home", str(home)]) == 0
        out = capsys.readouterr().out
        assert f"device    {device_id} (kiosk-swap)" in out and f"server    {server.url}" in out
        assert "current   swap v2" in out and "previous  swap v1" in out
        assert "serving swap v2" in out and "agent     running (pid" in out
        print(f"\n[swap] {len(answers)} requests, switch {switched:.2f} s after publish, slowest {slowest * 1000:.0f} ms")


# --- a killed download resumes where it stopped ----------------------------------------------------------


def _agent_process(home: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EDGE_CLASSIFY_HOME": str(home)}
    command = [sys.executable, "-m", "edge_runtime.agent", "run", "--port", "0", "--poll-interval", "0.3",
               "--telemetry-period", "0.5", "--fallback", "never", *extra]
    log = open(home / "agent.log", "a")
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _agent_url(home: Path) -> str | None:
    try:
        return json.loads((home / "agent" / "run.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def _live(home: Path) -> dict | None:
    url = _agent_url(home)
    if url is None:
        return None
    try:
        connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=2)
        connection.request("GET", "/status")
        return json.loads(connection.getresponse().read())
    except OSError:
        return None


def test_a_killed_download_resumes_from_the_partial_file(server, bundles, publisher, tmp_path):  # noqa: F811
    bundle = bundles.make("resume", 1)
    server.publish(bundle, publisher.saved_model)
    model = (bundle / "model.tflite").read_bytes()
    proxy = Proxy(server.url)
    home, _ = enrolled_device(tmp_path, publisher, proxy.url, "resume")
    assignment = server.admin("GET", "/v1/models/resume/versions/1").json()
    artifact = assignment["files"]["model.tflite"]
    cut = len(model) // 3
    release = threading.Event()
    proxy.hold[artifact["url"]] = (cut, release)
    part = home / "downloads" / f"{artifact['sha256']}.part"

    agent = _agent_process(home)
    try:
        wait_for(lambda: part.is_file() and part.stat().st_size == cut, what=f"{cut} bytes in {part.name}")
        agent.send_signal(signal.SIGKILL)  # the kiosk loses power mid-download
        agent.wait(10)
    finally:
        if agent.poll() is None:
            agent.kill()
    proxy.hold.clear()
    release.set()
    assert part.stat().st_size == cut, "the partial download survived the kill"

    agent = _agent_process(home)
    try:
        live = wait_for(lambda: (s := _live(home)) and s["serving"] and s, timeout=30, what="the agent to serve v1")
        assert live["serving"] == {"name": "resume", "version": 1}
        gets = proxy.seen("GET", artifact["url"])
        assert len(gets) == 2
        assert "Range" not in gets[0]
        assert gets[1]["Range"] == f"bytes={cut}-" and gets[1]["If-Range"] == f'"{artifact["sha256"]}"'
        assert proxy.body_bytes[artifact["url"]] == len(model), "no byte was downloaded twice"
        # the manager swaps the new version in, then clears the downloads: wait for the second step
        wait_for(lambda: not part.exists() and not any((home / "downloads").iterdir()), timeout=10,
                 what="downloads cleaned up after the install")
        status, body = classify(live["url"])
        assert status == 200 and body["model"] == {"name": "resume", "version": 1}
    finally:
        agent.terminate()
        assert agent.wait(15) == 0, (home / "agent.log").read_text()
        proxy.close()
    log = (home / "agent.log").read_text()
    assert "did not stop cleanly" in log and "Traceback" not in log


# --- corrupted, untrusted and unsigned bundles are refused; the device keeps serving --------------------


def test_corrupted_untrusted_and_unsigned_bundles_are_refused_and_the_old_version_keeps_serving(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("refuse", 1), publisher.saved_model)
    proxy = Proxy(server.url)
    proxy.refuse_events = True  # the push stream is down: the agent polls with If-None-Match
    home, device_id = enrolled_device(tmp_path, publisher, proxy.url, "refuse")
    try:
        with Agent.create_from_options(fast_options(home)) as agent:
            wait_for(lambda: serving_version(agent) == 1, what="v1 to be served")

            def refused(version: int) -> dict:
                return wait_for(lambda: agent.state.refused(ModelRef("refuse", version)), what=f"v{version} to be refused")

            # 1. signed with a key the device does not trust (the server trusts it)
            server.publish(bundles.make("refuse", 2, key=publisher.stranger_public_key.with_suffix("")), publisher.saved_model)
            assert refused(2)["step"] == "signature"

            # 2. a file on the server is damaged after publishing (the manifest: the model's bytes are shared)
            info = server.publish(bundles.make("refuse", 3), publisher.saved_model, channel=None)
            stored = server.artifact_path(info["files"]["manifest.json"]["sha256"])
            stored.chmod(0o644)
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
            server.set_channel("refuse", 3)
            assert refused(3)["step"] == "files"

            # 3. a man in the middle drops the signature from the assignment
            proxy.rewrite_assignment = lambda body: {**body, "files": {k: v for k, v in (body.get("files") or {}).items() if k != "manifest.sig"}}
            server.publish(bundles.make("refuse", 4), publisher.saved_model)
            reason = refused(4)
            assert reason["step"] == "signature" and "unsigned" in reason["reason"]

            assert serving_version(agent) == 1
            status, body = classify(agent.url)
            assert status == 200 and body["model"]["version"] == 1
            assert [r.version for r in agent.store.versions()] == [1], "refused bundles are deleted"
            assert not any((home / "downloads").iterdir())
            not_modified = proxy.seen("GET", f"/v1/devices/{device_id}/assignment")
            assert any("If-None-Match" in h for h in not_modified), "polling is conditional"
            assert agent.source.counts["not_modified"] > 0

            for version, step in ((2, "signature"), (3, "files"), (4, "signature")):
                report = wait_for(lambda: server.status_of(device_id, version), what=f"the v{version} report")
                assert report["load_ok"] is False and not report["running"]
                assert report["message"].startswith(f"refused ({step})")
            assert server.device(device_id)["running_version"] == 1

            # The push stream comes back: the agent reconnects and the next version arrives pushed (polled
            # answers still lose their signature here, so only the stream can deliver it intact).
            proxy.refuse_events = False
            wait_for(lambda: agent.source.connected, what="the push stream to reconnect")
            server.publish(bundles.make("refuse", 5), publisher.saved_model)
            wait_for(lambda: serving_version(agent) == 5, what="v5 pushed and switched to")
            assert agent.source.counts["events"] >= 1
            assert len(proxy.seen("GET", f"/v1/devices/{device_id}/events")) >= 2, "the stream was retried"
    finally:
        proxy.close()


# --- a bad version rolls back on its own -----------------------------------------------------------------


def test_a_version_that_fails_requests_is_rolled_back_and_the_server_is_told_why(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("rollback", 1), publisher.saved_model)
    home, device_id = enrolled_device(tmp_path, publisher, server.url, "rollback")
    real_loader = make_loader(home / "trusted.pub", home)

    class FailsEveryOtherPhoto(Servable):
        calls = 0

        def classify(self, data, top_k):  # noqa: ANN001, ANN201
            FailsEveryOtherPhoto.calls += 1
            if FailsEveryOtherPhoto.calls % 2:
                raise RuntimeError("tensor arena overflow (simulated)")
            return super().classify(data, top_k)

    def loader(path: Path) -> Servable:
        servable = real_loader(path)
        return FailsEveryOtherPhoto(servable.classifier) if servable.version == 2 else servable

    health = HealthPolicy(min_requests=6, max_error_rate=0.2, probation_s=60)
    with Agent.create_from_options(fast_options(home, health=health), loader=loader) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 to be served")
        server.publish(bundles.make("rollback", 2), publisher.saved_model)
        wait_for(lambda: serving_version(agent) == 2, what="the switch to v2")
        codes = [classify(agent.url)[0] for _ in range(8)]
        assert 500 in codes
        wait_for(lambda: serving_version(agent) == 1, what="the rollback to v1")
        status, body = classify(agent.url)
        assert status == 200 and body["model"]["version"] == 1
        refusal = agent.state.refused(ModelRef("rollback", 2))
        assert refusal["step"] == "health" and "requests failed" in refusal["reason"]
        assert agent.store.state().current.version == 1 and agent.store.state().previous.version == 2

        report = wait_for(lambda: (s := server.status_of(device_id, 2)) and not s["running"] and s, what="the rollback report")
        assert report["message"].startswith("rolled back to v1:") and "above the 20% limit" in report["message"]
        assert wait_for(lambda: server.device(device_id)["running_version"] == 1, what="v1 reported running")
        time.sleep(1.0)  # the server still assigns v2: the agent must not flap back
        assert serving_version(agent) == 1


# --- the outbox survives a crash and a restart, and sends everything once ---------------------------------


def test_reports_wait_in_the_outbox_through_a_crash_and_arrive_once(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("outbox", 1), publisher.saved_model)
    proxy = Proxy(server.url)
    home, device_id = enrolled_device(tmp_path, publisher, proxy.url, "outbox")
    agent = _agent_process(home)
    try:
        live = wait_for(lambda: (s := _live(home)) and s["serving"] and s, timeout=30, what="v1 served")
        wait_for(lambda: server.status_of(device_id, 1), what="the first status report")
        proxy.offline = True  # the shop's uplink goes down
        for _ in range(7):
            assert classify(live["url"])[0] == 200
        outbox = Outbox(home / "agent" / "outbox.sqlite")
        wait_for(lambda: outbox.count("telemetry") >= 1, what="telemetry queued")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        queued = outbox.count()
        outbox.close()
        assert queued >= 1

        agent = _agent_process(home)  # back after the crash, still offline
        wait_for(lambda: (s := _live(home)) and s["serving"], timeout=30, what="the agent back")
        time.sleep(1.0)
        assert server.telemetry("outbox")["versions"] == [], "nothing arrived while offline"
        proxy.offline = False
        wait_for(lambda: (_live(home) or {}).get("outbox", {}).get("queued") == 0, timeout=30, what="the outbox to drain")
        summary = server.telemetry("outbox")["versions"][0]
        assert summary["predictions"] == 7, summary
        keys = [h.get("Idempotency-Key") for h in proxy.seen("POST", f"/v1/devices/{device_id}/telemetry")]
        delivered = [k for k in keys if k]
        assert summary["reports"] == len(set(delivered)), "each report counted once"
    finally:
        agent.terminate()
        agent.wait(15)
        proxy.close()


# --- the command line: enrol, status, one clear line for every error --------------------------------------


def test_enroll_and_status_print_what_a_person_needs_and_errors_are_one_line(server, bundles, publisher, tmp_path, capsys):  # noqa: F811
    from edge_runtime.agent.cli import main
    from tests.agent_support import free_port

    server.publish(bundles.make("cli", 1), publisher.saved_model)
    home = tmp_path / "kiosk"

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    identity_file = home / "agent" / "identity.json"
    assert run("status", "--home", home) == (
        2, "", f"edge-agent: this device is not enrolled (no {identity_file}): run `edge-agent enroll --server URL --secret SECRET`\n")
    enroll_args = ("enroll", "--server", server.url, "--model", "cli", "--home", home)
    assert run(*enroll_args, "--secret", "not-the-secret") == (
        2, "", f"edge-agent: the server at {server.url} refused the enrolment secret: check --secret\n")
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, out, err = run("enroll", "--server", nowhere, "--secret", "s", "--model", "cli", "--home", home)
    assert code == 2 and err == (f"edge-agent: enrolling with {nowhere}: gave up after 3 tries (cannot reach the sync server at "
                                 f"{nowhere} (connection refused))\n")
    code, _, err = run("enroll", "--server", server.url, "--secret", ENROLLMENT_SECRET, "--model", "nope", "--home", home)
    assert code == 2 and err == f"edge-agent: the sync server refused {server.url}/v1/devices/enroll: unknown model 'nope' (unknown_model)\n"
    code, _, err = run("enroll", "--server", "localhost:8080", "--secret", "s", "--home", home, "--model", "cli")
    assert code == 2 and err == "edge-agent: error: the server URL must look like http://HOST:PORT, got 'localhost:8080'\n"
    code, _, err = run("enroll", "--server", server.url, "--home", home)
    assert code == 2 and err.endswith("error: give the enrolment secret with --secret or $EDGE_AGENT_ENROLLMENT_SECRET\n")
    assert not identity_file.exists()

    code, out, err = run(*enroll_args, "--secret", ENROLLMENT_SECRET, "--name", "till-3", "--public-key", publisher.public_key)
    assert code == 0, err
    device_id = json.loads(identity_file.read_text())["device_id"]
    assert out == f"enrolled {device_id} (till-3) with {server.url}: model cli, channel stable\nidentity in {identity_file}\n"
    assert err == "" and identity_file.stat().st_mode & 0o777 == 0o600
    assert (home / "trusted.pub").read_bytes() == publisher.public_key.read_bytes()
    assert run(*enroll_args, "--secret", ENROLLMENT_SECRET) == (
        2, "", f"edge-agent: this device is already enrolled ({identity_file}); pass --force to enrol it again\n")

    code, out, _ = run("status", "--home", home)
    assert code == 0 and out == (
        f"device    {device_id} (till-3)\nserver    {server.url}\nmodel     cli, channel stable\n"
        "current   none\nprevious  none\nagent     not running\noutbox    0 reports waiting\n")
    code, out, _ = run("status", "--home", home, "--json")
    assert json.loads(out)["device"] == {"server": server.url, "device_id": device_id, "model": "cli", "channel": "stable", "name": "till-3"}

    code, _, err = run("run", "--home", home, "--port", "70000")
    assert code == 2 and err == "edge-agent: error: the port must be 0..65535, got 70000\n"
    code, _, err = run("run", "--home", tmp_path / "elsewhere")
    assert code == 2 and err.startswith("edge-agent: this device is not enrolled")


def test_the_resource_preserving_policy_unloads_first_and_says_so_while_it_loads(server, bundles, publisher, tmp_path):  # noqa: F811
    server.publish(bundles.make("small-device", 1), publisher.saved_model)
    home, device_id = enrolled_device(tmp_path, publisher, server.url, "small-device")
    with Agent.create_from_options(fast_options(home, policy="resource")) as agent:
        wait_for(lambda: serving_version(agent) == 1, what="v1 to be served")
        answers: list[tuple[int, dict]] = []
        stop = threading.Event()

        def keep_classifying() -> None:
            while not stop.is_set():
                answers.append(classify(agent.url))

        client = threading.Thread(target=keep_classifying)
        client.start()
        server.publish(bundles.make("small-device", 2), publisher.saved_model)
        wait_for(lambda: answers and answers[-1][1].get("model", {}) and answers[-1][1]["model"]["version"] == 2, what="v2 answers")
        stop.set()
        client.join()
    assert {status for status, _ in answers} <= {200, 503}
    assert all(body["error"]["code"] == "updating" for status, body in answers if status == 503)
    report = wait_for(lambda: server.status_of(device_id, 2), what="the v2 report")
    assert report["running"] and report["smoke_test_ok"]
