"""Input statistics: the device, the converter and the server measure pixels with one class."""

import numpy as np
import pytest

from preprocessing import InputStats, mean_shift


def test_sums_from_two_devices_merge_to_the_figures_of_all_photos():
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(5)]
    one, two = InputStats(), InputStats()
    for photo in photos[:2]:
        one.add(photo)
    for photo in photos[2:]:
        two.add(photo)
    merged = InputStats.from_report(one.to_report()).merge(InputStats.from_report(two.to_report()))
    everything = np.stack(photos).reshape(-1, 3).astype(np.float64)
    assert merged.images == 5 and merged.pixels == 5 * 48
    assert merged.mean == pytest.approx(everything.mean(axis=0).tolist())
    assert merged.std == pytest.approx(everything.std(axis=0).tolist())


def test_a_darker_field_shifts_the_mean_by_baseline_spreads():
    baseline = InputStats()
    baseline.add(np.full((4, 4, 3), 128, np.uint8))
    baseline.add(np.full((4, 4, 3), 148, np.uint8))  # mean 138, spread 10
    field = InputStats()
    field.add(np.full((4, 4, 3), 108, np.uint8))
    base = baseline.to_baseline()
    assert mean_shift(field, base["mean"], base["std"]) == pytest.approx(3.0)
    assert mean_shift(InputStats(), base["mean"], base["std"]) is None


def test_pixels_of_another_shape_are_refused_with_the_reason():
    stats = InputStats()
    stats.add(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="4 channels; earlier ones had 3"):
        stats.add(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="height x width x channels"):
        stats.add(np.zeros((2, 2), np.uint8))
