"""Make and edit JPEG files byte by byte, for tests of what a decoder accepts.

`forge` writes a baseline JPEG from scratch: flat blocks (a DC difference each, then end of block)
with tiny Huffman tables, so a test can ask for any frame size, sampling factor or run of DC
differences, including ones no real encoder writes. The `with_*` helpers edit a real file's headers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

SOI, EOI, SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
SOF_MARKERS = (0xC0, 0xC1)


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of its 0xFF, length field) of each marker segment up to and including SOS."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        out.append((marker, i, length))
        if marker == SOS:
            break
        i += 2 + length
    return out


def sof_payload(data: bytes) -> int:
    """Offset of the SOF segment's first payload byte (its precision)."""
    for marker, offset, _ in segments(data):
        if marker in SOF_MARKERS:
            return offset + 4
    raise ValueError("no baseline SOF marker")


def sos_offset(data: bytes) -> int:
    for marker, offset, _ in segments(data):
        if marker == SOS:
            return offset
    raise ValueError("no SOS marker")


def with_sampling(data: bytes, component: int, factors: int) -> bytes:
    """`data` with component `component`'s sampling byte (h << 4 | v) set to `factors`."""
    out = bytearray(data)
    out[sof_payload(data) + 6 + 3 * component + 1] = factors
    return bytes(out)


def with_size(data: bytes, width: int | None = None, height: int | None = None) -> bytes:
    out = bytearray(data)
    p = sof_payload(data)
    if height is not None:
        out[p + 1 : p + 3] = struct.pack(">H", height)
    if width is not None:
        out[p + 3 : p + 5] = struct.pack(">H", width)
    return bytes(out)


def with_segment_before_sos(data: bytes, marker: int, payload: bytes = b"\x00\x00") -> bytes:
    """`data` with a marker segment (0xFF, `marker`, a length, `payload`) just before its SOS."""
    at = sos_offset(data)
    segment = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    return data[:at] + segment + data[at:]


class _Bits:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def put(self, bits: str) -> None:
        self.parts.append(bits)

    def stuffed(self) -> bytes:
        bits = "".join(self.parts)
        bits += "1" * (-len(bits) % 8)  # pad with ones, as encoders do
        raw = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
        return raw.replace(b"\xff", b"\xff\x00")


def _dc_bits(diff: int) -> str:
    # DC table: code 00 -> category 0, code 01 -> category 15 (differences of +-16384..32767)
    if diff == 0:
        return "00"
    if not 16384 <= abs(diff) <= 32767:
        raise ValueError("forge writes DC differences of 0 or 16384..32767 in magnitude")
    extra = diff if diff > 0 else diff + (1 << 15) - 1
    return "01" + format(extra, "015b")


def forge(
    width: int,
    height: int,
    sampling: Sequence[tuple[int, int]] = ((1, 1),),
    dc_diff: Callable[[int, int], int] = lambda component, mcu: 0,
    quant: int = 1,
) -> bytes:
    """A baseline JPEG of flat blocks. `sampling`: (h, v) per component (one: grayscale, three:
    YCbCr); `dc_diff(component, mcu)`: the DC difference of every block of that component in that MCU.
    """
    ncomp = len(sampling)
    hmax = max(h for h, _ in sampling)
    vmax = max(v for _, v in sampling)
    if ncomp == 1:
        mcus = -(-width // 8) * -(-height // 8)
        blocks = [1]
    else:
        mcus = -(-width // (8 * hmax)) * -(-height // (8 * vmax))
        blocks = [h * v for h, v in sampling]
    out = bytearray(SOI)
    out += b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([quant]) * 64
    sof = struct.pack(">BHHB", 8, height, width, ncomp)
    for c, (h, v) in enumerate(sampling):
        sof += bytes([c + 1, (h << 4) | v, 0])
    out += b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
    dc_table = b"\x00" + bytes([0, 2] + [0] * 14) + bytes([0, 15])
    ac_table = b"\x10" + bytes([1] + [0] * 15) + bytes([0])
    out += b"\xff\xc4" + struct.pack(">H", 2 + len(dc_table) + len(ac_table)) + dc_table + ac_table
    sos = bytes([ncomp]) + b"".join(bytes([c + 1, 0x00]) for c in range(ncomp)) + b"\x00\x3f\x00"
    out += b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos
    bits = _Bits()
    constant = all(dc_diff(c, 0) == dc_diff(c, 1) == dc_diff(c, mcus - 1) for c in range(ncomp))
    if constant:  # the usual case: one MCU's bits, repeated (fast for big frames)
        mcu_bits = "".join((_dc_bits(dc_diff(c, 0)) + "0") * blocks[c] for c in range(ncomp))
        bits.put(mcu_bits * mcus)
    else:
        for m in range(mcus):
            for c in range(ncomp):
                bits.put((_dc_bits(dc_diff(c, m)) + "0") * blocks[c])
    out += bits.stuffed() + EOI
    return bytes(out)
