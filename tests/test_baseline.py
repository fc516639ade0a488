"""A converted bundle carries its own baseline: what its model answered on the validation photos and
what those photos looked like, signed with the rest, so devices and the server can measure drift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converter import BundleFormatError, Manifest, SignatureMismatchError, read_bundle, write_bundle
from converter.baseline import HISTOGRAM_BINS, Baseline, histogram_bin
from preprocessing import (
    InputStats,
    PreprocessSpec,
    fit_pixels,
    list_labeled_images,
    load_image,
    normalise,
    prepare,
    preprocess,
    preprocess_pixels,
)
from tests.baseline_fixtures import validated_bundle  # noqa: F401  (fixture)
from tests.conftest import real_photo_path


@pytest.mark.parametrize("fit", ["pad", "center_crop", "stretch"])
def test_fit_pixels_of_a_decoded_photo_are_what_preprocess_pixels_gives(fit):
    spec = PreprocessSpec(height=40, width=56, fit=fit, pad_color=(128, 128, 128))
    for name in ("rocket.jpg", "chelsea.png"):
        path = real_photo_path(name)
        decoded = load_image(path, draft_size=spec.size)  # as preprocess decodes for a jpeg_draft spec
        fitted = fit_pixels(decoded, spec)
        assert fitted.dtype == np.uint8 and fitted.shape == spec.pixel_shape
        assert np.array_equal(fitted, preprocess_pixels(path, spec))
        assert np.array_equal(normalise(fitted, spec), prepare(decoded, spec))


def test_fit_pixels_refuses_what_is_not_rgb_pixels_in_one_line():
    with pytest.raises(ValueError, match=r"^fit_pixels needs an RGB uint8 array .* got float32 \(8, 8, 3\)$"):
        fit_pixels(np.zeros((8, 8, 3), np.float32), PreprocessSpec(height=8, width=8))


@pytest.mark.slow
def test_a_validated_conversion_writes_a_signed_baseline_of_its_own_answers(validated_bundle):
    bundle = read_bundle(validated_bundle.bundle, validated_bundle.public_key)
    assert bundle.signature == "verified"
    manifest = bundle.manifest
    baseline = manifest.baseline
    assert baseline is not None and baseline == validated_bundle.result.manifest.baseline
    doc = json.loads((validated_bundle.bundle / "manifest.json").read_bytes())["baseline"]
    assert set(doc) == {"images", "confidence_threshold", "class_counts", "confidence_histogram",
                        "low_confidence_rate", "per_class_agreement", "input"}
    assert set(doc["input"]) == {"images", "pixels", "mean", "std"}

    photos = list_labeled_images(validated_bundle.validation_photos, manifest.labels)
    assert baseline.images == len(photos) == sum(baseline.class_counts) == sum(baseline.confidence_histogram)
    assert len(baseline.class_counts) == len(manifest.labels) == len(baseline.per_class_agreement)
    assert baseline.confidence_threshold == manifest.confidence_threshold

    # What a device would answer with this bundle, photo by photo, gives the same figures.
    from converter.lite_model import LiteClassifier

    with LiteClassifier(bundle.read_model()) as lite:
        answers = np.stack([lite.predict(preprocess(p, manifest.preprocess_spec)) for p in photos.paths])
    top, score = answers.argmax(axis=1), answers.max(axis=1)
    assert list(baseline.class_counts) == np.bincount(top, minlength=len(manifest.labels)).tolist()
    assert list(baseline.confidence_histogram) == np.bincount(
        [histogram_bin(float(s)) for s in score], minlength=HISTOGRAM_BINS).tolist()
    assert baseline.low_confidence_rate == pytest.approx(float(np.mean(score < manifest.confidence_threshold)))
    # Per-class agreement is the validation report's, label by label.
    by_label = {c.label: c.agreement for c in manifest.validation.per_class}
    assert baseline.per_class_agreement == pytest.approx(tuple(by_label.get(label) for label in manifest.labels))

    # Input statistics: the one InputStats over the fitted pixels a device measures for the same photos.
    stats = InputStats()
    for path in photos.paths:
        stats.add(preprocess_pixels(path, manifest.float_preprocess_spec))
    assert (baseline.input.images, baseline.input.pixels) == (stats.images, stats.pixels) == (
        len(photos), len(photos) * manifest.preprocess_spec.width * manifest.preprocess_spec.height)
    assert baseline.input.mean == pytest.approx(stats.mean, abs=1e-3)
    assert baseline.input.std == pytest.approx(stats.std, abs=1e-3)


@pytest.mark.slow
def test_an_edited_baseline_breaks_the_signature(validated_bundle, tmp_path):
    import shutil

    copy = Path(shutil.copytree(validated_bundle.bundle, tmp_path / "bundle"))
    doc = json.loads((copy / "manifest.json").read_bytes())
    doc["baseline"]["low_confidence_rate"] = 0.5  # someone widens what counts as normal
    (copy / "manifest.json").write_bytes(Manifest.from_json(json.dumps(doc).encode()).to_json())
    with pytest.raises(SignatureMismatchError):
        read_bundle(copy, validated_bundle.public_key)


@pytest.mark.slow
def test_a_manifest_from_before_baselines_still_reads(validated_bundle, tmp_path):
    source = read_bundle(validated_bundle.bundle, validated_bundle.public_key)
    doc = json.loads((validated_bundle.bundle / "manifest.json").read_bytes())
    del doc["baseline"]
    old = Manifest.from_json(json.dumps(doc).encode())
    assert old.baseline is None and old.labels == source.manifest.labels
    # ... and a bundle written without one (validation skipped) is signed and read as before.
    import dataclasses

    written = write_bundle(tmp_path / "old", source.read_model(), dataclasses.replace(old, version=2),
                           sign_key=validated_bundle.private_key)
    again = read_bundle(written, validated_bundle.public_key)
    assert again.signature == "verified" and again.manifest.baseline is None


def _good() -> dict:
    return {
        "images": 4, "confidence_threshold": 0.6, "class_counts": [3, 1],
        "confidence_histogram": [0, 0, 0, 0, 0, 1, 0, 0, 1, 2], "low_confidence_rate": 0.25,
        "per_class_agreement": [1.0, None],
        "input": {"images": 4, "pixels": 400, "mean": [120.5, 118.0, 101.25], "std": [60.0, 58.5, 61.0]},
    }


def test_a_baseline_round_trips_through_its_dict():
    baseline = Baseline.from_dict(_good())
    assert baseline.to_dict() == _good()
    assert baseline.per_class_agreement == (1.0, None)
    assert baseline.input.mean == (120.5, 118.0, 101.25)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(class_counts="3,1"), "baseline.class_counts is not a list (got str)"),
    (lambda d: d.update(class_counts=[3, 1.5]), "baseline.class_counts holds 1.5, not a count"),
    (lambda d: d.update(class_counts=[3, True]), "baseline.class_counts holds True, not a count"),
    (lambda d: d.update(confidence_threshold="0.6"), "baseline.confidence_threshold is not a number (got '0.6')"),
    (lambda d: d.update(low_confidence_rate=1.5), "baseline.low_confidence_rate is not between 0 and 1"),
    (lambda d: d.update(confidence_histogram=[4]), "baseline.confidence_histogram has 1 bins, not 10"),
    (lambda d: d.update(class_counts=[3, 2]), "baseline counts do not add up to its 4 images (class_counts 5"),
    (lambda d: d.update(per_class_agreement=[1.0]), "baseline has 2 class_counts but 1 per_class_agreement"),
    (lambda d: d.pop("input"), "baseline has no field 'input'"),
    (lambda d: d["input"].update(std=[1.0]), "baseline.input has 3 means and 1 standard deviations"),
    (lambda d: d["input"].update(mean=[float("nan")] * 3), "baseline.input.mean holds nan, not a number"),
    (lambda d: d["input"].update(images=-1), "baseline.input.images is not a count (got -1)"),
])
def test_a_malformed_baseline_is_refused_with_the_field_named(change, message):
    doc = _good()
    change(doc)
    with pytest.raises(BundleFormatError) as info:
        Baseline.from_dict(doc)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_baseline_that_is_not_an_object_is_refused():
    with pytest.raises(BundleFormatError, match=r"^manifest.json baseline is not an object \(got list\)$"):
        Baseline.from_dict([1, 2])


@pytest.mark.slow
def test_the_server_takes_a_bundle_with_a_baseline_and_devices_get_it_signed(validated_bundle, tiny_saved_model, tmp_path):
    from edge_runtime.bundles import load_bundle
    from tests.server_fixtures import running_server, server_config

    baseline = validated_bundle.result.manifest.baseline
    config = server_config(tmp_path / "data", f"sqlite:///{tmp_path / 'server.db'}",
                           publisher_keys=(validated_bundle.public_key,))
    with running_server(config) as server:
        response = server.publish(validated_bundle.bundle, tiny_saved_model, channel="stable")
        assert response.status_code == 201, response.text
        device = server.enroll(model="shop")
        assignment = device.assignment()
        assert assignment.status_code == 200, assignment.text
        assert assignment.json()["version"] == 1
        assert Baseline.from_dict(assignment.json()["manifest"]["baseline"]) == baseline
    # The device's own loader verifies the bundle and keeps the baseline.
    assert load_bundle(validated_bundle.bundle, validated_bundle.public_key).manifest.baseline == baseline
