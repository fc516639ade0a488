"""Decode a photo into an upright RGB uint8 array, or refuse it with a code a seller can act on.

The format is sniffed from the bytes. Limits on file size and pixel count are checked before any
pixel is decoded, so a decompression bomb costs a header read, not gigabytes of memory.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile

from . import _fastjpeg
from ._errors import InvalidImageError
from ._sniff import sniff_format

#: What `load_image` accepts: a path, the bytes of a file, or a binary file object.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255)

# A truncated file must be an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what `load_image` will decode."""

    max_pixels: int = 50_000_000
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("DecodeLimits.max_pixels and max_bytes must be positive")


DEFAULT_LIMITS = DecodeLimits()


def read_source(source: ImageSource, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """Read the bytes of `source`, refusing more than `limits.max_bytes`."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise InvalidImageError("not_found", f"{path} is not a file.")
            if size > limits.max_bytes:
                raise _file_too_large(size, limits)
            with path.open("rb") as handle:
                # Ask for the size stat gave (+1), not the limit: a buffer of the limit's size would
                # be fresh memory, faulted in page by page, for every photo.
                data = handle.read(size + 1)
                if len(data) > size:  # it grew since stat, or has no size (a pipe): read on, bounded
                    data += handle.read(limits.max_bytes + 1 - len(data))
        except FileNotFoundError:
            raise InvalidImageError("not_found", f"{path} does not exist.") from None
        except PermissionError:
            raise InvalidImageError("not_found", f"{path} cannot be read (permission denied).") from None
        except IsADirectoryError:
            raise InvalidImageError("not_found", f"{path} is a folder, not an image file.") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read(limits.max_bytes + 1)
        if not isinstance(data, bytes):
            raise TypeError("load_image needs a file opened in binary mode ('rb')")
    else:
        raise TypeError(
            f"load_image takes a path, bytes or a binary file object, not {type(source).__name__}"
        )
    if len(data) > limits.max_bytes:
        raise _file_too_large(len(data), limits)
    if not data:
        raise InvalidImageError("empty", "The file is empty: upload the photo again.")
    return data


def load_image(
    source: ImageSource,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    draft_size: tuple[int, int] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Decode `source` into an upright RGB `uint8` array of shape (height, width, 3).

    EXIF orientation is applied and transparency is composited on white. With `draft_size`
    (width, height), a JPEG is decoded through libjpeg's DCT scaling to the smallest size of
    1/1, 1/2, 1/4 or 1/8 that still covers it: far faster for large photos, and part of the spec.
    At 1/8 the decode runs on up to `threads` cores (default: two where there are two) with the
    same pixels as a one-core decode.
    """
    return np.asarray(decode_upright(source, limits=limits, draft_size=draft_size, threads=threads), dtype=np.uint8)


def decode_upright(
    source: ImageSource,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    draft_size: tuple[int, int] | None = None,
    threads: int | None = None,
) -> Image.Image:
    """What `load_image` returns, as an RGB Pillow image: `preprocess` resizes it without a copy."""
    data = read_source(source, limits)
    image = _open(data, limits)
    orientation = _orientation(image)
    if draft_size is not None and image.format == "JPEG":
        width, height = draft_size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        image.draft(None, (max(1, int(width)), max(1, int(height))))
        fast = _fastjpeg.decode_draft(data, image, threads)
        if fast is not None:
            return _upright(_to_rgb(fast), orientation)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise _pixels_too_large(image.size, limits) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
        raise _decode_error(exc, data) from exc
    return _upright(_to_rgb(image), orientation)


def _upright(rgb: Image.Image, orientation: int) -> Image.Image:
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    accepted, refused = sniff_format(data[:64])
    if refused is not None:
        raise InvalidImageError(
            "unsupported_format",
            f"{refused} images are not accepted: send a JPEG, PNG, WebP, BMP or GIF photo.",
        )
    if accepted is None:
        raise InvalidImageError(
            "not_an_image", "This file is not an image: send a JPEG, PNG, WebP, BMP or GIF photo."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[accepted])
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(
            "too_large",
            f"The picture has far too many pixels (over {_mp(2 * (Image.MAX_IMAGE_PIXELS or 0))}; "
            f"the limit is {_mp(limits.max_pixels)}): send a smaller photo.",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
        raise _decode_error(exc, data, header=True) from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError("invalid_dimensions", "The picture has no pixels.")
    if width * height > limits.max_pixels:
        raise _pixels_too_large(image.size, limits)
    return image


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block must not cost the photo  # noqa: BLE001
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_gray_to_rgb(image)
    if mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _high_depth_gray_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        gray = np.clip(values, 0, 255)
    else:  # 16-bit samples (Pillow may widen them to 32-bit mode "I")
        gray = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    gray8 = np.rint(gray).astype(np.uint8)
    return Image.fromarray(np.repeat(gray8[:, :, None], 3, axis=2))


def _decode_error(exc: BaseException, data: bytes, *, header: bool = False) -> InvalidImageError:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or _looks_truncated(data):
        return InvalidImageError(
            "truncated", "The photo is incomplete (the upload was cut off): send it again."
        )
    where = "header" if header else "data"
    return InvalidImageError(
        "corrupt", f"The photo's {where} is damaged and cannot be decoded: take or export it again."
    )


def _looks_truncated(data: bytes) -> bool:
    """True when the bytes end before the format says the file ends."""
    fmt, _ = sniff_format(data[:64])
    if len(data) < 64:
        return True
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "BMP":
        return int.from_bytes(data[2:6], "little") > len(data)
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    if fmt == "JPEG":
        return b"\xff\xd9" not in data[-1024:]
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b"\x3b")
    return False


def _pixels_too_large(size: tuple[int, int], limits: DecodeLimits) -> InvalidImageError:
    width, height = size
    return InvalidImageError(
        "too_large",
        f"The picture is {width}x{height} ({_mp(width * height)}); the limit is "
        f"{_mp(limits.max_pixels)}: send a smaller photo.",
    )


def _file_too_large(size: int, limits: DecodeLimits) -> InvalidImageError:
    return InvalidImageError(
        "too_large",
        f"The file is {size / 2**20:.1f} MiB, over the limit of {limits.max_bytes / 2**20:.1f} MiB: "
        "send a smaller photo.",
    )


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"
