"""A bundle converted WITH validation, so its manifest carries a baseline (built once per session).

    validated_bundle   `ValidatedBundle`: the tiny model converted (float32, validated on the demo
                       data set's val split, signed), its keys and its validation photos

`tests.server_fixtures.publisher` skips validation (its bundles have no baseline); tests about the
baseline and the quality stories use this one instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class ValidatedBundle:
    bundle: Path
    private_key: Path
    public_key: Path
    validation_photos: Path
    result: Any  # converter.ConversionResult


@pytest.fixture(scope="session")
def validated_bundle(tiny_saved_model: Path, demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ValidatedBundle:
    if "validated" not in _CACHE:
        from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair

        root = tmp_path_factory.mktemp("validated")
        private, public = write_keypair(root / "publisher")
        # The tiny model trains for 2 epochs: a lenient gate, the baseline is what this is about.
        result = convert(tiny_saved_model, ConvertOptions(
            out=root / "bundle", validation=ValidationOptions(images=demo_dataset / "val", min_agreement=0.75,
                                                              min_class_agreement=0.0),
            signing=SigningOptions(key=private), name="shop", version=1,
        ))
        _CACHE["validated"] = ValidatedBundle(result.bundle, private, public, demo_dataset / "val", result)
    return _CACHE["validated"]
