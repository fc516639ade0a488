"""The PreprocessSpec travels inside every bundle: it must round-trip through JSON and refuse nonsense."""

from __future__ import annotations

import pytest

from preprocessing import PreprocessSpec, SpecError


def test_a_spec_round_trips_through_json():
    spec = PreprocessSpec(
        height=96, width=128, resize="bicubic", fit="pad", pad_color=(0, 0, 0),
        scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        dtype="uint8", quantization=(0.0078125, 128), jpeg_draft=False,
    )
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_json_lists_become_tuples_so_specs_compare_equal():
    from_json = PreprocessSpec.from_json('{"mean": [1, 1, 1], "std": [1, 1, 1], "pad_color": [255, 255, 255]}')
    assert from_json == PreprocessSpec()
    assert isinstance(from_json.mean, tuple)


def test_pixel_mean_and_std_are_in_pixel_units_for_tflite_metadata():
    spec = PreprocessSpec(scale=1 / 127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))
    assert spec.pixel_mean == pytest.approx((127.5,) * 3)
    assert spec.pixel_std == pytest.approx((127.5,) * 3)


@pytest.mark.parametrize(
    "changes, names",
    [
        ({"height": 0}, "height"),
        ({"width": 10_000}, "width"),
        ({"resize": "magic"}, "resize"),
        ({"fit": "zoom"}, "fit"),
        ({"dtype": "float16"}, "dtype"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"mean": (1.0, 2.0)}, "mean"),
        ({"scale": -1}, "scale"),
        ({"pad_color": (0, 0, 300)}, "pad_color"),
        ({"dtype": "int8"}, "quantization"),
        ({"dtype": "uint8", "quantization": (0.1, 300)}, "zero point"),
        ({"quantization": (0.1, 0)}, "quantization"),
        ({"version": 2}, "update edge-classify"),
    ],
)
def test_a_bad_field_is_named_in_the_error(changes, names):
    with pytest.raises(SpecError, match=names):
        PreprocessSpec().replace(**changes)


def test_unknown_fields_from_a_newer_bundle_are_refused_not_half_read():
    with pytest.raises(SpecError, match="unknown preprocessing spec field.*crop_fraction"):
        PreprocessSpec.from_dict({"crop_fraction": 0.875})


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"spec"'])
def test_malformed_json_is_a_spec_error(text):
    with pytest.raises(SpecError):
        PreprocessSpec.from_json(text)
