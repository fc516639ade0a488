"""The device's uint8 pixels travel to the full model as they are: the converter's `pixels` signatures.

A SavedModel written by `converter.serving.add_pixel_signatures` takes the fitted uint8 pixels (`pixels`)
or their PNGs (`pixels_png`) and normalises them in its graph exactly as `preprocessing.normalise` does.
Each backend then sends a version with the signature uint8 (a quarter of float32's bytes) and a version
without it float32, as before; the bytes each protocol puts on the wire are measured here.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")

import tensorflow as tf  # noqa: E402

from converter.serving import PIXELS_SIGNATURE, PNG_SIGNATURE, add_pixel_signatures, serving_signatures  # noqa: E402
from converter.warmup import WARMUP_FILE, build_warmup, read_warmup, request_inputs, warmup_batches, warmup_pixel_batches  # noqa: E402
from preprocessing import PreprocessSpec, normalise, preprocess, preprocess_pixels  # noqa: E402
from sync_server import TFServingOptions  # noqa: E402
from sync_server.config import BatchingOptions, UploadLimits  # noqa: E402
from sync_server.predict.embedded import EmbeddedPredictor  # noqa: E402
from sync_server.predict.service import PredictionService  # noqa: E402
from sync_server.predict.tf_serving import TFServingClient, TFServingPredictor, encode_png  # noqa: E402
from sync_server.predict.tf_serving_grpc import TFServingGrpcClient, TFServingGrpcPredictor  # noqa: E402
from sync_server.serving_repo import ServingRepository  # noqa: E402

from .server_fixtures import photo_bytes  # noqa: E402
from .tf_serving_standin import TFServingStandin  # noqa: E402

#: The issue's target for one 224x224 photo, server to backend.
TARGET_BYTES = 160_000


def small_saved_model(folder: Path, size: int, classes: int = 4) -> Path:
    """A small float SavedModel for [N, size, size, 3] (conv, pooling, dense; fixed seed) with its spec."""
    tf.keras.utils.set_random_seed(size)
    inputs = tf.keras.Input((size, size, 3), name="image")
    x = tf.keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(classes, activation="softmax")(x)
    tf.keras.Model(inputs, outputs).export(str(folder))
    spec = PreprocessSpec(height=size, width=size, fit="pad", pad_color=(128, 128, 128), scale=1 / 255, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))
    (folder / "preprocess_spec.json").write_text(spec.to_json())
    (folder / "labels.txt").write_text("".join(f"c{i}\n" for i in range(classes)))
    return folder


@dataclass
class Models:
    """A model repository: version 1 with the pixel signatures, version 2 the same model without them."""

    repo: ServingRepository
    name: str
    spec: PreprocessSpec
    pixels: list[np.ndarray]  # real photos' fitted pixels

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple((self.repo.path_of(self.name, 2) / "labels.txt").read_text().split())


def _models(root: Path, size: int, dataset: Path) -> Models:
    plain = small_saved_model(root / f"plain{size}", size)
    repo = ServingRepository(root / "repo")
    name = f"m{size}"
    add_pixel_signatures(plain, repo.path_of(name, 1))
    shutil.copytree(plain, repo.path_of(name, 2))
    spec = PreprocessSpec.from_json((plain / "preprocess_spec.json").read_text())
    photos = [photo_bytes(dataset, label) for label in ("sneaker", "book", "mug")]
    return Models(repo, name, spec, [preprocess_pixels(p, spec) for p in photos])


@pytest.fixture(scope="module", params=[96, 224])
def models(request, tmp_path_factory, demo_dataset) -> Models:
    return _models(tmp_path_factory.mktemp(f"pixels{request.param}"), request.param, demo_dataset)


def test_the_pixels_signatures_answer_as_serving_default_does_on_normalised_pixels(models):
    version = tf.saved_model.load(str(models.repo.path_of(models.name, 1)))
    original = tf.saved_model.load(str(models.repo.path_of(models.name, 2))).signatures["serving_default"]
    batch = np.stack(models.pixels)
    floats = np.stack([normalise(p, models.spec) for p in models.pixels])
    expected = original(image=tf.constant(floats))["output_0"].numpy()
    by_float = version.signatures["serving_default"](image=tf.constant(floats))["output_0"].numpy()
    by_pixels = version.signatures[PIXELS_SIGNATURE](pixels=tf.constant(batch))["output_0"].numpy()
    pngs = np.array([encode_png(p) for p in batch], dtype=object)
    by_png = version.signatures[PNG_SIGNATURE](png=tf.constant(pngs))["output_0"].numpy()
    assert np.array_equal(by_float, expected), "serving_default is the original function"
    assert np.allclose(by_pixels, expected, atol=1e-5) and np.allclose(by_png, by_pixels, atol=1e-7)
    assert not np.allclose(expected[0], expected[1], atol=1e-4), "different photos, different answers"
    assert serving_signatures(models.repo.path_of(models.name, 1)) == {"signatures": ["pixels", "pixels_png", "serving_default"]}
    assert not {"pixels", "pixels_png"} & set(serving_signatures(models.repo.path_of(models.name, 2))["signatures"])
    for extra in ("labels.txt", "preprocess_spec.json"):
        assert (models.repo.path_of(models.name, 1) / extra).read_bytes() == (models.repo.path_of(models.name, 2) / extra).read_bytes()


def test_warmup_records_for_the_pixel_signatures_parse_with_the_real_protos_and_warm_the_version(models, demo_dataset, tmp_path):
    photos = sorted((demo_dataset / "test" / "book").iterdir())[:2]
    records = build_warmup(models.name, "image", warmup_batches(photos, models.spec),
                           pixels=warmup_pixel_batches(photos, models.spec))
    assert records.records == 9 and records.batch_sizes == (1, 1, 2, 1, 1, 1, 1, 2, 2)
    assert records.to_dict()["signatures"] == ["serving_default"] * 3 + ["pixels", "pixels_png"] * 3
    repo = ServingRepository(tmp_path / "warm")
    folder = repo.path_of(models.name, 1)
    shutil.copytree(models.repo.path_of(models.name, 1), folder)
    (folder / "assets.extra").mkdir(exist_ok=True)
    (folder / WARMUP_FILE).write_bytes(records.data)
    logs = read_warmup(folder / WARMUP_FILE)
    kinds = [(log.predict_log.request.model_spec.signature_name, request_inputs(log)) for log in logs]
    pixels = [x["pixels"] for name, x in kinds if name == PIXELS_SIGNATURE]
    pngs = [x["png"] for name, x in kinds if name == PNG_SIGNATURE]
    assert [p.dtype for p in pixels] == [np.uint8] * 3 and pixels[0].shape == (1, *models.spec.pixel_shape)
    assert all(p.dtype == object and p[0][:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert logs[3].predict_log.request.inputs["pixels"].tensor_content, "uint8 packed as tensor_content bytes"

    predictor = EmbeddedPredictor(repo)
    try:
        assert asyncio.run(predictor.takes_pixels(models.name, 1))
        loaded = predictor._loaded[(models.name, 1)]
        assert loaded.warmup_source == "records" and loaded.warmup_requests == 9
    finally:
        asyncio.run(predictor.aclose())


@dataclass
class _Info:
    float_spec: PreprocessSpec
    labels: tuple[str, ...]


def _service(predictor, models: Models, batching: bool = False) -> PredictionService:
    info = _Info(models.spec, models.labels)
    return PredictionService(predictor, lambda _n, _v: info, BatchingOptions(enabled=batching), UploadLimits())


def _ask_both(predictor, models: Models, measure) -> dict[int, tuple[np.ndarray, int]]:
    """Each version's scores for the first photo's pixels through the service, and the bytes `measure()` saw."""

    async def story():
        service = _service(predictor, models)
        try:
            answers = {}
            for version in (1, 2):
                result = await service.predict_pixels(models.name, version, models.pixels[0], top_k=4)
                scores = {c.label: c.score for c in result.top_k}
                answers[version] = (np.array([scores[label] for label in models.labels]), measure())
            return answers
        finally:
            await service.aclose()

    return asyncio.run(story())


def _reference(models: Models) -> np.ndarray:
    model = tf.saved_model.load(str(models.repo.path_of(models.name, 2)))
    x = normalise(models.pixels[0], models.spec)[None]
    return model.signatures["serving_default"](image=tf.constant(x))["output_0"].numpy()[0]


def test_the_embedded_predictor_runs_pixels_through_the_signature_and_floats_without_it(models):
    predictor = EmbeddedPredictor(models.repo)
    sent: list[np.dtype] = []
    original = predictor._predict_sync
    predictor._predict_sync = lambda n, v, batch: (sent.append(batch.dtype), original(n, v, batch))[1]
    answers = _ask_both(predictor, models, lambda: sent[-1])
    assert predictor.warmed_up == {(models.name, 1): 2, (models.name, 2): 1}, "without records: a zero photo per signature served"
    expected = _reference(models)
    assert answers[1][1] == np.uint8 and answers[2][1] == np.float32
    assert np.allclose(answers[1][0], expected, atol=1e-5) and np.allclose(answers[2][0], expected, atol=1e-5)


def _standin_config(tmp_path: Path, models: Models) -> Path:
    config = tmp_path / "models.config"
    config.write_text(
        'model_config_list { config { name: "%s" base_path: "%s" model_platform: "tensorflow" '
        "model_version_policy { all {} } } }" % (models.name, models.repo.models_dir / models.name)
    )
    return config


def test_tf_serving_grpc_gets_uint8_tensor_content_for_a_version_with_the_signature(models, tmp_path, record_property):
    with TFServingStandin(_standin_config(tmp_path, models), grpc=True) as tfs:
        tfs.wait_available(models.name, 1)
        tfs.wait_available(models.name, 2)
        client = TFServingGrpcClient(TFServingOptions(url=tfs.grpc_url, protocol="tf-serving-grpc"))
        answers = _ask_both(TFServingGrpcPredictor(client), models, lambda: tfs.grpc_request_bytes[-1])
    pixel_bytes = int(np.prod(models.spec.pixel_shape))
    (by_pixels, uint8_bytes), (by_float, float_bytes) = answers[1], answers[2]
    assert pixel_bytes < uint8_bytes < pixel_bytes + 200 and 4 * pixel_bytes < float_bytes < 4 * pixel_bytes + 200
    assert np.allclose(by_pixels, _reference(models), atol=1e-5) and np.allclose(by_float, by_pixels, atol=1e-5)
    if models.spec.height == 224:
        assert uint8_bytes <= TARGET_BYTES
    record_property("grpc_request_bytes", {"uint8": uint8_bytes, "float32": float_bytes})
    print(f"gRPC PredictRequest, {models.spec.height}x{models.spec.width}: uint8 {uint8_bytes} B, float32 {float_bytes} B")


def test_tf_serving_rest_gets_base64_pngs_for_a_version_with_the_signature(models, tmp_path, record_property):
    with TFServingStandin(_standin_config(tmp_path, models)) as tfs:
        tfs.wait_available(models.name, 1)
        tfs.wait_available(models.name, 2)
        answers = _ask_both(TFServingPredictor(TFServingClient(TFServingOptions(url=tfs.url))), models,
                            lambda: tfs.rest_request_bytes[-1])
        assert any(r.endswith("/versions/1/metadata") for r in tfs.requests), "the signatures came from the version's metadata"
    (by_pixels, png_bytes), (by_float, json_bytes) = answers[1], answers[2]
    assert np.allclose(by_pixels, _reference(models), atol=1e-5) and np.allclose(by_float, by_pixels, atol=1e-5)
    assert png_bytes * 4 < json_bytes, "PNG in base64 against JSON float digits"
    if models.spec.height == 224:
        assert png_bytes <= TARGET_BYTES, "a real photo's 224x224 PNG in base64 fits the target"
    record_property("rest_request_bytes", {"png_b64": png_bytes, "float_json": json_bytes})
    print(f"REST predict body, {models.spec.height}x{models.spec.width}: PNG/b64 {png_bytes} B, float JSON {json_bytes} B")


def test_a_raw_photo_goes_to_a_pixels_version_as_the_servers_own_fitted_pixels(models, demo_dataset):
    """The raw-photo endpoint's photo is fitted once (preprocess_pixels) and goes uint8 too: same answer as the floats."""
    predictor = EmbeddedPredictor(models.repo)
    sent: list[np.ndarray] = []
    original = predictor._predict_sync
    predictor._predict_sync = lambda n, v, batch: (sent.append(batch), original(n, v, batch))[1]
    photo = photo_bytes(demo_dataset, "sneaker")

    async def story():
        service = _service(predictor, models, batching=True)
        try:
            return [await service.predict(models.name, version, photo, top_k=4) for version in (1, 2)]
        finally:
            await service.aclose()

    v1, v2 = asyncio.run(story())
    assert sent[0].dtype == np.uint8 and np.array_equal(sent[0][0], preprocess_pixels(photo, models.spec))
    assert sent[1].dtype == np.float32 and np.array_equal(sent[1][0], preprocess(photo, models.spec))
    assert [c.label for c in v1.top_k] == [c.label for c in v2.top_k]
    assert np.allclose([c.score for c in v1.top_k], [c.score for c in v2.top_k], atol=1e-5)
