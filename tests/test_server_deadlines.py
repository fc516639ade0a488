"""A slow TF Serving: every fallback prediction is answered by its deadline, however many wait.

Devices send photos to the full model while TF Serving takes far longer than the server's timeout
(it is overloaded). Each request gets 503 with Retry-After at its deadline, not after waiting in the
batcher behind earlier batches; requests whose deadline passed in the queue never reach TF Serving.
"""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from sync_server import BatchingOptions, TFServingOptions
from sync_server.config import ThrottleOptions
from tests.server_fixtures import MODEL, live_server, photo_bytes, publisher, server_config  # noqa: F401
from tests.tf_serving_standin import TFServingStandin

DEADLINE_S = 3.0
#: What an answer may take past its deadline on a loaded 2-core test machine (HTTP, event loop, the
#: load generator in the same process). Without deadlines the last 503 came after 2-4 deadlines.
MARGIN_S = 2.0


@dataclass
class Answer:
    seconds: float  # from the request's last byte sent to the answer's last byte received
    status: int
    headers: dict[str, str]
    body: dict


def concurrent_requests(port: int, request: bytes, count: int, timeout_s: float = 60.0) -> list[Answer]:
    """Send `request` (raw HTTP/1.1) on `count` connections at once; time each answer from its own send.

    Raw sockets, all connected before the first request goes out, so the time measured is the
    server's and not the load generator's (an HTTP client running 200 requests in one process adds
    seconds of its own).
    """
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    sent_at: dict[socket.socket, float] = {}
    received: dict[socket.socket, bytearray] = {s: bytearray() for s in socks}
    answers: dict[socket.socket, Answer] = {}
    try:
        for sock in socks:
            sock.sendall(request)
            sent_at[sock] = time.monotonic()
            sock.setblocking(False)
        deadline = time.monotonic() + timeout_s
        while len(answers) < count and time.monotonic() < deadline:
            pending = [s for s in socks if s not in answers]
            for sock in select.select(pending, [], [], 0.5)[0]:
                data = sock.recv(65536)
                received[sock] += data
                answer = _parse(bytes(received[sock]), closed=not data)
                if answer is not None:
                    status, headers, body = answer
                    answers[sock] = Answer(time.monotonic() - sent_at[sock], status, headers, body)
    finally:
        for sock in socks:
            sock.close()
    assert len(answers) == count, f"{count - len(answers)} of {count} requests got no answer in {timeout_s:g} s"
    return list(answers.values())


def _parse(data: bytes, closed: bool) -> tuple[int, dict[str, str], dict] | None:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "-1"))
    if length >= 0 and len(body) < length and not closed:
        return None
    return int(lines[0].split()[1]), headers, json.loads(body[:length] if length >= 0 else body)


def predict_request(token: str, photo: bytes, model: str = MODEL) -> bytes:
    head = (
        f"POST /v1/models/{model}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(photo)}\r\n\r\n"
    )
    return head.encode() + photo


@pytest.fixture(scope="module")
def slow_tf_serving(publisher, tmp_path_factory):
    """A server whose TF Serving is fast or slow (`predict_delay_s`), with a 3 s timeout."""
    data = tmp_path_factory.mktemp("deadlines") / "data"
    with TFServingStandin(data / "tf-serving" / "models.config") as tfs:
        options = TFServingOptions(url=tfs.url, timeout_s=DEADLINE_S, status_poll_s=0.05, load_timeout_s=30, retry_after_s=3)
        config = server_config(
            data, None, publisher, tf_serving=options, throttle=ThrottleOptions(enabled=False),
            batching=BatchingOptions(max_batch_size=32, max_wait_ms=2, num_batch_threads=2),
        )
        with live_server(config) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            tfs.wait_available(MODEL, 1)
            yield server, tfs


@pytest.mark.parametrize("count", [64, 200])
def test_under_a_slow_tf_serving_every_request_gets_503_by_its_deadline(slow_tf_serving, demo_dataset, count):
    server, tfs = slow_tf_serving
    device = server.enroll()
    photo = photo_bytes(demo_dataset, "mug")
    tfs.predict_delay_s = 0.0
    assert device.predict(photo).status_code == 200, "a fast TF Serving answers"

    tfs.predict_delay_s = 20.0
    try:
        answers = concurrent_requests(urlsplit(server.url).port, predict_request(device.token, photo), count)
    finally:
        tfs.predict_delay_s = 0.0
    seconds = sorted(a.seconds for a in answers)
    assert {a.status for a in answers} == {503}, [a.body for a in answers if a.status != 503][:3]
    assert {a.body["error"]["code"] for a in answers} <= {"deadline_exceeded", "backend_timeout"}
    assert all(a.headers["retry-after"] == "3" for a in answers)
    assert seconds[-1] < DEADLINE_S + MARGIN_S, (
        f"with {count} concurrent requests the last 503 came after {seconds[-1]:.2f} s (deadline {DEADLINE_S:g} s)"
    )
