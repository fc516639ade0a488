"""Big JPEGs at 1/8 scale on two cores, to exactly the pixels Pillow's `draft()` decode gives.

A 12-megapixel phone photo spends nearly all its decode time in the serial Huffman decode of its
bitstream, even at 1/8 scale. The C module `_jpeg8` splits that work across two threads (see the
comment at the top of `_jpeg8.c`) and replicates libjpeg-turbo's scaled IDCT and colour arithmetic,
so the result is bit-identical: this is an accelerator, not a second implementation. Anything it
does not reproduce exactly (progressive, CMYK, 4:2:2, damaged data, anything libjpeg would refuse,
...) it declines, and Pillow decodes the photo as before: its verdict is libjpeg's. So does a decode
past `MAX_IN_FLIGHT`. Where the module could not be compiled, Pillow decodes everything.
"""

from __future__ import annotations

import os

from PIL import Image

try:
    from . import _jpeg8
except ImportError:  # installed without a C compiler
    _jpeg8 = None

#: Set EDGE_CLASSIFY_FAST_JPEG=0 to decode every photo with Pillow (same pixels, slower).
ENV_SWITCH = "EDGE_CLASSIFY_FAST_JPEG"


def available() -> bool:
    """Whether the two-core decoder is compiled in and not switched off."""
    return _jpeg8 is not None and os.environ.get(ENV_SWITCH, "1") != "0"


_CORES = os.cpu_count() or 1

#: The most scratch memory one fast decode may use: a 12 MP photo needs ~14 MiB, a 50 MP frame ~45;
#: a frame that needs more (the 200 MP cap: ~175) is declined before anything is allocated, and
#: Pillow decodes it (~30 MiB at 1/8 scale).
MAX_SCRATCH_BYTES = 64 * 1024 * 1024
#: Fast decodes allowed at once. Each uses two threads and up to MAX_SCRATCH_BYTES; one more than this
#: is declined at once and Pillow decodes it (slower, leaner). One per core: a folder's decode workers
#: each run a one-thread fast decode on their own core (15 ms against Pillow's 23.5 for 12 MP), so a
#: cap of one per two cores sent every second worker to Pillow (folder throughput 4.8-6.7x -> 4.1x).
ENV_IN_FLIGHT = "EDGE_CLASSIFY_FAST_JPEG_IN_FLIGHT"
#: Scratch memory the decoder keeps between calls (fresh pages cost a page fault each): enough for a
#: 12 MP photo (~14 MiB on two threads); a bigger frame's buffers are freed when its call returns.
KEEP_BYTES = 24 * 1024 * 1024


def _max_in_flight() -> int:
    configured = os.environ.get(ENV_IN_FLIGHT, "")
    if configured.isdigit() and int(configured) >= 1:
        return int(configured)
    return max(1, _CORES)


MAX_IN_FLIGHT = _max_in_flight()
if _jpeg8 is not None:
    _jpeg8.set_limits(MAX_IN_FLIGHT, KEEP_BYTES, MAX_SCRATCH_BYTES)


def default_threads() -> int:
    """Two threads where there are two cores, else one."""
    return 2 if _CORES >= 2 else 1


def memory_stats(reset_peak: bool = False) -> dict[str, int]:
    """The decoder's scratch memory (kept between calls, in use, peak in use) and decodes in flight."""
    return _jpeg8.memory_stats(reset_peak) if _jpeg8 is not None else {}


def decode_draft(data: bytes, image: Image.Image, threads: int | None = None) -> Image.Image | None:
    """The pixels of `image` (opened from `data`, `draft()` already applied), or None.

    None means: not a 1/8-scale draft, or a file this decoder leaves to Pillow; call `image.load()`.
    """
    if not available() or image.mode not in ("RGB", "L"):
        return None
    config = getattr(image, "decoderconfig", ())
    if not config or config[0] != 8:
        return None
    result = _jpeg8.decode_eighth(data, threads or default_threads())  # type: ignore[union-attr]
    if result is None:
        return None
    width, height, channels, pixels = result
    if (width, height) != image.size or channels != len(image.mode):
        return None
    decoded = Image.frombytes(image.mode, image.size, pixels)
    decoded.info = dict(image.info)
    return decoded
