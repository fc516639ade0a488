"""Verify a model bundle before anything loads it: the converter's bundle reader, with device errors.

The device pins the publisher's public key; an unsigned bundle, a bad signature, or a model file
whose sha256 or size differs from the manifest is refused with `BundleRejectedError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from preprocessing import PreprocessSpec

from .errors import BundleRejectedError

if TYPE_CHECKING:  # the converter's reader loads cryptography: `load_bundle` imports it when it runs
    from converter.manifest import Manifest

# converter.bundle.MANIFEST_FILE, not imported from there for the reason above (a test keeps them equal).
_MANIFEST_FILE = "manifest.json"


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


def bundle_folder(path: str | Path) -> Path:
    """The bundle folder `path` names: the folder itself, or the folder of the model file inside one."""
    path = Path(path)
    return path.parent if path.is_file() else path


def load_bundle(path: str | Path, public_key: str | Path) -> LoadedBundle:
    """Verify the bundle at `path` (a folder, or the model file inside one) with the pinned key."""
    from converter.bundle import read_bundle
    from converter.errors import BundleError, KeyFileError

    path = bundle_folder(path)
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


def peek_spec(path: str | Path) -> PreprocessSpec | None:
    """The preprocessing spec in a bundle's manifest, read WITHOUT verifying anything; None if unreadable.

    Only for starting work early (decoding a photo while the bundle is verified): whatever is made
    with it must be thrown away unless it equals the verified bundle's spec. Never raises: the
    verification that follows reports what is wrong with the bundle.
    """
    try:
        manifest = json.loads((bundle_folder(path) / _MANIFEST_FILE).read_bytes())
        return PreprocessSpec.from_dict(manifest["preprocess_spec"])
    except Exception:  # anything wrong here is reported by `load_bundle`  # noqa: BLE001
        return None
