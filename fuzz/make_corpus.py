"""Write the seed corpus for the fuzz campaign: real photos re-encoded every way the decoder meets.

    .venv/bin/python fuzz/make_corpus.py fuzz/corpus-seed      # ~300 files, ~10 MB

Photos are scikit-image's (astronaut, chelsea, coffee, camera, rocket, ...), cropped and resized to
small sizes (fast executions) and a few phone-photo sizes (the two-thread paths: speculative split
and restart intervals need over 256 KB of entropy-coded data). Each is saved at several qualities,
subsamplings (4:4:4, 4:2:2, 4:2:0), restart intervals (in rows and in MCUs, ending mid-row),
optimised and standard Huffman tables, progressive, grayscale and CMYK; plus forged frames from
tests/jpeg_forge.py (DC sums past the int range, unusual grayscale sampling factors).
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import jpeg_forge  # noqa: E402
from tests.conftest import SKIMAGE_DATA  # noqa: E402

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg", "motorcycle_left.png",
          "page.png", "moon.png", "hubble_deep_field.jpg", "immunohistochemistry.png"]


def textured(image: Image.Image, size: tuple[int, int], seed: int) -> Image.Image:
    """`image` resized to `size`, with phone-like fine texture (so the bitstream is dense)."""
    image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16)
    pixels += np.random.default_rng(seed).integers(-12, 13, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encodings(image: Image.Image, rng: np.random.Generator):
    gray = image.mode == "L"
    for quality in (5, 30, 50, 75, 90, 95, 100):
        params: dict = {"quality": quality}
        if not gray:
            params["subsampling"] = int(rng.integers(0, 3))
        choice = rng.random()
        if choice < 0.2:
            params["restart_marker_rows"] = int(rng.integers(1, 4))
        elif choice < 0.4:
            params["restart_marker_blocks"] = int(rng.integers(1, 40))
        if rng.random() < 0.3:
            params["optimize"] = True
        if rng.random() < 0.1:
            params["progressive"] = True
        yield params


def save(folder: Path, data: bytes) -> None:
    (folder / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus-seed")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(13)
    small = [(64, 48), (100, 75), (160, 120), (251, 189), (333, 250), (640, 480)]
    count = 0
    for name in PHOTOS:
        path = SKIMAGE_DATA / name
        if not path.is_file():
            continue
        photo = Image.open(path)
        photo = photo.convert("L" if photo.mode in ("L", "I", "I;16", "F") else "RGB")
        for size in small:
            for params in encodings(photo.resize(size), rng):
                buffer = io.BytesIO()
                photo.resize(size).save(buffer, "JPEG", **params)
                save(folder, buffer.getvalue())
                count += 1
        if photo.mode == "RGB":
            for mode in ("L", "CMYK"):
                buffer = io.BytesIO()
                photo.resize((160, 120)).convert(mode).save(buffer, "JPEG", quality=85)
                save(folder, buffer.getvalue())
                count += 1
    # phone-photo sizes: the two-thread paths (a few only: each execution costs ~100 ms under ASan)
    chelsea = Image.open(SKIMAGE_DATA / "chelsea.png").convert("RGB")
    for params in ({"quality": 90}, {"quality": 85, "restart_marker_rows": 2},
                   {"quality": 80, "subsampling": 0}, {"quality": 70, "restart_marker_blocks": 7}):
        buffer = io.BytesIO()
        textured(chelsea, (1600, 1200), 7).save(buffer, "JPEG", **params)
        save(folder, buffer.getvalue())
        count += 1
    buffer = io.BytesIO()
    textured(Image.open(SKIMAGE_DATA / "camera.png").convert("L"), (1536, 1536), 3).save(buffer, "JPEG", quality=95)
    save(folder, buffer.getvalue())
    count += 1
    # forged frames: DC predictors past the int range, grayscale sampling factors 1..4
    save(folder, jpeg_forge.forge(2048, 2064, dc_diff=lambda c, m: 32767))
    save(folder, jpeg_forge.forge(1024, 1024, ((2, 2), (1, 1), (1, 1)), dc_diff=lambda c, m: -32767 if c == 0 else 0))
    for factors in (0x11, 0x22, 0x41, 0x14):
        save(folder, jpeg_forge.with_sampling(jpeg_forge.forge(96, 64), 0, factors))
    count += 6
    print(f"{count} seeds in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
