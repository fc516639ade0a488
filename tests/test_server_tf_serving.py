"""The full model behind TF Serving: the server writes the repository and config, TF Serving loads it.

The TF Serving here is `tests/tf_serving_standin.py`: TF Serving's documented REST API over the real
SavedModels, including its refusal of labels on versions that are not loaded yet.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from sync_server import TFServingOptions
from sync_server.errors import BackendFailedError, BackendUnavailableError
from sync_server.predict.json_tensor import encode_float_tensor
from sync_server.predict.tf_serving import TFServingClient
from tests.server_fixtures import MODEL, live_server, photo_bytes, publisher, running_server, server_config  # noqa: F401
from tests.tf_serving_standin import TFServingStandin, read_model_config


def _config(data, publisher, url, **overrides):
    options = TFServingOptions(url=url, status_poll_s=0.05, load_timeout_s=20, retries=2, retry_backoff_s=0.01, retry_after_s=7)
    return server_config(data, None, publisher, tf_serving=options, **overrides)


def test_the_standin_speaks_tf_servings_documented_rest_api(publisher, tmp_path):
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    import shutil

    shutil.copytree(publisher.saved_model, repo / "m" / "1")
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{repo / "m"}" model_platform: "tensorflow" }} }}')
    with TFServingStandin(config) as tfs:
        tfs.wait_available("m", 1)
        status = httpx.get(f"{tfs.url}/v1/models/m").json()
        assert status == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        x = np.zeros((2, 32, 32, 3), np.float32)
        rows = httpx.post(f"{tfs.url}/v1/models/m:predict", json={"instances": x.tolist()}).json()
        assert np.asarray(rows["predictions"]).shape == (2, len(publisher.labels))
        columns = httpx.post(f"{tfs.url}/v1/models/m/versions/1:predict", json={"inputs": x.tolist()}).json()
        assert np.allclose(columns["outputs"], rows["predictions"])
        metadata = httpx.get(f"{tfs.url}/v1/models/m/metadata").json()
        assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]

        for method, path, body, status_code, message in [
            ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
            ("POST", "/v1/models/m/versions/9:predict", {"instances": x.tolist()}, 404, "Servable not found for request: Specific(m, 9)"),
            ("POST", "/v1/models/m/labels/canary:predict", {"instances": x.tolist()}, 400, "Unrecognized servable version label: canary"),
            ("POST", "/v1/models/m:predict", {"instances": [{"b64": "AAAA"}]}, 400, "is not of expected type: float"),
            ("POST", "/v1/models/m:predict", {"signature_name": "nope", "instances": x.tolist()}, 400, 'Serving signature name: "nope" not found'),
        ]:
            response = httpx.request(method, tfs.url + path, json=body)
            assert response.status_code == status_code and message in response.json()["error"], (path, response.text)


def test_the_json_tensor_is_exact_and_smaller_than_json_dumps():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    x = (pixels * np.float32(1 / 127.5) - np.float32(1.0)).astype(np.float32)
    text = encode_float_tensor(x)
    back = np.asarray(json.loads(text), dtype=np.float32)
    assert back.shape == x.shape and np.array_equal(back, x), "bit-for-bit the same float32 tensor"
    assert len(text) < 0.6 * len(json.dumps(x.tolist()))
    with pytest.raises(ValueError):
        encode_float_tensor(np.array([np.nan], np.float32))


def test_predictions_go_through_tf_serving_and_labels_move_only_onto_loaded_versions(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    config_file = data / "tf-serving" / "models.config"
    with TFServingStandin(config_file, load_delay_s=0.4) as tfs:
        with running_server(_config(data, publisher, tfs.url)) as server:
            server.publish_ok(publisher, 1, 2)
            server.set_channel(1)
            server.wait_serving_idle()
            (served,) = read_model_config(config_file.read_text())
            assert (served.policy, served.labels) == (("specific", {1}), {"stable": 1})

            device = server.enroll()
            photo = photo_bytes(demo_dataset, "sneaker")
            answer = device.predict(photo, top_k=6)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == {"name": MODEL, "version": 1}
            assert tfs.requests[-1] == f"POST /v1/models/{MODEL}/versions/1:predict"

            # Moving stable to v2: first the config loads v2 with the label still on v1 ...
            server.set_channel(2)
            deadline = time.monotonic() + 5
            seen = []
            while time.monotonic() < deadline:
                (served,) = read_model_config(config_file.read_text())
                seen.append((frozenset(served.policy[1]), served.labels.get("stable")))
                if served.labels.get("stable") == 2:
                    break
                time.sleep(0.02)
            assert (frozenset({1, 2}), 1) in seen, "v2 was loaded before the label moved"
            assert seen[-1] == (frozenset({1, 2}), 2), "then the label moved (v1 stays loaded for rollback)"
            _eventually(lambda: tfs.manager.labels.get(MODEL) == {"stable": 2})
            assert tfs.manager.config_errors == [], "TF Serving never saw a label on an unloaded version"

            # ... and the full model behind the label answers like the embedded one would.
            assert device.predict(photo).json()["model"]["version"] == 2
            client = TFServingClient(TFServingOptions(url=tfs.url))
            from preprocessing import PreprocessSpec, preprocess

            spec = PreprocessSpec.from_json((publisher.saved_model / "preprocess_spec.json").read_text())
            x = preprocess(photo, spec)[None]
            by_label = asyncio.run(_predict_and_close(client, x, label="stable"))
            assert np.allclose(by_label[0], _scores(answer.json(), publisher.labels), atol=1e-5)


def _eventually(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


async def _predict_and_close(client: TFServingClient, x, **kwargs):
    try:
        return await client.predict(MODEL, x, **kwargs)
    finally:
        await client.aclose()


def _scores(answer: dict, labels) -> list[float]:
    by_label = {c["label"]: c["score"] for c in answer["top_k"]}
    return [by_label[label] for label in labels]


def test_tf_serving_down_means_503_with_retry_after_and_it_recovers(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config") as tfs:
        with running_server(_config(data, publisher, tfs.url)) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            device = server.enroll()
            photo = photo_bytes(demo_dataset, "book")
            assert device.predict(photo).status_code == 200

            tfs.stop()
            down = device.predict(photo)
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "7"
            assert down.json()["error"]["code"] == "backend_unavailable"
            assert "unreachable" in down.json()["error"]["message"]
            ready = server.client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["backend"].startswith("failing: TF Serving")

            tfs.start()  # same port, models loaded again from the config file
            tfs.wait_available(MODEL, 1)
            assert device.predict(photo).status_code == 200
            assert server.client.get("/readyz").status_code == 200


def test_after_tf_serving_restarts_the_config_is_rewritten_and_readyz_tells_until_it_serves(publisher, demo_dataset, tmp_path):
    """A restarted TF Serving has nothing loaded and refuses a config whose label names a version it has
    not loaded: the server notices, writes the config with labels only on loaded versions, moves them
    back once the versions load, and /readyz says not ready meanwhile."""
    data = tmp_path / "data"
    config_file = data / "tf-serving" / "models.config"
    with TFServingStandin(config_file, load_delay_s=1.0) as tfs:
        options = TFServingOptions(url=tfs.url, status_poll_s=0.05, load_timeout_s=20, retries=2, retry_backoff_s=0.01,
                                   retry_after_s=7, watch_s=0.1)
        config = server_config(data, None, publisher, tf_serving=options)
        with running_server(config) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            device = server.enroll()
            photo = photo_bytes(demo_dataset, "mug")
            assert device.predict(photo).status_code == 200
            assert server.client.get("/readyz").status_code == 200

            tfs.restart()
            _eventually(lambda: tfs.manager.config_errors != [], timeout=5)
            assert "not currently available for inference" in tfs.manager.config_errors[0]
            not_ready = _eventually(lambda: _not_ready(server), timeout=5)
            assert not_ready["checks"]["serving"].startswith("failing: TF Serving has no version of shop loaded")
            assert device.predict(photo).json()["error"]["code"] == "version_not_loaded"

            _eventually(lambda: device.predict(photo).status_code == 200, timeout=15)
            _eventually(lambda: server.client.get("/readyz").status_code == 200, timeout=5)
            _eventually(lambda: tfs.manager.labels.get(MODEL) == {"stable": 1}, timeout=5)
            (served,) = read_model_config(config_file.read_text())
            assert served.labels == {"stable": 1}


def _not_ready(server):
    response = server.client.get("/readyz")
    return response.json() if response.status_code == 503 else None


def test_a_version_tf_serving_has_not_loaded_gets_503(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config", load_delay_s=3.0) as tfs:
        with running_server(_config(data, publisher, tfs.url)) as server:
            server.publish_ok(publisher, 1, channel="stable")
            device = server.enroll()
            response = device.predict(photo_bytes(demo_dataset, "mug"))
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "version_not_loaded"
            assert "Servable not found" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "7"
            del tfs


def test_the_client_retries_connection_errors_only():
    attempts: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append("try")
        if len(attempts) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"predictions": [[0.25, 0.75]]})

    options = TFServingOptions(url="http://tf-serving:8501", retries=2, retry_backoff_s=0.001)
    x = np.zeros((1, 2, 2, 3), np.float32)
    result = asyncio.run(_predict_and_close(TFServingClient(options, transport=httpx.MockTransport(flaky)), x, version=1))
    assert result.tolist() == [[0.25, 0.75]] and len(attempts) == 3

    attempts.clear()

    def refusing(request: httpx.Request) -> httpx.Response:
        attempts.append("try")
        return httpx.Response(500, json={"error": "Internal: the graph is broken"})

    with pytest.raises(BackendFailedError, match="the graph is broken"):
        asyncio.run(_predict_and_close(TFServingClient(options, transport=httpx.MockTransport(refusing)), x, version=1))
    assert len(attempts) == 1, "an answer is never retried"

    attempts.clear()

    def slow(request: httpx.Request) -> httpx.Response:
        attempts.append("try")
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(BackendUnavailableError) as caught:
        asyncio.run(_predict_and_close(TFServingClient(options, transport=httpx.MockTransport(slow)), x, version=1))
    assert caught.value.code == "backend_timeout" and len(attempts) == 1

    def refused_always(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(BackendUnavailableError) as caught:
        asyncio.run(_predict_and_close(TFServingClient(options, transport=httpx.MockTransport(refused_always)), x, version=1))
    assert caught.value.headers["Retry-After"] == "5"


def test_concurrent_fallbacks_reach_tf_serving_as_batches(publisher, demo_dataset, tmp_path):
    import concurrent.futures

    from sync_server import BatchingOptions

    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config") as tfs:
        config = _config(data, publisher, tfs.url, batching=BatchingOptions(max_batch_size=16, max_wait_ms=30, num_batch_threads=1))
        with live_server(config) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            device = server.enroll()
            photos = [photo_bytes(demo_dataset, index=i) for i in range(16)]
            with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
                statuses = list(pool.map(lambda p: device.predict(p).status_code, photos))
            assert statuses == [200] * 16
            assert sum(tfs.predict_batches) == 16 and max(tfs.predict_batches) > 1
