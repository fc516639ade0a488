"""Input statistics of prepared pixels: per-channel mean and spread, mergeable across photos and devices.

The converter writes them into a bundle's baseline from its validation photos; a device adds every
photo it classifies and reports the sums; the server merges reports and compares with the baseline.
All three use this one class on the same pixels (`preprocess_pixels`: after decode, orientation, fit
and resize, before normalisation, on the 0..255 scale), so a drift in the figures is a drift in the
photos, not in how they were measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: At most this many channels (RGBA) in a report.
MAX_CHANNELS = 4


@dataclass
class InputStats:
    """Sums over the pixels of `images` photos: `pixels` values per channel, their sum and sum of squares."""

    images: int = 0
    pixels: int = 0
    sum: list[float] = field(default_factory=list)
    sum_sq: list[float] = field(default_factory=list)

    def add(self, pixels: np.ndarray) -> None:
        """Count one photo's fitted pixels (uint8, height x width x channels)."""
        if pixels.ndim != 3 or not 1 <= pixels.shape[2] <= MAX_CHANNELS:
            raise ValueError(f"InputStats.add needs height x width x channels pixels (1 to {MAX_CHANNELS}); got {pixels.shape}")
        flat = pixels.reshape(-1, pixels.shape[2]).astype(np.float64)
        sums = flat.sum(axis=0)
        squares = np.einsum("ij,ij->j", flat, flat)
        if not self.sum:
            self.sum = [0.0] * pixels.shape[2]
            self.sum_sq = [0.0] * pixels.shape[2]
        elif len(self.sum) != pixels.shape[2]:
            raise ValueError(f"these pixels have {pixels.shape[2]} channels; earlier ones had {len(self.sum)}")
        self.images += 1
        self.pixels += flat.shape[0]
        self.sum = [a + float(b) for a, b in zip(self.sum, sums)]
        self.sum_sq = [a + float(b) for a, b in zip(self.sum_sq, squares)]

    def merge(self, other: "InputStats") -> "InputStats":
        """Both together (a new object); channels must match unless one side is empty."""
        if not other.images:
            return InputStats(self.images, self.pixels, list(self.sum), list(self.sum_sq))
        if not self.images:
            return InputStats(other.images, other.pixels, list(other.sum), list(other.sum_sq))
        if len(self.sum) != len(other.sum):
            raise ValueError(f"cannot merge statistics of {len(self.sum)} and {len(other.sum)} channels")
        return InputStats(
            self.images + other.images,
            self.pixels + other.pixels,
            [a + b for a, b in zip(self.sum, other.sum)],
            [a + b for a, b in zip(self.sum_sq, other.sum_sq)],
        )

    @property
    def mean(self) -> list[float]:
        """Per-channel mean on the 0..255 scale ([] when empty)."""
        return [s / self.pixels for s in self.sum] if self.pixels else []

    @property
    def std(self) -> list[float]:
        """Per-channel standard deviation over all pixels ([] when empty)."""
        if not self.pixels:
            return []
        return [math.sqrt(max(0.0, q / self.pixels - (s / self.pixels) ** 2)) for s, q in zip(self.sum, self.sum_sq)]

    def to_report(self) -> dict[str, Any]:
        """The sums, as a device reports them (the server merges sums, never means)."""
        return {"images": self.images, "pixels": self.pixels, "sum": list(self.sum), "sum_sq": list(self.sum_sq)}

    @classmethod
    def from_report(cls, data: dict[str, Any]) -> "InputStats":
        return cls(int(data["images"]), int(data["pixels"]), [float(v) for v in data["sum"]],
                   [float(v) for v in data["sum_sq"]])

    def to_baseline(self) -> dict[str, Any]:
        """What a bundle's baseline keeps: counts, mean and spread per channel (rounded)."""
        return {"images": self.images, "pixels": self.pixels, "mean": [round(m, 4) for m in self.mean],
                "std": [round(s, 4) for s in self.std]}


def mean_shift(field_stats: InputStats, baseline_mean: list[float], baseline_std: list[float]) -> float | None:
    """The largest per-channel shift of the field's mean from the baseline's, in baseline standard
    deviations (None when either side has nothing or their channels differ)."""
    mean = field_stats.mean
    if not mean or len(mean) != len(baseline_mean) or len(baseline_std) != len(baseline_mean):
        return None
    return max(abs(m - b) / max(s, 1.0) for m, b, s in zip(mean, baseline_mean, baseline_std))
