"""A release engineer converts with `edge-convert --serving-repo`: the TF Serving version it writes takes the
device's fitted uint8 pixels (`pixels`, `pixels_png`) beside `serving_default`, its warm-up records warm all
three, the signed manifest says so, and the server accepts that export with the bundle and answers pixels
through the signature.

One conversion (the CLI, int8 like the demo's) is shared by the module; the server is real (TestClient).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")

import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from converter import read_bundle, write_keypair  # noqa: E402
from converter.cli import main as edge_convert  # noqa: E402
from converter.serving import PIXELS_SIGNATURE, PNG_SIGNATURE, serving_signatures  # noqa: E402
from converter.warmup import WARMUP_FILE  # noqa: E402
from preprocessing import PreprocessSpec, normalise, preprocess_pixels  # noqa: E402

from .model_fixtures import TINY_INPUT  # noqa: E402
from .server_fixtures import photo_bytes, running_server, server_config  # noqa: E402

WARMUP_PHOTOS = 2
SERVED = ["pixels", "pixels_png", "serving_default"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Release:
    bundle: Path
    export: Path  # REPO/tiny/1: the TF Serving version
    public_key: Path
    code: int
    stderr: str

    @property
    def manifest(self) -> dict:
        return json.loads((self.bundle / "manifest.json").read_text())

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_json((self.export / "preprocess_spec.json").read_bytes())


@pytest.fixture(scope="module")
def release(tiny_saved_model: Path, demo_dataset: Path, tmp_path_factory) -> Release:
    root = tmp_path_factory.mktemp("pixel_release")
    private, public = write_keypair(root / "publisher")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = edge_convert([
            str(tiny_saved_model), "--out", str(root / "bundle"), "--quantize", "int8",
            "--calibration", str(demo_dataset / "train"), "--calibration-limit", "8",
            "--validation", str(demo_dataset / "val"), "--min-agreement", "0", "--min-class-agreement", "0",
            "--name", "tiny", "--sign-key", str(private), "--serving-repo", str(root / "serving"),
            "--warmup-photos", str(WARMUP_PHOTOS), "--json",
        ])
    report = json.loads(stdout.getvalue())
    return Release(root / "bundle", Path(report["serving_path"]), public, code, stderr.getvalue())


def records_of(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    """The file read back the way TF Serving reads it: TFRecord framing, one PredictionLog per record."""
    return [prediction_log_pb2.PredictionLog.FromString(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]


def test_with_a_serving_repo_the_served_version_takes_uint8_pixels_by_default(release, tiny_saved_model):
    assert release.code == 0, release.stderr
    assert serving_signatures(release.export) == {"signatures": SERVED}
    assert PIXELS_SIGNATURE not in serving_signatures(tiny_saved_model)["signatures"], "the given SavedModel is left as it was"
    bundle = read_bundle(release.bundle, release.public_key, require_signature=True)
    assert bundle.signature == "verified"
    serving = bundle.manifest.serving
    assert serving["signatures"] == SERVED and {serving["name"], serving["version"]} == {"tiny", 1}
    assert release.manifest["source"]["saved_model"] == tiny_saved_model.name, "named after the folder given, not the scratch copy"


def test_the_warmup_records_warm_every_signature_the_version_serves(release):
    file = release.export / WARMUP_FILE
    logs = records_of(file)
    signatures = [log.predict_log.request.model_spec.signature_name for log in logs]
    # each photo alone, then both as one batch, for each signature
    assert Counter(signatures) == {"serving_default": WARMUP_PHOTOS + 1, PIXELS_SIGNATURE: WARMUP_PHOTOS + 1,
                                   PNG_SIGNATURE: WARMUP_PHOTOS + 1}
    warmup = release.manifest["serving"]["warmup"]
    assert warmup["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() and warmup["records"] == len(logs)
    assert warmup["signatures"] == signatures
    floats = [tf.make_ndarray(log.predict_log.request.inputs["image"]) for log, name in zip(logs, signatures) if name == "serving_default"]
    pixel_logs = [log for log, name in zip(logs, signatures) if name == PIXELS_SIGNATURE]
    png_logs = [log for log, name in zip(logs, signatures) if name == PNG_SIGNATURE]
    height, width = TINY_INPUT
    for float_batch, pixel_log, png_log in zip(floats, pixel_logs, png_logs):
        tensor = pixel_log.predict_log.request.inputs["pixels"]
        assert tensor.dtype == tf.uint8.as_datatype_enum and tensor.tensor_content, "uint8 packed as bytes"
        pixels = tf.make_ndarray(tensor)
        assert pixels.shape[1:] == (height, width, 3) and pixels.std() > 0
        # the same photos: normalised as the server's spec does, the pixels are the float records
        assert np.array_equal(np.stack([normalise(p, release.spec) for p in pixels]), float_batch)
        pngs = list(png_log.predict_log.request.inputs["png"].string_val)
        assert len(pngs) == len(pixels) and all(png.startswith(PNG_MAGIC) for png in pngs)
        assert np.array_equal(tf.io.decode_png(pngs[0], channels=3).numpy(), pixels[0]), "lossless"


def test_the_server_accepts_the_export_with_its_bundle_and_answers_pixels_through_the_signature(
        release, tiny_saved_model, demo_dataset, tmp_path):
    config = server_config(tmp_path / "data", None, publisher_keys=(release.public_key,))
    with running_server(config) as server:
        given = server.publish(release.bundle, tiny_saved_model, channel="stable")
        assert given.status_code == 422 and given.json()["error"]["code"] == "saved_model_mismatch", \
            "the bundle's fingerprint is the served copy's, not the folder given to edge-convert"
        published = server.publish(release.bundle, release.export, channel="stable")
        assert published.status_code == 201, published.text
        served = server.services.repository.path_of("tiny", 1)
        assert serving_signatures(served) == {"signatures": SERVED}

        predictor = server.services.predictor
        sent: list[np.dtype] = []
        original = predictor._predict_sync
        predictor._predict_sync = lambda n, v, batch: (sent.append(batch.dtype), original(n, v, batch))[1]
        device = server.enroll(model="tiny")
        spec = release.spec
        pixels = preprocess_pixels(photo_bytes(demo_dataset, "mug"), spec)
        answer = server.client.post("/v1/models/tiny/predict/pixels", content=pixels.tobytes(), params={"top_k": 6}, headers={
            **device.headers, "Content-Type": "application/x-edge-pixels", "X-Pixels-Shape": f"{spec.height}x{spec.width}x3",
            "X-Spec-Digest": spec.pixels_digest()})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": "tiny", "version": 1}
        assert sent == [np.uint8], "the server handed the model the device's uint8 pixels"
        loaded = predictor._loaded[("tiny", 1)]
        assert loaded.warmup_source == "records" and loaded.warmup_requests == 3 * (WARMUP_PHOTOS + 1)

    model = tf.saved_model.load(str(tiny_saved_model)).signatures["serving_default"]
    expected = next(iter(model(image=tf.constant(normalise(pixels, spec)[None])).values())).numpy()[0]
    labels = (tiny_saved_model / "labels.txt").read_text().split()
    scores = {c["label"]: c["score"] for c in answer.json()["top_k"]}
    assert np.allclose([scores[label] for label in labels], expected, atol=1e-5), "the given model's answer"


def test_pixel_signatures_without_a_serving_repo_is_one_clear_error(tiny_saved_model, tmp_path, capsys):
    code = edge_convert([str(tiny_saved_model), "--out", str(tmp_path / "b"), "--skip-validation", "--unsigned",
                         "--pixel-signatures"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--serving-repo" in err
    assert not (tmp_path / "b").exists()


def test_the_python_api_gives_a_served_version_the_pixel_signatures_unless_told_not_to(tmp_path):
    from converter import ConvertOptions, SigningOptions, ValidationOptions

    def checked(**options):  # noqa: ANN003
        return ConvertOptions(out=tmp_path / "b", validation=ValidationOptions(skip=True), signing=SigningOptions(unsigned=True),
                              **options).checked()

    assert checked(serving_repo=tmp_path / "repo").pixel_signatures is True
    assert checked().pixel_signatures is False
    assert checked(serving_repo=tmp_path / "repo", pixel_signatures=False).pixel_signatures is False
