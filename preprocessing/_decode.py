"""Decode a photo into an upright RGB uint8 array, or refuse it with a code a seller can act on.

The format is sniffed from the bytes. Limits on file size and pixel count are checked before any
pixel is decoded, so a decompression bomb costs a header read, not gigabytes of memory.

Memory: the bytes a decode will allocate are estimated from the header and reserved in a
`DecodeBudget` (shared by all threads) before decoding. Only the decoded frame is ever held at full
size: the conversion to RGB runs in strips, and when the caller needs a small picture (`draft_size`)
each strip is box-reduced as it is converted, so a 7000x7000 GIF costs its 49 MB palette frame,
not a gigabyte of RGBA copies.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar, Union

import numpy as np
from PIL import Image, ImageFile

from . import _fastjpeg
from ._budget import DEFAULT_BUDGET, DecodeBudget
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
    """Bounds on what `load_image` will decode.

    `max_pixels` bounds the picture's size as its header states it. `max_decoded_pixels` bounds the
    frame the decoder allocates at full resolution: a JPEG decoded at 1/8 scale (`draft_size`)
    counts 1/64 of its pixels, while PNG, WebP, BMP and GIF always decode at full size, so for them
    it is the pixel limit. None: the same as `max_pixels`.
    """

    max_pixels: int = 50_000_000
    max_bytes: int = 64 * 1024 * 1024
    max_decoded_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("DecodeLimits.max_pixels and max_bytes must be positive")
        if self.max_decoded_pixels is not None and self.max_decoded_pixels <= 0:
            raise ValueError("DecodeLimits.max_decoded_pixels must be positive (or None)")

    @property
    def decoded_pixel_limit(self) -> int:
        """The most pixels one decoded frame may have."""
        return self.max_pixels if self.max_decoded_pixels is None else min(self.max_pixels, self.max_decoded_pixels)


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
    budget: DecodeBudget | None = DEFAULT_BUDGET,
) -> np.ndarray:
    """Decode `source` into an upright RGB `uint8` array of shape (height, width, 3).

    EXIF orientation is applied and transparency is composited on white. With `draft_size`
    (width, height), a JPEG is decoded through libjpeg's DCT scaling to the smallest size of
    1/1, 1/2, 1/4 or 1/8 that still covers it: far faster for large photos, and part of the spec.
    At 1/8 the decode runs on up to `threads` cores (default: two where there are two) with the
    same pixels as a one-core decode. A picture (of any format) still more than `REDUCING_GAP`
    times larger than `draft_size` on both sides is then box-reduced by a whole factor, as Pillow's
    `resize(reducing_gap=3)` does, so a huge PNG or GIF never exists in RGB at full size.

    The decode's memory is reserved in `budget` first (default: the process-wide `DEFAULT_BUDGET`,
    a quarter of the machine's memory up to 1 GiB; None: unbounded); see `DecodeBudget` for the
    waits, `DecodeBusyError` and `too_large`.
    """
    return decode_then(
        source, _as_array, limits=limits, draft_size=draft_size, threads=threads, budget=budget,
        use_bytes=lambda size: size[0] * size[1] * 3 + min(size[0] * size[1], _STRIP_PIXELS) * 8,
    )


def _as_array(image: Image.Image) -> np.ndarray:
    """The pixels as a new array, copied strip by strip (`np.asarray` would hold two more copies)."""
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    if rows >= height:
        return np.asarray(image, dtype=np.uint8)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, rows):
        out[top:top + rows] = np.asarray(image.crop((0, top, width, min(height, top + rows))))
    return out


T = TypeVar("T")

#: A picture more than this many times larger than `draft_size` is box-reduced before resizing.
REDUCING_GAP = 3.0
# Conversion to RGB runs on strips of about this many pixels.
_STRIP_PIXELS = 1 << 18
# Bytes per pixel of Pillow's image memory, by mode (every other mode takes 4, RGB included).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def decode_then(
    source: ImageSource,
    use: Callable[[Image.Image], T],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    draft_size: tuple[int, int] | None = None,
    threads: int | None = None,
    budget: DecodeBudget | None = DEFAULT_BUDGET,
    use_bytes: Callable[[tuple[int, int]], int] = lambda size: 0,
) -> T:
    """`use(image)` of the upright RGB Pillow image `load_image` would return, inside the budget.

    `use` must not keep the image (it is closed afterwards); `use_bytes(size)` is what `use`
    allocates for an image of that size, reserved with the decode.
    """
    data = read_source(source, limits)
    image = _open(data, limits)
    header_size = image.size
    orientation = _header_orientation(image, data)  # None: a PNG that may state it after its pixels
    wanted = None if draft_size is None else (max(1, int(draft_size[0])), max(1, int(draft_size[1])))
    if wanted is not None and image.format == "JPEG":
        image.draft(None, _turned(wanted, orientation))
    if image.width * image.height > limits.decoded_pixel_limit:
        raise _decoded_too_large(image, header_size, limits)
    if orientation is None:  # reserve for the smaller of both factors, and for a transpose
        factor = min(reduce_factor(image.size, wanted), reduce_factor(image.size, _turned(wanted, 6)))
        cost = decode_cost(image, factor, 6, use_bytes)
    else:
        cost = decode_cost(image, reduce_factor(image.size, _turned(wanted, orientation)), orientation, use_bytes)
    what = f"Decoding this {header_size[0]}x{header_size[1]} {image.format} picture"
    with budget.reserve(cost, what=what) if budget is not None else nullcontext():
        upright = _decode_upright(data, image, limits, orientation, wanted, threads)
        del image
        try:
            return use(upright)
        finally:
            upright.close()  # freed before the reservation ends, so the budget's trim returns it
            del upright


def _turned(size: tuple[int, int] | None, orientation: int | None) -> tuple[int, int] | None:
    """`size` as the stored (not yet upright) picture must cover it."""
    if size is not None and orientation in (5, 6, 7, 8):
        return size[1], size[0]
    return size


def reduce_factor(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The whole factor a picture of `size` is box-reduced by when `target` is all the caller needs."""
    if target is None:
        return 1
    ratio = min(size[0] / target[0], size[1] / target[1])
    return max(1, int(ratio / REDUCING_GAP))


def decode_cost(
    image: Image.Image, factor: int, orientation: int, use_bytes: Callable[[tuple[int, int]], int] = lambda size: 0
) -> int:
    """Bytes decoding `image` (opened, `draft` applied) allocates at its peak, from its header alone.

    Pillow stores RGB in 4 bytes a pixel; the frame is freed once converted to RGB, which runs in
    strips; a transpose for EXIF orientation copies the RGB picture once.
    """
    width, height = image.size
    pixels = width * height
    frame = pixels * _PIXEL_BYTES.get(image.mode, 4)
    decoding = frame
    if image.format == "WEBP":  # libwebp's animation decoder keeps two RGBA canvases, returns bytes, Pillow copies
        decoding += pixels * 12
    elif image.format == "JPEG":  # the fast decoder's output bytes, before they become the frame
        decoding += pixels * 3
    out_size = (math.ceil(width / factor), math.ceil(height / factor))
    out = out_size[0] * out_size[1] * 4
    converts = factor > 1 or not _is_plain_rgb(image)
    strip = min(pixels, _STRIP_PIXELS) * (24 if image.mode in _HIGH_DEPTH else 16)
    converting = frame + out + strip if converts else frame
    held = out if converts else frame
    if orientation in _TRANSPOSE_FOR_ORIENTATION:
        held *= 2
    return max(decoding, converting, held + use_bytes(out_size)) + (1 << 20)


def _is_plain_rgb(image: Image.Image) -> bool:
    return image.mode == "RGB" and "transparency" not in image.info


def _decode_upright(
    data: bytes, image: Image.Image, limits: DecodeLimits, orientation: int | None,
    wanted: tuple[int, int] | None, threads: int | None,
) -> Image.Image:
    frame = None
    if wanted is not None and image.format == "JPEG":
        frame = _fastjpeg.decode_draft(data, image, threads)
    if frame is None:
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise _pixels_too_large(image.size, limits) from exc
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
            raise _decode_error(exc, data) from exc
        frame = image
    if orientation is None:
        orientation = _orientation(frame)
    rgb = _to_rgb(frame, reduce_factor(frame.size, _turned(wanted, orientation)))
    if rgb is not frame:
        frame.close()  # the full-size frame goes as soon as its RGB picture exists
    upright = _upright(rgb, orientation)
    if upright is not rgb:
        rgb.close()
    return upright


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


def _header_orientation(image: Image.Image, data: bytes) -> int | None:
    """The EXIF orientation, if it is known before decoding the pixels; else None.

    Pillow's PNG `getexif()` decodes the whole picture first (an eXIf or text chunk may follow the
    pixel data), which must not happen outside the budget. When no such chunk follows the first
    IDAT, the chunks read with the header are all there is; otherwise it is looked up after decoding.
    """
    if image.format != "PNG" or "exif" in image.info:
        return _orientation(image)
    pixels = data.find(b"IDAT")
    if pixels < 0 or any(data.find(kind, pixels) >= 0 for kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt")):
        return None
    return _orientation(image, header_only=True)


def _orientation(image: Image.Image, *, header_only: bool = False) -> int:
    try:
        exif = Image.Image.getexif(image) if header_only else image.getexif()
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block must not cost the photo  # noqa: BLE001
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image, factor: int = 1) -> Image.Image:
    """`image` in RGB (transparency on white), box-reduced by `factor`, converted strip by strip.

    Each step is a per-pixel operation (a reduce works on `factor`-row blocks, and strips start on
    block boundaries), so the strips give exactly the pixels of converting the whole picture.
    """
    if _is_plain_rgb(image):
        return image.reduce(factor) if factor > 1 else image
    width, height = image.size
    rows = max(factor, (_STRIP_PIXELS // max(1, width)) // factor * factor)
    if rows >= height:
        rgb = _to_rgb_whole(image)
        return rgb.reduce(factor) if factor > 1 else rgb
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    for top in range(0, height, rows):
        piece = _to_rgb_whole(image.crop((0, top, width, min(height, top + rows))))
        if factor > 1:
            piece = piece.reduce(factor)
        out.paste(piece, (0, top // factor))
    return out


def _to_rgb_whole(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _HIGH_DEPTH:
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


def _decoded_too_large(image: Image.Image, header_size: tuple[int, int], limits: DecodeLimits) -> InvalidImageError:
    width, height = header_size
    if image.format == "JPEG":
        how = "decoded at full size" if image.size == header_size else f"decoded at {image.width}x{image.height}"
        advice = "send a smaller photo"
    else:
        how = f"{image.format} pictures are decoded at full size"
        advice = "send a smaller photo, or a JPEG"
    return InvalidImageError(
        "too_large",
        f"The picture is {width}x{height} ({_mp(width * height)}) and {how}; the limit for a decoded "
        f"picture is {_mp(limits.decoded_pixel_limit)}: {advice}.",
    )


def _file_too_large(size: int, limits: DecodeLimits) -> InvalidImageError:
    return InvalidImageError(
        "too_large",
        f"The file is {size / 2**20:.1f} MiB, over the limit of {limits.max_bytes / 2**20:.1f} MiB: "
        "send a smaller photo.",
    )


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"
