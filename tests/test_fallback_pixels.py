"""An unsure kiosk sends the server the pixels it fed its own model, not the photo: compact, no second decode.

The server is real (uvicorn, the embedded SavedModel); the device is `edge-classify --server` and the
fallback client it uses. Bytes on the wire are counted by a TCP relay between the two, at the server's door.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.cli import main
from edge_runtime.fallback import FallbackClient, FallbackOptions, PixelPayload
from preprocessing import PreprocessSpec, normalise, preprocess, preprocess_pixels
from sync_server import BatchingOptions, UploadLimits
from sync_server.config import ThrottleOptions
from tests.server_fixtures import MODEL, live_server, publisher, running_server, server_config  # noqa: F401

PIXEL_ROUTE = "/v1/models/{name}/predict/pixels"
#: The answer for pixels and for the photo they came from: probabilities this close, the same top-1.
TOLERANCE = 1e-5


class CountingRelay:
    """A TCP relay in front of the server that counts the bytes each connection sends to the server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent: list[int] = []  # per connection, device -> server
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30)
            with self._lock:
                index = len(self.sent)
                self.sent.append(0)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, index), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, index: int | None) -> None:
        try:
            while data := source.recv(65536):
                if index is not None:
                    with self._lock:
                        self.sent[index] += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> list[int]:
        with self._lock:
            sent, self.sent = self.sent, []
        return sent

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


@pytest.fixture(scope="module")
def server(publisher, tmp_path_factory):
    """One server for the module (the SavedModel loads once), v1 and v2 published, stable -> v1."""
    config = server_config(
        tmp_path_factory.mktemp("pixels"), None, publisher,
        batching=BatchingOptions(max_batch_size=8, max_wait_ms=5, num_batch_threads=1),
        limits=UploadLimits(max_image_bytes=2_000_000),
        throttle=ThrottleOptions(enabled=False),
    )
    with live_server(config) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        yield server


@pytest.fixture(scope="module")
def spec(publisher) -> PreprocessSpec:
    """The version's float spec (what the server normalises with)."""
    return PreprocessSpec.from_json((publisher.saved_model / "preprocess_spec.json").read_text())


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.astronaut()).save(out, "JPEG", quality=90)
    return out.getvalue()


def _send_pixels(server, device, body: bytes, shape: str, digest: str, content_type: str = "application/x-edge-pixels", **params):
    headers = {**device.headers, "Content-Type": content_type, "X-Pixels-Shape": shape, "X-Spec-Digest": digest}
    return server.client.post(f"/v1/models/{MODEL}/predict/pixels", headers=headers, content=body, params=params)


def _other_fit(spec: PreprocessSpec) -> str:
    return next(fit for fit in ("center_crop", "pad", "stretch") if fit != spec.fit)


def _scores(answer: dict) -> dict[str, float]:
    return {c["label"]: c["score"] for c in answer["top_k"]}


# --- the spec digest ----------------------------------------------------------------------------


def test_the_pixel_digest_covers_geometry_not_normalisation(spec):
    int8 = spec.replace(dtype="int8", quantization=(0.0078125, 0))
    assert int8.pixels_digest() == spec.pixels_digest(), "an int8 bundle's pixels are the float spec's pixels"
    assert spec.replace(mean=(0.5, 0.5, 0.5)).pixels_digest() == spec.pixels_digest()
    for change in ({"height": spec.height + 1}, {"width": spec.width + 1}, {"fit": _other_fit(spec)}, {"resize": "nearest"},
                   {"jpeg_draft": not spec.jpeg_draft}, {"pad_color": (0, 0, 0)}):
        assert spec.replace(**change).pixels_digest() != spec.pixels_digest(), change
    assert len(spec.pixels_digest()) == 64 and spec.pixels_digest() == PreprocessSpec.from_json(spec.to_json()).pixels_digest()


def test_normalised_pixels_are_exactly_the_tensor_preprocess_makes(spec, astronaut_jpeg):
    int8 = spec.replace(dtype="int8", quantization=(0.0078125, 0))
    for s in (spec, int8, spec.replace(fit="pad"), spec.replace(fit="stretch", jpeg_draft=False)):
        pixels = preprocess_pixels(astronaut_jpeg, s)
        assert pixels.dtype == np.uint8 and pixels.shape == s.pixel_shape
        np.testing.assert_array_equal(normalise(pixels, s), preprocess(astronaut_jpeg, s))
    with pytest.raises(ValueError, match="uint8 pixels of shape"):
        normalise(np.zeros((spec.height + 1, spec.width, 3), np.uint8), spec)


# --- the server -------------------------------------------------------------------------------


def test_pixels_get_the_same_answer_as_the_photo_they_came_from(server, spec, astronaut_jpeg, publisher):
    device = server.enroll()
    pixels = preprocess_pixels(astronaut_jpeg, spec)
    k = len(publisher.labels)
    by_photo = device.predict(astronaut_jpeg, top_k=k)
    by_pixels = _send_pixels(server, device, pixels.tobytes(), f"{spec.height}x{spec.width}x3", spec.pixels_digest(), top_k=k)
    assert by_photo.status_code == 200 and by_pixels.status_code == 200, by_pixels.text
    assert by_pixels.json()["model"] == by_photo.json()["model"] == {"name": MODEL, "version": 1}
    photo_scores, pixel_scores = _scores(by_photo.json()), _scores(by_pixels.json())
    assert by_pixels.json()["top_k"][0]["label"] == by_photo.json()["top_k"][0]["label"]
    assert set(pixel_scores) == set(publisher.labels)
    assert all(abs(pixel_scores[label] - photo_scores[label]) <= TOLERANCE for label in publisher.labels)


def test_pixels_from_another_spec_are_refused_naming_both_digests(server, spec, astronaut_jpeg):
    device = server.enroll()
    other = spec.replace(fit=_other_fit(spec))  # same shape, other pixels: only the digest can tell
    pixels = preprocess_pixels(astronaut_jpeg, other)
    response = _send_pixels(server, device, pixels.tobytes(), f"{spec.height}x{spec.width}x3", other.pixels_digest())
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "spec_mismatch"
    assert other.pixels_digest() in error["message"] and spec.pixels_digest() in error["message"]


def test_pixels_of_the_wrong_shape_length_or_type_are_refused(server, spec):
    device = server.enroll()
    h, w = spec.height, spec.width
    good = bytes(h * w * 3)
    cases = [
        (good, f"{h + 1}x{w}x3", "application/x-edge-pixels", 400, "bad_shape"),
        (good[:-1], f"{h}x{w}x3", "application/x-edge-pixels", 400, "bad_length"),
        (good + b"\0", f"{h}x{w}x3", "application/x-edge-pixels", 400, "bad_length"),
        (b"", f"{h}x{w}x3", "application/x-edge-pixels", 400, "bad_length"),
        (good, f"{h}x{w}x4", "application/x-edge-pixels", 422, "invalid_request"),
        (good, f"{h}x{w}x3", "application/octet-stream", 415, "unsupported_media_type"),
    ]
    for body, shape, content_type, status, code in cases:
        response = _send_pixels(server, device, body, shape, spec.pixels_digest(), content_type)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (shape, len(body), response.text)
        assert response.json()["error"]["message"]
    missing_digest = server.client.post(f"/v1/models/{MODEL}/predict/pixels", content=good, headers={
        **device.headers, "Content-Type": "application/x-edge-pixels", "X-Pixels-Shape": f"{h}x{w}x3"})
    assert missing_digest.status_code == 422 and "X-Spec-Digest" in missing_digest.json()["error"]["message"]
    other_model = server.client.post("/v1/models/other/predict/pixels", content=good, headers={
        **device.headers, "Content-Type": "application/x-edge-pixels", "X-Pixels-Shape": f"{h}x{w}x3", "X-Spec-Digest": spec.pixels_digest()})
    assert other_model.status_code == 403 and other_model.json()["error"]["code"] == "forbidden"


def test_pixel_predictions_share_the_devices_throttle_bucket(publisher, spec, tmp_path):
    config = server_config(tmp_path / "data", None, publisher, throttle=ThrottleOptions(predict_per_s=0.01, predict_burst=2))
    with running_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        wrong = "0" * 64  # answered 409 without running the model: only the bucket matters here
        shape = f"{spec.height}x{spec.width}x3"
        statuses = [_send_pixels(server, device, bytes(spec.height * spec.width * 3), shape, wrong).status_code for _ in range(2)]
        throttled = _send_pixels(server, device, bytes(spec.height * spec.width * 3), shape, wrong)
        assert statuses == [409, 409]
        assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "rate_limited"
        assert int(throttled.headers["Retry-After"]) >= 1
        assert device.predict(b"any photo").status_code == 429, "photos and pixels take from one bucket"


def test_the_python_client_sends_pixels_and_names_a_mismatch(server, spec, astronaut_jpeg):
    from sync_server.client import SyncServerClient
    from sync_server.errors import ConflictError
    from tests.server_fixtures import ADMIN_TOKEN

    pixels = preprocess_pixels(astronaut_jpeg, spec).tobytes()
    with SyncServerClient(server.url, ADMIN_TOKEN, timeout_s=30) as client:
        answer = client.predict_pixels(MODEL, pixels, spec.height, spec.width, spec.pixels_digest(), version=2, top_k=2)
        assert answer["model"] == {"name": MODEL, "version": 2} and len(answer["top_k"]) == 2
        by_photo = client.predict(MODEL, astronaut_jpeg, version=2, top_k=2)["top_k"]
        assert [c["label"] for c in answer["top_k"]] == [c["label"] for c in by_photo]
        assert [c["score"] for c in answer["top_k"]] == pytest.approx([c["score"] for c in by_photo], abs=TOLERANCE)
        with pytest.raises(ConflictError, match="spec digest") as refused:
            client.predict_pixels(MODEL, pixels, spec.height, spec.width, "f" * 64, version=2)
        assert refused.value.code == "spec_mismatch"


class SlowPredictor:
    """A backend that takes `delay_s` per batch and answers uniform scores; it keeps the batches it got."""

    kind = "slow_standin"

    def __init__(self, labels: int, delay_s: float) -> None:
        self.labels, self.delay_s, self.batches = labels, delay_s, []

    async def predict(self, name, version, batch, *, timeout_s=None):  # type: ignore[no-untyped-def]
        import asyncio

        self.batches.append(batch)
        await asyncio.sleep(self.delay_s)
        return np.full((len(batch), self.labels), 1.0 / self.labels, dtype=np.float32)

    async def model_status(self, name):  # type: ignore[no-untyped-def]
        return {1: "AVAILABLE"}

    async def ready(self):  # type: ignore[no-untyped-def]
        return None

    async def aclose(self) -> None:
        pass


def test_pixels_reach_the_backend_as_the_float_tensor_and_keep_the_deadline(publisher, spec, astronaut_jpeg, tmp_path):
    predictor = SlowPredictor(len(publisher.labels), delay_s=0.0)
    config = server_config(tmp_path / "data", None, publisher, throttle=ThrottleOptions(enabled=False), predict_deadline_s=0.5)
    with running_server(config, predictor=predictor) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        pixels = preprocess_pixels(astronaut_jpeg, spec)
        shape = f"{spec.height}x{spec.width}x3"
        assert _send_pixels(server, device, pixels.tobytes(), shape, spec.pixels_digest()).status_code == 200
        [batch] = predictor.batches
        np.testing.assert_array_equal(batch[0], preprocess(astronaut_jpeg, spec))  # normalised with the float spec
        predictor.delay_s = 5.0
        late = _send_pixels(server, device, pixels.tobytes(), shape, spec.pixels_digest())
        assert late.status_code == 503 and late.json()["error"]["code"] == "deadline_exceeded"
        assert "Retry-After" in late.headers


# --- the device -------------------------------------------------------------------------------


@pytest.fixture
def kiosk(tmp_path, monkeypatch, publisher, server):
    """A device enrolled with the server, trusting the publisher's key, its bundle v1 on disk."""
    home = tmp_path / "device"
    home.mkdir()
    shutil.copy(publisher.public_key, home / "trusted.pub")
    monkeypatch.setenv("EDGE_CLASSIFY_HOME", str(home))
    monkeypatch.delenv("EDGE_CLASSIFY_SERVER", raising=False)
    monkeypatch.delenv("EDGE_CLASSIFY_PUBLIC_KEY", raising=False)
    device = server.enroll()
    monkeypatch.setenv("EDGE_CLASSIFY_TOKEN", device.token)
    relay = CountingRelay(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    yield relay
    relay.close()


def _classify(capsys, relay: CountingRelay, photo: Path, bundle: Path) -> dict:
    code = main([str(photo), "--model", str(bundle), "--json", "--server", relay.url, "--threshold", "1.0", "--timeout", "30"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = [json.loads(x) for x in out.splitlines() if x.strip()]
    return line


def test_an_unsure_kiosk_sends_its_pixels_not_the_photo(kiosk, publisher, spec, astronaut_jpeg, tmp_path, capsys, server):
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg)
    result = _classify(capsys, kiosk, photo, publisher.bundles[1])
    assert result["source"] == "server" and result["fallback"] == "answered", result
    [sent] = kiosk.take()
    pixels = spec.height * spec.width * 3
    assert pixels <= sent < pixels + 1024, f"{sent} bytes for {pixels} bytes of pixels"
    assert sent < len(astronaut_jpeg)
    # The server's answer is the photo route's answer for the same photo.
    by_photo = server.enroll().predict(astronaut_jpeg, top_k=len(result["top_k"])).json()
    assert result["top_k"][0]["label"] == by_photo["top_k"][0]["label"]
    assert [c["score"] for c in result["top_k"]] == pytest.approx([c["score"] for c in by_photo["top_k"]], abs=TOLERANCE)


@pytest.fixture
def old_server(publisher, tmp_path):
    """This server as it was before the pixel route (404 `not_found` at routing), behind a counting relay."""
    from sync_server.api import predict

    routes = predict.router.routes
    [pixel_route] = [r for r in routes if getattr(r, "path", None) == PIXEL_ROUTE]
    routes.remove(pixel_route)
    try:
        config = server_config(tmp_path / "old", None, publisher, throttle=ThrottleOptions(enabled=False))
        with live_server(config) as server:
            server.publish_ok(publisher, 1, channel="stable")
            relay = CountingRelay(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
            yield server, relay
            relay.close()
    finally:
        routes.append(pixel_route)


def test_an_older_server_without_the_pixel_route_gets_the_photo_once_asked(old_server, spec, astronaut_jpeg):
    server, relay = old_server
    device = server.enroll()
    refused = _send_pixels(server, device, b"", "1x1x3", "0" * 64)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", refused.text
    client = FallbackClient(FallbackOptions(relay.url, timeout_s=30, token=device.token))
    payload = PixelPayload.from_array(preprocess_pixels(astronaut_jpeg, spec), spec)
    first = client.predict(astronaut_jpeg, MODEL, 1, 3, payload)
    assert first.model_version == 1 and len(first.categories) == 3
    assert not client.sends_pixels, "the client remembers that this server takes photos only"
    tried, resent = relay.take()
    assert spec.height * spec.width * 3 <= tried < spec.height * spec.width * 3 + 1024
    assert len(astronaut_jpeg) <= resent < len(astronaut_jpeg) + 1024
    second = client.predict(astronaut_jpeg, MODEL, 1, 3, payload)
    [only_photo] = relay.take()
    assert len(astronaut_jpeg) <= only_photo < len(astronaut_jpeg) + 1024, "no second pixel attempt"
    assert second.categories == first.categories


def test_a_refusal_about_the_caller_or_the_model_is_not_taken_for_an_old_server(kiosk, spec, astronaut_jpeg):
    from edge_runtime.errors import FallbackUnavailableError
    from tests.server_fixtures import ADMIN_TOKEN

    payload = PixelPayload.from_array(preprocess_pixels(astronaut_jpeg, spec), spec)
    for token, model, answer in ((None, MODEL, "HTTP 401"), (ADMIN_TOKEN, "other", "HTTP 404: .*other")):
        client = FallbackClient(FallbackOptions(kiosk.url, timeout_s=30, token=token))
        with pytest.raises(FallbackUnavailableError, match=answer):
            client.predict(astronaut_jpeg, model, 1, 3, payload)
        assert len(kiosk.take()) == 1 and client.sends_pixels, "one request: the pixel route answered"


def test_the_agents_local_api_sends_pixels_too(kiosk, publisher, spec, astronaut_jpeg, server, tmp_path):
    """The agent's Classify (behind its local HTTP API) asks the server with the pixels it ran."""
    from types import SimpleNamespace

    from edge_runtime.agent.servable import ServableHandle, make_loader
    from edge_runtime.agent.serving import Classify

    handle = ServableHandle()
    handle.swap(make_loader(publisher.public_key, tmp_path / "store")(publisher.bundles[1]))
    device = server.enroll()
    client = FallbackClient(FallbackOptions(kiosk.url, timeout_s=30, token=device.token))
    classify = Classify(handle, SimpleNamespace(fallback_threshold=None), fallback=client,  # type: ignore[arg-type]
                        record=lambda *a, **k: None, health=lambda *a, **k: None)
    status, result = classify(astronaut_jpeg, "astronaut.jpg", 3, "always")
    assert status == 200 and result.source == "server" and result.fallback == "answered", result
    [sent] = kiosk.take()
    assert spec.height * spec.width * 3 <= sent < spec.height * spec.width * 3 + 1024
    handle.swap(None)


@pytest.fixture
def standin():
    """A server that reads any request's body and answers one fixed top-k (for specs the real model lacks)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"model": {"name": MODEL, "version": 1}, "top_k": [{"label": "a", "score": 1.0}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    relay = CountingRelay(httpd.server_address[:2])
    yield relay
    relay.close()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("size", [32, 96, 224])
def test_bytes_on_the_wire_per_photo(size, standin, astronaut_jpeg, capsys):
    """Device -> server bytes of one pixel request (request line, headers, body) for a `size` x `size` model."""
    spec = PreprocessSpec(height=size, width=size)
    payload = PixelPayload.from_array(preprocess_pixels(astronaut_jpeg, spec), spec)
    client = FallbackClient(FallbackOptions(standin.url, timeout_s=30, token="t" * 43))  # a device token's length
    client.predict(astronaut_jpeg, MODEL, 1, 5, payload)
    [sent] = standin.take()
    with capsys.disabled():
        print(f"\n{size}x{size}: {sent} bytes device -> server ({size * size * 3} pixels + {sent - size * size * 3} "
              f"request line and headers); the photo is {len(astronaut_jpeg)} bytes")
    assert size * size * 3 <= sent < size * size * 3 + 1024
    if size == 224:
        assert sent <= 160 * 1024, "the issue's target: at most 160 KB per photo for a 224x224 model"
