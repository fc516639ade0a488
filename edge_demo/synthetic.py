"""Deterministic synthetic product photos for training the demo classifier.

Nothing can be downloaded where this project is built (no pretrained weights, no hub data sets), so the
demo model learns from pictures drawn here with Pillow: six shop products (mug, t-shirt, sneaker, book,
bottle, backpack), each a recognisable silhouette with some detail, on varied backgrounds and under varied
light, saved as JPEGs that look like what a shop device meets: phone-photo sizes and aspect ratios, a few
12-megapixel images, varied JPEG quality and some files whose pixels are stored rotated behind an EXIF
Orientation tag. The output is byte-identical for the same options, because every image draws from its own
random stream derived from (seed, split, category, index).

Only Pillow and numpy are used, so the generator runs without TensorFlow.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = [
    "CATEGORIES",
    "DatasetSummary",
    "GeneratorOptions",
    "generate_dataset",
    "main",
    "render_product",
]

CATEGORIES: tuple[str, ...] = ("mug", "t-shirt", "sneaker", "book", "bottle", "backpack")

#: Size of the 12-megapixel photos, landscape; portrait ones are the transpose.
LARGE_SIZE: tuple[int, int] = (4000, 3000)
#: Aspect ratios (width, height) of the ordinary photos, with how often each is drawn.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((4, 3), (3, 4), (1, 1), (16, 9), (9, 16))
_ASPECT_WEIGHTS = np.array([0.3, 0.3, 0.15, 0.15, 0.1])
#: EXIF Orientation values used, and the transpose that stores an upright image under each of them
#: (the inverse of what `PIL.ImageOps.exif_transpose` applies).
_STORE_TRANSPOSE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
_ORIENTATIONS = (3, 6, 8)
_EXIF_ORIENTATION_TAG = 0x0112
#: Pictures are drawn at most this large (long side) and scaled up beyond it: drawing dominates the cost.
_MAX_DRAW_SIDE = 1600
_MIN_SIZE = 16

Colour = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------------------
# Options and summary
# ----------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _int_range(name: str, value: object, low: int, high: int) -> tuple[int, int]:
    try:
        lo, hi = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (_is_int(lo) and _is_int(hi)):
        raise ValueError(f"{name} must hold two integers, got {value!r}")
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return int(lo), int(hi)


def _fraction(name: str, value: object) -> float:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GeneratorOptions:
    """What to generate; invalid values raise ValueError naming the field."""

    seed: int = 0
    #: (split name, images per category) in output order.
    splits: tuple[tuple[str, int], ...] = (("train", 300), ("val", 60), ("test", 60))
    #: Range of the long side, in pixels, of the ordinary (not 12-megapixel) photos.
    long_side: tuple[int, int] = (640, 1600)
    #: Fraction of the photos saved at 12 megapixels (4000x3000 or 3000x4000).
    large_fraction: float = 0.02
    #: Fraction of the photos stored rotated behind an EXIF Orientation tag (3, 6 or 8).
    exif_fraction: float = 0.1
    #: Inclusive range of the JPEG quality.
    jpeg_quality: tuple[int, int] = (60, 95)
    categories: tuple[str, ...] = CATEGORIES

    def __post_init__(self) -> None:
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        splits = self.splits.items() if isinstance(self.splits, Mapping) else self.splits
        try:
            pairs = tuple((name, count) for name, count in splits)
        except (TypeError, ValueError):
            raise ValueError(f"splits must be a sequence of (name, count) pairs, got {self.splits!r}") from None
        if not pairs:
            raise ValueError("splits must name at least one split")
        seen: set[str] = set()
        for name, count in pairs:
            if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
                raise ValueError(f"splits: bad split name {name!r} (must be a plain directory name)")
            if name in seen:
                raise ValueError(f"splits: split {name!r} is listed twice")
            seen.add(name)
            if not _is_int(count) or count < 0:
                raise ValueError(f"splits: count for {name!r} must be a non-negative integer, got {count!r}")
        object.__setattr__(self, "splits", tuple((name, int(count)) for name, count in pairs))
        object.__setattr__(self, "long_side", _int_range("long_side", self.long_side, 32, 8192))
        object.__setattr__(self, "jpeg_quality", _int_range("jpeg_quality", self.jpeg_quality, 1, 100))
        object.__setattr__(self, "large_fraction", _fraction("large_fraction", self.large_fraction))
        object.__setattr__(self, "exif_fraction", _fraction("exif_fraction", self.exif_fraction))
        if isinstance(self.categories, str):
            raise ValueError(f"categories must be a sequence of names, got the string {self.categories!r}")
        categories = tuple(self.categories)
        if not categories:
            raise ValueError("categories must name at least one category")
        for name in categories:
            if name not in CATEGORIES:
                raise ValueError(f"categories: unknown category {name!r}; known: {', '.join(CATEGORIES)}")
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories: duplicate names in {categories!r}")
        object.__setattr__(self, "categories", categories)


@dataclass(frozen=True)
class DatasetSummary:
    """What `generate_dataset` wrote."""

    root: Path
    counts: dict[str, dict[str, int]]  # split -> category -> images
    labels: tuple[str, ...]
    large_images: int
    exif_images: int
    seconds: float = field(default=0.0, compare=False)

    @property
    def total(self) -> int:
        """Number of images written."""
        return sum(sum(per_category.values()) for per_category in self.counts.values())

    def describe(self) -> str:
        """One-line human-readable summary."""
        splits = " ".join(f"{split}={sum(c.values())}" for split, c in self.counts.items())
        return (
            f"wrote {self.total} images of {len(self.labels)} categories ({splits}; "
            f"{self.large_images} at 12 MP, {self.exif_images} EXIF-rotated) to {self.root} "
            f"in {self.seconds:.1f} s"
        )


# ----------------------------------------------------------------------------------------------------------
# Colours and textures
# ----------------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _scale(colour: Colour, factor: float) -> Colour:
    return tuple(int(min(255, max(0, round(c * factor)))) for c in colour)  # type: ignore[return-value]


def _luma(colour: Colour) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def _distance(a: Colour, b: Colour) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _product_colour(rng: np.random.Generator) -> Colour:
    """A colour a product might have: mostly saturated, sometimes black, white or grey."""
    if rng.random() < 0.18:
        return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.choice([rng.uniform(0.08, 0.25), rng.uniform(0.8, 0.97)]))
    return _hsv(rng.random(), rng.uniform(0.35, 0.95), rng.uniform(0.3, 0.95))


def _contrasting(rng: np.random.Generator, against: Colour, min_distance: float = 110.0) -> Colour:
    """A random product colour that stands out from `against`."""
    best, best_d = against, -1.0
    for _ in range(12):
        colour = _product_colour(rng)
        d = _distance(colour, against)
        if d >= min_distance:
            return colour
        if d > best_d:
            best, best_d = colour, d
    return best if best_d > 40 else ((255, 255, 255) if _luma(against) < 128 else (20, 20, 20))


def _text_colour(background: Colour) -> Colour:
    return (245, 242, 235) if _luma(background) < 140 else (25, 25, 30)


def _texture(rng: np.random.Generator, size: tuple[int, int], base: Colour, pattern: str) -> Image.Image:
    """A fill of `size`: solid, horizontal or vertical stripes, or dots."""
    w, h = size
    img = Image.new("RGB", size, base)
    if pattern == "solid":
        return img
    draw = ImageDraw.Draw(img)
    second = _contrasting(rng, base, 90)
    if pattern in ("hstripes", "vstripes"):
        length = h if pattern == "hstripes" else w
        period = max(2.0, length / rng.uniform(5, 16))
        duty = rng.uniform(0.25, 0.6)
        pos = -rng.uniform(0, period)
        while pos < length:
            a, b = pos, pos + max(1.0, period * duty)
            draw.rectangle([0, a, w, b] if pattern == "hstripes" else [a, 0, b, h], fill=second)
            pos += period
    elif pattern == "dots":
        period = max(3.0, min(w, h) / rng.uniform(4, 10))
        r = period * rng.uniform(0.15, 0.3)
        for row, y in enumerate(np.arange(rng.uniform(0, period), h + period, period)):
            shift = period / 2 if row % 2 else 0.0
            for x in np.arange(shift, w + period, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=second)
    return img


def _choose(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float]) -> str:
    p = np.asarray(weights, dtype=float)
    return str(options[int(rng.choice(len(options), p=p / p.sum()))])


# ----------------------------------------------------------------------------------------------------------
# Drawing the products
# ----------------------------------------------------------------------------------------------------------


class _Layer:
    """A transparent RGBA canvas for one product, addressed in coordinates normalised to [0, 1]."""

    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.img)

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (x * (self.w - 1), y * (self.h - 1))

    def pts(self, seq: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.p(x, y) for x, y in seq]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, d) = self.p(min(x0, x1), min(y0, y1)), self.p(max(x0, x1), max(y0, y1))
        return [a, b, c, d]

    def lw(self, fraction: float) -> int:
        """A line width: `fraction` of the short side, at least one pixel."""
        return max(1, round(fraction * min(self.w, self.h)))

    def mask(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        m = Image.new("L", (self.w, self.h), 0)
        return m, ImageDraw.Draw(m)

    def fill(self, mask: Image.Image, rng: np.random.Generator, base: Colour, pattern: str) -> None:
        self.img.paste(_texture(rng, (self.w, self.h), base, pattern), (0, 0), mask)

    def shade_cylinder(self, rng: np.random.Generator, x0: float = 0.0, x1: float = 1.0) -> None:
        """Light the columns x0..x1 like a cylinder: darker edges and a highlight."""
        arr = np.asarray(self.img, dtype=np.float32)
        a, b = int(x0 * (self.w - 1)), int(x1 * (self.w - 1)) + 1
        t = np.linspace(0.0, 1.0, max(1, b - a), dtype=np.float32)
        edge = rng.uniform(0.25, 0.45)
        hx, hw, ha = rng.uniform(0.2, 0.4), rng.uniform(0.04, 0.1), rng.uniform(0.1, 0.35)
        profile = 1.0 - edge * np.abs(2 * t - 1) ** 2.2 + ha * np.exp(-(((t - hx) / hw) ** 2))
        arr[:, a:b, :3] *= profile[None, :, None]
        arr[:, a:b, :3] += (ha * 120) * np.exp(-(((t - hx) / (hw * 0.5)) ** 2))[None, :, None]
        self.img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")
        self.draw = ImageDraw.Draw(self.img)

    def shade_soft(self, rng: np.random.Generator) -> None:
        """Light the product from one side so that it does not look flat."""
        angle = rng.uniform(0, 2 * math.pi)
        ys = np.linspace(-0.5, 0.5, 32, dtype=np.float32)[:, None]
        xs = np.linspace(-0.5, 0.5, 32, dtype=np.float32)[None, :]
        gain = 1.0 + rng.uniform(0.1, 0.35) * (xs * math.cos(angle) + ys * math.sin(angle))
        gain = gain - rng.uniform(0.0, 0.25) * (xs**2 + ys**2)
        self.img = _apply_gain(self.img, gain)
        self.draw = ImageDraw.Draw(self.img)


def _apply_gain(img: Image.Image, gain: np.ndarray) -> Image.Image:
    """Multiply the colour bands of `img` by a smooth gain field given on a small grid (C speed, no floats)."""
    top = float(gain.max())
    small = Image.fromarray(np.clip(gain / top * 255.0, 0, 255).astype(np.uint8), "L")
    f = small.resize(img.size, Image.Resampling.BILINEAR)
    opaque = [Image.new("L", img.size, 255)] if img.mode == "RGBA" else []
    out = ImageChops.multiply(img, Image.merge(img.mode, [f, f, f, *opaque]))
    if top <= 1.0:
        return out
    lut = [min(255, round(v * top)) for v in range(256)]
    return out.point(lut * 3 + list(range(256)) * len(opaque))


Point = tuple[float, float]


def _lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _bezier(p0: Point, p1: Point, p2: Point, p3: Point, n: int = 12) -> list[Point]:
    """Points along a cubic Bézier curve, ends included."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 3 * np.array(p0) + 3 * (1 - t) ** 2 * t * np.array(p1)
    pts = pts + 3 * (1 - t) * t**2 * np.array(p2) + t**3 * np.array(p3)
    return [(float(x), float(y)) for x, y in pts]


def _logo(layer: _Layer, rng: np.random.Generator, cx: float, cy: float, size: float, colour: Colour) -> None:
    """A small print: circle, star, diamond or a few text bars, centred at (cx, cy), `size` of the width."""
    kind = _choose(rng, ["circle", "star", "diamond", "text"], [1, 1, 1, 1.5])
    rx, ry = size / 2, size / 2 * layer.w / layer.h
    if kind == "circle":
        layer.draw.ellipse(layer.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    elif kind == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
        layer.draw.polygon(layer.pts(pts), fill=colour)
    elif kind == "diamond":
        layer.draw.polygon(layer.pts([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)]), fill=colour)
    else:
        bar = ry * 0.35
        for i, frac in enumerate((1.0, rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8))[: int(rng.integers(1, 4))]):
            y = cy - ry * 0.6 + i * bar * 1.8
            layer.draw.rectangle(layer.box(cx - rx * frac, y, cx + rx * frac, y + bar), fill=colour)


def _draw_mug(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    bw = rng.uniform(0.7, 0.8)  # body width; the handle takes the rest
    ry = rng.uniform(0.06, 0.1)  # rim ellipse half-height
    rb = ry * 0.6
    taper = rng.uniform(0.0, 0.06) if rng.random() < 0.4 else 0.0
    handle_colour = base if rng.random() < 0.8 else _contrasting(rng, base)
    t = layer.lw(rng.uniform(0.06, 0.09))
    hy0, hy1 = rng.uniform(0.15, 0.25), rng.uniform(0.65, 0.8)
    hbox = layer.box(bw - 0.15, hy0, 1.0, hy1)
    if rng.random() < 0.7:
        layer.draw.ellipse(hbox, outline=_scale(handle_colour, 0.9), width=t)
    else:
        layer.draw.rounded_rectangle(hbox, radius=max(1, t * 1.5), outline=_scale(handle_colour, 0.9), width=t)
    mask, md = layer.mask()
    md.polygon(layer.pts([(0, ry), (bw, ry), (bw - taper, 1 - rb), (taper, 1 - rb)]), fill=255)
    md.ellipse(layer.box(taper, 1 - 2 * rb, bw - taper, 1), fill=255)
    md.ellipse(layer.box(0, 0, bw, 2 * ry), fill=255)
    pattern = _choose(rng, ["solid", "hstripes", "vstripes", "dots"], [6, 1.5, 0.7, 1])
    layer.fill(mask, rng, base, pattern)
    if rng.random() < 0.55:
        _logo(layer, rng, bw / 2, rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35), _contrasting(rng, base))
    layer.shade_cylinder(rng, 0.0, bw)
    # rim: a lighter lip, the dark inside, sometimes coffee
    inside = _scale(base, 0.45) if rng.random() < 0.6 else (235, 232, 225)
    layer.draw.ellipse(layer.box(0, 0, bw, 2 * ry), fill=_scale(base, 1.15), outline=_scale(base, 0.8), width=1)
    layer.draw.ellipse(layer.box(0.03, ry * 0.3, bw - 0.03, 2 * ry - ry * 0.25), fill=inside)
    if rng.random() < 0.3:
        coffee = _hsv(0.07, 0.7, rng.uniform(0.2, 0.4))
        layer.draw.ellipse(layer.box(0.06, ry * 0.75, bw - 0.06, 2 * ry - ry * 0.3), fill=coffee)
    else:
        layer.draw.chord(layer.box(0.03, ry * 0.3, bw - 0.03, 2 * ry - ry * 0.25), 180, 360, fill=_scale(inside, 0.7))
    return layer.img


def _draw_tshirt(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    bw = rng.uniform(0.27, 0.32)  # half body width
    nw = rng.uniform(0.09, 0.13)  # half neck width
    nd = rng.uniform(0.06, 0.12)  # front neck depth
    sy = rng.uniform(0.24, 0.32)  # sleeve tip height
    sl = rng.uniform(0.38, 0.46)  # sleeve lower corner height
    sx = rng.uniform(0.0, 0.05)  # sleeve tip inset
    vneck = rng.random() < 0.25
    shoulder = (0.5 - bw - 0.04, 0.07)
    armpit = (0.5 - bw, 0.31)
    sleeve_top, sleeve_bottom = (sx, sy), (sx + 0.11, sl)
    if vneck:
        neck = [(0.5 + nw, 0.0), (0.5, nd * 2.0), (0.5 - nw, 0.0)]
    else:
        neck = [(0.5 + nw * math.cos(a), nd * math.sin(a)) for a in np.linspace(0, math.pi, 14)]

    def mirror(p: tuple[float, float]) -> tuple[float, float]:
        return (1.0 - p[0], p[1])

    left = [(0.5 - nw, 0.0), shoulder, sleeve_top, sleeve_bottom, armpit, (0.5 - bw - 0.01, 1.0)]
    outline = left + [mirror(p) for p in reversed(left)] + neck[1:-1]
    mask, md = layer.mask()
    md.polygon(layer.pts(outline), fill=255)
    pattern = _choose(rng, ["solid", "hstripes", "vstripes", "dots"], [5, 2.5, 0.5, 0.6])
    layer.fill(mask, rng, base, pattern)
    d = layer.draw
    seam = _scale(base, 0.75)
    # the inside of the back shows through the neck opening
    back = [(0.5 - nw * math.cos(a) * 0.98, nd * 0.3 * math.sin(a)) for a in np.linspace(0, math.pi, 10)]
    d.polygon(layer.pts(neck + back), fill=_scale(base, 0.5))
    collar = base if rng.random() < 0.7 else _contrasting(rng, base)
    d.line(layer.pts(neck), fill=_scale(collar, 0.85), width=layer.lw(0.03), joint="curve")
    # sleeve hems and the bottom hem
    for side in (lambda p: p, mirror):
        a = side(_lerp(shoulder, sleeve_top, 0.85))
        b = side(_lerp(armpit, sleeve_bottom, 0.85))
        d.line(layer.pts([a, b]), fill=seam, width=layer.lw(0.008))
        side_seam = [side(armpit), side((0.5 - bw - 0.005, 0.99))]
        d.line(layer.pts(side_seam), fill=_scale(base, 0.88), width=layer.lw(0.006))
    d.line(layer.pts([(0.5 - bw, 0.955), (0.5 + bw, 0.955)]), fill=seam, width=layer.lw(0.008))
    if rng.random() < 0.5:
        _logo(layer, rng, 0.5, rng.uniform(0.35, 0.5), rng.uniform(0.18, 0.32), _contrasting(rng, base))
    # a few folds
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0.35, 0.65), rng.uniform(0.45, 0.85)
        fold = [(x, y), (x + rng.uniform(-0.08, 0.08), y + rng.uniform(0.04, 0.1))]
        d.line(layer.pts(fold), fill=_scale(base, 0.85), width=layer.lw(0.01))
    layer.shade_soft(rng)
    return layer.img


def _draw_sneaker(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    d = layer.draw
    sole_top = rng.uniform(0.74, 0.8)
    tongue = rng.uniform(0.0, 0.06)
    toe = rng.uniform(0.5, 0.6)
    upper = [
        (0.03, sole_top + 0.04), (0.0, 0.55), (0.01, 0.32), (0.05, 0.18), (0.12, 0.13), (0.22, 0.15),
        (0.32, 0.22), (0.40, 0.13), (0.43, 0.02 + tongue), (0.5, 0.04 + tongue), (0.52, 0.15),
        (0.62, 0.27), (0.74, 0.38), (0.86, toe - 0.08), (0.95, toe), (0.99, toe + 0.1), (0.99, sole_top + 0.04),
    ]
    mask, md = layer.mask()
    md.polygon(layer.pts(upper), fill=255)
    pattern = _choose(rng, ["solid", "hstripes", "dots"], [8, 0.7, 0.5])
    layer.fill(mask, rng, base, pattern)
    accent = _contrasting(rng, base)
    # heel counter and toe cap in another shade
    if rng.random() < 0.6:
        heel_colour = _scale(base, rng.uniform(0.6, 0.8)) if rng.random() < 0.6 else accent
        heel = [(0.03, sole_top + 0.04), (0.0, 0.55), (0.03, 0.36), (0.17, 0.42), (0.21, sole_top + 0.04)]
        d.polygon(layer.pts(heel), fill=heel_colour)
    if rng.random() < 0.6:
        toe_cap = [(0.8, toe - 0.03), (0.95, toe), (0.99, toe + 0.1), (0.99, sole_top + 0.04), (0.76, sole_top + 0.04)]
        d.polygon(layer.pts(toe_cap + [(0.74, toe + 0.08)]), fill=_scale(base, rng.uniform(0.7, 1.2)))
    # side decoration: a swoosh, three stripes or a panel
    deco = _choose(rng, ["swoosh", "stripes", "panel", "none"], [3, 2, 1.5, 1])
    if deco == "swoosh":
        lower = _bezier((0.2, 0.66), (0.4, 0.72), (0.6, 0.62), (0.82, 0.42))
        upper_edge = _bezier((0.82, 0.42), (0.6, 0.55), (0.4, 0.6), (0.2, 0.66))
        d.polygon(layer.pts(lower + upper_edge), fill=accent)
    elif deco == "stripes":
        for k in range(3):
            x = 0.36 + k * 0.07
            d.polygon(layer.pts([(x, 0.3), (x + 0.035, 0.3), (x + 0.1, sole_top), (x + 0.065, sole_top)]), fill=accent)
    elif deco == "panel":
        d.polygon(layer.pts([(0.25, 0.45), (0.6, 0.4), (0.7, sole_top), (0.2, sole_top)]), fill=_scale(base, 0.8))
    # ankle opening, tongue and laces
    lining = _scale(base, 0.35) if rng.random() < 0.7 else (40, 40, 45)
    opening = [(0.07, 0.17), (0.13, 0.14), (0.22, 0.16), (0.31, 0.23), (0.38, 0.17), (0.37, 0.25), (0.24, 0.27)]
    d.polygon(layer.pts(opening + [(0.12, 0.24)]), fill=lining)
    lace = (245, 245, 240) if _luma(base) < 150 else _scale(base, 0.35)
    if rng.random() < 0.3:
        lace = accent
    n = int(rng.integers(4, 7))
    for k in range(n):
        f = (k + 0.5) / n
        px, py = 0.45 + f * (0.71 - 0.45), 0.15 + f * (0.39 - 0.15)
        d.line(layer.pts([(px - 0.03, py + 0.02), (px + 0.035, py - 0.06)]), fill=lace, width=layer.lw(0.035))
        r = 0.012
        ex, ey = px + 0.02, py + 0.07
        d.ellipse(layer.box(ex - r, ey - r * w / h, ex + r, ey + r * w / h), fill=_scale(base, 0.4))
    # sole: midsole, outsole and tread marks
    sole = _choose(rng, ["white", "gum", "black", "match"], [5, 1, 1.5, 1])
    sole_colours = {"white": (238, 236, 230), "gum": (176, 120, 64), "black": (30, 30, 32), "match": _scale(base, 1.25)}
    sole_colour = sole_colours[sole]
    sole_pts = [(0.01, sole_top), (0.97, sole_top), (1.0, sole_top + 0.06), (0.99, 0.93), (0.95, 1.0), (0.03, 1.0)]
    sole_pts.append((0.0, 0.93))
    d.polygon(layer.pts(sole_pts), fill=sole_colour)
    outsole = (40, 38, 36) if sole != "black" else (75, 70, 65)
    d.polygon(layer.pts([(0.0, 0.93), (0.99, 0.93), (0.95, 1.0), (0.03, 1.0)]), fill=outsole)
    midsole = [(0.02, sole_top + 0.055), (0.98, sole_top + 0.055)]
    d.line(layer.pts(midsole), fill=_scale(sole_colour, 0.8), width=layer.lw(0.015))
    for x in np.linspace(0.06, 0.92, int(rng.integers(10, 22))):
        d.line(layer.pts([(x, 0.94), (x, 0.99)]), fill=_scale(outsole, 1.6), width=max(1, layer.w // 300))
    layer.shade_soft(rng)
    return layer.img


def _draw_book(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    d = layer.draw
    pe = rng.uniform(0.03, 0.07)  # visible page edge on the right
    sp = rng.uniform(0.05, 0.1)  # spine
    cover_right = 1.0 - pe
    pages = (rng.uniform(225, 250), rng.uniform(218, 240), rng.uniform(195, 225))
    pages_colour: Colour = tuple(int(c) for c in pages)  # type: ignore[assignment]
    page_block = [(cover_right - 0.01, 0.012), (1.0, 0.03), (1.0, 0.985), (cover_right - 0.01, 0.998)]
    d.polygon(layer.pts(page_block), fill=pages_colour)
    for x in np.linspace(cover_right + pe * 0.2, 1.0 - pe * 0.15, 4):
        d.line(layer.pts([(x, 0.03), (x, 0.985)]), fill=_scale(pages_colour, 0.85), width=1)
    mask, md = layer.mask()
    md.rectangle(layer.box(0.0, 0.0, cover_right, 1.0), fill=255)
    pattern = _choose(rng, ["solid", "hstripes", "vstripes", "dots"], [9, 0.6, 0.4, 0.4])
    layer.fill(mask, rng, base, pattern)
    d = layer.draw
    d.rectangle(layer.box(0.0, 0.0, sp, 1.0), fill=_scale(base, rng.uniform(0.55, 0.8)))
    d.line(layer.pts([(sp + 0.015, 0.0), (sp + 0.015, 1.0)]), fill=_scale(base, 0.6), width=layer.lw(0.01))
    ink = _text_colour(base) if rng.random() < 0.6 else _contrasting(rng, base)
    left, right = sp + 0.08, cover_right - 0.08
    if rng.random() < 0.35:
        d.rectangle(layer.box(sp + 0.045, 0.03, cover_right - 0.04, 0.97), outline=ink, width=layer.lw(0.012))
    # title block: one to three bars, centred or left-aligned
    centred = rng.random() < 0.6
    y = rng.uniform(0.08, 0.2)
    for i in range(int(rng.integers(1, 4))):
        bar_h = rng.uniform(0.045, 0.075) if i == 0 else rng.uniform(0.03, 0.05)
        width = (right - left) * rng.uniform(0.5, 1.0)
        x0 = (left + right - width) / 2 if centred else left
        d.rectangle(layer.box(x0, y, x0 + width, y + bar_h), fill=ink)
        y += bar_h * 1.6
    # a picture or a band in the middle
    art = _choose(rng, ["circle", "band", "rect", "none"], [1, 1, 1, 1])
    art_colour = _contrasting(rng, base)
    if art == "circle":
        r = rng.uniform(0.15, 0.3)
        cx, cy = (left + right) / 2, rng.uniform(0.5, 0.62)
        d.ellipse(layer.box(cx - r, cy - r * w / h, cx + r, cy + r * w / h), fill=art_colour)
    elif art == "band":
        y0 = rng.uniform(0.45, 0.6)
        d.rectangle(layer.box(sp + 0.02, y0, cover_right, y0 + rng.uniform(0.08, 0.2)), fill=art_colour)
    elif art == "rect":
        d.rectangle(layer.box(left, rng.uniform(0.4, 0.5), right, rng.uniform(0.68, 0.76)), fill=art_colour)
    author_y = rng.uniform(0.83, 0.9)
    width = (right - left) * rng.uniform(0.35, 0.7)
    x0 = (left + right - width) / 2 if centred else left
    d.rectangle(layer.box(x0, author_y, x0 + width, author_y + rng.uniform(0.025, 0.04)), fill=ink)
    layer.shade_soft(rng)
    img = layer.img
    if rng.random() < 0.45:  # seen slightly from above or below, or from one side
        k = rng.uniform(0.03, 0.09) * w
        if rng.random() < 0.5:
            quad = (-k, 0, 0, h, w, h, w + k, 0) if rng.random() < 0.5 else (0, 0, -k, h, w + k, h, w, 0)
        else:
            kk = k * h / w
            quad = (0, -kk, 0, h + kk, w, h, w, 0) if rng.random() < 0.5 else (0, 0, 0, h, w, h + kk, w, -kk)
        img = img.convert("RGBa").transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
        img = img.convert("RGBA")
    return img


def _draw_bottle(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    cw = rng.uniform(0.17, 0.24)  # half cap width
    ch = rng.uniform(0.05, 0.09)  # cap height
    nw = cw * rng.uniform(0.75, 0.92)  # half neck width
    ne = rng.uniform(0.14, 0.3)  # where the neck ends
    se = ne + rng.uniform(0.07, 0.17)  # where the shoulder ends
    rc = rng.uniform(0.05, 0.15)  # bottom corner radius, of the width
    rcy = rc * w / h
    shoulder = _bezier((0.5 - nw, ne), (0.5 - nw, ne + (se - ne) * 0.6), (0.0, ne + (se - ne) * 0.3), (0.0, se))
    left = [(0.5 - nw, ch)] + shoulder
    left += [(rc - rc * math.cos(a), 1.0 - rcy + rcy * math.sin(a)) for a in np.linspace(0, math.pi / 2, 6)]
    outline = left + [(1.0 - x, y) for x, y in reversed(left)]
    mask, md = layer.mask()
    md.polygon(layer.pts(outline), fill=255)
    layer.fill(mask, rng, base, _choose(rng, ["solid", "hstripes", "vstripes"], [10, 0.6, 0.4]))
    d = layer.draw
    # label band around the body, clipped to the bottle
    if rng.random() < 0.85:
        label_colour = _contrasting(rng, base, 90) if rng.random() < 0.7 else (240, 238, 230)
        l0 = rng.uniform(se + 0.03, se + 0.2)
        l1 = min(0.95, l0 + rng.uniform(0.18, 0.35))
        label_mask, lm = layer.mask()
        lm.rectangle(layer.box(0.0, l0, 1.0, l1), fill=255)
        label_mask = ImageChops.multiply(label_mask, mask)
        label = _texture(rng, (w, h), label_colour, _choose(rng, ["solid", "hstripes"], [4, 1]))
        layer.img.paste(label, (0, 0), label_mask)
        d = layer.draw = ImageDraw.Draw(layer.img)
        ink = _text_colour(label_colour) if rng.random() < 0.6 else _contrasting(rng, label_colour)
        y = l0 + (l1 - l0) * rng.uniform(0.15, 0.3)
        for i in range(int(rng.integers(1, 4))):
            bar = (l1 - l0) * rng.uniform(0.08, 0.15)
            half = rng.uniform(0.2, 0.38)
            d.rectangle(layer.box(0.5 - half, y, 0.5 + half, y + bar), fill=ink)
            y += bar * 1.7
            if y > l1 - bar:
                break
    # cap, with a neck ring and ribs
    cap = _product_colour(rng)
    d.rectangle(layer.box(0.5 - nw * 1.08, ch, 0.5 + nw * 1.08, ch + 0.012), fill=_scale(base, 0.75))
    d.rounded_rectangle(layer.box(0.5 - cw, 0.0, 0.5 + cw, ch), radius=max(1, layer.lw(0.04)), fill=cap)
    if rng.random() < 0.6:
        for x in np.linspace(0.5 - cw * 0.8, 0.5 + cw * 0.8, 7):
            d.line(layer.pts([(x, 0.006), (x, ch - 0.004)]), fill=_scale(cap, 0.7), width=1)
    layer.shade_cylinder(rng)
    return layer.img


def _draw_backpack(rng: np.random.Generator, w: int, h: int, base: Colour) -> Image.Image:
    layer = _Layer(w, h)
    d = layer.draw
    strap = _scale(base, 0.55) if rng.random() < 0.6 else (35, 35, 38)
    # top handle and the shoulder straps behind the body
    d.ellipse(layer.box(0.38, 0.0, 0.62, 0.17), outline=strap, width=layer.lw(0.035))
    d.rounded_rectangle(layer.box(0.0, 0.2, 0.14, 0.95), radius=layer.lw(0.05), fill=strap)
    d.rounded_rectangle(layer.box(0.86, 0.2, 1.0, 0.95), radius=layer.lw(0.05), fill=strap)
    top = rng.uniform(0.04, 0.07)
    dome = rng.uniform(0.45, 0.65)
    mask, md = layer.mask()
    md.ellipse(layer.box(0.06, top, 0.94, dome), fill=255)
    md.rounded_rectangle(layer.box(0.06, (top + dome) / 2, 0.94, 1.0), radius=layer.lw(0.1), fill=255)
    layer.fill(mask, rng, base, _choose(rng, ["solid", "hstripes", "vstripes", "dots"], [8, 0.6, 0.4, 0.5]))
    d = layer.draw
    if rng.random() < 0.5:  # a reinforced bottom panel
        bottom_mask, bm = layer.mask()
        bm.rectangle(layer.box(0.0, 0.9, 1.0, 1.0), fill=255)
        layer.img.paste(strap, (0, 0, w, h), ImageChops.multiply(bottom_mask, mask))
    zip_colour = _scale(base, 0.45) if rng.random() < 0.7 else _contrasting(rng, base)
    zw = layer.lw(0.018)
    # main zip along the dome, with its pullers
    zbox = layer.box(0.13, top + 0.05, 0.87, dome + (dome - top) * 0.5)
    d.arc(zbox, 180, 360, fill=zip_colour, width=zw)
    cy = (zbox[1] + zbox[3]) / 2 / (h - 1)
    for x in (0.13, 0.87):
        d.rounded_rectangle(layer.box(x - 0.02, cy, x + 0.02, cy + 0.08), radius=1, fill=zip_colour)
    # front pocket with its own zip
    pocket_colour = _scale(base, rng.uniform(0.75, 0.9)) if rng.random() < 0.7 else _contrasting(rng, base)
    p0 = rng.uniform(0.5, 0.6)
    px = rng.uniform(0.14, 0.22)
    pbox = layer.box(px, p0, 1 - px, rng.uniform(0.88, 0.95))
    seam = _scale(pocket_colour, 0.7)
    d.rounded_rectangle(pbox, radius=layer.lw(0.08), fill=pocket_colour, outline=seam, width=layer.lw(0.01))
    zy = p0 + rng.uniform(0.04, 0.07)
    d.line(layer.pts([(px + 0.05, zy), (1 - px - 0.05, zy)]), fill=zip_colour, width=zw)
    pull_x = rng.uniform(px + 0.08, 1 - px - 0.08)
    d.rounded_rectangle(layer.box(pull_x - 0.015, zy, pull_x + 0.015, zy + 0.07), radius=1, fill=zip_colour)
    if rng.random() < 0.5:
        _logo(layer, rng, 0.5, p0 + 0.18, rng.uniform(0.12, 0.2), _contrasting(rng, pocket_colour))
    if rng.random() < 0.4:  # compression straps
        for y in (0.42, 0.48):
            d.line(layer.pts([(0.06, y), (0.2, y)]), fill=strap, width=layer.lw(0.02))
            d.line(layer.pts([(0.8, y), (0.94, y)]), fill=strap, width=layer.lw(0.02))
    layer.shade_soft(rng)
    return layer.img


#: category -> (range of width/height of the product's box, drawing function, whether it may be mirrored)
_Drawer = Callable[[np.random.Generator, int, int, Colour], Image.Image]
_PRODUCTS: dict[str, tuple[tuple[float, float], _Drawer, bool]] = {
    "mug": ((1.05, 1.35), _draw_mug, True),
    "t-shirt": ((0.95, 1.2), _draw_tshirt, False),
    "sneaker": ((2.1, 2.7), _draw_sneaker, True),
    "book": ((0.62, 0.8), _draw_book, True),
    "bottle": ((0.26, 0.4), _draw_bottle, False),
    "backpack": ((0.72, 0.9), _draw_backpack, True),
}
assert tuple(_PRODUCTS) == CATEGORIES


# ----------------------------------------------------------------------------------------------------------
# Scene: background, placement, shadow, light, camera
# ----------------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], `size` (w, h), from a grid of `cells` along the long side."""
    w, h = size
    gw = max(2, round(cells * w / max(w, h)))
    gh = max(2, round(cells * h / max(w, h)))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.Resampling.BICUBIC))


def _surface(rng: np.random.Generator, size: tuple[int, int], colour: Colour, kind: str) -> Image.Image:
    """A wall or table surface: solid, gradient, blotchy texture or wood-like streaks."""
    w, h = size
    if kind == "solid":
        return Image.new("RGB", size, colour)
    c = np.array(colour, dtype=np.float32)
    if kind in ("vgradient", "hgradient"):
        other = c * rng.uniform(0.6, 1.3) + rng.uniform(-20, 20, 3).astype(np.float32)
        n = 32
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)
        shape = (n, 1, 3) if kind == "vgradient" else (1, n, 3)
        arr = (c + (other - c) * t[:, None]).reshape(shape)
        small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        return small.resize(size, Image.Resampling.BILINEAR)
    if kind == "wood":  # streaks along the table
        sw, sh = max(2, w // 16), max(2, h // 2)
        streaks = rng.standard_normal((max(2, h // 6), 1)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(streaks, "F").resize((sw, sh), Image.Resampling.BILINEAR))
        field_ = field_ + 0.3 * rng.standard_normal((sh, sw)).astype(np.float32)
        arr = c * (1.0 + rng.uniform(0.05, 0.1) * field_[..., None])
    else:  # blotchy texture: plaster, fabric, stone
        sw, sh = max(2, w // 4), max(2, h // 4)
        noise = _smooth_noise(rng, (sw, sh), int(rng.integers(6, 40)))
        arr = c + rng.uniform(8, 25) * noise[..., None] * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BILINEAR)


def _wall_colour(rng: np.random.Generator) -> Colour:
    kind = _choose(rng, ["light", "pastel", "mid", "dark"], [4, 2, 2, 1])
    if kind == "light":
        return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.78, 0.97))
    if kind == "pastel":
        return _hsv(rng.random(), rng.uniform(0.12, 0.4), rng.uniform(0.65, 0.92))
    if kind == "mid":
        return _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.4, 0.7))
    return _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.12, 0.3))


def _table_colour(rng: np.random.Generator) -> tuple[Colour, str]:
    kind = _choose(rng, ["wood", "white", "grey", "dark"], [3, 2, 1.5, 1])
    if kind == "wood":
        return _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.8)), "wood"
    if kind == "white":
        return _hsv(rng.random(), rng.uniform(0.0, 0.06), rng.uniform(0.85, 0.98)), "texture"
    if kind == "grey":
        return _hsv(rng.random(), rng.uniform(0.0, 0.1), rng.uniform(0.45, 0.75)), "texture"
    return _hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.1, 0.3)), "solid"


def _background(rng: np.random.Generator, size: tuple[int, int], wall: Colour, table_y: int | None) -> Image.Image:
    w, h = size
    kind = _choose(rng, ["solid", "vgradient", "hgradient", "texture"], [2, 2, 1, 2])
    bg = _surface(rng, size, wall, kind)
    if table_y is not None and 0 < table_y < h - 1:
        colour, table_kind = _table_colour(rng)
        table = _surface(rng, (w, h - table_y), colour, table_kind if rng.random() < 0.7 else "vgradient")
        bg.paste(table, (0, table_y))
        draw = ImageDraw.Draw(bg)
        edge = max(1, h // 250)
        draw.rectangle([0, table_y, w, table_y + edge], fill=_scale(colour, rng.uniform(1.1, 1.3)))
    return bg


def _shadow(alpha: Image.Image, blur: float) -> tuple[Image.Image, int]:
    """A soft shadow mask from an alpha channel, padded by the returned margin on every side."""
    w, h = alpha.size
    k = max(1, round(max(w, h) / 256))
    margin = int(blur * 3) + k
    small = alpha.resize((max(1, w // k), max(1, h // k)), Image.Resampling.BOX)
    pm = margin // k
    padded = Image.new("L", (small.width + 2 * pm, small.height + 2 * pm), 0)
    padded.paste(small, (pm, pm))
    padded = padded.filter(ImageFilter.GaussianBlur(max(0.5, blur / k)))
    return padded.resize((w + 2 * pm * k, h + 2 * pm * k), Image.Resampling.BILINEAR), pm * k


def _grain_lut(sigma: float) -> list[int]:
    """Map a uniform byte to 128 + a normal deviate of standard deviation `sigma`, clipped to a byte."""
    inv = NormalDist().inv_cdf
    return [min(255, max(0, round(128.0 + sigma * inv((i + 0.5) / 256.0)))) for i in range(256)]


def _light_and_camera(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Brightness, contrast, colour cast, vignette or light gradient, sometimes blur, and sensor noise."""
    w, h = img.size
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6) * max(w, h) / 1000))
    contrast = rng.uniform(0.75, 1.2)
    brightness = rng.uniform(0.72, 1.2)
    cast = rng.uniform(0.92, 1.08, 3)
    # uneven light: a vignette and/or light from one side, on a small grid scaled up
    gw, gh = (48, max(2, round(48 * h / w))) if w >= h else (max(2, round(48 * w / h)), 48)
    xs = np.linspace(-1.0, 1.0, gw, dtype=np.float32)[None, :]
    ys = np.linspace(-1.0, 1.0, gh, dtype=np.float32)[:, None]
    gain = np.ones((gh, gw), dtype=np.float32)
    uneven = False
    if rng.random() < 0.4:  # vignette
        gain = gain * (1.0 - rng.uniform(0.1, 0.35) * (xs**2 + ys**2) / 2)
        uneven = True
    if rng.random() < 0.4:  # light from one side
        a = rng.uniform(0, 2 * math.pi)
        gain = gain * (1.0 + rng.uniform(0.08, 0.25) * (xs * math.cos(a) + ys * math.sin(a)))
        uneven = True
    if uneven:
        img = _apply_gain(img, gain)
    # contrast, brightness and colour cast as one lookup table per band
    v = np.arange(256, dtype=np.float64)
    lut = np.concatenate([((v - 128.0) * contrast + 128.0) * brightness * c for c in cast])
    img = img.point(np.clip(np.round(lut), 0, 255).astype(np.uint8).tolist())
    # sensor noise, the same on every band (luminance grain)
    # (uniform bytes through the inverse normal CDF: a Gaussian at the price of random bytes)
    sigma = rng.uniform(1.0, 7.0)
    g = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").point(_grain_lut(sigma))
    return ImageChops.add(img, Image.merge("RGB", (g, g, g)), scale=1.0, offset=-128)


def render_product(category: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw one upright RGB photo, `size` = (width, height), of a product of `category`."""
    if category not in _PRODUCTS:
        raise ValueError(f"category: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if width < _MIN_SIZE or height < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}x{_MIN_SIZE}, got {size!r}")
    # draw at most _MAX_DRAW_SIDE on the long side, then scale up
    k = min(1.0, _MAX_DRAW_SIDE / max(width, height))
    dw, dh = max(_MIN_SIZE, round(width * k)), max(_MIN_SIZE, round(height * k))
    (lo, hi), draw_product, mirrorable = _PRODUCTS[category]

    # the product's box: 25-80 % of the frame, where its shape and the tilt allow
    aspect = rng.uniform(lo, hi)
    angle = rng.uniform(-5, 5) if rng.random() < 0.5 else rng.uniform(-20, 20)
    coverage = rng.uniform(0.25, 0.8)
    ow = math.sqrt(coverage * dw * dh * aspect)
    oh = ow / aspect
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    fit = min(1.0, 0.94 * dw / (ow * c + oh * s), 0.94 * dh / (ow * s + oh * c))
    ow, oh = max(8, round(ow * fit)), max(8, round(oh * fit))

    wall = _wall_colour(rng)
    base = _contrasting(rng, wall, 100)
    product = draw_product(rng, ow, oh, base)
    if mirrorable and rng.random() < 0.5:
        product = product.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # nearest-neighbour: the drawing is not anti-aliased anyway, and bilinear rotation costs ten times more
    product = product.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    pw, ph = product.size
    x = round((dw - pw) * rng.beta(2.0, 2.0)) if dw > pw else (dw - pw) // 2
    y = round((dh - ph) * rng.beta(2.0, 2.0)) if dh > ph else (dh - ph) // 2

    table_y: int | None = None
    if rng.random() < 0.45:  # a table edge behind the product, somewhere below its middle
        table_y = round(y + ph * rng.uniform(0.35, 0.85))
    bg = _background(rng, (dw, dh), wall, table_y)

    alpha = product.getchannel("A")
    if rng.random() < 0.85:
        blur = max(1.0, rng.uniform(0.02, 0.08) * max(pw, ph))
        shadow, margin = _shadow(alpha, blur)
        dx = round(rng.uniform(-0.08, 0.08) * pw)
        dy = round(rng.uniform(0.0, 0.08) * ph)
        opacity = rng.uniform(0.25, 0.6)
        shadow = shadow.point(lambda v: int(v * opacity))
        sx, sy = x + dx - margin, y + dy - margin
        bg.paste(_scale(wall, 0.25), (sx, sy, sx + shadow.width, sy + shadow.height), shadow)
    bg.paste(product.convert("RGB"), (x, y), alpha)

    img = _light_and_camera(rng, bg)
    if (dw, dh) != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return img


# ----------------------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    path: Path
    category: str
    size: tuple[int, int]
    quality: int
    orientation: int | None
    large: bool
    render_seed: np.random.SeedSequence


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _plan(options: GeneratorOptions, root: Path, split: str, category: str, index: int) -> _Plan:
    """Decide size, quality and orientation of one image; the draw order never depends on the options."""
    seq = np.random.SeedSequence([options.seed, _name_key(split), _name_key(category), index])
    meta_seq, render_seq = seq.spawn(2)
    meta = np.random.default_rng(meta_seq)
    u_large, u_exif, u_portrait, u_long, u_quality = meta.random(5)
    aspect_index = int(meta.choice(len(ASPECT_RATIOS), p=_ASPECT_WEIGHTS))
    orientation_index = int(meta.integers(len(_ORIENTATIONS)))
    large = bool(u_large < options.large_fraction)
    if large:
        size = LARGE_SIZE if u_portrait < 0.5 else (LARGE_SIZE[1], LARGE_SIZE[0])
    else:
        lo, hi = options.long_side
        long_side = lo + min(hi - lo, int(u_long * (hi - lo + 1)))
        aw, ah = ASPECT_RATIOS[aspect_index]
        short = max(_MIN_SIZE, round(long_side * min(aw, ah) / max(aw, ah)))
        size = (long_side, short) if aw >= ah else (short, long_side)
    qlo, qhi = options.jpeg_quality
    quality = qlo + min(qhi - qlo, int(u_quality * (qhi - qlo + 1)))
    orientation = _ORIENTATIONS[orientation_index] if u_exif < options.exif_fraction else None
    path = root / split / category / f"{category}_{index:05d}.jpg"
    return _Plan(path, category, size, quality, orientation, large, render_seq)


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_image(plan: _Plan) -> tuple[bool, bool]:
    """Render and write one planned image; returns (large, exif-rotated)."""
    img = render_product(plan.category, np.random.default_rng(plan.render_seed), plan.size)
    save_args: dict[str, object] = {"format": "JPEG", "quality": plan.quality}
    if plan.orientation is not None:
        img = img.transpose(_STORE_TRANSPOSE[plan.orientation])
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = plan.orientation
        save_args["exif"] = exif
    _atomic_write(plan.path, lambda fh: img.save(fh, **save_args))
    return plan.large, plan.orientation is not None


def _remove_stale(directory: Path, category: str, count: int) -> None:
    """Delete numbered images of an earlier, larger run so that the folder holds exactly this run."""
    pattern = re.compile(rf"{re.escape(category)}_(\d{{5,}})\.jpg")
    for entry in directory.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) >= count and entry.is_file():
            entry.unlink()


def generate_dataset(
    out_dir: str | Path,
    options: GeneratorOptions = GeneratorOptions(),
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> DatasetSummary:
    """Write `out_dir/{split}/{category}/{category}_{index:05d}.jpg` and `out_dir/labels.txt`."""
    if not isinstance(options, GeneratorOptions):
        raise ValueError(f"options must be a GeneratorOptions, got {type(options).__name__}")
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    started = time.perf_counter()
    root = Path(out_dir)
    plans: list[_Plan] = []
    counts: dict[str, dict[str, int]] = {}
    for split, count in options.splits:
        counts[split] = {}
        for category in options.categories:
            directory = root / split / category
            directory.mkdir(parents=True, exist_ok=True)
            _remove_stale(directory, category, count)
            counts[split][category] = count
            plans.extend(_plan(options, root, split, category, i) for i in range(count))
    labels_text = "".join(f"{c}\n" for c in options.categories)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "labels.txt", lambda fh: fh.write(labels_text.encode("utf-8")))  # type: ignore[attr-defined]

    large = exif = 0
    total = len(plans)
    if progress is not None:
        progress(0, total)

    def tally(done: int, result: tuple[bool, bool]) -> None:
        nonlocal large, exif
        large += result[0]
        exif += result[1]
        if progress is not None:
            progress(done, total)

    if workers == 1 or total < 2:
        for done, plan in enumerate(plans, 1):
            tally(done, _make_image(plan))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done, result in enumerate(pool.map(_make_image, plans, chunksize=8), 1):
                tally(done, result)
    return DatasetSummary(
        root=root,
        counts=counts,
        labels=options.categories,
        large_images=large,
        exif_images=exif,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command line: generate a data set and print a one-line summary."""
    defaults = GeneratorOptions()
    split_defaults = dict(defaults.splits)
    parser = argparse.ArgumentParser(
        prog="python -m edge_demo.synthetic",
        description="Generate synthetic product photos for the demo classifier.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write {split}/{category}/*.jpg and labels.txt")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train", type=int, default=split_defaults["train"], help="images per category")
    parser.add_argument("--val", type=int, default=split_defaults["val"], help="images per category")
    parser.add_argument("--test", type=int, default=split_defaults["test"], help="images per category")
    parser.add_argument("--large-fraction", type=float, default=defaults.large_fraction, help="fraction at 12 MP")
    parser.add_argument("--exif-fraction", type=float, default=defaults.exif_fraction, help="fraction EXIF-rotated")
    parser.add_argument("--workers", type=int, default=1, help="processes to render with")
    args = parser.parse_args(argv)
    try:
        options = GeneratorOptions(
            seed=args.seed,
            splits=(("train", args.train), ("val", args.val), ("test", args.test)),
            large_fraction=args.large_fraction,
            exif_fraction=args.exif_fraction,
        )
        summary = generate_dataset(args.out_dir, options, workers=args.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
