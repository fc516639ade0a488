"""A new model version answers its first request warm: the converter ships TF Serving warm-up records
with the version, and the server's embedded predictor runs them before it serves the version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")

import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from converter import (  # noqa: E402
    ConvertOptions,
    QuantizationOptions,
    SigningOptions,
    ValidationOptions,
    convert,
    write_keypair,
)
from converter.cli import main as edge_convert  # noqa: E402
from converter.errors import UsageError  # noqa: E402
from converter.warmup import MAX_WARMUP_RECORDS, WARMUP_FILE, build_warmup  # noqa: E402
from preprocessing import PreprocessSpec  # noqa: E402
from sync_server.errors import BackendFailedError  # noqa: E402
from sync_server.predict.embedded import EmbeddedPredictor  # noqa: E402
from sync_server.serving_repo import ServingRepository, saved_model_digest  # noqa: E402

from .model_fixtures import TINY_INPUT  # noqa: E402
from .server_fixtures import copy_saved_model, publisher, running_server, server_config  # noqa: E402, F401

PHOTOS = 3


def records_of(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    """The file read back the way TF Serving reads it: TFRecord framing, one PredictionLog per record."""
    return [prediction_log_pb2.PredictionLog.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]


@pytest.fixture(scope="module")
def converted(tiny_saved_model: Path, demo_dataset: Path, tmp_path_factory) -> dict:
    """One int8 conversion calibrated on the demo photos, published into a TF Serving repository."""
    root = tmp_path_factory.mktemp("warmup")
    private, public = write_keypair(root / "publisher")
    result = convert(tiny_saved_model, ConvertOptions(
        out=root / "bundle",
        quantization=QuantizationOptions("int8", calibration=demo_dataset / "train", calibration_limit=8),
        validation=ValidationOptions(skip=True),
        signing=SigningOptions(key=private),
        name="tiny",
        serving_repo=root / "serving",
        warmup_photos=PHOTOS,
        pixel_signatures=False,  # the float path (tests/test_convert_pixel_signatures.py has the default, with pixels)
    ))
    return {"root": root, "result": result, "version": result.serving_path, "public_key": public}


def test_the_tf_serving_version_carries_warmup_records_tf_serving_can_read(converted, tiny_saved_model):
    warmup = converted["version"] / WARMUP_FILE
    assert warmup.is_file()
    logs = records_of(warmup)
    assert 1 <= len(logs) <= MAX_WARMUP_RECORDS
    # each calibration photo alone, then all of them as one batch: the shapes the server sends
    assert [log.predict_log.request.inputs["image"].tensor_shape.dim[0].size for log in logs] == [1] * PHOTOS + [PHOTOS]
    height, width = TINY_INPUT
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "tiny" and request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["image"]
        tensor = request.inputs["image"]
        assert tensor.dtype == tf.float32.as_datatype_enum and tensor.tensor_content  # packed bytes, not a float list
        assert [d.size for d in tensor.tensor_shape.dim][1:] == [height, width, 3]
    # the original SavedModel is left as it was
    assert not (tiny_saved_model / "assets.extra").exists()


def test_every_warmup_request_gets_probabilities_from_the_savedmodel(converted):
    model = tf.saved_model.load(str(converted["version"]))
    serve = model.signatures["serving_default"]
    spec = PreprocessSpec.from_json((converted["version"] / "preprocess_spec.json").read_bytes())
    for log in records_of(converted["version"] / WARMUP_FILE):
        batch = tf.make_ndarray(log.predict_log.request.inputs["image"])
        # prepared with the model's float spec: normalised values, not 0..255 pixels
        low = (0 - max(spec.pixel_mean)) / min(spec.pixel_std)
        high = (255 - min(spec.pixel_mean)) / min(spec.pixel_std)
        assert batch.min() >= low - 1e-3 and batch.max() <= high + 1e-3 and batch.std() > 0
        probabilities = next(iter(serve(image=tf.constant(batch)).values())).numpy()
        assert probabilities.shape == (batch.shape[0], 6)
        assert np.all(probabilities >= 0) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_the_signed_manifest_records_the_warmup_file(converted):
    manifest = json.loads((converted["result"].bundle / "manifest.json").read_text())
    data = (converted["version"] / WARMUP_FILE).read_bytes()
    assert manifest["serving"]["name"] == "tiny" and manifest["serving"]["version"] == 1
    assert manifest["serving"]["warmup"] == {
        "file": WARMUP_FILE, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        "records": PHOTOS + 1, "batch_sizes": [1] * PHOTOS + [PHOTOS],
    }


def test_the_server_digest_covers_the_warmup_file(converted, tmp_path):
    """What the registry records for a version includes its warm-up file: a changed file is another digest."""
    copy = tmp_path / "copy"
    shutil.copytree(converted["version"], copy)
    before = saved_model_digest(copy)
    (copy / WARMUP_FILE).write_bytes(b"\0" * 16)
    assert saved_model_digest(copy) != before


def test_the_server_serves_the_signed_warmup_file_and_records_it(converted, tmp_path):
    """Publishing the converter's TF Serving export: TF Serving's folder holds the warm-up file, and the
    registry's digest is the digest of exactly that folder."""
    config = server_config(tmp_path / "data", None, publisher_keys=(converted["public_key"],))
    with running_server(config) as server:
        response = server.publish(converted["result"].bundle, converted["version"])
        assert response.status_code == 201, response.text
        served = server.services.repository.path_of("tiny", 1)
        assert (served / WARMUP_FILE).read_bytes() == (converted["version"] / WARMUP_FILE).read_bytes()
        detail = server.admin("GET", "/v1/models/tiny/versions/1").json()
        assert detail["saved_model_digest"] == saved_model_digest(served) == saved_model_digest(converted["version"])


def test_a_warmup_file_the_converter_did_not_sign_is_refused(converted, tiny_saved_model, tmp_path):
    changed = copy_saved_model(converted["version"], tmp_path / "changed")
    records = build_warmup("tiny", "image", [np.zeros((1, *TINY_INPUT, 3), dtype=np.float32)])
    (changed / WARMUP_FILE).write_bytes(records.data)  # well-formed, but not the signed one
    foreign = copy_saved_model(tiny_saved_model, tmp_path / "foreign")
    (foreign / "assets.extra").mkdir()
    (foreign / WARMUP_FILE).write_bytes(records.data)
    config = server_config(tmp_path / "data", None, publisher_keys=(converted["public_key"],))
    with running_server(config) as server:
        for folder, reason in ((changed, "not the one the converter signed"), (foreign, "not the one the converter signed")):
            response = server.publish(converted["result"].bundle, folder)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "saved_model_mismatch" and reason in error["message"]
        assert not server.services.repository.path_of("tiny", 1).exists()


def test_a_warmup_file_beside_a_bundle_that_records_none_is_refused(publisher, tmp_path):
    folder = copy_saved_model(publisher.saved_model, tmp_path / "model")
    (folder / "assets.extra").mkdir()
    (folder / WARMUP_FILE).write_bytes(build_warmup("shop", "image", [np.zeros((1, *TINY_INPUT, 3), np.float32)]).data)
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        response = server.publish(publisher.bundles[1], folder)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "saved_model_mismatch"
        assert "records no warm-up file" in response.json()["error"]["message"]


def test_serving_export_writes_warmup_records_too(tiny_saved_model, demo_dataset, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert edge_convert(["serving-export", str(tiny_saved_model), "--repo", str(repo), "--name", "tiny",
                         "--warmup-from", str(demo_dataset / "val")]) == 0
    assert "warm-up requests" in capsys.readouterr().out
    assert len(records_of(repo / "tiny" / "1" / WARMUP_FILE)) == 5  # 4 photos alone, then as a batch
    assert edge_convert(["serving-export", str(tiny_saved_model), "--repo", str(repo), "--name", "tiny",
                         "--no-warmup"]) == 0
    assert not (repo / "tiny" / "2" / "assets.extra").exists()


def test_too_many_warmup_photos_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--warmup-photos"):
        ConvertOptions(out=tmp_path / "b", validation=ValidationOptions(skip=True),
                       signing=SigningOptions(unsigned=True), warmup_photos=MAX_WARMUP_RECORDS).checked()


# --- the embedded predictor ---------------------------------------------------------------------------------

def repository_with(tmp_path: Path, version_folder: Path, version: int = 1) -> ServingRepository:
    repo = ServingRepository(tmp_path / "tf-serving")
    repo.install("tiny", version, version_folder, saved_model_digest(version_folder))
    return repo


def test_the_embedded_predictor_runs_the_warmup_records_before_serving(converted, tmp_path):
    predictor = EmbeddedPredictor(repository_with(tmp_path, converted["version"]))

    async def story() -> np.ndarray:
        await predictor.preload("tiny", 1)
        for _ in range(600):  # the load (and its warm-up) finishes in the background
            if ("tiny", 1) in predictor.warmed_up:
                break
            await asyncio.sleep(0.05)
        assert predictor.warmed_up[("tiny", 1)] == PHOTOS + 1
        loaded = predictor._loaded[("tiny", 1)]
        assert loaded.warmup_source == "records" and loaded.warmup_requests == PHOTOS + 1
        return await predictor.predict("tiny", 1, np.zeros((2, *TINY_INPUT, 3), dtype=np.float32))

    try:
        answer = asyncio.run(story())
    finally:
        asyncio.run(predictor.aclose())
    assert answer.shape == (2, 6) and np.allclose(answer.sum(axis=1), 1.0, atol=1e-4)


def test_without_a_warmup_file_the_predictor_warms_up_with_a_photo_of_the_input_shape(tiny_saved_model, tmp_path):
    predictor = EmbeddedPredictor(repository_with(tmp_path, tiny_saved_model))
    try:
        answer = asyncio.run(predictor.predict("tiny", 1, np.zeros((1, *TINY_INPUT, 3), dtype=np.float32)))
        assert answer.shape == (1, 6)
        assert predictor.warmed_up[("tiny", 1)] == 1 and predictor._loaded[("tiny", 1)].warmup_source == "zeros"
    finally:
        asyncio.run(predictor.aclose())


def test_a_version_whose_warmup_requests_do_not_fit_its_signature_is_not_served(tiny_saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_saved_model, folder)
    wrong = build_warmup("tiny", "image", [np.zeros((1, 8, 8, 3), dtype=np.float32)])  # 8x8, the model takes 32x32
    (folder / "assets.extra").mkdir()
    (folder / WARMUP_FILE).write_bytes(wrong.data)
    predictor = EmbeddedPredictor(repository_with(tmp_path, folder))
    try:
        with pytest.raises(BackendFailedError, match="warm-up requests .* shape \\[1, 8, 8, 3\\]") as caught:
            asyncio.run(predictor.predict("tiny", 1, np.zeros((1, *TINY_INPUT, 3), dtype=np.float32)))
        assert caught.value.code == "warmup_failed" and ("tiny", 1) not in predictor._loaded
    finally:
        asyncio.run(predictor.aclose())


def test_a_garbled_warmup_file_is_refused_with_its_name(tiny_saved_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_saved_model, folder)
    (folder / "assets.extra").mkdir()
    (folder / WARMUP_FILE).write_bytes(b"not a tfrecord file at all, just some bytes")
    predictor = EmbeddedPredictor(repository_with(tmp_path, folder))
    try:
        with pytest.raises(BackendFailedError, match="tf_serving_warmup_requests\\) are unreadable"):
            asyncio.run(predictor.predict("tiny", 1, np.zeros((1, *TINY_INPUT, 3), dtype=np.float32)))
    finally:
        asyncio.run(predictor.aclose())
