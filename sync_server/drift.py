"""Drift of what devices see and answer from a bundle's baseline: class and confidence distributions, inputs.

The main measure is the Jensen-Shannon divergence, base 2, of two count vectors (the predicted-class
counts, or the confidence histogram, of the field against the baseline of the converter's validation
run). Why JSD rather than the population stability index (PSI):

* bounded: 0 (same distribution) to 1 (no class in common), so one threshold (`max_class_jsd`) means
  the same for a 3-class and a 1,000-class model;
* symmetric: JSD(field, baseline) == JSD(baseline, field);
* finite when a class is empty on one side: it compares each side with their mixture, never divides by
  a zero share. A new model that never predicts a class, or a field that shows one the validation set
  lacked, is a real, measurable drift, not an infinity.

PSI, sum((p - q) * ln(p / q)), is infinite as soon as one side has an empty bin, so it needs smoothing
(an epsilon per bin) whose choice changes the figure, and it is unbounded. It is given here as a
secondary figure (`psi`, smoothed) because operators know its rule of thumb (0.1 small, 0.25 large).

Input shift is `preprocessing.mean_shift`: the largest per-channel shift of the mean prepared pixel
from the baseline's, in baseline standard deviations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from preprocessing import InputStats, mean_shift

#: PSI's per-bin smoothing: an empty bin counts as this share.
PSI_EPSILON = 1e-4


def _shares(counts: Sequence[float], length: int) -> list[float] | None:
    values = [float(c) for c in counts] + [0.0] * (length - len(counts))
    total = sum(values)
    if total <= 0 or any(v < 0 or not math.isfinite(v) for v in values):
        return None
    return [v / total for v in values]


def jensen_shannon(p_counts: Sequence[float], q_counts: Sequence[float]) -> float | None:
    """The Jensen-Shannon divergence, base 2 (0..1), of two count vectors; the shorter is padded with
    zeros. None when either side has no counts."""
    length = max(len(p_counts), len(q_counts))
    p, q = _shares(p_counts, length), _shares(q_counts, length)
    if p is None or q is None:
        return None
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m)
        if b > 0:
            total += b * math.log2(b / m)
    return min(1.0, max(0.0, total / 2))


def psi(field_counts: Sequence[float], baseline_counts: Sequence[float], *, epsilon: float = PSI_EPSILON) -> float | None:
    """The population stability index of `field_counts` against `baseline_counts` (natural log), empty
    bins smoothed to `epsilon` share. None when either side has no counts."""
    length = max(len(field_counts), len(baseline_counts))
    p, q = _shares(field_counts, length), _shares(baseline_counts, length)
    if p is None or q is None:
        return None
    return sum((max(a, epsilon) - max(b, epsilon)) * math.log(max(a, epsilon) / max(b, epsilon)) for a, b in zip(p, q))


def rebin(counts: Sequence[int], bins: int) -> list[int] | None:
    """Equal-width histogram `counts` merged into `bins` equal bins (when its length is a multiple of
    `bins`), so a 20-bin device histogram compares with a 10-bin baseline. None when they do not divide."""
    if bins <= 0 or not counts:
        return None
    if len(counts) == bins:
        return list(counts)
    if len(counts) % bins:
        return None
    step = len(counts) // bins
    return [sum(counts[i * step:(i + 1) * step]) for i in range(bins)]


def confidence_jsd(histogram: Sequence[int], baseline_histogram: Sequence[int]) -> float | None:
    """JSD of a confidence histogram against the baseline's (rebinned to the coarser of the two)."""
    if not histogram or not baseline_histogram:
        return None
    coarse = min(len(histogram), len(baseline_histogram))
    field, base = rebin(histogram, coarse), rebin(baseline_histogram, coarse)
    if field is None or base is None:
        return None
    return jensen_shannon(field, base)


def input_shift(pixels: Sequence[int], sums: Sequence[float], images: int, baseline_input: dict[str, Any] | None) -> float | None:
    """`mean_shift` of the field's input sums (per channel: pixels counted, sum) against a baseline's
    `input` ({"mean", "std"}). None without a baseline or without pixels."""
    if not baseline_input or not pixels or not all(pixels):
        return None
    count = min(int(p) for p in pixels)
    # Channels may have been counted over different reports (3- and 4-channel photos): scale each sum
    # to one pixel count so InputStats.mean is each channel's own mean.
    stats = InputStats(images=images, pixels=count, sum=[float(s) * count / int(p) for s, p in zip(sums, pixels)],
                       sum_sq=[0.0] * len(sums))
    mean, std = baseline_input.get("mean"), baseline_input.get("std")
    if not isinstance(mean, list) or not isinstance(std, list):
        return None
    return mean_shift(stats, [float(m) for m in mean], [float(s) for s in std])
