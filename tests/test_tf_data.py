"""Training and calibration read photos through tf.data, and still get the device's exact tensors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from preprocessing import PreprocessSpec, preprocess  # noqa: E402
from preprocessing.tf_data import (  # noqa: E402
    folder_dataset,
    image_dataset,
    naive_preprocess,
    representative_dataset,
)
from tests.conftest import encode, mean_abs_diff, with_orientation  # noqa: E402

SPEC = PreprocessSpec(height=64, width=64)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, chelsea):
    """A small labelled folder with the awkward cases: a big JPEG, a rotated one, a PNG with alpha."""
    root = tmp_path_factory.mktemp("photos")
    (root / "cat").mkdir()
    (root / "other").mkdir()
    (root / "cat" / "big.jpg").write_bytes(encode(chelsea.resize((3000, 2000)), "JPEG", quality=88))
    (root / "cat" / "rotated.jpg").write_bytes(with_orientation(chelsea, 6))
    alpha = chelsea.convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    (root / "other" / "alpha.png").write_bytes(encode(alpha, "PNG"))
    (root / "other" / "plain.webp").write_bytes(encode(chelsea, "WEBP", quality=90))
    return root


def test_tf_data_yields_exactly_what_the_device_computes(photo_folder):
    # Tolerance: zero. tf.data calls the same preprocess(), so the tensors are bit-identical.
    dataset, listing = folder_dataset(photo_folder, SPEC)
    assert listing.labels == ("cat", "other")
    seen = 0
    for (image, target), path, expected_target in zip(dataset, listing.paths, listing.targets):
        assert int(target) == expected_target
        assert np.array_equal(image.numpy(), preprocess(path, SPEC))
        seen += 1
    assert seen == 4


def test_batches_and_shuffling_keep_photos_and_targets_together(photo_folder):
    _, listing = folder_dataset(photo_folder, SPEC)
    dataset = image_dataset(listing.paths, SPEC, listing.targets, batch_size=3, shuffle=True, seed=1)
    expected = {t: [preprocess(p, SPEC) for p, tt in zip(listing.paths, listing.targets) if tt == t] for t in (0, 1)}
    sizes = []
    for images, targets in dataset:
        sizes.append(len(images))
        for image, target in zip(images.numpy(), targets.numpy()):
            assert any(np.array_equal(image, candidate) for candidate in expected[int(target)])
    assert sizes == [3, 1]


def test_calibration_sees_the_same_tensors_with_a_batch_axis(photo_folder):
    _, listing = folder_dataset(photo_folder, SPEC)
    samples = list(representative_dataset(listing.paths, SPEC, limit=2)())
    assert len(samples) == 2
    assert samples[0][0].shape == (1, 64, 64, 3)
    assert np.array_equal(samples[0][0][0], preprocess(listing.paths[0], SPEC))


def test_why_the_naive_tf_image_pipeline_is_not_good_enough(photo_folder):
    """`decode_image` + `tf.image.resize` is what tutorials write. It differs from our path because it
    ignores EXIF orientation (the rotated phone photo comes out sideways), stretches instead of
    cropping, and does not antialias when it shrinks a large photo."""
    spec = PreprocessSpec(height=64, width=64, fit="stretch", jpeg_draft=False)
    rotated = photo_folder / "cat" / "rotated.jpg"
    naive = naive_preprocess(rotated, spec).numpy()
    ours = preprocess(rotated, spec)
    assert mean_abs_diff(naive, ours) > 0.2  # sideways: a different picture altogether
    # Even upright, with the same stretch and no draft, shrinking 3000x2000 without antialiasing aliases.
    big = photo_folder / "cat" / "big.jpg"
    naive_big = naive_preprocess(big, spec).numpy()
    ours_big = preprocess(big, spec)
    assert mean_abs_diff(naive_big, ours_big) > 0.01
    # Our path, in contrast, gives the sideways phone photo the same tensor as its upright twin.
    upright = preprocess(photo_folder / "other" / "plain.webp", spec)
    assert mean_abs_diff(ours, upright) < 0.05
