"""A kiosk serving v1 is told to run v2 in shadow: it installs v2 beside v1 (never serving it), runs it
on a sample of its requests off the request path, reports v2's agreement with v1, and drops v2 when
the server stops naming it. A broken or crashing candidate, a full queue and a device whose policy
says no never disturb what the kiosk answers.

The server here is tests/misbehaving_server.py (a real HTTP server on loopback speaking the device
side of the protocol): it records every status and telemetry report the agent sends."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentOptions, AgentPaths, RetryOptions, ServeOptions, TimeoutOptions, enroll
from edge_runtime.agent.assignment import parse_assignment
from edge_runtime.agent.config import Identity, save_identity
from edge_runtime.agent.options import ShadowOptions
from edge_runtime.agent.servable import make_loader
from edge_runtime.agent.serving import ClassifiedPhoto
from edge_runtime.agent.shadow import ShadowRunner
from edge_runtime.store import ModelRef, ModelStore
from preprocessing import preprocess_pixels
from tests.agent_fixtures import bundles, stand_in  # noqa: F401  (fixtures)
from tests.agent_support import ROOT, device_home, sync_server_process, wait_for
from tests.conftest import real_photo_path
from tests.misbehaving_server import MisbehavingServer
from tests.server_fixtures import ENROLLMENT_SECRET, publisher  # noqa: F401  (fixture)

PHOTOS = [real_photo_path(name).read_bytes() for name in ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png")]


def options(home: Path, **overrides) -> AgentOptions:
    values = dict(home=home, serve=ServeOptions(port=0), poll_interval_s=0.2, push=False,
                  retry=RetryOptions(attempts=3, base_s=0.05, max_s=0.5),
                  timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=1, exchange_s=5),
                  telemetry_period_s=0.5, fallback="never", shadow=ShadowOptions(min_free_bytes=0))
    values.update(overrides)
    return AgentOptions(**values)


def enrolled(tmp_path: Path, publisher, server: MisbehavingServer) -> Path:  # noqa: F811
    home = device_home(tmp_path, publisher)
    save_identity(AgentPaths.at(home), Identity(server=server.url, device_id=server.device_id, token="token", model="m",
                                                channel="stable", name="kiosk-shadow"))
    return home


def with_shadow(server: MisbehavingServer, serving: dict, folder: Path, version: int, sample_rate: float) -> dict:
    """`serving`'s assignment naming the bundle in `folder` as its shadow (its files served by the stand-in)."""
    files = server.bundle_assignment(folder, "m", version)["files"]
    return {**serving, "shadow": {"version": version, "manifest": None, "files": files, "sample_rate": sample_rate}}


def classify(url: str, photo: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/classify", body=photo)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def reports(server: MisbehavingServer, kind: str) -> list[dict]:
    return [body for path, body in list(server.reports) if path.endswith("/" + kind)]


def said(server: MisbehavingServer, state: str) -> list[dict]:
    """Status reports saying what happened to the shadow version (they are about the served version)."""
    return [r for r in reports(server, "status") if ((r.get("details") or {}).get("shadow") or {}).get("state") == state]


def shadow_telemetry(server: MisbehavingServer, version: int) -> list[dict]:
    return [r for r in reports(server, "telemetry") if r.get("mode") == "shadow" and r["version"] == version]


def artifact_requests(server: MisbehavingServer, files: dict) -> int:
    """Downloads of these files so far (v1 and v2 share the model's and labels' bytes: compare before and after)."""
    return sum(server.count("GET", f"/v1/artifacts/{entry['sha256']}") for entry in files.values())


# --- the story ------------------------------------------------------------------------------------------


def test_a_shadow_version_runs_beside_the_served_one_reports_agreement_and_is_dropped_with_the_assignment(
        stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None and agent.handle.current.version == 1, what="v1 served")
        assignment = with_shadow(stand_in, v1, bundles.make("m", 2), 2, sample_rate=1.0)
        stand_in.assign(assignment)
        wait_for(lambda: agent.shadow.current is not None, what="v2 loaded in shadow")

        shadow_home = ModelStore(home / "shadow")
        assert shadow_home.versions() == [ModelRef("m", 2)], "v2 is installed beside v1, in the shadow store"
        assert agent.store.state().current == ModelRef("m", 1) and ModelRef("m", 2) not in agent.store.versions()
        started = wait_for(lambda: said(stand_in, "running"), what="the report of the shadow started")[0]
        assert started["version"] == 1 and started["running"] is True, "about the served version"
        assert started["details"]["shadow"]["version"] == 2 and started["details"]["shadow"]["smoke_test_ok"] is True
        assert started["message"].startswith("shadow v2: installed beside v1, running on 100% of the requests")

        answers = [classify(agent.url, photo) for photo in PHOTOS * 5]
        assert {status for status, _ in answers} == {200}
        assert {body["model"]["version"] for _, body in answers} == {1}, "every answer still comes from v1"
        wait_for(lambda: agent.shadow.counts["run"] == len(answers), what="every request run in shadow (sample rate 1.0)")

        sent = wait_for(lambda: sum(r["predictions"] for r in shadow_telemetry(stand_in, 2)) >= len(answers) and
                        shadow_telemetry(stand_in, 2), what="shadow reports about v2 at the server")
        assert {r["shadow_of"] for r in sent} == {1}
        assert sum(r["predictions"] for r in sent) == len(answers)
        # v2 carries v1's weights: it agrees on every photo, and its answers are v1's
        assert sum(r["agreements"] for r in sent) == len(answers)
        assert sum(r["fallbacks"] for r in sent) == 0 and sum(r["errors"] for r in sent) == 0
        wait_for(lambda: sum(r["predictions"] for r in reports(stand_in, "telemetry")
                             if r.get("mode", "serving") == "serving" and r["version"] == 1) == len(answers),
                 what="v1's own reports, apart from v2's")
        assert get_status(agent)["shadow"]["version"] == 2

        # the served version switches: v2 stays the shadow, and is not pruned with the old versions
        stand_in.assign(with_shadow(stand_in, stand_in.bundle_assignment(bundles.make("m", 3), "m", 3), bundles.make("m", 2), 2, 1.0))
        wait_for(lambda: agent.handle.current.version == 3, what="v3 served")
        assert agent.shadow.current is not None and agent.shadow.current.version == 2
        assert shadow_home.versions() == [ModelRef("m", 2)]
        status, body = classify(agent.url, PHOTOS[0])
        assert status == 200 and body["model"]["version"] == 3
        wait_for(lambda: any(r["shadow_of"] == 3 for r in shadow_telemetry(stand_in, 2)), what="v2 compared with v3")

        stand_in.assign(stand_in.bundle_assignment(bundles.make("m", 3), "m", 3))  # the rollout stops naming v2
        wait_for(lambda: agent.shadow.current is None, what="the shadow dropped")
        assert shadow_home.versions() == [] and not (home / "shadow" / "models" / "m" / "2").exists()
        status, body = classify(agent.url, PHOTOS[0])
        assert status == 200 and body["model"]["version"] == 3


def test_a_promotion_from_shadow_uses_the_files_already_verified_and_downloads_nothing(stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served")
        assignment = with_shadow(stand_in, v1, bundles.make("m", 2), 2, sample_rate=0.1)
        before = artifact_requests(stand_in, assignment["shadow"]["files"])
        stand_in.assign(assignment)
        wait_for(lambda: agent.shadow.current is not None, what="v2 in shadow")
        fetched = artifact_requests(stand_in, assignment["shadow"]["files"])
        assert fetched - before == len(assignment["shadow"]["files"]), "each file of v2 downloaded once"

        stand_in.assign(stand_in.bundle_assignment(bundles.make("m", 2), "m", 2))  # promoted: v2 is the channel's now
        wait_for(lambda: agent.handle.current.version == 2, what="v2 served")
        assert artifact_requests(stand_in, assignment["shadow"]["files"]) == fetched, "the promotion downloaded nothing"
        wait_for(lambda: agent.shadow.current is None and ModelStore(home / "shadow").versions() == [], what="the shadow copy gone")
        assert agent.store.check(ModelRef("m", 2)) is None, "the served copy is intact after the shadow copy was deleted"
        status, body = classify(agent.url, PHOTOS[0])
        assert status == 200 and body["model"]["version"] == 2


def test_a_shadow_rollout_on_a_real_sync_server_reaches_the_kiosk_and_its_agreement_reaches_the_quality_figures(
        bundles, publisher, tmp_path):  # noqa: F811
    with sync_server_process(tmp_path / "server", [publisher.public_key]) as server:
        server.publish(bundles.make("shadowed", 1), publisher.saved_model)
        server.publish(bundles.make("shadowed", 2), publisher.saved_model, channel=None)
        home = device_home(tmp_path, publisher)
        enroll(AgentPaths.at(home), server.url, ENROLLMENT_SECRET, model="shadowed", name="kiosk-shadowed")
        with Agent.create_from_options(options(home, push=True)) as agent:
            wait_for(lambda: agent.handle.current is not None and agent.handle.current.version == 1, what="v1 served")
            started = server.admin("POST", "/v1/models/shadowed/channels/stable/rollout",
                                   json={"version": 2, "percent": 100, "mode": "shadow", "sample_rate": 1.0})
            assert started.status_code == 200, started.text
            wait_for(lambda: agent.shadow.current is not None and agent.shadow.current.version == 2, what="v2 run in shadow")
            answers = [classify(agent.url, photo) for photo in PHOTOS * 3]
            assert {(status, body["model"]["version"]) for status, body in answers} == {(200, 1)}

            def shadow_figures() -> dict | None:
                quality = server.admin("GET", "/v1/models/shadowed/quality", params={"mode": "shadow"}).json()
                figures = next((v for v in quality["versions"] if v["version"] == 2 and v["mode"] == "shadow"), None)
                return figures if figures and figures["predictions"] == len(answers) else None

            figures = wait_for(shadow_figures, what="v2's shadow figures at the server")
            assert figures["shadow_agreement"] == 1.0, "v2 (v1's weights) agrees with v1 on every photo"
            assert agent.outbox.dead_count() == 0, "the server took every report (status and shadow telemetry)"

            assert server.admin("POST", "/v1/models/shadowed/channels/stable/rollback").status_code == 200
            wait_for(lambda: agent.shadow.current is None, what="the shadow dropped after the rollback")
            assert ModelStore(home / "shadow").versions() == []
            assert classify(agent.url, PHOTOS[0])[1]["model"]["version"] == 1


# --- faults of the candidate never reach the answers -------------------------------------------------------


def test_a_broken_shadow_bundle_is_refused_and_reported_and_serving_goes_on(stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served")
        tampered = with_shadow(stand_in, v1, publisher.tampered, 6, sample_rate=1.0)  # its model changed after signing
        stand_in.assign(tampered)
        refusal = wait_for(lambda: said(stand_in, "refused"), what="the refusal of the shadow version")[0]
        assert refusal["version"] == 1 and refusal["running"] is True and refusal["load_ok"] is True, "v1 is not blamed"
        assert refusal["message"].startswith("shadow v6 refused (signature)")
        assert refusal["details"]["shadow"]["version"] == 6 and refusal["details"]["shadow"]["load_ok"] is False
        assert agent.state.shadow_refused(ModelRef("m", 6))["step"] == "signature"
        answers = [classify(agent.url, photo) for photo in PHOTOS]
        assert [status for status, _ in answers] == [200] * len(PHOTOS)
        assert {body["model"]["version"] for _, body in answers} == {1}
        fetched = artifact_requests(stand_in, tampered["shadow"]["files"])
        time.sleep(1.0)  # several manager steps
        assert artifact_requests(stand_in, tampered["shadow"]["files"]) == fetched, "a refused shadow is not fetched again"
        assert agent.shadow.current is None and ModelStore(home / "shadow").versions() == []
        assert agent.store.state().current == ModelRef("m", 1)


def test_a_malformed_shadow_part_is_ignored_with_its_reason_and_the_served_version_still_installs(
        stand_in, bundles, publisher, tmp_path):  # noqa: F811
    assignment = parse_assignment(json.dumps({"model": "m", "version": None, "shadow": {"version": 2, "files": [],
                                                                                                   "sample_rate": 1}}))
    assert assignment.shadow is None and assignment.shadow_problem == (2, "the shadow's files are a list, not an object of name: file")

    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.bundle_assignment(bundles.make("m", 1), "m", 1)
    stand_in.assign({**v1, "shadow": {"version": 2, "files": {"model.tflite": "no"}, "sample_rate": 2.5}})
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None and agent.handle.current.version == 1, what="v1 served anyway")
        refused = wait_for(lambda: said(stand_in, "refused"), what="the report of the ignored shadow part")[0]
        assert refused["message"] == "shadow v2 refused (assignment): the shadow's sample rate 2.5 is not a number in 0..1"
        assert refused["version"] == 1 and refused["details"]["shadow"]["step"] == "assignment"
        assert agent.source.following() == "ok", "the served part of the assignment was taken"
        assert classify(agent.url, PHOTOS[0])[0] == 200


def test_a_candidate_that_killed_the_agent_is_refused_at_the_next_start_and_the_served_version_is_not_blamed(
        stand_in, bundles, publisher, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served")
    # a process dies (SIGKILL) while v2 is inside the interpreter in shadow: what a segfault in the candidate leaves
    dying = ("import os, signal; from pathlib import Path; from edge_runtime.agent.servable import CallMarker;"
             "from edge_runtime.agent.state import AgentState; from edge_runtime.store import ModelRef;"
             f"home = Path({str(home)!r}); AgentState(home / 'agent' / 'state.json').start_run();"
             "marker = CallMarker(home / 'agent' / 'in_model');"
             "ctx = marker.inside(ModelRef('m', 2), 'shadow_invoke'); ctx.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    died = subprocess.run([sys.executable, "-c", dying], cwd=ROOT, timeout=60)
    assert died.returncode == -signal.SIGKILL
    stand_in.assign(with_shadow(stand_in, v1, bundles.make("m", 2), 2, sample_rate=1.0))
    with Agent.create_from_options(options(home)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served after the crash")
        refusal = wait_for(lambda: said(stand_in, "refused"), what="the crash report")[0]
        assert refusal["message"] == "shadow v2 refused (crash): the agent died while m v2 ran in shadow (shadow_invoke)"
        assert refusal["version"] == 1 and refusal["running"] is True
        assert agent.state.refused(ModelRef("m", 1)) is None and agent.state.shadow_refused(ModelRef("m", 2))["step"] == "crash"
        time.sleep(1.0)
        assert agent.shadow.current is None, "the candidate that crashed is not run in shadow again"
        assert classify(agent.url, PHOTOS[0])[0] == 200


# --- the device's policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, cause", [
    ({"shadow": ShadowOptions(min_free_bytes=10**15)}, "disk"),
    ({"policy": "resource"}, "policy"),
    ({"shadow": ShadowOptions(enabled=False)}, "off"),
])
def test_a_device_whose_policy_refuses_shadow_says_why_and_downloads_nothing(
        stand_in, bundles, publisher, tmp_path, overrides, cause):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    v1 = stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    with Agent.create_from_options(options(home, **overrides)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served")
        assignment = with_shadow(stand_in, v1, bundles.make("m", 2), 2, sample_rate=1.0)
        before = artifact_requests(stand_in, assignment["shadow"]["files"])
        stand_in.assign(assignment)
        declined = wait_for(lambda: said(stand_in, "declined"), what="the report of the declined shadow")
        assert declined[0]["version"] == 1 and declined[0]["running"] is True, "said about the served version: no rollout failure"
        assert declined[0]["details"]["shadow"]["cause"] == cause and declined[0]["details"]["shadow"]["version"] == 2
        assert declined[0]["message"].startswith("shadow v2 declined: ")
        time.sleep(1.0)  # several manager steps: said once
        assert len(said(stand_in, "declined")) == 1
        assert artifact_requests(stand_in, assignment["shadow"]["files"]) == before, "nothing of v2 downloaded"
        assert get_status(agent)["shadow"]["declined"]["cause"] == cause
        assert classify(agent.url, PHOTOS[0])[0] == 200


# --- the runner on its own -------------------------------------------------------------------------------


def test_a_full_shadow_queue_drops_samples_and_counts_them_and_a_foreign_geometry_is_skipped(bundles, publisher):  # noqa: F811
    load = make_loader(publisher.public_key, publisher.public_key.parent, threads=1)
    served, candidate = load(bundles.make("m", 1)), load(bundles.make("m", 2))
    recorded: list[tuple[tuple, dict]] = []
    runner = ShadowRunner(lambda *args, **kwargs: recorded.append((args, kwargs)), queue_size=3)
    runner.use(candidate, sample_rate=1.0)  # the shadow thread is not started yet: nothing leaves the queue
    spec = served.classifier.spec
    photos = []
    for data in PHOTOS * 3:
        categories, _ms = served.classify(data, 1)
        pixels = preprocess_pixels(data, spec)
        photos.append(ClassifiedPhoto(served.ref, pixels, spec, categories[0].label, None, categories[0].score))
    offered = time.perf_counter()
    for photo in photos:
        runner.offer(photo)
    per_offer_us = (time.perf_counter() - offered) / len(photos) * 1e6
    assert runner.counts["sampled"] == len(photos) and runner.counts["dropped"] == len(photos) - 3
    assert per_offer_us < 1000, f"offer() returns at once ({per_offer_us:.0f} µs)"

    other = ClassifiedPhoto(served.ref, photos[0].pixels, spec.replace(resize="nearest"), photos[0].label, None, 0.5)
    runner.start()
    try:
        wait_for(lambda: runner.counts["run"] == 3, what="the three queued samples run")
        niceness = int(Path(f"/proc/self/task/{runner.native_id}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10), "the shadow thread runs at a lower priority"
        assert os.getpriority(os.PRIO_PROCESS, 0) < niceness, "the process (and its request threads) kept theirs"
        runner.offer(other)
        wait_for(lambda: runner.counts["skipped_geometry"] == 1, what="the photo of another geometry skipped")
        assert [kwargs["agrees"] for _args, kwargs in recorded] == [True] * 3
        assert {args for args, _kwargs in recorded} == {(2, 1)}
        assert all(kwargs["latency_ms"] > 0 and not kwargs.get("error") and kwargs["score"] > 0 for _a, kwargs in recorded)
        assert runner.status()["dropped"] == len(photos) - 3

        failures: list[tuple[ModelRef, str]] = []
        runner.on_error = lambda ref, why: failures.append((ref, why))
        candidate.classifier.close()  # its interpreter is gone: every call into it fails
        runner.offer(photos[0])
        wait_for(lambda: runner.counts["errors"] == 1, what="the failed sample counted")
        assert recorded[-1][1]["error"] is True and recorded[-1][1]["label_index"] is None
        assert failures and failures[0][0] == ModelRef("m", 2), "the failure is the candidate's, said once to the keeper"
    finally:
        runner.stop()
        served.close()


def get_status(agent: Agent) -> dict:
    host, port = agent.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/status")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def test_the_agent_cli_takes_the_shadow_flags(tmp_path):
    from edge_runtime.agent.cli import _parser

    args = _parser().parse_args(["run", "--no-shadow", "--shadow-min-free-mb", "10", "--shadow-max-model-mb", "5",
                                 "--shadow-queue", "4"])
    assert (args.shadow, args.shadow_min_free_mb, args.shadow_max_model_mb, args.shadow_queue) == (False, 10.0, 5.0, 4)
    assert _parser().parse_args(["run"]).shadow is True
