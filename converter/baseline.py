"""The bundle's baseline: what the converted model answered on the validation photos, and what they looked like.

Devices and the server compare the field against it: the predicted-class distribution and confidence
histogram (Jensen-Shannon divergence), the low-confidence rate, and the input statistics of the
prepared pixels (`preprocessing.InputStats`, the same sums a device reports). It is written into
manifest.json under "baseline" and signed with the rest; reading it needs no TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from .errors import BundleFormatError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from preprocessing import InputStats

#: Equal bins of the top-1 score on [0, 1]; a score s falls in bin min(9, int(s * 10)).
HISTOGRAM_BINS = 10
#: At most this many labels (the device's class_counts limit).
MAX_CLASSES = 10_000
#: At most this many channels in the input statistics (RGBA).
MAX_CHANNELS = 4


def histogram_bin(score: float) -> int:
    """The confidence-histogram bin of a top-1 score (clamped to 0..9)."""
    return max(0, min(HISTOGRAM_BINS - 1, int(score * HISTOGRAM_BINS)))


@dataclass(frozen=True)
class InputBaseline:
    """Per-channel mean and standard deviation of the prepared uint8 pixels (0..255) of the photos."""

    images: int
    pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "pixels": self.pixels, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any) -> "InputBaseline":
        doc = _object(data, "baseline.input")
        mean = _numbers(doc, "mean", "baseline.input", MAX_CHANNELS)
        std = _numbers(doc, "std", "baseline.input", MAX_CHANNELS)
        if len(mean) != len(std):
            raise BundleFormatError(
                f"manifest.json baseline.input has {len(mean)} means and {len(std)} standard deviations")
        if any(s < 0 for s in std):
            raise BundleFormatError("manifest.json baseline.input.std has a negative value")
        return cls(_count(doc, "images", "baseline.input"), _count(doc, "pixels", "baseline.input"), mean, std)


@dataclass(frozen=True)
class Baseline:
    """The converted model's answers on the validation photos (see the module docstring)."""

    images: int
    confidence_threshold: float
    #: Predicted top-1 per label, in labels order.
    class_counts: tuple[int, ...]
    #: Top-1 score, `HISTOGRAM_BINS` equal bins on [0, 1].
    confidence_histogram: tuple[int, ...]
    #: Share of photos whose top-1 score is below `confidence_threshold`.
    low_confidence_rate: float
    #: Per label: share of its validation photos where the converted model's top-1 equals the
    #: SavedModel's (None where no validation photo has that label).
    per_class_agreement: tuple[float | None, ...]
    input: InputBaseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "confidence_threshold": self.confidence_threshold,
            "class_counts": list(self.class_counts),
            "confidence_histogram": list(self.confidence_histogram),
            "low_confidence_rate": self.low_confidence_rate,
            "per_class_agreement": list(self.per_class_agreement),
            "input": self.input.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Baseline":
        """Parse manifest.json's "baseline"; raises `BundleFormatError` naming the bad field."""
        doc = _object(data, "baseline")
        images = _count(doc, "images", "baseline")
        counts = tuple(int(c) for c in _numbers(doc, "class_counts", "baseline", MAX_CLASSES, integers=True))
        histogram = tuple(int(c) for c in _numbers(doc, "confidence_histogram", "baseline", HISTOGRAM_BINS,
                                                      integers=True))
        if len(histogram) != HISTOGRAM_BINS:
            raise BundleFormatError(
                f"manifest.json baseline.confidence_histogram has {len(histogram)} bins, not {HISTOGRAM_BINS}")
        agreement = _numbers(doc, "per_class_agreement", "baseline", MAX_CLASSES, nullable=True)
        if len(agreement) != len(counts):
            raise BundleFormatError(
                f"manifest.json baseline has {len(counts)} class_counts but {len(agreement)} per_class_agreement")
        if sum(counts) != images or sum(histogram) != images:
            raise BundleFormatError(
                f"manifest.json baseline counts do not add up to its {images} images "
                f"(class_counts {sum(counts)}, confidence_histogram {sum(histogram)})")
        for name in ("confidence_threshold", "low_confidence_rate"):
            if not 0.0 <= _number(doc, name, "baseline") <= 1.0:
                raise BundleFormatError(f"manifest.json baseline.{name} is not between 0 and 1")
        if any(a is not None and not 0.0 <= a <= 1.0 for a in agreement):
            raise BundleFormatError("manifest.json baseline.per_class_agreement has a value outside 0..1")
        if "input" not in doc:
            raise BundleFormatError("manifest.json baseline has no field 'input'")
        return cls(images, _number(doc, "confidence_threshold", "baseline"), counts, histogram,
                   _number(doc, "low_confidence_rate", "baseline"), agreement, InputBaseline.from_dict(doc["input"]))


def measure_baseline(
    converted: "np.ndarray",
    saved: "np.ndarray",
    targets: Sequence[int],
    confidence_threshold: float,
    input_stats: "InputStats",
) -> Baseline:
    """The baseline of a validation run: `converted` and `saved` are the TFLite model's and the
    SavedModel's probabilities (photos x labels), `targets` the true label indices, `input_stats`
    the photos' prepared pixels."""
    import numpy as np

    n, classes = converted.shape
    top = converted.argmax(axis=1)
    score = converted.max(axis=1).astype(np.float64)
    agree = top == saved.argmax(axis=1)
    truth = np.asarray(targets)
    bins = np.minimum(HISTOGRAM_BINS - 1, np.maximum(0, (score * HISTOGRAM_BINS).astype(np.int64)))
    per_class: list[float | None] = []
    for index in range(classes):
        mask = truth == index
        per_class.append(round(float(np.mean(agree[mask])), 6) if mask.any() else None)
    stats = input_stats.to_baseline()
    return Baseline(
        images=int(n),
        confidence_threshold=float(confidence_threshold),
        class_counts=tuple(int(c) for c in np.bincount(top, minlength=classes)),
        confidence_histogram=tuple(int(c) for c in np.bincount(bins, minlength=HISTOGRAM_BINS)),
        low_confidence_rate=round(float(np.mean(score < confidence_threshold)), 6) if n else 0.0,
        per_class_agreement=tuple(per_class),
        input=InputBaseline(stats["images"], stats["pixels"], tuple(stats["mean"]), tuple(stats["std"])),
    )


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BundleFormatError(f"manifest.json {where} is not an object (got {type(data).__name__})")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(doc: dict[str, Any], name: str, where: str) -> float:
    if name not in doc:
        raise BundleFormatError(f"manifest.json {where} has no field '{name}'")
    value = doc[name]
    if not _is_number(value):
        raise BundleFormatError(f"manifest.json {where}.{name} is not a number (got {value!r:.40})")
    return float(value)


def _count(doc: dict[str, Any], name: str, where: str) -> int:
    value = _number(doc, name, where)
    if value < 0 or value != int(value):
        raise BundleFormatError(f"manifest.json {where}.{name} is not a count (got {doc[name]!r:.40})")
    return int(value)


def _numbers(doc: dict[str, Any], name: str, where: str, limit: int, *, integers: bool = False,
             nullable: bool = False) -> tuple[Any, ...]:
    if name not in doc:
        raise BundleFormatError(f"manifest.json {where} has no field '{name}'")
    values = doc[name]
    if not isinstance(values, list):
        raise BundleFormatError(f"manifest.json {where}.{name} is not a list (got {type(values).__name__})")
    if len(values) > limit:
        raise BundleFormatError(f"manifest.json {where}.{name} has {len(values)} entries (at most {limit})")
    out: list[Any] = []
    for value in values:
        if value is None and nullable:
            out.append(None)
            continue
        if not _is_number(value) or (integers and (value < 0 or value != int(value))):
            kind = "a count" if integers else "a number"
            raise BundleFormatError(f"manifest.json {where}.{name} holds {value!r:.40}, not {kind}")
        out.append(int(value) if integers else float(value))
    return tuple(out)
