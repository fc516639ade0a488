"""A bounded differential fuzz run on every CI run: the accelerator never changes load_image's verdict.

Real photos, encoded in each layout the fast decoder handles, are damaged in the ways a fuzzer
damages them (byte flips, inserted markers, edited header fields, truncation, dropped or repeated
segments) with a fixed seed. Each damaged file goes through `load_image` twice, the accelerator on
and off: the same pixels, or the same refusal code. The long campaign (libFuzzer against
libjpeg-turbo, under sanitizers) lives in fuzz/; this is its quick, always-on part.
"""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image

from preprocessing import InvalidImageError, load_image
from preprocessing import _fastjpeg

from . import jpeg_forge
from .conftest import encode, real_photo_path

SEED = 1313
BUDGET_S = 20.0  # stop early on a very slow machine rather than time out; the counts are asserted
MARKERS = [0xC0, 0xC1, 0xC2, 0xC4, 0xCC, 0xD0, 0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
           0xE0, 0xE1, 0xEE, 0xF0, 0xFD, 0xFE, 0x00, 0x01, 0x02, 0xFF]


def photo(name: str, size: tuple[int, int], mode: str = "RGB", seed: int = 7) -> Image.Image:
    image = Image.open(real_photo_path(name)).convert(mode).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16)
    pixels += np.random.default_rng(seed).integers(-10, 11, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    chelsea = photo("chelsea.png", (256, 192))
    return [
        encode(chelsea, "JPEG", quality=90),  # 4:2:0
        encode(chelsea, "JPEG", quality=75, subsampling=0),  # 4:4:4
        encode(photo("camera.png", (256, 256), "L"), "JPEG", quality=85),  # grayscale
        encode(photo("coffee.png", (240, 160)), "JPEG", quality=80, restart_marker_blocks=3),
        encode(photo("astronaut.png", (256, 256)), "JPEG", quality=95, optimize=True, restart_marker_rows=1),
        jpeg_forge.forge(512, 256, dc_diff=lambda c, m: 32767 if m % 3 else -32767),
    ]


@pytest.fixture(scope="module")
def big_original() -> bytes:
    """Over 256 KB of entropy-coded data: the two-thread paths run."""
    return encode(photo("chelsea.png", (1200, 900)), "JPEG", quality=95)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    segments = jpeg_forge.segments(data)
    sos = jpeg_forge.sos_offset(data)
    header_end = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    kind = int(rng.integers(0, 8))
    if kind == 0:  # byte flips anywhere
        for at in rng.integers(2, len(out), size=int(rng.integers(1, 5))):
            out[at] = int(rng.integers(0, 256))
    elif kind == 1:  # byte flips in the headers
        for at in rng.integers(2, header_end, size=int(rng.integers(1, 4))):
            out[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == 2:  # a marker inserted before a segment or inside the data
        marker = MARKERS[int(rng.integers(0, len(MARKERS)))]
        payload = bytes(rng.integers(0, 256, size=int(rng.integers(0, 6)), dtype=np.uint8))
        segment = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
        at = (segments[int(rng.integers(0, len(segments)))][1] if rng.random() < 0.6
              else int(rng.integers(header_end, len(out) - 2)))
        out[at:at] = segment
    elif kind == 3:  # an edited header field
        marker, offset, length = segments[int(rng.integers(0, len(segments)))]
        field = offset + 4 + int(rng.integers(0, max(1, length - 2)))
        out[field] = int(rng.choice([0, 1, 2, 3, 4, 5, 0x0F, 0x10, 0x11, 0x22, 0x41, 0x55, 0x7F, 0x80, 0xFF]))
    elif kind == 4:  # frame size and sampling factors
        sof = jpeg_forge.sof_payload(data)
        if rng.random() < 0.5:
            value = int(rng.choice([0, 1, 7, 8, 9, 65500, 65501, 65535]))
            at = sof + (1 if rng.random() < 0.5 else 3)
            out[at:at + 2] = struct.pack(">H", value)
        else:
            component = int(rng.integers(0, out[sof + 5] or 1))
            out[sof + 6 + 3 * component + 1] = int(rng.integers(0, 256))
    elif kind == 5:  # truncated, sometimes with an EOI after the cut
        cut = int(rng.integers(2, len(out)))
        out = out[:cut] + (b"\xff\xd9" if rng.random() < 0.5 else b"")
    elif kind == 6:  # a segment dropped or repeated
        marker, offset, length = segments[int(rng.integers(0, len(segments)))]
        segment = bytes(out[offset:offset + 2 + length])
        if rng.random() < 0.5:
            del out[offset:offset + 2 + length]
        else:
            out[offset:offset] = segment
    else:  # entropy-coded bytes damaged, 0xFF included (new markers, broken stuffing)
        for at in rng.integers(header_end, len(out) - 2, size=int(rng.integers(1, 4))):
            out[at] = int(rng.choice([0xFF, 0x00, int(rng.integers(0, 256))]))
    return bytes(out)


def verdict(monkeypatch, data: bytes, fast: bool, draft: tuple[int, int]):
    with monkeypatch.context() as patch:
        patch.setenv(_fastjpeg.ENV_SWITCH, "1" if fast else "0")
        try:
            return load_image(data, draft_size=draft)
        except InvalidImageError as exc:
            return exc.code


def compare(monkeypatch, data: bytes, label: str) -> bool:
    """Assert load_image's verdict is the same either way; True if the accelerator decoded it."""
    size = open_size(data) or (8, 8)  # a draft size that asks for 1/8 scale
    draft = (max(1, size[0] // 8), max(1, size[1] // 8))
    with_fast = verdict(monkeypatch, data, True, draft)
    without = verdict(monkeypatch, data, False, draft)
    if isinstance(without, str) or isinstance(with_fast, str):
        on = with_fast if isinstance(with_fast, str) else f"pixels {with_fast.shape}"
        off = without if isinstance(without, str) else f"pixels {without.shape}"
        assert on == off, f"{label}: accelerator on -> {on}, off -> {off}"
    else:
        np.testing.assert_array_equal(with_fast, without, err_msg=label)
    return _fastjpeg._jpeg8.decode_eighth(data, 2) is not None


def open_size(data: bytes) -> tuple[int, int] | None:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # whatever Pillow's header parser raises, load_image names it; see compare
        return None


def test_damaged_photos_get_the_same_verdict_with_the_accelerator_on_and_off(monkeypatch, originals, big_original):
    rng = np.random.default_rng(SEED)
    started = time.monotonic()
    tried = fast_decoded = 0
    for trial in range(4000):
        if time.monotonic() - started > BUDGET_S:
            break
        big = trial % 40 == 39
        clean = big_original if big else originals[trial % len(originals)]
        data = mutate(clean, rng)
        fast_decoded += compare(monkeypatch, data, f"trial {trial} (seed {SEED})")
        tried += 1
    print(f"{tried} damaged files, {fast_decoded} decoded by the accelerator")
    assert tried >= 300, f"only {tried} mutants in {BUDGET_S} s"
    # not vacuous: a good share of the damaged files still reach the accelerator and decode there
    assert fast_decoded >= tried // 10, f"{fast_decoded} of {tried} decoded by the accelerator"
