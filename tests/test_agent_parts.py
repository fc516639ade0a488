"""The agent's parts on their own (no server): push-stream parsing, retries, the outbox, telemetry,
the servable handle, the health policy and the local API's photo parsing. Fast."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from edge_runtime.agent.assignment import Assignment
from edge_runtime.agent.errors import ServerRejectedError, ServerUnreachableError
from edge_runtime.agent.health import HealthMonitor
from edge_runtime.agent.options import AgentOptions, HealthPolicy, RetryOptions
from edge_runtime.agent.outbox import Outbox
from edge_runtime.agent.retry import backoff_delay, with_retries
from edge_runtime.agent.servable import ServableHandle
from edge_runtime.agent.serving import _photo_from
from edge_runtime.agent.sse import Event, parse_events
from edge_runtime.agent.state import AgentState
from edge_runtime.agent.telemetry import TelemetryRecorder
from edge_runtime.store import ModelRef
from tests.agent_support import ROOT


def test_the_push_stream_parser_follows_the_event_stream_format():
    raw = [b": keepalive\n", b"event: assignment\n", b'id: "abc"\n', b"retry: 5000\n", b'data: {"a":\n', b"data: 1}\n", b"\n",
           b"data: plain\r\n", b"\r\n", b"event: revoked\n", b"\n"]
    events = list(parse_events(raw))
    assert events == [None, Event("assignment", '{"a":\n1}', '"abc"', 5000), Event("message", "plain", '"abc"', None)]


def test_backoff_grows_to_a_cap_with_jitter_and_retries_end_with_a_clear_error():
    options = RetryOptions(attempts=4, base_s=0.5, max_s=4.0, jitter=0.5)
    assert [backoff_delay(n, options, rng=lambda: 0.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_delay(2, options, rng=lambda: 1.0) == 1.0, "jitter takes up to half off"

    calls = []

    def unreachable():
        calls.append(time.monotonic())
        raise ServerUnreachableError("connection refused")

    fast = RetryOptions(attempts=3, base_s=0.01, max_s=0.02)
    with pytest.raises(ServerUnreachableError, match=r"^saying hello: gave up after 3 tries \(connection refused\)$"):
        with_retries(unreachable, fast, what="saying hello")
    assert len(calls) == 3

    refused = ServerRejectedError("no", status=401, code="bad_token")
    with pytest.raises(ServerRejectedError):
        with_retries(lambda: (_ for _ in ()).throw(refused), fast, what="x")

    moving = iter([True, True, True, True, False, False, False])
    count = []

    def slow_but_moving():
        count.append(1)
        raise ServerUnreachableError("broke off")

    with pytest.raises(ServerUnreachableError):
        with_retries(slow_but_moving, fast, what="download", progressed=lambda: next(moving))
    assert len(count) == 6, "tries that made progress start the count again (4 moving, then 2 more)"


def test_the_outbox_keeps_order_across_reopening_and_drops_old_telemetry_first(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_rows=3)
    keys = [outbox.put("status", "/s", {"n": 0}), outbox.put("telemetry", "/t", {"n": 1}), outbox.put("telemetry", "/t", {"n": 2})]
    outbox.close()

    again = Outbox(path, max_rows=3)
    assert [(m.key, m.body["n"]) for m in again.peek()] == list(zip(keys, [0, 1, 2]))
    again.put("telemetry", "/t", {"n": 3})
    assert [m.body["n"] for m in again.peek()] == [0, 2, 3], "full: the oldest telemetry goes, status stays"
    first = again.peek()[0]
    again.failed(first.id, "connection refused")
    again.sent(first.id)
    assert [m.body["n"] for m in again.peek()] == [2, 3] and again.count() == 2
    again.close()


def test_telemetry_counts_survive_a_restart_and_become_one_report(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    recorder = TelemetryRecorder(outbox, "/v1/devices/d/telemetry", period_s=3600)
    for score, ms in ((0.95, 3.0), (0.42, 5.0), (0.97, 40.0)):
        recorder.record(2, score, ms, fallback=score < 0.5)
    recorder.record(2, None, 1.0, error=True)
    recorder.checkpoint()
    outbox.close()  # the agent dies here: nothing queued yet, the counts are on disk

    outbox = Outbox(path)
    recorder = TelemetryRecorder(outbox, "/v1/devices/d/telemetry", period_s=3600)
    recorder.record(2, 0.91, 4.0)
    assert recorder.close_due(force=True) == 1
    [message] = outbox.peek()
    report = message.body
    assert (message.kind, message.path) == ("telemetry", "/v1/devices/d/telemetry")
    assert (report["version"], report["predictions"], report["fallbacks"], report["errors"]) == (2, 4, 1, 1)
    assert report["fallback_rate"] == 0.25 and sum(report["confidence_histogram"]) == 4
    assert report["confidence_histogram"][9] == 3 and report["confidence_histogram"][4] == 1
    assert 4.0 <= report["latency_ms"]["p50"] <= 4.0 * 1.415 and report["latency_ms"]["p99"] >= 40.0
    assert recorder.close_due(force=True) == 0
    outbox.close()


class FakeServable:
    def __init__(self, version: int) -> None:
        self.ref = ModelRef("m", version)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_swap_never_closes_a_version_a_request_still_uses():
    handle = ServableHandle()
    v1, v2 = FakeServable(1), FakeServable(2)
    handle.swap(v1)
    with handle.acquire() as in_flight:
        assert handle.swap(v2) is v1
        assert in_flight is v1 and not v1.closed, "the request in flight keeps v1 open"
        with handle.acquire() as next_request:
            assert next_request is v2
    assert v1.closed and not v2.closed

    v3 = FakeServable(3)
    release = threading.Event()

    def slow_request() -> None:
        with handle.acquire():
            release.wait(5)

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(0.05)
    threading.Timer(0.1, release.set).start()
    started = time.monotonic()
    handle.swap(None, wait_s=5)  # the resource-preserving policy unloads first, waiting for the request
    assert 0.05 < time.monotonic() - started < 2 and v2.closed
    worker.join()
    handle.swap(v3)
    assert handle.current is v3


def test_health_rolls_back_on_errors_once_and_counts_crashes_across_restarts(tmp_path):
    policy = HealthPolicy(min_requests=4, max_error_rate=0.25, max_crashes=2, probation_s=60)
    calls = []
    state = AgentState(tmp_path / "state.json")
    monitor = HealthMonitor(policy, state, lambda ref, reason, details: calls.append((ref, reason, details)))
    v2 = ModelRef("m", 2)
    monitor.watch(v2, ModelRef("m", 1))
    monitor.record(ModelRef("m", 1), error=True)  # not on probation: ignored
    for error in (False, True, False, True, True, True):
        monitor.record(v2, error=error)
    assert len(calls) == 1, "fires once"
    assert calls[0][1] == "2 of 4 requests failed on m v2 (50%, above the 25% limit)"

    assert state.start_run() is False
    crashed = AgentState(tmp_path / "state.json")  # the process died without stop_run
    assert crashed.start_run() is True
    calls.clear()
    HealthMonitor(policy, crashed, lambda *a: calls.append(a)).after_crash(v2)
    assert calls == []
    again = AgentState(tmp_path / "state.json")
    assert again.start_run() is True
    HealthMonitor(policy, again, lambda *a: calls.append(a)).after_crash(v2)
    assert calls and calls[0][1] == "the agent crashed 2 times running m v2 (limit 2)"


def test_assignments_are_checked_before_anything_is_downloaded():
    files = {name: {"sha256": "a" * 64, "size": 1, "url": f"/v1/artifacts/{'a' * 64}"} for name in ("model.tflite", "manifest.json", "labels.txt")}
    assert Assignment.from_json({"model": "m", "version": 3, "files": files}, '"e"').ref == ModelRef("m", 3)
    assert Assignment.from_json({"model": "m", "version": None}).ref is None
    with pytest.raises(ValueError, match="unexpected file '../../etc/passwd'"):
        Assignment.from_json({"model": "m", "version": 1, "files": {**files, "../../etc/passwd": files["labels.txt"]}})
    with pytest.raises(ValueError, match="is not a sha256"):
        Assignment.from_json({"model": "m", "version": 1, "files": {**files, "model.tflite": {**files["model.tflite"], "sha256": "../x"}}})
    with pytest.raises(ValueError, match="lists no labels.txt"):
        Assignment.from_json({"model": "m", "version": 1, "files": {k: v for k, v in files.items() if k != "labels.txt"}})


def test_the_local_api_takes_raw_bytes_or_a_multipart_upload():
    assert _photo_from(b"\xff\xd8jpeg", "image/jpeg", "shelf.jpg") == (b"\xff\xd8jpeg", "shelf.jpg")
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"mug.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\nbytes\r\n--XyZ--\r\n")
    assert _photo_from(body, "multipart/form-data; boundary=XyZ", None) == (b"\x89PNG\r\n\x1a\nbytes", "mug.png")


def test_options_refuse_nonsense_with_a_sentence():
    with pytest.raises(ValueError, match="the policy must be one of availability, resource"):
        AgentOptions(policy="fast")
    with pytest.raises(ValueError, match="the poll interval must be a positive number"):
        AgentOptions(poll_interval_s=0)


def test_the_agent_imports_no_tensorflow():
    code = ("import sys, edge_runtime.agent, edge_runtime.agent.cli, edge_runtime.agent.daemon, converter.smoke; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_an_unsure_photo_asks_the_server_within_its_timeout_and_keeps_the_edge_answer_when_it_is_away():
    from edge_runtime.agent.serving import Classify
    from edge_runtime.fallback import FallbackClient, FallbackOptions
    from edge_runtime.results import Category
    from tests.agent_support import free_port

    class Unsure(FakeServable):
        threshold = 0.6

        def classify(self, data, top_k):  # noqa: ANN001, ANN201
            return (Category("mug", 0.41), Category("bottle", 0.30))[:top_k], 2.0

    handle = ServableHandle()
    handle.swap(Unsure(4))
    recorded, health = [], []
    fallback = FallbackClient(FallbackOptions(f"http://127.0.0.1:{free_port()}", timeout_s=1.0, token="dt_x"))
    classify = Classify(handle, AgentOptions(), fallback=fallback, record=lambda *a, **k: recorded.append((a, k)),
                        health=lambda ref, error: health.append(error))
    started = time.monotonic()
    status, result = classify(b"photo", "shelf.jpg", 1, "auto")
    assert time.monotonic() - started < 1.5
    assert status == 200 and result.label == "mug" and result.source == "edge" and result.model_version == 4
    assert result.fallback.startswith("unavailable: the server is unreachable")
    assert [c.label for c in result.categories] == ["mug"]
    assert recorded[0][0][:2] == (4, 0.41) and recorded[0][1]["fallback"] is True and recorded[0][1]["low_confidence"] is True and health == [False]

    handle.swap(None)
    status, result = classify(b"photo", None, 3, "auto")
    assert status == 503 and result.error["code"] == "no_model" and result.to_dict()["model"] is None


def test_the_public_surface_is_what_all_lists():
    import edge_runtime.agent as agent

    public = {name for name in dir(agent) if not name.startswith("_") and not isinstance(getattr(agent, name), type(agent))}
    assert public == set(agent.__all__)


def test_the_smoke_test_module_loads_without_litert_for_devices_on_other_interpreters():
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['ai_edge_litert'] = None; sys.modules['ai_edge_litert.interpreter'] = None; "
        "import converter.smoke, edge_runtime.agent.servable; print('ok')"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"


def test_enrolment_pins_a_key_ring_as_it_is(tmp_path):
    """A device may be enrolled with the current publisher key and the next one in one file."""
    from converter.signing import write_keypair
    from edge_runtime.agent.config import AgentPaths
    from edge_runtime.agent.enroll import _pin_key
    from edge_runtime.agent.errors import AgentError

    _, current = write_keypair(tmp_path / "current")
    _, upcoming = write_keypair(tmp_path / "next")
    ring = tmp_path / "ring.pub"
    ring.write_bytes(current.read_bytes() + upcoming.read_bytes())
    paths = AgentPaths.at(tmp_path / "home")
    _pin_key(paths, ring)
    assert (paths.home / "trusted.pub").read_bytes() == ring.read_bytes()
    (tmp_path / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(AgentError, match="--public-key"):
        _pin_key(paths, tmp_path / "bad.pub")


def test_a_photo_that_finds_the_decode_budget_full_gets_503_busy_and_counts_against_no_model():
    import io

    from PIL import Image

    from edge_runtime.agent.serving import Classify
    from preprocessing import DecodeBudget, load_image

    budget = DecodeBudget(8 << 20, wait_s=0.05)

    class Decoding(FakeServable):
        threshold = 0.5

        def classify(self, data, top_k):  # noqa: ANN001, ANN201
            load_image(data, budget=budget)  # the real decode, inside a budget other photos hold
            raise AssertionError("the budget was full: the photo cannot have decoded")

    photo = io.BytesIO()
    Image.new("RGB", (640, 480), "white").save(photo, "PNG")
    handle = ServableHandle()
    handle.swap(Decoding(3))
    recorded, health = [], []
    classify = Classify(handle, AgentOptions(), fallback=None, record=lambda *a, **k: recorded.append((a, k)),
                        health=lambda ref, error: health.append(error))
    with budget.reserve(8 << 20):  # other photos are being decoded
        status, result = classify(photo.getvalue(), "shelf.png", 1, "auto")
    assert status == 503 and result.error["code"] == "busy" and result.model_version == 3
    assert health == [] and recorded == [], "a busy decoder is not a failure of the model"
