"""Golden photos inside the manifest, so a device can check a model right after download.

The converter picks a few small photos the converted model answers with a clear margin, stores them
as PNG (lossless: every device decodes the same pixels) with the top-1 label and probabilities, and
`run_smoke_test` replays them through `preprocess` and LiteRT. No TensorFlow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from preprocessing import InvalidImageError, PreprocessSpec, load_image, preprocess

from .lite_model import LiteClassifier
from .manifest import SmokeCase, SmokeTest

#: Longest side of a golden photo: small enough to keep the manifest small.
SMOKE_IMAGE_SIDE = 48
#: How far a device's probabilities may drift from the converter's, per quantization mode.
SMOKE_TOLERANCE: dict[str, float] = {"float32": 0.01, "dynamic": 0.02, "float16": 0.02, "int8": 0.05}
_CANDIDATES = 24


@dataclass(frozen=True)
class SmokeOutcome:
    expected_label: str
    label: str
    max_abs_diff: float
    passed: bool


@dataclass(frozen=True)
class SmokeResult:
    """What `run_smoke_test` found: `passed` only when every case passed."""

    outcomes: tuple[SmokeOutcome, ...]

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)


def make_smoke_test(
    classifier: LiteClassifier,
    spec: PreprocessSpec,
    labels: Sequence[str],
    photos: Sequence[Path],
    quantization: str,
    count: int = 3,
) -> SmokeTest:
    """Pick up to `count` golden photos with distinct top-1 labels and the largest top-1 margins.

    `photos` are candidates (validation or calibration photos); with none, synthetic gradients are used.
    """
    step = max(1, len(photos) // _CANDIDATES)
    sources = []
    for path in list(photos)[::step][:_CANDIDATES]:
        try:
            sources.append((path.name, _thumbnail_png(load_image(path))))
        except InvalidImageError:  # an unreadable calibration photo was already reported; skip it
            continue
    if not sources:
        sources = [(f"synthetic-{i}", _synthetic_png(i)) for i in range(count * 2)]
    best: dict[int, tuple[float, SmokeCase]] = {}
    for name, png in sources:
        probabilities = classifier.predict(preprocess(png, spec))
        order = np.argsort(probabilities)[::-1]
        top = int(order[0])
        margin = float(probabilities[order[0]] - probabilities[order[1]]) if len(order) > 1 else 1.0
        case = SmokeCase(png, labels[top], tuple(float(p) for p in probabilities), name)
        if top not in best or margin > best[top][0]:
            best[top] = (margin, case)
    chosen = sorted(best.values(), key=lambda item: -item[0])[:count]
    return SmokeTest(tuple(case for _, case in chosen), SMOKE_TOLERANCE.get(quantization, 0.05))


def run_smoke_test(
    smoke_test: SmokeTest, classifier: LiteClassifier, spec: PreprocessSpec, labels: Sequence[str]
) -> SmokeResult:
    """Replay the golden photos: each must give the same top-1 and probabilities within tolerance."""
    outcomes = []
    for case in smoke_test.cases:
        probabilities = classifier.predict(preprocess(case.image_png, spec))
        expected = np.asarray(case.expected_probabilities, dtype=np.float32)
        diff = float(np.max(np.abs(probabilities - expected))) if len(expected) == len(probabilities) else 1.0
        label = labels[int(np.argmax(probabilities))]
        outcomes.append(SmokeOutcome(case.expected_label, label, diff,
                                     label == case.expected_label and diff <= smoke_test.tolerance))
    return SmokeResult(tuple(outcomes))


def _thumbnail_png(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels)
    image.thumbnail((SMOKE_IMAGE_SIDE, SMOKE_IMAGE_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()


def _synthetic_png(index: int) -> bytes:
    """A deterministic colour gradient (no random numbers, so nothing depends on numpy's RNG)."""
    side = SMOKE_IMAGE_SIDE
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    phase = index * 0.7
    channels = [(np.sin(2 * np.pi * (x * (c + 1) + y * (index + 1) / 3) + phase + c) + 1) * 127.5 for c in range(3)]
    return _thumbnail_png(np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8))
