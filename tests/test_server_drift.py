"""Drift measures on counts one can check by hand: Jensen-Shannon divergence (base 2), PSI, input shift."""

from __future__ import annotations

import math

import pytest

from sync_server import drift


def test_jsd_is_zero_for_the_same_shares_and_one_for_disjoint_classes():
    assert drift.jensen_shannon([10, 30, 60], [1, 3, 6]) == pytest.approx(0.0, abs=1e-12), "shares, not totals"
    assert drift.jensen_shannon([5, 0], [0, 7]) == 1.0, "no class in common: the maximum, base 2"


def test_jsd_by_hand_for_a_class_empty_on_one_side():
    # P = (1/2, 1/2), Q = (1, 0), M = (3/4, 1/4):
    # KL(P||M) = 1/2 log2(2/3) + 1/2 log2(2) = 0.5 * -0.5849625 + 0.5 = 0.2075187
    # KL(Q||M) = log2(4/3) = 0.4150375;  JSD = (0.2075187 + 0.4150375) / 2 = 0.3112781
    by_hand = (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25) + math.log2(1 / 0.75)) / 2
    assert drift.jensen_shannon([1, 1], [1, 0]) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.3112781, abs=1e-7)
    assert drift.jensen_shannon([1, 0], [1, 1]) == drift.jensen_shannon([1, 1], [1, 0]), "symmetric"
    assert drift.jensen_shannon([1, 1], [1]) == pytest.approx(by_hand), "the shorter side is padded with zeros"


def test_jsd_needs_counts_on_both_sides():
    assert drift.jensen_shannon([], [1, 2]) is None
    assert drift.jensen_shannon([0, 0], [1, 2]) is None


def test_psi_by_hand_and_smoothed_where_jsd_needs_no_smoothing():
    # field (0.6, 0.4) against baseline (0.5, 0.5): (0.1 ln 1.2) + (-0.1 ln 0.8) = 0.0182321 + 0.0223144
    assert drift.psi([60, 40], [50, 50]) == pytest.approx(0.1 * math.log(1.2) - 0.1 * math.log(0.8))
    assert drift.psi([50, 50], [50, 50]) == pytest.approx(0.0)
    empty_bin = drift.psi([10, 0], [5, 5])
    # without smoothing this is infinite; with a 1e-4 share for the empty bin it is large but finite
    assert empty_bin == pytest.approx((1 - 0.5) * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))
    assert drift.jensen_shannon([10, 0], [5, 5]) < 1.0


def test_histograms_are_rebinned_to_the_coarser_side():
    assert drift.rebin([1, 2, 3, 4], 2) == [3, 7]
    assert drift.rebin([1, 2, 3], 2) is None, "3 bins do not merge into 2"
    twenty = [1] * 20
    assert drift.confidence_jsd(twenty, [2] * 10) == pytest.approx(0.0, abs=1e-12)
    assert drift.confidence_jsd([1, 2, 3], [1] * 10) is None


def test_input_shift_is_the_largest_channel_shift_in_baseline_stds():
    baseline = {"mean": [100.0, 120.0, 140.0], "std": [10.0, 20.0, 0.5]}
    # field means 110, 120, 141 over 4 pixels: shifts 1.0, 0.0 and 1 / max(0.5, 1) = 1.0 -> 1.0
    assert drift.input_shift([4, 4, 4], [440.0, 480.0, 564.0], 1, baseline) == pytest.approx(1.0)
    # 130 in the first channel: 3 stds
    assert drift.input_shift([4, 4, 4], [520.0, 480.0, 560.0], 1, baseline) == pytest.approx(3.0)
    # channels counted over different reports: each channel's own mean (3 pixels of 120 -> 120)
    assert drift.input_shift([4, 3, 4], [400.0, 360.0, 560.0], 1, baseline) == pytest.approx(0.0)
    assert drift.input_shift([4, 4, 4], [400.0, 480.0, 560.0], 1, None) is None, "no baseline"
    assert drift.input_shift([4, 4], [400.0, 480.0], 1, baseline) is None, "channels differ"
