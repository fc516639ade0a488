"""Shared fixtures: real photos shipped by scikit-image, encoders for every format we accept."""

from __future__ import annotations

pytest_plugins = ["tests.model_fixtures"]

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SKIMAGE_DATA = Path(__import__("skimage.data", fromlist=["data"]).__file__).parent


def real_photo_path(name: str = "rocket.jpg") -> Path:
    """A real photo file that ships with scikit-image (rocket.jpg, chelsea.png, coffee.png, ...)."""
    path = SKIMAGE_DATA / name
    assert path.is_file(), f"scikit-image no longer ships {name}"
    return path


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """The bytes of `image` saved as `fmt` with Pillow."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def with_orientation(upright: Image.Image, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels need EXIF `orientation` applied to look like `upright`."""
    inverse = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # viewer rotates 270 (clockwise 90) to undo
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif)


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    """A real RGB photo (the cat from scikit-image), 451x300."""
    return Image.open(real_photo_path("chelsea.png")).convert("RGB")


@pytest.fixture(scope="session")
def rocket_jpeg() -> bytes:
    """A real JPEG file, as a camera or phone would send it."""
    return real_photo_path("rocket.jpg").read_bytes()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))
