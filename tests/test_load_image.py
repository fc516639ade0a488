"""A seller's photo arrives in whatever format the phone wrote: decode it upright, in RGB, or say why not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocessing import DecodeLimits, InvalidImageError, load_image
from tests.conftest import encode, mean_abs_diff, real_photo_path, with_orientation


def test_a_real_jpeg_from_a_path_decodes_to_rgb_uint8(rocket_jpeg):
    image = load_image(real_photo_path("rocket.jpg"))
    reference = np.asarray(Image.open(io.BytesIO(rocket_jpeg)).convert("RGB"))
    assert image.dtype == np.uint8 and image.shape == reference.shape
    assert np.array_equal(image, reference)


def test_path_bytes_and_file_object_give_the_same_pixels(tmp_path, rocket_jpeg):
    path = tmp_path / "photo.jpg"
    path.write_bytes(rocket_jpeg)
    from_path = load_image(str(path))
    assert np.array_equal(from_path, load_image(path))
    assert np.array_equal(from_path, load_image(rocket_jpeg))
    assert np.array_equal(from_path, load_image(bytearray(rocket_jpeg)))
    with path.open("rb") as handle:
        assert np.array_equal(from_path, load_image(handle))


def test_the_format_comes_from_the_bytes_not_the_file_name(tmp_path, chelsea):
    misnamed = tmp_path / "photo.jpg"
    misnamed.write_bytes(encode(chelsea, "PNG"))
    assert np.array_equal(load_image(misnamed), np.asarray(chelsea))


@pytest.mark.parametrize(
    "fmt, params, tolerance",
    [
        ("JPEG", {"quality": 92}, 4.0),
        ("JPEG", {"quality": 92, "progressive": True}, 4.0),
        ("PNG", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("WEBP", {"quality": 90}, 4.0),
        ("BMP", {}, 0.0),
    ],
)
def test_every_accepted_format_decodes_close_to_the_original(chelsea, fmt, params, tolerance):
    decoded = load_image(encode(chelsea, fmt, **params))
    assert decoded.shape == (300, 451, 3)
    assert mean_abs_diff(decoded, np.asarray(chelsea)) <= tolerance


def test_cmyk_jpeg_becomes_rgb(chelsea):
    decoded = load_image(encode(chelsea.convert("CMYK"), "JPEG", quality=95))
    assert decoded.shape == (300, 451, 3)
    assert mean_abs_diff(decoded, np.asarray(chelsea)) < 6.0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(chelsea, fmt):
    decoded = load_image(encode(chelsea.convert("L"), fmt))
    assert decoded.shape == (300, 451, 3)
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and np.array_equal(decoded[..., 1], decoded[..., 2])


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256).astype(np.uint16)[None, :]).repeat(4, axis=0)
    decoded = load_image(encode(Image.fromarray(ramp), "PNG"))
    assert decoded.shape == (4, 256, 3)
    assert decoded[0, 0, 0] == 0 and decoded[0, -1, 0] == 255
    assert 120 <= decoded[0, 128, 0] <= 135  # mid-grey stays mid-grey


def test_transparent_pixels_become_white_like_a_product_shot():
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 0, 20, 10))
    decoded = load_image(encode(rgba, "PNG"))
    assert tuple(decoded[5, 2]) == (255, 255, 255)
    assert tuple(decoded[5, 15]) == (0, 0, 255)


def test_palette_png_with_a_transparent_index_composites_on_white():
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(1, (5, 0, 10, 10))
    decoded = load_image(encode(palette, "PNG", transparency=0))
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[0, 9]) == (0, 200, 0)


def test_a_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    decoded = load_image(data)
    assert decoded.shape == (16, 16, 3)
    assert decoded[8, 8, 0] > 200 and decoded[8, 8, 2] < 50


def test_a_real_gif_shipped_by_scikit_image_decodes():
    decoded = load_image(real_photo_path("no_time_for_that_tiny.gif"))
    assert decoded.ndim == 3 and decoded.shape[2] == 3 and decoded.std() > 0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(chelsea, orientation):
    decoded = load_image(with_orientation(chelsea, orientation))
    assert decoded.shape == (300, 451, 3)  # upright, whatever the stored pixels were
    assert mean_abs_diff(decoded, np.asarray(chelsea)) < 4.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_draft_decoding_respects_orientation_too(orientation):
    big = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (2400, 3200, 3), dtype=np.uint8)
    ).resize((3200, 2400))
    decoded = load_image(with_orientation(big, orientation, quality=80), draft_size=(224, 224))
    assert decoded.shape == (300, 400, 3)  # 1/8 scale, upright


def test_draft_decodes_a_12_megapixel_jpeg_at_one_eighth(chelsea):
    big = encode(chelsea.resize((4000, 3000)), "JPEG", quality=90)
    assert load_image(big).shape == (3000, 4000, 3)
    assert load_image(big, draft_size=(224, 224)).shape == (375, 500, 3)
    assert load_image(big, draft_size=(1000, 1000)).shape == (1500, 2000, 3)  # never below the target


# --- Every bad input gets its code, and nothing else -------------------------------------------------


def _code_of(source, **kwargs) -> str:
    with pytest.raises(InvalidImageError) as raised:
        load_image(source, **kwargs)
    assert isinstance(raised.value, ValueError)
    assert raised.value.message and "\n" not in raised.value.message
    return raised.value.code


def _message_of(source, **kwargs) -> str:
    with pytest.raises(InvalidImageError) as raised:
        load_image(source, **kwargs)
    return raised.value.message


def test_empty_input_is_refused_as_empty(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _code_of(b"") == "empty"
    assert _code_of(empty) == "empty"
    assert _code_of(io.BytesIO(b"")) == "empty"


def test_missing_files_and_folders_are_not_found(tmp_path):
    assert _code_of(tmp_path / "nope.jpg") == "not_found"
    assert _code_of(tmp_path) == "not_found"


@pytest.mark.parametrize(
    "data",
    [b"hello, this is a text file", b"%!PS-Adobe", bytes(range(256)) * 4, b"\x00" * 100],
)
def test_bytes_that_are_no_image_are_not_an_image(data):
    assert _code_of(data) == "not_an_image"


def test_a_text_file_named_jpg_is_not_an_image(tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("definitely not a photo")
    assert _code_of(fake) == "not_an_image"


def test_known_but_refused_formats_are_unsupported(chelsea):
    assert _code_of(real_photo_path("multipage.tif")) == "unsupported_format"
    assert _code_of(encode(chelsea, "TIFF")) == "unsupported_format"
    assert _code_of(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40) == "unsupported_format"
    assert _code_of(b"%PDF-1.7\n" + b"\x00" * 40) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_cut_off_upload_is_truncated(chelsea, fmt, keep):
    data = encode(chelsea, fmt)
    assert _code_of(data[: int(len(data) * keep)]) == "truncated"


def test_a_header_cut_off_is_truncated(chelsea):
    assert _code_of(encode(chelsea, "PNG")[:20]) == "truncated"
    assert _code_of(encode(chelsea, "JPEG")[:40]) == "truncated"


def test_damaged_data_is_corrupt(chelsea):
    data = bytearray(encode(chelsea, "PNG"))
    data[40:400] = b"\xff" * 360  # scribble over IHDR's CRC and the start of IDAT
    assert _code_of(bytes(data)) == "corrupt"


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding():
    # PNGs that claim 9000 x 9000 (81 MP) and 30000 x 30000 pixels (900 MP) in a few kilobytes.
    for side in (9000, 30000):
        bomb = encode(Image.new("1", (side, side)), "PNG")
        assert len(bomb) < 200_000
        with pytest.raises(InvalidImageError) as raised:
            load_image(bomb)
        assert raised.value.code == "too_large"
        assert "limit is 50.0 megapixels" in raised.value.message
    assert "9000x9000" in _message_of(encode(Image.new("1", (9000, 9000)), "PNG"))


def test_the_pixel_limit_is_configurable(chelsea):
    data = encode(chelsea, "PNG")
    assert _code_of(data, limits=DecodeLimits(max_pixels=100_000)) == "too_large"
    assert load_image(data, limits=DecodeLimits(max_pixels=200_000)).shape == (300, 451, 3)


def test_the_file_size_is_bounded_for_paths_bytes_and_streams(tmp_path, chelsea):
    data = encode(chelsea, "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    small = DecodeLimits(max_bytes=1000)
    assert _code_of(path, limits=small) == "too_large"
    assert _code_of(data, limits=small) == "too_large"
    assert _code_of(io.BytesIO(data), limits=small) == "too_large"


def test_a_text_mode_file_object_is_a_programming_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x")
    with path.open("r") as handle, pytest.raises(TypeError, match="binary mode"):
        load_image(handle)
    with pytest.raises(TypeError, match="path, bytes or a binary file"):
        load_image(12345)  # type: ignore[arg-type]


def _png_with_orientation(upright: Image.Image, orientation: int, *, after_pixels: bool) -> bytes:
    """A PNG whose eXIf chunk says `orientation`, before the pixel data or (as some tools write it) after."""
    import struct
    import zlib

    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(upright.transpose(inverse), "PNG", exif=exif.tobytes())
    if not after_pixels:
        return data
    start = data.index(b"eXIf") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    chunk = data[start:start + 12 + length]
    rest = data[:start] + data[start + len(chunk):]
    end = rest.index(b"IEND") - 4
    assert zlib.crc32(chunk[4:-4]) == struct.unpack(">I", chunk[-4:])[0]
    return rest[:end] + chunk + rest[end:]


@pytest.mark.parametrize("after_pixels", [False, True])
@pytest.mark.parametrize("orientation", [3, 6])
def test_a_png_with_exif_orientation_is_turned_upright(chelsea, orientation, after_pixels):
    data = _png_with_orientation(chelsea, orientation, after_pixels=after_pixels)
    assert np.array_equal(load_image(data), np.asarray(chelsea))
    small = load_image(data, draft_size=(64, 64))
    assert small.shape == (300, 451, 3)  # only 2x the target per side: not reduced
