"""From decoded photo to model input: fit, resize, normalise, quantize — identically for every caller."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocessing import PreprocessSpec, load_image, prepare, preprocess
from tests.conftest import encode, mean_abs_diff, real_photo_path, with_orientation


def test_prepare_gives_the_spec_shape_and_dtype(chelsea):
    x = prepare(np.asarray(chelsea), PreprocessSpec(height=96, width=128))
    assert x.shape == (96, 128, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_normalisation_follows_scale_mean_and_std():
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    spec = PreprocessSpec(height=4, width=4, scale=1 / 255, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = prepare(image, spec)
    assert np.allclose(x[0, 0], [(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, 1 / 2.0])


def test_uint8_without_quantization_is_the_raw_resized_photo(chelsea):
    spec = PreprocessSpec(height=32, width=32, dtype="uint8", fit="stretch")
    x = prepare(np.asarray(chelsea), spec)
    assert x.dtype == np.uint8
    assert np.array_equal(x, np.asarray(chelsea.resize((32, 32), Image.Resampling.BILINEAR)))


def test_integer_inputs_are_quantized_with_the_models_scale_and_zero_point(chelsea):
    base = PreprocessSpec(height=32, width=32)
    as_float = prepare(np.asarray(chelsea), base)
    for dtype, zero_point in (("uint8", 128), ("int8", 0)):
        q = prepare(np.asarray(chelsea), base.replace(dtype=dtype, quantization=(1 / 127.5, zero_point)))
        assert q.dtype == np.dtype(dtype)
        dequantized = (q.astype(np.float32) - zero_point) * (1 / 127.5)
        assert np.max(np.abs(dequantized - as_float)) <= 1 / 127.5  # within one quantization step


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything():
    # A wide picture: red left third, green middle, blue right third.
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    image[:, :100, 0] = 255
    image[:, 100:200, 1] = 255
    image[:, 200:, 2] = 255
    cropped = prepare(image, PreprocessSpec(height=10, width=10, fit="center_crop", dtype="uint8"))
    stretched = prepare(image, PreprocessSpec(height=10, width=30, fit="stretch", dtype="uint8"))
    assert (cropped[..., 1] > 200).all()  # only the green middle survives
    assert stretched[5, 2, 0] > 200 and stretched[5, 27, 2] > 200


def test_pad_letterboxes_with_the_pad_colour():
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    x = prepare(image, PreprocessSpec(height=30, width=30, fit="pad", dtype="uint8", pad_color=(255, 255, 255)))
    assert (x[0] == 255).all() and (x[-1] == 255).all()  # white bars above and below
    assert (x[15] == 0).all()  # the photo in the middle


def test_prepare_refuses_arrays_that_are_not_rgb_uint8():
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare(np.zeros((10, 10), dtype=np.uint8), PreprocessSpec())
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare(np.zeros((10, 10, 3), dtype=np.float32), PreprocessSpec())


def test_a_photo_gives_the_same_tensor_from_a_path_bytes_or_a_stream(tmp_path, rocket_jpeg):
    # Tolerance: exact. There is one implementation, so every caller must agree bit for bit.
    spec = PreprocessSpec(height=96, width=96)
    path = tmp_path / "rocket.jpg"
    path.write_bytes(rocket_jpeg)
    reference = preprocess(path, spec)
    assert np.array_equal(reference, preprocess(rocket_jpeg, spec))
    assert np.array_equal(reference, preprocess(io.BytesIO(rocket_jpeg), spec))
    assert np.array_equal(reference, prepare(load_image(path, draft_size=spec.size), spec))


def test_the_draft_fast_path_is_part_of_the_spec(chelsea):
    # A 12-megapixel photo: the DCT-scaled decode is close to, but not bit-identical with, the full decode,
    # which is why the spec says which one every caller uses.
    big = encode(chelsea.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90)
    drafted = preprocess(big, PreprocessSpec(height=96, width=96, jpeg_draft=True))
    full = preprocess(big, PreprocessSpec(height=96, width=96, jpeg_draft=False))
    assert not np.array_equal(drafted, full)
    assert mean_abs_diff(drafted, full) < 0.02  # in [-1, 1] units: under 1% of the range


def test_a_rotated_phone_photo_gives_the_same_tensor_as_the_upright_one(chelsea):
    spec = PreprocessSpec(height=64, width=64)
    upright = preprocess(encode(chelsea, "JPEG", quality=95), spec)
    rotated = preprocess(with_orientation(chelsea, 6), spec)
    assert mean_abs_diff(upright, rotated) < 0.02


def test_a_real_png_with_alpha_from_scikit_image_prepares(tmp_path):
    x = preprocess(real_photo_path("logo.png"), PreprocessSpec(height=48, width=48))
    assert x.shape == (48, 48, 3) and np.isfinite(x).all()
