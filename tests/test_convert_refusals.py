"""When the converter says no: the agreement gate, and every bad input, with one line and no bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from converter import (  # noqa: E402
    ConvertOptions,
    DataError,
    ModelContractError,
    NotASavedModelError,
    QuantizationOptions,
    SigningOptions,
    UnsupportedOpError,
    ValidationOptions,
    convert,
    read_bundle,
    write_keypair,
)
from converter.cli import main  # noqa: E402
from preprocessing import PreprocessSpec  # noqa: E402

LABELS = ("mug", "t-shirt", "sneaker", "book", "bottle", "backpack")
SPEC = PreprocessSpec(height=32, width=32)


def save_module(path: Path, serve, *, labels=LABELS, spec: PreprocessSpec | None = SPEC) -> Path:
    """Save a tf.function as a SavedModel with the sidecar files the converter expects."""
    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    if labels is not None:
        (path / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    if spec is not None:
        (path / "preprocess_spec.json").write_text(spec.to_json())
    return path


def image_input(shape=(None, 32, 32, 3), dtype=tf.float32):
    return [tf.TensorSpec(shape, dtype, name="image")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd_models")

    @tf.function(input_signature=image_input())
    def near_tie(image):
        # The last label wins every photo by ~0.002 in probability: float conversions keep that, but
        # int8's output steps of 1/256 round all six probabilities to the same value.
        brightness = tf.reduce_mean(image, axis=[1, 2, 3])[:, None]
        logits = tf.concat([tf.zeros_like(brightness)] * 5 + [0.01 + 0.001 * brightness], axis=1)
        return {"probabilities": tf.nn.softmax(logits)}

    @tf.function(input_signature=[tf.TensorSpec([None, 10], tf.float32, name="features")])
    def tabular(features):
        return {"probabilities": tf.nn.softmax(tf.concat([features[:, :3]] * 2, axis=1))}

    @tf.function(input_signature=image_input())
    def logits(image):
        return {"logits": tf.concat([tf.reduce_sum(image, axis=[1, 2])] * 2, axis=1)}

    @tf.function(input_signature=image_input())
    def matrix_solve(image):
        x = tf.reshape(tf.concat([tf.reduce_mean(image, axis=[1, 2])] * 12, axis=1), [-1, 6, 6])
        return {"probabilities": tf.nn.softmax(tf.linalg.solve(x + tf.eye(6) * 3.0, x)[:, 0, :])}

    @tf.function(input_signature=image_input())
    def top_k(image):
        scores = tf.concat([tf.reduce_mean(image, axis=[1, 2])] * 2, axis=1)
        ranked, _ = tf.math.top_k(scores, k=6)  # TOPK_V2: a CPU-only op
        return {"probabilities": tf.nn.softmax(ranked)}

    return {
        "top_k": save_module(root / "top_k", top_k),
        "near_tie": save_module(root / "near_tie", near_tie),
        "tabular": save_module(root / "tabular", tabular),
        "logits": save_module(root / "logits", logits),
        "matrix_solve": save_module(root / "matrix_solve", matrix_solve),
        "no_spec": save_module(root / "no_spec", near_tie, spec=None),
        "five_labels": save_module(root / "five_labels", near_tie, labels=LABELS[:5]),
    }


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("key") / "signing.key")


def nothing_written(folder: Path) -> bool:
    """No bundle and no leftover temporary folder."""
    return not folder.exists() and not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the agreement gate ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gate_passes_a_faithful_conversion(models, demo_dataset, key, tmp_path, capsys):
    out = tmp_path / "bundle"
    code, stdout, stderr = cli(capsys, models["near_tie"], "--out", out, "--validation", demo_dataset / "val",
                               "--sign-key", key[0])
    assert code == 0, stderr
    assert "top-1 agreement 100.0%" in stdout and "bundle " in stdout
    assert read_bundle(out, key[1]).manifest.validation.agreement == 1.0


@pytest.mark.slow
def test_the_gate_refuses_int8_that_changes_answers(models, demo_dataset, key, tmp_path, capsys):
    out = tmp_path / "bundle"
    code, stdout, stderr = cli(capsys, models["near_tie"], "--out", out, "--quantize", "int8",
                               "--calibration", demo_dataset / "train", "--validation", demo_dataset / "val",
                               "--sign-key", key[0])
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("edge-convert: conversion refused, no bundle written: ")
    assert "top-1 agreement 0.0% is below --min-agreement 98.0%" in stderr
    assert "class 'backpack' agreement 0.0%" in stderr
    assert "below gate" in stdout  # the report is still shown, per class
    assert nothing_written(out)


@pytest.mark.slow
def test_the_gate_threshold_is_the_callers(models, demo_dataset, key, tmp_path):
    result = convert(models["near_tie"], ConvertOptions(
        out=tmp_path / "bundle",
        quantization=QuantizationOptions("int8", demo_dataset / "train"),
        validation=ValidationOptions(images=demo_dataset / "val", min_agreement=0.0, min_class_agreement=0.0),
        signing=SigningOptions(key=key[0]),
    ))
    assert result.validation.agreement == 0.0 and result.validation.passed
    assert result.bundle.is_dir()


@pytest.mark.slow
def test_a_gate_failure_in_json(models, demo_dataset, key, tmp_path, capsys):
    code, stdout, _ = cli(capsys, models["near_tie"], "--out", tmp_path / "b", "--quantize", "int8",
                          "--calibration", demo_dataset / "train", "--validation", demo_dataset / "val",
                          "--sign-key", key[0], "--json")
    doc = json.loads(stdout)
    assert code == 1 and doc["ok"] is False
    assert doc["error"]["type"] == "ValidationGateError"
    assert doc["validation"]["agreement"] == 0.0 and doc["validation"]["passed"] is False


# --- bad inputs: exit 2, one line, nothing written ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("file", "is a file, not a SavedModel folder"),
        ("empty_dir", "is not a SavedModel: it has no saved_model.pb"),
        ("tabular", "input 'features' is float32 [None, 10], not an image"),
        ("no_spec", "has no preprocess_spec.json beside saved_model.pb: pass --spec FILE"),
        ("five_labels", "lists 5 labels but the model outputs 6 probabilities"),
        ("logits", "is not probabilities"),
        ("matrix_solve", "op(s) TFLite has no builtin kernel for: tf.MatrixSolve"),
    ],
)
def test_bad_models_get_one_clear_line(case, message, models, demo_dataset, key, tmp_path, capsys):
    paths = {"missing": tmp_path / "nope", "file": tmp_path / "model.keras", "empty_dir": tmp_path / "empty"}
    (tmp_path / "model.keras").write_bytes(b"PK")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "bundle"
    code, stdout, stderr = cli(capsys, paths.get(case) or models[case], "--out", out, "--sign-key", key[0],
                               "--validation", demo_dataset / "val")
    assert code == 2
    assert stderr.startswith("edge-convert: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert "Traceback" not in stdout + stderr
    assert nothing_written(out)


@pytest.mark.slow
def test_errors_carry_their_kind(models, demo_dataset, key, tmp_path):
    base = dict(out=tmp_path / "b", signing=SigningOptions(key=key[0]),
                validation=ValidationOptions(images=demo_dataset / "val"))
    with pytest.raises(UnsupportedOpError) as caught:
        convert(models["matrix_solve"], ConvertOptions(**base))
    assert caught.value.ops == ("tf.MatrixSolve",)
    with pytest.raises(NotASavedModelError):
        convert(tmp_path, ConvertOptions(**base))
    with pytest.raises(ModelContractError):
        convert(models["tabular"], ConvertOptions(**base))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(SPEC.to_json())
    assert convert(models["no_spec"], ConvertOptions(**base, spec=spec_file)).bundle.is_dir()


@pytest.mark.slow
def test_calibration_and_validation_folders_are_checked(models, demo_dataset, key, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    strange = tmp_path / "strange"
    shutil.copytree(demo_dataset / "val" / "mug", strange / "teapot")
    out = tmp_path / "bundle"
    base = [models["near_tie"], "--out", out, "--sign-key", key[0]]
    cases = [
        (["--quantize", "int8", "--calibration", tmp_path / "empty", "--validation", demo_dataset / "val"],
         "holds no photos"),
        (["--quantize", "int8", "--calibration", tmp_path / "nowhere", "--validation", demo_dataset / "val"],
         "calibration folder"),
        (["--validation", strange], "is not one of the labels"),
        (["--validation", tmp_path / "nowhere"], "is not a folder of labelled photos"),
        (["--quantize", "int8", "--validation", demo_dataset / "val"], "needs --calibration DIR"),
    ]
    for extra, message in cases:
        code, _, stderr = cli(capsys, *base, *extra)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (extra, stderr)
        assert nothing_written(out)
    with pytest.raises(DataError):
        convert(models["near_tie"], ConvertOptions(
            out=out, quantization=QuantizationOptions("int8", tmp_path / "empty"),
            validation=ValidationOptions(images=demo_dataset / "val"), signing=SigningOptions(key=key[0])))


def test_usage_mistakes_are_caught_before_any_work(tmp_path, key, capsys):
    model = tmp_path / "model"  # never read: every case fails on its options first
    cases = [
        ([model, "--out", tmp_path / "b", "--validation", tmp_path], "pass --sign-key KEY"),
        ([model, "--out", tmp_path / "b", "--sign-key", key[0]], "pass --validation DIR"),
        ([model, "--out", tmp_path / "b", "--unsigned", "--skip-validation", "--min-agreement", "1.5"],
         "--min-agreement must be a number from 0 to 1"),
        ([model, "--out", tmp_path / "b", "--unsigned", "--skip-validation", "--calibration", tmp_path],
         "--calibration is only used by --quantize int8"),
        ([model, "--out", tmp_path / "b", "--unsigned", "--skip-validation", "--name", "../etc"],
         "--name '../etc' must be"),
    ]
    for args, message in cases:
        code, _, stderr = cli(capsys, *args)
        assert code == 2 and message in stderr, (args, stderr)


@pytest.mark.slow
def test_bad_signing_keys_stop_the_conversion_before_it_starts(models, demo_dataset, key, tmp_path, capsys):
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    for bad, message in [(key[1], "is a public key"), (tmp_path / "missing.pem", "does not exist"),
                         (tmp_path / "junk.pem", "not a usable PEM private key")]:
        code, _, stderr = cli(capsys, models["near_tie"], "--out", tmp_path / "b", "--validation",
                              demo_dataset / "val", "--sign-key", bad)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_an_existing_bundle_is_not_replaced_without_force(models, demo_dataset, key, tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [models["near_tie"], "--out", out, "--validation", demo_dataset / "val", "--sign-key", key[0]]
    code, _, stderr = cli(capsys, *args)
    assert code == 2 and "already exists" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    code, _, stderr = cli(capsys, *args, "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and read_bundle(out, key[1]).manifest.quantization == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_probability_check_uses_the_real_rows():
    from converter.validate import _check_probabilities

    class Fake:
        path, output_name = Path("m"), "p"

    _check_probabilities(np.full((2, 4), 0.25, np.float32), Fake())
    with pytest.raises(ModelContractError, match="sums to 2"):
        _check_probabilities(np.full((2, 4), 0.5, np.float32), Fake())


@pytest.mark.slow
def test_a_failed_bundle_write_takes_the_serving_version_back(models, demo_dataset, key, tmp_path, monkeypatch):
    import converter.pipeline as pipeline
    from converter import PublishError

    def disk_full(*args, **kwargs):
        raise PublishError("cannot write the bundle: No space left on device")

    monkeypatch.setattr(pipeline, "write_bundle", disk_full)
    with pytest.raises(PublishError):
        convert(models["near_tie"], ConvertOptions(
            out=tmp_path / "bundle", validation=ValidationOptions(images=demo_dataset / "val"),
            signing=SigningOptions(key=key[0]), name="tie", serving_repo=tmp_path / "repo", pixel_signatures=False,
        ))
    assert list((tmp_path / "repo" / "tie").iterdir()) == []


@pytest.mark.slow
def test_gpu_target_lists_the_ops_that_would_fall_back_to_the_cpu(models, demo_dataset, key, tmp_path, capsys):
    code, stdout, stderr = cli(capsys, models["top_k"], "--out", tmp_path / "b", "--target", "gpu",
                               "--validation", demo_dataset / "val", "--sign-key", key[0])
    assert code == 0, stderr
    assert "GPU delegate: 1 op(s) would fall back to the CPU:" in stdout
    assert "TOPK_V2: not an op the GPU delegate implements" in stdout
    gpu = read_bundle(tmp_path / "b", key[1]).manifest.gpu
    assert not gpu.compatible and [f.op for f in gpu.fallback_ops] == ["TOPK_V2"]


def test_analyzer_gpu_warnings_are_used_when_the_build_has_them():
    from converter.gpu import parse_analyzer_output

    text = """Subgraph#0 main(T#0) -> [T#3]
  Op#0 CONV_2D(T#0, T#1, T#2) -> [T#3]
GPU COMPATIBILITY WARNING: Not supported op CONV_2D with fused RELU_N1
  Op#1 FlexAddV2(T#3, T#3) -> [T#4]
GPU COMPATIBILITY WARNING: Not supported custom op FlexAddV2

GPU COMPATIBILITY WARNING: Subgraph#0 has GPU delegate compatibility issues at nodes 0, 1 with TFLite runtime version 2.21.0
"""
    report = parse_analyzer_output(text)
    assert report.analyzer_checked and not report.compatible
    assert [(f.index, f.op, f.reason) for f in report.fallback_ops] == [
        (0, "CONV_2D", "Not supported op CONV_2D with fused RELU_N1"),
        (1, "FlexAddV2", "Not supported custom op FlexAddV2"),
    ]


def test_one_collapsed_class_fails_the_gate_even_when_the_overall_agreement_passes():
    from converter.report import ModelScore
    from converter.validate import _report
    from preprocessing import LabeledImages

    labels = tuple(f"product-{i}" for i in range(50))
    targets = np.repeat(np.arange(50), 10)
    saved = np.eye(50, dtype=np.float32)[targets]
    converted = saved.copy()
    converted[targets == 7] = np.eye(50, dtype=np.float32)[0]  # int8 sends every product-7 photo to product-0
    photos = LabeledImages(tuple(Path(f"{i}.png") for i in range(len(targets))), tuple(targets.tolist()), labels)
    score = ModelScore(1.0, 1, 1.0, 1.0)
    report = _report(photos, saved, converted, ValidationOptions(), saved_model=score, tflite=score,
                     confidence_threshold=0.5)
    assert report.agreement == pytest.approx(0.98)  # 490 of 500: the overall gate alone would pass
    assert not report.passed
    assert report.failures == ("class 'product-7' agreement 0.0% is below --min-class-agreement 80.0%",)
