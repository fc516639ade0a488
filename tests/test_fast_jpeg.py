"""The two-core 1/8-scale JPEG decoder gives exactly Pillow's pixels, or steps aside for Pillow.

Every comparison decodes the same bytes twice through the public `load_image`: once as a device
does (accelerator on) and once with `EDGE_CLASSIFY_FAST_JPEG=0` (Pillow only), and asks for
identical arrays. The photos are real ones shipped by scikit-image, enlarged to phone-photo sizes
so that the two-thread paths (speculative split, restart intervals) run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing import DecodeLimits, InvalidImageError, load_image
from preprocessing import _fastjpeg

from . import jpeg_forge
from .conftest import SKIMAGE_DATA, encode, real_photo_path, with_orientation

ROOT = Path(__file__).resolve().parent.parent

DRAFT = (224, 224)


def pillow_only(monkeypatch, data: bytes, **kwargs) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setenv(_fastjpeg.ENV_SWITCH, "0")
        return load_image(data, draft_size=DRAFT, **kwargs)


def big_photo(name: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A real photo enlarged to `size`, with fine texture added so its bitstream is phone-like."""
    image = Image.open(real_photo_path(name)).convert(mode).resize(size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(7)
    pixels = np.asarray(image).astype(np.int16)
    pixels += rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def phone_photo() -> Image.Image:
    return big_photo("chelsea.png", (2400, 1800))


def test_the_accelerator_is_compiled_in_this_install():
    # CI installs with a C compiler; if the extension silently failed to build, the tests below
    # would only compare Pillow with itself.
    assert _fastjpeg.available()


@pytest.mark.parametrize(
    "params",
    [
        dict(quality=90),  # a phone's 4:2:0
        dict(quality=95, optimize=True),  # optimised Huffman tables
        dict(quality=80, subsampling=0),  # 4:4:4
        dict(quality=85, restart_marker_rows=1),  # restart intervals split between threads
        dict(quality=70, restart_marker_blocks=5),  # intervals that end mid-row
    ],
    ids=["420", "optimized", "444", "restart-rows", "restart-blocks"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_phone_photo_decodes_to_exactly_pillows_pixels(monkeypatch, phone_photo, params, threads):
    data = encode(phone_photo, "JPEG", **params)
    fast = load_image(data, draft_size=DRAFT, threads=threads)
    assert fast.shape == (225, 300, 3)
    np.testing.assert_array_equal(fast, pillow_only(monkeypatch, data))


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"])
def test_other_real_photos_match_too(monkeypatch, name):
    if not (SKIMAGE_DATA / name).is_file():
        pytest.skip(f"scikit-image does not ship {name}")
    data = encode(big_photo(name, (2000, 1504)), "JPEG", quality=92)
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


def test_grayscale_photos_match(monkeypatch):
    data = encode(big_photo("camera.png", (2048, 2048), mode="L"), "JPEG", quality=90)
    fast = load_image(data, draft_size=DRAFT)
    assert fast.shape == (256, 256, 3)
    np.testing.assert_array_equal(fast, pillow_only(monkeypatch, data))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_is_applied_the_same_way(monkeypatch, phone_photo, orientation):
    data = with_orientation(phone_photo, orientation, quality=90)
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


def test_odd_sizes_crop_the_same_partial_blocks(monkeypatch):
    data = encode(big_photo("coffee.png", (2001, 1803)), "JPEG", quality=90)
    fast = load_image(data, draft_size=DRAFT)
    assert fast.shape == (226, 251, 3)
    np.testing.assert_array_equal(fast, pillow_only(monkeypatch, data))


@pytest.mark.parametrize(
    "params",
    [dict(quality=90, progressive=True), dict(quality=90, subsampling=1)],
    ids=["progressive", "422"],
)
def test_layouts_it_does_not_reproduce_are_left_to_pillow(monkeypatch, phone_photo, params):
    data = encode(phone_photo, "JPEG", **params)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


def test_cmyk_photos_are_left_to_pillow(monkeypatch, phone_photo):
    data = encode(phone_photo.convert("CMYK"), "JPEG", quality=90)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


def test_photos_decoded_at_a_larger_scale_are_left_to_pillow(monkeypatch, phone_photo):
    # 1/4 scale: the accelerator only does 1/8.
    data = encode(phone_photo.resize((1200, 900)), "JPEG", quality=90)
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


def test_a_cut_off_big_photo_is_still_reported_as_truncated(phone_photo):
    data = encode(phone_photo, "JPEG", quality=90)
    with pytest.raises(InvalidImageError) as caught:
        load_image(data[: len(data) * 2 // 3], draft_size=DRAFT)
    assert caught.value.code == "truncated"


def test_damaged_bitstreams_give_pillows_result_whatever_it_is(monkeypatch, phone_photo):
    """Flip bytes inside the entropy-coded data: the accelerator must agree with Pillow exactly, or
    step aside so that Pillow's own error or repair is what the caller gets."""
    clean = bytearray(encode(phone_photo, "JPEG", quality=90))
    rng = np.random.default_rng(2026)
    start = len(clean) // 10
    for _ in range(12):
        data = bytearray(clean)
        for offset in rng.integers(start, len(data) - 2, size=3):
            data[offset] = int(rng.integers(0, 255))  # never 0xFF: no new markers
        try:
            expected = pillow_only(monkeypatch, bytes(data))
        except InvalidImageError as exc:
            with pytest.raises(InvalidImageError) as caught:
                load_image(bytes(data), draft_size=DRAFT)
            assert caught.value.code == exc.code
        else:
            np.testing.assert_array_equal(load_image(bytes(data), draft_size=DRAFT), expected)


@pytest.fixture(scope="module")
def photo_kinds(phone_photo) -> list[bytes]:
    """One photo of each layout the accelerator handles."""
    return [
        encode(phone_photo, "JPEG", quality=85, restart_marker_rows=4),  # 4:2:0 with restart intervals
        encode(big_photo("coffee.png", (2000, 1800)), "JPEG", quality=75),  # 4:2:0, coarser tables
        encode(big_photo("camera.png", (2048, 2048), mode="L"), "JPEG", quality=90),  # grayscale
        encode(big_photo("astronaut.png", (2048, 2048)), "JPEG", quality=80, subsampling=0),  # 4:4:4
    ]


def test_bytes_damaged_anywhere_never_crash_and_still_match_pillow(monkeypatch, photo_kinds):
    """Sellers' uploads are untrusted: damage headers, tables, markers and data (0xFF included).
    Each result must be Pillow's own (same pixels, or the same refusal), and nothing may crash."""
    rng = np.random.default_rng(11)
    for trial in range(80):
        clean = photo_kinds[trial % len(photo_kinds)]
        data = bytearray(clean)
        header_end = clean.index(b"\xff\xda") + 12  # through the start of scan
        where = (2, header_end) if rng.random() < 0.5 else (header_end, len(data) - 2)
        for offset in rng.integers(where[0], where[1], size=int(rng.integers(1, 5))):
            data[offset] = int(rng.integers(0, 256))
        for threads in (1, 2):
            _fastjpeg._jpeg8.decode_eighth(bytes(data), threads)  # whatever it decides, it returns
        try:
            expected = pillow_only(monkeypatch, bytes(data))
        except InvalidImageError as exc:
            with pytest.raises(InvalidImageError) as caught:
                load_image(bytes(data), draft_size=DRAFT)
            assert caught.value.code == exc.code, f"trial {trial}"
        else:
            np.testing.assert_array_equal(load_image(bytes(data), draft_size=DRAFT), expected, f"trial {trial}")


def test_the_switch_turns_the_accelerator_off(monkeypatch):
    monkeypatch.setenv(_fastjpeg.ENV_SWITCH, "0")
    assert not _fastjpeg.available()


def test_a_process_forked_while_another_thread_decodes_can_still_decode(phone_photo):
    # The decoder's buffer pool has a lock; a child forked while another thread held it must not hang.
    import os
    import threading
    import warnings

    data = encode(phone_photo, "JPEG", quality=90)
    stop = threading.Event()

    def keep_decoding() -> None:
        while not stop.is_set():
            _fastjpeg._jpeg8.decode_eighth(data, 2)

    worker = threading.Thread(target=keep_decoding)
    worker.start()
    try:
        for _ in range(8):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python 3.12+)
                pid = os.fork()
            if pid == 0:  # the child: decode once, report by exit status
                os._exit(0 if _fastjpeg._jpeg8.decode_eighth(data, 2) is not None else 3)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        stop.set()
        worker.join()


# ---- libjpeg's header rules (issue 13): what libjpeg refuses, the accelerator declines -------------


def same_verdict(monkeypatch, data: bytes, **kwargs) -> None:
    """load_image gives the same pixels or the same refusal with the accelerator on and off."""
    try:
        expected = pillow_only(monkeypatch, data, **kwargs)
    except InvalidImageError as exc:
        with pytest.raises(InvalidImageError) as caught:
            load_image(data, draft_size=DRAFT, **kwargs)
        assert caught.value.code == exc.code
    else:
        np.testing.assert_array_equal(load_image(data, draft_size=DRAFT, **kwargs), expected)


@pytest.fixture(scope="module")
def flat_gray() -> bytes:
    return jpeg_forge.forge(2048, 2048)  # big enough that load_image decodes it at 1/8


@pytest.mark.parametrize("factors", [0x00, 0x01, 0x10, 0x50, 0x15, 0x05, 0xF1])
def test_a_grayscale_frame_with_bogus_sampling_factors_is_refused_as_libjpeg_does(monkeypatch, flat_gray, factors):
    # libjpeg: "Bogus sampling factors" (factors must be 1..4), whatever the layout
    data = jpeg_forge.with_sampling(flat_gray, 0, factors)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    with pytest.raises(InvalidImageError) as caught:
        load_image(data, draft_size=DRAFT)
    assert caught.value.code == "corrupt"
    same_verdict(monkeypatch, data)


@pytest.mark.parametrize("component, factors", [(0, 0x00), (0, 0x52), (1, 0x05), (2, 0x50)])
def test_a_colour_photo_with_bogus_sampling_factors_is_left_to_libjpeg(monkeypatch, phone_photo, component, factors):
    data = jpeg_forge.with_sampling(encode(phone_photo, "JPEG", quality=90), component, factors)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    same_verdict(monkeypatch, data)


@pytest.mark.parametrize("factors", [0x22, 0x41, 0x14, 0x44])
def test_valid_grayscale_sampling_factors_still_decode_fast_to_the_same_pixels(monkeypatch, flat_gray, factors):
    data = jpeg_forge.with_sampling(flat_gray, 0, factors)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is not None
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


# EXP, JPG0..JPG13, DHP, reserved codes, TEM and RST (no length for libjpeg), DAC (arithmetic), FF 00
REFUSED_OR_MISREAD_MARKERS = [0xDF, 0xF0, 0xF7, 0xFD, 0xDE, 0x02, 0x4F, 0xBF, 0x01, 0xD0, 0xCC, 0x00]


@pytest.mark.parametrize("marker", REFUSED_OR_MISREAD_MARKERS, ids=lambda m: f"FF{m:02X}")
def test_markers_libjpeg_does_not_skip_are_left_to_it(monkeypatch, flat_gray, marker):
    data = jpeg_forge.with_segment_before_sos(flat_gray, marker)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    same_verdict(monkeypatch, data)


@pytest.mark.parametrize("marker", [0xDF, 0xF0], ids=["EXP", "JPG0"])
def test_a_phone_photo_with_a_reserved_marker_is_refused_as_libjpeg_does(monkeypatch, phone_photo, marker):
    data = jpeg_forge.with_segment_before_sos(encode(phone_photo, "JPEG", quality=90), marker)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    with pytest.raises(InvalidImageError) as caught:  # libjpeg: "Unsupported marker type"
        load_image(data, draft_size=DRAFT)
    assert caught.value.code == "corrupt"
    same_verdict(monkeypatch, data)


@pytest.mark.parametrize("marker", [0xE0, 0xE1, 0xEF, 0xFE, 0xDC], ids=["APP0", "APP1", "APP15", "COM", "DNL"])
def test_markers_libjpeg_skips_are_skipped(monkeypatch, flat_gray, marker):
    data = jpeg_forge.with_segment_before_sos(flat_gray, marker, b"any bytes")
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is not None
    np.testing.assert_array_equal(load_image(data, draft_size=DRAFT), pillow_only(monkeypatch, data))


HUGE = DecodeLimits(max_pixels=200_000_000)


@pytest.mark.parametrize("width, height", [(65501, 1800), (1800, 65501), (65535, 1800)])
def test_frames_beyond_65500_pixels_are_refused_as_libjpeg_does(monkeypatch, width, height):
    data = jpeg_forge.forge(width, height)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    with pytest.raises(InvalidImageError) as caught:  # libjpeg: "Maximum supported image dimension"
        load_image(data, draft_size=DRAFT, limits=HUGE)
    assert caught.value.code == "corrupt"
    same_verdict(monkeypatch, data, limits=HUGE)


def test_a_frame_65500_pixels_wide_still_decodes_fast(monkeypatch):
    data = jpeg_forge.forge(65500, 1800)
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is not None
    np.testing.assert_array_equal(
        load_image(data, draft_size=DRAFT, limits=HUGE), pillow_only(monkeypatch, data, limits=HUGE)
    )


# ---- DC predictors that overflow a 32-bit int (issue 13, finding 4) ------------------------------

# 65,538 or more blocks of the largest DC difference: libjpeg-turbo's int sum wraps and only its low
# 16 bits reach the pixels (its coefficients are 16-bit).
OVERFLOWING_DC = {
    "gray": lambda: jpeg_forge.forge(2048, 2064, dc_diff=lambda c, m: 32767),
    "420": lambda: jpeg_forge.forge(2048, 4096, ((2, 2), (1, 1), (1, 1)), dc_diff=lambda c, m: 32767 if c == 0 else 0),
    "444": lambda: jpeg_forge.forge(2048, 2064, ((1, 1),) * 3, dc_diff=lambda c, m: -32767 if c == 0 else 0),
}


@pytest.mark.parametrize("kind", OVERFLOWING_DC)
@pytest.mark.parametrize("threads", [1, 2])
def test_dc_predictors_past_the_int_range_give_libjpegs_pixels(monkeypatch, kind, threads):
    data = OVERFLOWING_DC[kind]()
    assert _fastjpeg._jpeg8.decode_eighth(data, threads) is not None
    np.testing.assert_array_equal(
        load_image(data, draft_size=DRAFT, threads=threads), pillow_only(monkeypatch, data)
    )


def test_the_decoder_has_no_undefined_behaviour_on_overflowing_dc_sums(tmp_path, phone_photo):
    """Built alone under UndefinedBehaviorSanitizer, without -fwrapv (Python's own flags pass it): any
    signed overflow aborts. The DC sums used to overflow here (emit_420, render_rows, render_420)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler to build fuzz/jpeg8_run.c with")
    runner = tmp_path / "jpeg8_run"
    build = subprocess.run(
        [compiler, "-O1", "-g", "-fsanitize=undefined", "-fno-sanitize-recover=all", "-fno-wrapv", "-pthread",
         str(ROOT / "fuzz" / "jpeg8_run.c"), "-o", str(runner)],
        capture_output=True, text=True,
    )
    if build.returncode != 0:
        pytest.skip(f"{compiler} cannot build with -fsanitize=undefined here: {build.stderr[-300:]}")
    files = []
    for kind, make in OVERFLOWING_DC.items():
        files.append(tmp_path / f"{kind}.jpg")
        files[-1].write_bytes(make())
    files.append(tmp_path / "photo.jpg")
    files[-1].write_bytes(encode(phone_photo, "JPEG", quality=90))
    run = subprocess.run([str(runner), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "runtime error" not in run.stderr
    assert run.stdout.count("declined") == 0, run.stdout  # all four really decoded


# ---- memory (issue 13, finding 5) ------------------------------------------------------------------


def test_a_huge_frame_does_not_leave_its_buffers_behind(phone_photo):
    # 50 MP in a 0.2 MB file: its scratch memory is freed when the call returns
    huge = jpeg_forge.forge(8192, 6144, ((2, 2), (1, 1), (1, 1)))
    _fastjpeg.memory_stats(reset_peak=True)
    assert _fastjpeg._jpeg8.decode_eighth(huge, 2) is not None
    stats = _fastjpeg.memory_stats()
    assert stats["scratch_peak_bytes"] > stats["keep_limit_bytes"]  # it needed more than is kept
    assert stats["kept_bytes"] <= stats["keep_limit_bytes"] == _fastjpeg.KEEP_BYTES
    assert stats["scratch_in_use_bytes"] == 0
    # an ordinary phone photo's buffers are kept: the next one needs no fresh pages
    assert _fastjpeg._jpeg8.decode_eighth(encode(phone_photo, "JPEG", quality=90), 2) is not None
    assert 0 < _fastjpeg.memory_stats()["kept_bytes"] <= _fastjpeg.KEEP_BYTES


def test_decodes_beyond_the_in_flight_limit_go_to_pillow(monkeypatch, phone_photo):
    """Eight threads decode at once; at most MAX_IN_FLIGHT use the accelerator (and its memory) at
    a time, the others are decoded by Pillow. Every result is the same picture."""
    import threading

    data = encode(phone_photo, "JPEG", quality=90)
    expected = pillow_only(monkeypatch, data)
    _fastjpeg._jpeg8.set_limits(1, _fastjpeg.KEEP_BYTES)
    _fastjpeg.memory_stats(reset_peak=True)
    results: list[np.ndarray] = []
    try:
        def decode() -> None:
            for _ in range(3):
                results.append(load_image(data, draft_size=DRAFT))

        workers = [threading.Thread(target=decode) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        stats = _fastjpeg.memory_stats()
    finally:
        _fastjpeg._jpeg8.set_limits(_fastjpeg.MAX_IN_FLIGHT, _fastjpeg.KEEP_BYTES)
    assert len(results) == 24
    for result in results:
        np.testing.assert_array_equal(result, expected)
    assert stats["in_flight_peak"] == 1 and stats["in_flight"] == 0


def test_a_frame_needing_more_scratch_than_one_decode_may_use_goes_to_pillow(monkeypatch):
    # 120 MP of flat 4:2:0 in a 0.9 MB file: ~105 MiB of scratch on the fast path, ~20 MiB in Pillow
    data = jpeg_forge.forge(12000, 10000, ((2, 2), (1, 1), (1, 1)))
    assert _fastjpeg._jpeg8.decode_eighth(data, 2) is None
    np.testing.assert_array_equal(
        load_image(data, draft_size=DRAFT, limits=HUGE), pillow_only(monkeypatch, data, limits=HUGE)
    )
    # the cap is why it declined: with room enough it decodes, to the same pixels
    _fastjpeg._jpeg8.set_limits(_fastjpeg.MAX_IN_FLIGHT, _fastjpeg.KEEP_BYTES, 1 << 30)
    try:
        w, h, c, pixels = _fastjpeg._jpeg8.decode_eighth(data, 2)
    finally:
        _fastjpeg._jpeg8.set_limits(_fastjpeg.MAX_IN_FLIGHT, _fastjpeg.KEEP_BYTES, _fastjpeg.MAX_SCRATCH_BYTES)
    assert (w, h, c) == (1500, 1250, 3)
    assert _fastjpeg.memory_stats()["max_scratch_bytes"] == _fastjpeg.MAX_SCRATCH_BYTES
