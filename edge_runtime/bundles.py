"""Verify a model bundle before anything loads it: the converter's bundle reader, with device errors.

The device pins the publisher's public key; an unsigned bundle, a bad signature, or a model file
whose sha256 or size differs from the manifest is refused with `BundleRejectedError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converter.bundle import read_bundle
from converter.errors import BundleError, KeyFileError
from converter.manifest import Manifest
from preprocessing import PreprocessSpec

from .errors import BundleRejectedError


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle with its model bytes in memory (checked once, loaded from these bytes)."""

    path: Path
    manifest: Manifest
    model_bytes: bytes

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.preprocess_spec

    @property
    def quantization(self) -> str:
        return self.manifest.quantization

    @property
    def confidence_threshold(self) -> float | None:
        return self.manifest.confidence_threshold


def load_bundle(path: str | Path, public_key: str | Path) -> LoadedBundle:
    """Verify the bundle at `path` (a folder, or the model file inside one) with the pinned key."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not Path(public_key).is_file():
        raise BundleRejectedError(
            f"no trusted publisher key at {public_key}: a device only loads signed bundles; copy the "
            "publisher's .pub file there or pass --public-key"
        )
    try:
        bundle = read_bundle(path, public_key)
        return LoadedBundle(bundle.path, bundle.manifest, bundle.read_model())
    except KeyFileError as exc:
        raise BundleRejectedError(f"the trusted key cannot be used: {exc}") from exc
    except BundleError as exc:
        raise BundleRejectedError(f"refused {path}: {exc}") from exc
