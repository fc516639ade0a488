"""A seller's tiny file can claim a huge picture: decoding it costs a bounded, stated amount of memory.

Pillow allocates pixels with malloc, out of sight of tracemalloc, so memory is measured as the peak
resident size (ru_maxrss) of a child Python that decodes one photo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing import (
    DecodeBudget,
    DecodeBusyError,
    DecodeLimits,
    InvalidImageError,
    PreprocessSpec,
    PreprocessingError,
    load_image,
    preprocess,
)
from preprocessing._decode import _to_rgb, _to_rgb_whole, decode_cost, reduce_factor
from tests.conftest import encode

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
SPEC = PreprocessSpec(height=224, width=224)


def big_gif(size: int = 7000) -> bytes:
    """A few-KB GIF of a `size`x`size` picture (a transparent canvas with a square on it)."""
    image = Image.new("P", (size, size), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (size // 7, size // 7, size * 3 // 7, size * 3 // 7))
    return encode(image, "GIF", transparency=0)


def big_png(size: int = 7000) -> bytes:
    """A ~200 KB PNG that decodes to `size`x`size` RGBA (196 MB at 7000)."""
    image = Image.new("RGBA", (size, size), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (size // 7, size // 7, size * 3 // 7, size * 3 // 7))
    return encode(image, "PNG", optimize=True)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    files = {"gif": folder / "big.gif", "png": folder / "big.png"}
    files["gif"].write_bytes(big_gif())
    files["png"].write_bytes(big_png())
    return files


_CHILD = """
import json, resource, sys
from preprocessing import PreprocessSpec, load_image, preprocess
data = open(sys.argv[1], "rb").read()
how = sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if how == "preprocess":
    out = preprocess(data, PreprocessSpec(height=224, width=224))
else:
    out = load_image(data)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_mb": (after - before) / 1024, "shape": list(out.shape)}))
"""


def peak_added_mb(path: Path, how: str) -> float:
    """Peak resident memory a fresh process adds while it decodes `path` (`preprocess` or `load_image`)."""
    warm = "import numpy, PIL.Image, PIL.PngImagePlugin, PIL.GifImagePlugin, PIL.WebPImagePlugin, PIL.JpegImagePlugin\n"
    result = subprocess.run(
        [sys.executable, "-c", warm + _CHILD, str(path), how], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["added_mb"]


# --- One photo ---------------------------------------------------------------------------------------


def test_a_37_kb_gif_of_7000x7000_costs_its_palette_frame_not_800_mb(bombs):
    # Before: 797 MB added (palette -> RGBA -> copy -> white canvas -> composite -> RGB, all full size).
    assert bombs["gif"].stat().st_size < 100_000
    added = peak_added_mb(bombs["gif"], "preprocess")
    assert added < 110, f"preprocess of the 7000x7000 GIF added {added:.0f} MB (the palette frame is 49 MB)"


def test_a_208_kb_rgba_png_of_7000x7000_costs_one_frame_not_750_mb(bombs):
    # Before: 750 MB added. Pillow must hold the decoded RGBA frame (196 MB); nothing else is full size.
    added = peak_added_mb(bombs["png"], "preprocess")
    assert added < 240, f"preprocess of the 7000x7000 RGBA PNG added {added:.0f} MB (its frame is 196 MB)"


def test_a_full_size_load_holds_the_picture_and_its_array_only(bombs):
    # Before: 797 MB. The caller asked for the 147 MB array; the RGB picture (196 MB) is its source.
    added = peak_added_mb(bombs["gif"], "load_image")
    assert added < 380, f"load_image of the 7000x7000 GIF added {added:.0f} MB"


def _cases() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((2400, 1800))
    alpha = photo.convert("RGBA")
    alpha.putalpha(128)
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 2400).astype(np.uint16), (1800, 1)))
    return {
        "jpeg": encode(photo, "JPEG", quality=90),
        "png-rgba": encode(alpha, "PNG", compress_level=1),
        "png-16bit": encode(ramp, "PNG", compress_level=1),
        "webp": encode(photo, "WEBP", quality=80),
        "bmp": encode(photo, "BMP"),
        "gif": encode(photo.convert("P"), "GIF"),
    }


@pytest.mark.parametrize("how", ["preprocess", "load_image"])
def test_the_header_estimate_covers_what_the_decode_really_allocates(tmp_path, how):
    """The budget reserves `decode_cost` before decoding: it must not be an under-estimate."""
    from preprocessing._decode import _open, _orientation

    for name, data in _cases().items():
        path = tmp_path / name
        path.write_bytes(data)
        image = _open(data, DecodeLimits())
        target = SPEC.size if how == "preprocess" else None
        if target and image.format == "JPEG":
            image.draft(None, target)
        factor = reduce_factor(image.size, target)
        use = (lambda size: size[0] * size[1] * 3) if how == "load_image" else (lambda size: 0)
        estimate_mb = decode_cost(image, factor, _orientation(image), use) / MB
        added = peak_added_mb(path, how)
        assert added <= estimate_mb * 1.1 + 4, f"{name} via {how}: added {added:.1f} MB, estimated {estimate_mb:.1f} MB"


# --- Exactly the same pixels ---------------------------------------------------------------------------


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (610, 700, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (610, 700), dtype=np.uint8)))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    keyed = rgb.copy()
    keyed.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    gray16 = Image.fromarray(rng.integers(0, 65535, (610, 700), dtype=np.uint16))
    return [rgba, palette, keyed, rgb.convert("L"), rgb.convert("LA"), gray16, rgb.convert("CMYK")]


@pytest.mark.parametrize("factor", [1, 3])
def test_converting_in_strips_gives_exactly_the_pixels_of_the_whole_picture(factor):
    for picture in _pictures():
        whole = _to_rgb_whole(picture)
        expected = whole.reduce(factor) if factor > 1 else whole
        assert np.array_equal(np.asarray(_to_rgb(picture, factor)), np.asarray(expected)), picture.mode


def test_an_ordinary_photo_is_never_reduced_so_its_tensor_is_unchanged(chelsea):
    assert reduce_factor(chelsea.size, SPEC.size) == 1  # 451x300 is only 2x the input
    png = encode(chelsea, "PNG")
    expected = preprocess(png, SPEC, budget=None)
    assert np.array_equal(preprocess(png, SPEC), expected)


def test_a_huge_picture_is_reduced_only_as_far_as_three_times_the_input(bombs):
    assert reduce_factor((7000, 7000), (224, 224)) == 10  # 700x700 left, still 3.1x the input
    x = preprocess(bombs["png"].read_bytes(), SPEC)
    assert x.shape == (224, 224, 3)
    assert np.allclose(x[0, 0], 1.0)  # transparent canvas on white (scaled to [-1, 1])


# --- The budget across threads ----------------------------------------------------------------------


def test_a_decode_larger_than_the_whole_budget_is_too_large_at_once(bombs):
    budget = DecodeBudget(64 * MB, wait_s=30)
    started = time.monotonic()
    with pytest.raises(InvalidImageError) as caught:
        preprocess(bombs["png"].read_bytes(), SPEC, budget=budget)
    assert caught.value.code == "too_large" and time.monotonic() - started < 5
    assert "MiB" in caught.value.message and "7000x7000 PNG" in caught.value.message
    assert budget.in_use == 0


def test_a_full_budget_makes_a_decode_wait_then_say_busy(chelsea):
    png = encode(chelsea, "PNG")
    budget = DecodeBudget(8 * MB, wait_s=0.3)
    with budget.reserve(8 * MB):
        started = time.monotonic()
        with pytest.raises(DecodeBusyError) as caught:
            load_image(png, budget=budget)
        waited = time.monotonic() - started
    assert 0.25 <= waited < 3
    error = caught.value
    assert isinstance(error, PreprocessingError) and not isinstance(error, InvalidImageError)
    assert error.code == "busy" and error.retry_after_s >= 1 and "send it again" in error.message
    assert error.to_dict()["code"] == "busy"
    assert load_image(png, budget=budget).shape == (300, 451, 3), "the photo itself is fine"


def test_a_decode_waits_for_room_and_then_runs(chelsea):
    png = encode(chelsea, "PNG")
    budget = DecodeBudget(8 * MB, wait_s=10)
    held = budget.reserve(8 * MB)
    threading.Timer(0.2, held.release).start()
    started = time.monotonic()
    assert load_image(png, budget=budget).shape == (300, 451, 3)
    assert time.monotonic() - started >= 0.15
    assert budget.in_use == 0


def test_waiters_are_served_in_arrival_order_so_a_big_one_is_not_starved():
    budget = DecodeBudget(100, wait_s=10)
    order: list[str] = []
    first = budget.reserve(60)

    def take(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            order.append(name)
            time.sleep(0.05)

    big = threading.Thread(target=take, args=("big", 80))
    big.start()
    while budget.waiting < 1:
        time.sleep(0.005)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but arrived later
    small.start()
    while budget.waiting < 2:
        time.sleep(0.005)
    time.sleep(0.05)
    assert order == []
    first.release()
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]


def test_concurrent_decodes_never_hold_more_than_the_budget():
    pngs = [big_png(2000)] * 8  # 16 MB frames
    budget = DecodeBudget(40 * MB, wait_s=60)
    results: list[object] = []

    def work(data: bytes) -> None:
        try:
            results.append(preprocess(data, SPEC, budget=budget).shape)
        except PreprocessingError as exc:  # pragma: no cover - a failure, shown below
            results.append(exc)

    threads = [threading.Thread(target=work, args=(data,)) for data in pngs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [(224, 224, 3)] * 8
    assert 16 * MB < budget.peak <= budget.max_bytes and budget.in_use == 0


def test_bad_budgets_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            DecodeBudget(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecodeBudget(MB, wait_s=float("nan"))


# --- A pixel limit for what must be decoded at full size ------------------------------------------------


def test_a_decoded_pixel_limit_refuses_big_pngs_but_not_scaled_jpegs(bombs, chelsea):
    limits = DecodeLimits(max_decoded_pixels=16_000_000)
    with pytest.raises(InvalidImageError) as caught:
        preprocess(bombs["gif"].read_bytes(), SPEC, limits=limits)
    assert caught.value.code == "too_large"
    assert "GIF pictures are decoded at full size" in caught.value.message and "JPEG" in caught.value.message

    jpeg_20mp = encode(chelsea.resize((5200, 3900)), "JPEG", quality=85)
    assert preprocess(jpeg_20mp, SPEC, limits=limits).shape == (224, 224, 3), "decoded at 1/8: 0.3 MP"
    with pytest.raises(InvalidImageError) as caught:
        load_image(jpeg_20mp, limits=limits)  # the caller asked for every pixel
    assert caught.value.code == "too_large" and "decoded at full size" in caught.value.message
    with pytest.raises(ValueError):
        DecodeLimits(max_decoded_pixels=0)


# --- Memory goes back -----------------------------------------------------------------------------------


_THREADS_CHILD = """
import json, threading
from preprocessing import DecodeBudget, PreprocessSpec, preprocess
data = open(__import__("sys").argv[1], "rb").read()
budget = DecodeBudget(260 << 20, wait_s=120)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
preprocess(data, PreprocessSpec(height=32, width=32), budget=None)  # warm: plugins, first arenas
base = rss()
threads = [threading.Thread(target=preprocess, args=(data, PreprocessSpec(height=224, width=224)), kwargs={"budget": budget}) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"base": base, "peak": hwm(), "after": rss(), "budget_peak": budget.peak / 2**20}))
"""


def test_eight_concurrent_big_pngs_stay_inside_the_budget_and_give_the_memory_back(tmp_path):
    # Before: eight 7000x7000 RGBA PNGs peaked at 6.7 GB and left 5 GB held by glibc's arenas.
    path = tmp_path / "big.png"
    path.write_bytes(big_png(5000))  # 100 MB RGBA frames: two fit in the 260 MB budget at once
    result = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["budget_peak"] <= 260
    assert figures["peak"] - figures["base"] < 260 + 40, figures
    assert figures["after"] - figures["base"] < 60, f"freed memory stayed held: {figures}"


def test_a_png_over_the_decoded_pixel_limit_is_refused_from_its_header_without_decoding(bombs):
    # Pillow's PNG getexif() decodes the whole picture; the orientation is read without it.
    code = (
        "import json, resource, sys\n"
        "from preprocessing import DecodeLimits, InvalidImageError, PreprocessSpec, preprocess\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    preprocess(data, PreprocessSpec(), limits=DecodeLimits(max_decoded_pixels=16_000_000))\n"
        "except InvalidImageError as exc:\n"
        "    print(json.dumps({'code': exc.code, 'added_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(bombs["png"])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["code"] == "too_large" and outcome["added_mb"] < 30, outcome


# --- The device ---------------------------------------------------------------------------------------


def test_a_kiosk_folder_run_reports_a_photo_over_its_budget_and_goes_on(tmp_path, chelsea):
    """The folder pipeline's decode workers use the classifier's budget; a photo that cannot fit is its own error."""
    from edge_runtime.pipeline import _load

    huge, fine = tmp_path / "huge.png", tmp_path / "fine.jpg"
    huge.write_bytes(big_png(5000))
    fine.write_bytes(encode(chelsea, "JPEG"))
    budget = DecodeBudget(48 * MB, wait_s=0.2)
    refused = _load(str(huge), SPEC, False, 1, budget)
    assert refused.tensor is None and refused.error.to_dict()["code"] == "too_large"
    assert _load(str(fine), SPEC, False, 1, budget).tensor.shape == (224, 224, 3)
    with budget.reserve(48 * MB):
        busy = _load(str(fine), SPEC, False, 1, budget)
    assert busy.tensor is None and busy.error.to_dict()["code"] == "busy"


def test_a_classifier_decodes_inside_the_budget_its_options_give():
    from edge_runtime.classifier import ClassifierOptions

    budget = DecodeBudget(64 * MB)
    assert ClassifierOptions(decode_budget=budget).decode_budget is budget
    assert ClassifierOptions().decode_budget is None  # the process-wide DEFAULT_BUDGET
