"""Tell an image format from its first bytes, never from a file name."""

from __future__ import annotations

#: Formats we decode, by the name Pillow gives them.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# (format, prefix) pairs of formats we recognise but refuse, so the error can name them.
_REFUSED_PREFIXES: tuple[tuple[str, bytes], ...] = (
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("PSD", b"8BPS"),
    ("ICO", b"\x00\x00\x01\x00"),
    ("JPEG 2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n"),
    ("JPEG 2000", b"\xff\x4f\xff\x51"),
    ("PDF", b"%PDF"),
    ("SVG", b"<svg"),
    ("SVG", b"<?xml"),
)

_ISO_BMFF_BRANDS: dict[bytes, str] = {
    b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
    b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF",
}


def sniff_format(head: bytes) -> tuple[str | None, str | None]:
    """Return `(accepted_format, refused_format)` for the first bytes of a file.

    At most one is set; both are None when the bytes are not an image format we know.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG", None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF", None
    if head.startswith(b"BM") and len(head) >= 26:
        return "BMP", None
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _ISO_BMFF_BRANDS:
            return None, _ISO_BMFF_BRANDS[brand]
    stripped = head.lstrip()
    for name, prefix in _REFUSED_PREFIXES:
        if head.startswith(prefix) or stripped.startswith(prefix):
            return None, name
    return None, None
