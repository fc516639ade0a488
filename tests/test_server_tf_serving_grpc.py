"""The full model behind TF Serving's gRPC API (`--backend-protocol tf-serving-grpc`).

The TF Serving here is `tests/tf_serving_standin.py` with its gRPC server on: the real protos'
PredictionService and ModelService over the same SavedModels its REST API serves.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from sync_server import TFServingOptions
from sync_server.config import ServerConfig
from sync_server.errors import BackendFailedError, BackendUnavailableError, ConfigError
from sync_server.predict.tf_serving import TFServingClient
from sync_server.predict.tf_serving_grpc import TFServingGrpcClient, decode_tensor, encode_tensor, grpc_target
from tests.model_fixtures import TINY_INPUT
from tests.server_fixtures import MODEL, photo_bytes, publisher, running_server, server_config  # noqa: F401
from tests.tf_serving_standin import TFServingStandin


def _options(url: str, **overrides) -> TFServingOptions:
    values = dict(url=url, protocol="tf-serving-grpc", status_poll_s=0.05, load_timeout_s=20, retries=2,
                  retry_backoff_s=0.01, retry_after_s=7)
    values.update(overrides)
    return TFServingOptions(**values)


def _prepared(publisher, photo: bytes) -> np.ndarray:
    from preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec.from_json((publisher.saved_model / "preprocess_spec.json").read_text())
    return preprocess(photo, spec)[None]


async def _ask(client, x, **kwargs):
    try:
        return await client.predict(MODEL, x, **kwargs)
    finally:
        await client.aclose()


def _eventually(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


def test_one_flag_picks_the_protocol_and_the_address_is_checked():
    config = ServerConfig.load({}, {"SYNC_SERVER_BACKEND_URL": "grpc://tf-serving:8500", "SYNC_SERVER_BACKEND_PROTOCOL": "tf-serving-grpc"})
    assert (config.tf_serving.url, config.tf_serving.protocol, config.uses_tf_serving) == ("grpc://tf-serving:8500", "tf-serving-grpc", True)
    legacy = ServerConfig.load({}, {"SYNC_SERVER_TF_SERVING_URL": "http://tf-serving:8501"})
    assert (legacy.tf_serving.url, legacy.tf_serving.protocol) == ("http://tf-serving:8501", "tf-serving-rest"), "the old flag still works"
    assert ServerConfig.load({"tf_serving.url": "tf-serving:8500", "tf_serving.protocol": "tf-serving-grpc"}, {}).tf_serving.url == "tf-serving:8500"
    assert grpc_target("grpc://tf-serving:8500") == grpc_target("tf-serving:8500") == "tf-serving:8500"

    for environ, message in [
        ({"SYNC_SERVER_BACKEND_URL": "http://tf-serving:8501", "SYNC_SERVER_BACKEND_PROTOCOL": "tf-serving-grpc"}, "grpc://host:port"),
        ({"SYNC_SERVER_BACKEND_URL": "tf-serving", "SYNC_SERVER_BACKEND_PROTOCOL": "tf-serving-grpc"}, "grpc://host:port"),
        ({"SYNC_SERVER_BACKEND_URL": "grpc://tf-serving:8500"}, "must start with http://"),
        ({"SYNC_SERVER_BACKEND_PROTOCOL": "triton"}, "tf-serving-rest, tf-serving-grpc, oip"),
        ({"SYNC_SERVER_TF_SERVING_URL": "http://a:8501", "SYNC_SERVER_BACKEND_URL": "http://b:8501"}, "disagree"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ServerConfig.load({}, environ)


def test_the_oip_protocol_is_built_by_its_own_predictor_or_refused_clearly(tmp_path):
    from sync_server.predict import make_predictor
    from sync_server.serving_repo import ServingRepository

    config = ServerConfig(data_dir=tmp_path, tf_serving=TFServingOptions(url="http://mlserver:8080", protocol="oip"))
    repository = ServingRepository(config.serving_dir)
    try:
        from sync_server.predict.oip import OIPPredictor
    except ImportError:
        with pytest.raises(ConfigError, match="oip backend protocol is not available"):
            make_predictor(config, repository)
    else:
        predictor = make_predictor(config, repository)
        assert isinstance(predictor, OIPPredictor)
        asyncio.run(predictor.aclose())
    assert config.uses_tf_serving is False, "an OIP server does not read TF Serving's model config"


def test_tensors_go_as_raw_bytes_and_answers_are_read_in_either_form():
    import tensorflow as tf

    x = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    proto = encode_tensor(x)
    assert proto.dtype == tf.float32.as_datatype_enum and len(proto.tensor_content) == x.nbytes and not proto.float_val
    assert np.array_equal(tf.make_ndarray(proto), x), "TensorFlow reads back exactly the tensor sent"
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert np.array_equal(tf.make_ndarray(encode_tensor(pixels)), pixels) and len(encode_tensor(pixels).tensor_content) == pixels.size
    assert np.array_equal(tf.make_ndarray(encode_tensor(x.astype(">f4"))), x), "big-endian input goes little-endian on the wire"

    probabilities = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    as_values = tf.make_tensor_proto(probabilities)
    as_values.ClearField("tensor_content")
    as_values.float_val.extend(probabilities.ravel().tolist())
    assert np.array_equal(decode_tensor(tf.make_tensor_proto(probabilities)), probabilities)
    assert np.array_equal(decode_tensor(as_values), probabilities)
    short = tf.make_tensor_proto(probabilities)
    short.tensor_content = short.tensor_content[:-4]
    with pytest.raises(ValueError, match="needs 16"):
        decode_tensor(short)
    with pytest.raises(ValueError, match="cannot send"):
        encode_tensor(np.array(["a"]))
    with pytest.raises(ValueError, match="NaN"):
        encode_tensor(np.array([np.nan], np.float32))


def test_grpc_answers_equal_rest_answers_by_version_and_by_label_on_a_real_photo(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    config_file = data / "tf-serving" / "models.config"
    with TFServingStandin(config_file, load_delay_s=0.3, grpc=True) as tfs:
        with running_server(server_config(data, None, publisher, tf_serving=_options(tfs.grpc_url))) as server:
            assert server.services.predictor.kind == "tf_serving_grpc"
            server.publish_ok(publisher, 1, 2)
            server.set_channel(1)
            server.wait_serving_idle()  # the reconciler read the versions' status over gRPC
            _eventually(lambda: tfs.manager.labels.get(MODEL) == {"stable": 1}, timeout=15)
            device = server.enroll()
            photo = photo_bytes(demo_dataset, "sneaker")
            answer = device.predict(photo, top_k=6)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == {"name": MODEL, "version": 1}
            assert tfs.requests[-1] == f"gRPC Predict {MODEL}" and tfs.predict_batches[-1] == 1

            x = _prepared(publisher, photo)
            by_grpc = asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), x, version=1))
            by_rest = asyncio.run(_ask(TFServingClient(TFServingOptions(url=tfs.url)), x, version=1))
            assert by_grpc.dtype == np.float32 and by_grpc.shape == (1, len(publisher.labels))
            assert np.max(np.abs(by_grpc - by_rest)) <= 1e-6, "the same tensor reaches the same model"
            scores = {c["label"]: c["score"] for c in answer.json()["top_k"]}
            assert np.allclose(by_grpc[0], [scores[label] for label in publisher.labels], atol=1e-6)

            server.set_channel(2)
            _eventually(lambda: tfs.manager.labels.get(MODEL) == {"stable": 2}, timeout=15)
            by_label = asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), x, label="stable"))
            v2 = asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), x, version=2))
            assert np.array_equal(by_label, v2)
            assert device.predict(photo).json()["model"]["version"] == 2

            status = asyncio.run(_status(TFServingGrpcClient(_options(tfs.grpc_url))))
            assert status == {1: "AVAILABLE", 2: "AVAILABLE"}
            assert asyncio.run(_status(TFServingGrpcClient(_options(tfs.grpc_url)), "nope")) == {}

            with pytest.raises(BackendUnavailableError) as caught:  # not loaded: 503, as over REST
                asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), x, version=9))
            assert caught.value.code == "version_not_loaded" and "Servable not found" in caught.value.message
            with pytest.raises(BackendUnavailableError, match="Unrecognized servable version label: canary"):
                asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), x, label="canary"))
            with pytest.raises(BackendFailedError, match="INVALID_ARGUMENT: Expects arg\\[0\\] to be float32 but uint8"):
                asyncio.run(_ask(TFServingGrpcClient(_options(tfs.grpc_url)), np.zeros(x.shape, np.uint8), version=1))


async def _status(client: TFServingGrpcClient, name: str = MODEL):
    try:
        return await client.model_status(name)
    finally:
        await client.aclose()


def test_a_stopped_grpc_backend_means_503_with_retry_after_and_it_recovers(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config", grpc=True) as tfs:
        with running_server(server_config(data, None, publisher, tf_serving=_options(tfs.grpc_url))) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            device = server.enroll()
            photo = photo_bytes(demo_dataset, "book")
            assert device.predict(photo).status_code == 200

            tfs.stop()
            started = time.monotonic()
            down = device.predict(photo)
            assert down.status_code == 503, down.text
            assert time.monotonic() - started < 5, "refused connections answer at once, not at the deadline"
            assert down.headers["retry-after"] == "7"
            assert down.json()["error"]["code"] == "backend_unavailable"
            assert "unreachable" in down.json()["error"]["message"]
            ready = server.client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["backend"].startswith("failing: TF Serving")

            tfs.start()  # the same port; the models load again from the config file
            tfs.wait_available(MODEL, 1)
            _eventually(lambda: device.predict(photo).status_code == 200, timeout=10)
            assert server.client.get("/readyz").status_code == 200


def test_a_slow_grpc_backend_gets_the_time_the_deadline_leaves_and_no_more(publisher, demo_dataset, tmp_path):
    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config", grpc=True) as tfs:
        config = server_config(data, None, publisher, tf_serving=_options(tfs.grpc_url), predict_deadline_s=0.5)
        with running_server(config) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            device = server.enroll()
            photo = photo_bytes(demo_dataset, "mug")
            assert device.predict(photo).status_code == 200
            tfs.predict_delay_s = 3.0
            started = time.monotonic()
            late = device.predict(photo)
            took = time.monotonic() - started
            assert late.status_code == 503 and late.headers["retry-after"] == "7", late.text
            assert late.json()["error"]["code"] in ("deadline_exceeded", "backend_timeout")
            assert took < 2.5, f"the device waited {took:.2f} s for a 0.5 s deadline (TF Serving takes 3 s)"
        x = np.zeros((1, *TINY_INPUT, 3), np.float32)
        tfs.predict_delay_s = 3.0
        client = TFServingGrpcClient(_options(tfs.grpc_url, timeout_s=10))
        asked = len(tfs.requests)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            asyncio.run(_ask(client, x, version=1, timeout_s=0.4))
        took = time.monotonic() - started
        assert caught.value.code == "backend_timeout" and caught.value.headers["Retry-After"] == "7"
        assert len(tfs.requests) - asked <= 1, "a call that reached TF Serving is never retried"
        assert 0.3 < took < 2.5, f"the call ended after {took:.2f} s, not at its 0.4 s deadline (TF Serving takes 3 s)"


def test_bytes_on_the_wire_per_request_are_the_raw_tensor(publisher, demo_dataset, tmp_path):
    """A PredictRequest is the tensor's bytes plus a few dozen bytes of framing (JSON over REST: ~4x)."""
    from sync_server.predict.json_tensor import encode_float_tensor
    from tensorflow_serving.apis import predict_pb2

    def request_bytes(x: np.ndarray) -> int:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = MODEL, "serving_default"
        request.model_spec.version.value = 1
        request.inputs["image"].CopyFrom(encode_tensor(x))
        return request.ByteSize()

    sizes = {}
    for shape, dtype in [((96, 96), np.float32), ((224, 224), np.float32), ((224, 224), np.uint8)]:
        x = np.zeros((1, *shape, 3), dtype)
        sizes[(shape, np.dtype(dtype).name)] = request_bytes(x)
        assert x.nbytes < sizes[(shape, np.dtype(dtype).name)] <= x.nbytes + 100
    print("PredictRequest bytes:", {f"{s[0]}x{s[1]} {d}": n for (s, d), n in sizes.items()})
    assert sizes[((224, 224), "uint8")] <= 160_000, "the issue's 160 KB target for a 224x224 input"

    photo = photo_bytes(demo_dataset, "mug")
    x = _prepared(publisher, photo)
    data = tmp_path / "data"
    with TFServingStandin(data / "tf-serving" / "models.config", grpc=True) as tfs:
        with running_server(server_config(data, None, publisher, tf_serving=_options(tfs.grpc_url))) as server:
            server.publish_ok(publisher, 1, channel="stable")
            server.wait_serving_idle()
            assert server.enroll().predict(photo).status_code == 200
        assert tfs.grpc_request_bytes == [request_bytes(x)], "what the server sent is one raw tensor"
        json_bytes = len(encode_float_tensor(x)) + len('{"instances":}')
        print(f"demo photo ({x.shape[1]}x{x.shape[2]}): gRPC {tfs.grpc_request_bytes[0]} B, REST JSON {json_bytes} B")
        assert tfs.grpc_request_bytes[0] < json_bytes / 2


def test_the_grpc_client_starts_without_loading_tensorflow_and_tensorflow_still_loads_after_it():
    """The server's process does not run the model: building requests needs the protos, not TensorFlow."""
    import subprocess
    import sys

    script = """
import sys, time
started = time.monotonic()
import numpy as np
from sync_server.config import TFServingOptions
from sync_server.predict.tf_serving_grpc import TFServingGrpcClient, encode_tensor
TFServingGrpcClient(TFServingOptions(url="grpc://127.0.0.1:1", protocol="tf-serving-grpc"))
proto = encode_tensor(np.full((1, 2, 2, 3), 7, np.uint8))
print("tensorflow loaded:", "tensorflow.python" in sys.modules, "in", round(time.monotonic() - started, 2), "s")
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
assert type(proto) is tensor_pb2.TensorProto, "one TensorProto class for both"
assert tf.make_ndarray(proto).tolist() == np.full((1, 2, 2, 3), 7, np.uint8).tolist()
print("tensorflow after: ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tensorflow loaded: False" in done.stdout and "tensorflow after: ok" in done.stdout, done.stdout
