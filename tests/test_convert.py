"""The demo model converts in every mode into a bundle a device can check end to end."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import converter  # noqa: E402
from ai_edge_litert import schema_py_generated as litert_schema  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from converter import (  # noqa: E402
    ConvertOptions,
    QuantizationOptions,
    SigningOptions,
    ValidationOptions,
    convert,
    read_bundle,
    write_keypair,
)
from converter.lite_model import LiteClassifier  # noqa: E402
from converter.metadata import read_metadata  # noqa: E402
from converter.smoke import run_smoke_test  # noqa: E402
from preprocessing import PreprocessSpec, list_labeled_images, preprocess  # noqa: E402

MODES = ("float32", "dynamic", "float16", "int8")
# The tiny session model trains for 2 epochs: its photos sit close to decision boundaries, so quantized
# modes may flip a few of the 24 validation photos. The gate itself is tested in test_convert_gate.py.
LENIENT = dict(min_agreement=0.75, min_class_agreement=0.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys") / "signing.key")


@pytest.fixture(scope="module")
def results(tiny_saved_model: Path, demo_dataset: Path, keys, tmp_path_factory) -> dict:
    """One conversion per mode (float16 for the GPU target), shared by every test here."""
    out = tmp_path_factory.mktemp("bundles")
    done = {}
    for mode in MODES:
        options = ConvertOptions(
            out=out / mode,
            quantization=QuantizationOptions(
                mode=mode, calibration=demo_dataset / "train" if mode == "int8" else None
            ),
            validation=ValidationOptions(images=demo_dataset / "val", **LENIENT),
            signing=SigningOptions(key=keys[0]),
            target="gpu" if mode == "float16" else "cpu",
            name="tiny",
            version=7,
        )
        done[mode] = convert(tiny_saved_model, options)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_makes_a_bundle_a_device_trusts(results, keys, mode, tiny_saved_model):
    result = results[mode]
    bundle = read_bundle(result.bundle, keys[1])
    assert bundle.signature == "verified"
    manifest = bundle.manifest
    assert (manifest.name, manifest.version, manifest.quantization) == ("tiny", 7, mode)
    assert manifest.labels == tuple((tiny_saved_model / "labels.txt").read_text().split())
    assert manifest.float_preprocess_spec == PreprocessSpec.from_json(
        (tiny_saved_model / "preprocess_spec.json").read_text()
    )
    assert manifest.source["fingerprint"]["files_sha256"]
    assert manifest.source["fingerprint"]["singleprint"]
    assert manifest.source["saved_model"] == tiny_saved_model.name, "no build-machine path in a shipped bundle"
    assert str(tiny_saved_model.parent) not in (result.bundle / "manifest.json").read_text()
    assert manifest.validation == result.validation
    assert manifest.signing["key_id"] == bundle.key_id


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_model_carries_standard_tflite_metadata(results, mode, tiny_saved_model):
    model = (results[mode].bundle / "model.tflite").read_bytes()
    spec = PreprocessSpec.from_json((tiny_saved_model / "preprocess_spec.json").read_text())
    meta = read_metadata(model)
    assert meta.labels == results[mode].manifest.labels
    assert meta.mean == pytest.approx(spec.pixel_mean) and meta.std == pytest.approx(spec.pixel_std)
    assert meta.color_space == "RGB" and meta.min_parser_version == "1.0.0"
    # Read the layout again with nothing from the writer: LiteRT's model schema and zipfile.
    root = litert_schema.Model.GetRootAs(model, 0)
    names = {root.Metadata(i).Name().decode(): root.Metadata(i).Buffer() for i in range(root.MetadataLength())}
    assert "TFLITE_METADATA" in names
    buffer = root.Buffers(names["TFLITE_METADATA"]).DataAsNumpy().tobytes()
    assert buffer[4:8] == b"M001"  # the metadata flatbuffer's file identifier
    with zipfile.ZipFile(io.BytesIO(model)) as archive:
        info = archive.getinfo("labels.txt")
        assert info.compress_type == zipfile.ZIP_STORED
        assert archive.read(info).decode().split() == list(meta.labels)


@pytest.mark.slow
def test_int8_is_integer_from_input_to_output(results, demo_dataset):
    result = results["int8"]
    model = (result.bundle / "model.tflite").read_bytes()
    interpreter = Interpreter(model_content=model)
    kinds = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert "float32" not in kinds and "int8" in kinds
    manifest = result.manifest
    assert manifest.input.dtype == "uint8" and manifest.output.dtype == "uint8"
    assert manifest.input.quantization is not None and manifest.output.quantization is not None
    # The bundle's spec is the integer spec: preprocess() output feeds the model as is.
    assert manifest.preprocess_spec.dtype == "uint8"
    assert manifest.preprocess_spec.quantization == manifest.input.quantization
    photo = list_labeled_images(demo_dataset / "val").paths[0]
    x = preprocess(photo, manifest.preprocess_spec)
    assert x.dtype == np.uint8
    with LiteClassifier(model) as lite:
        probabilities = lite.predict(x)
    assert probabilities.shape == (len(manifest.labels),)
    assert abs(float(probabilities.sum()) - 1.0) < 0.05


@pytest.mark.slow
def test_float_modes_keep_float_inputs(results):
    for mode in ("float32", "dynamic", "float16"):
        manifest = results[mode].manifest
        assert manifest.input.dtype == "float32" and manifest.input.quantization is None
        assert manifest.preprocess_spec == manifest.float_preprocess_spec


@pytest.mark.slow
def test_the_report_compares_both_models_per_class(results, demo_dataset):
    photos = list_labeled_images(demo_dataset / "val", results["float32"].manifest.labels)
    for mode, result in results.items():
        report = result.validation
        assert report.images == len(photos)
        assert [c.label for c in report.per_class] == list(photos.labels)
        assert sum(c.images for c in report.per_class) == len(photos)
        assert 0.0 <= report.agreement <= 1.0 and report.passed
        assert report.tflite.size_bytes == result.manifest.model_size
        assert 0 < report.size_ratio < 1, mode
        assert report.tflite.latency_ms > 0 and report.saved_model.latency_ms > 0
    exact = results["float32"].validation
    assert exact.agreement == 1.0 and exact.mean_abs_diff < 1e-4
    assert exact.tflite.accuracy == exact.saved_model.accuracy
    sizes = {mode: r.manifest.model_size for mode, r in results.items()}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    assert sizes["dynamic"] < sizes["float32"]


@pytest.mark.slow
def test_gpu_target_is_float16_and_lists_its_ops(results):
    gpu = results["float16"].gpu
    assert results["float16"].manifest.target == "gpu"
    assert gpu is not None and gpu.compatible and not gpu.fallback_ops
    assert "CONV_2D" in gpu.ops and "DEPTHWISE_CONV_2D" in gpu.ops
    assert results["float32"].gpu is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_smoke_test_replays_on_a_device(results, keys, mode):
    bundle = read_bundle(results[mode].bundle, keys[1])
    smoke = bundle.manifest.smoke_test
    assert 1 <= len(smoke.cases) <= 3
    assert len({case.expected_label for case in smoke.cases}) == len(smoke.cases)
    with LiteClassifier(bundle.read_model()) as lite:
        assert run_smoke_test(smoke, lite, bundle.spec, bundle.labels).passed
        first = smoke.cases[0]
        wrong = type(smoke)((type(first)(first.image_png, first.expected_label,
                                          tuple(1.0 - p for p in first.expected_probabilities)),), smoke.tolerance)
        assert not run_smoke_test(wrong, lite, bundle.spec, bundle.labels).passed


@pytest.mark.slow
@pytest.mark.parametrize("mode, tolerance", [("float32", 1e-4), ("int8", 0.05)])
def test_mediapipe_image_classifier_reads_the_bundle(results, demo_dataset, mode, tolerance):
    """An off-the-shelf runtime takes labels and normalisation from the metadata alone.

    For int8 it feeds raw pixels to the uint8 input: the calibration's black and white frames make
    the input quantization (about 2/255, 127) map pixels to almost themselves.
    """
    pytest.importorskip("mediapipe")
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from PIL import Image

    from preprocessing import prepare

    result = results[mode]
    spec = result.manifest.preprocess_spec.replace(fit="stretch")
    photo = list_labeled_images(demo_dataset / "val").paths[0]
    pixels = np.asarray(Image.open(photo).convert("RGB").resize((spec.width, spec.height)))
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=str(result.bundle / "model.tflite")), max_results=10
    )
    with vision.ImageClassifier.create_from_options(options) as classifier:
        found = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels)))
    scores = {c.category_name: c.score for c in found.classifications[0].categories}
    with LiteClassifier((result.bundle / "model.tflite").read_bytes()) as lite:
        expected = lite.predict(prepare(pixels, spec))
    assert set(scores) == set(result.manifest.labels)
    for label, p in zip(result.manifest.labels, expected):
        assert scores[label] == pytest.approx(float(p), abs=tolerance)


def test_every_exported_name_exists():
    for name in converter.__all__:
        assert getattr(converter, name) is not None, name
