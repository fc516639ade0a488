"""A model bundle on disk: write it atomically, read it back and decide whether to trust it.

    BUNDLE_DIR/model.tflite    the model, with standard TFLite Model Metadata and labels zipped on
    BUNDLE_DIR/manifest.json   `Manifest`: hashes, tensors, PreprocessSpec, labels, validation, smoke test
    BUNDLE_DIR/manifest.sig    base64 Ed25519 signature of the exact bytes of manifest.json (absent if unsigned)
    BUNDLE_DIR/labels.txt      the labels, one per line (also inside the manifest and the model)

Devices and the server import this module, so it needs only the stdlib, cryptography, numpy and
`preprocessing`: no TensorFlow, no LiteRT.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from preprocessing import PreprocessSpec

from .errors import (
    BundleFormatError,
    ModelHashMismatchError,
    PublishError,
    UnsignedBundleError,
    UsageError,
)
from .manifest import Manifest
from .signing import PrivateKeyLike, PublicKeyLike, key_id, load_public_keys, sign, verify

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
LABELS_FILE = "labels.txt"
BUNDLE_FILES: tuple[str, ...] = (MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE, LABELS_FILE)

#: `Bundle.signature` values.
VERIFIED, UNSIGNED, NOT_CHECKED = "verified", "unsigned", "not_checked"


@dataclass(frozen=True)
class Bundle:
    """A bundle whose files match its manifest (and, when `signature == "verified"`, its signature)."""

    path: Path
    manifest: Manifest
    #: "verified" (signed by the trusted key), "unsigned" (no manifest.sig) or "not_checked" (no key given).
    signature: str
    key_id: str | None = None

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def spec(self) -> PreprocessSpec:
        """The spec whose `preprocess` output feeds the model directly."""
        return self.manifest.preprocess_spec

    def read_model(self) -> bytes:
        """The model file's bytes, checked again against the manifest (it may have changed since reading)."""
        data = _read(self.model_path, "model")
        _check_file(data, self.manifest.model_sha256, self.manifest.model_size, self.manifest.model_file)
        return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bundle(
    path: str | os.PathLike, public_key: PublicKeyLike | None, *, require_signature: bool = True
) -> Bundle:
    """Read a bundle and check it: signature first, then the manifest, then the files' sha256 and size.

    With `require_signature` (the default, what devices do) a `public_key` is needed and an unsigned
    bundle raises `UnsignedBundleError`; a bad signature raises `SignatureMismatchError` and a changed
    file `ModelHashMismatchError`. `require_signature=False` is for inspection: a signature present is
    still verified when a key is given.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleFormatError(f"{root} is not a bundle folder (it does not exist or is a file)")
    if require_signature and public_key is None:
        raise UsageError("read_bundle needs the trusted public key (or require_signature=False to inspect)")
    manifest_bytes = _read(root / MANIFEST_FILE, "manifest")
    signature_path = root / SIGNATURE_FILE
    status, signer = NOT_CHECKED, None
    if not signature_path.is_file():
        if require_signature:
            raise UnsignedBundleError(f"{root} is unsigned (no {SIGNATURE_FILE}): devices refuse unsigned bundles")
        status = UNSIGNED
    elif public_key is not None:
        signed_by = verify(manifest_bytes, _read(signature_path, "signature"), load_public_keys(public_key))
        status, signer = VERIFIED, key_id(signed_by)
    manifest = Manifest.from_json(manifest_bytes)
    model = _read(root / manifest.model_file, "model")
    _check_file(model, manifest.model_sha256, manifest.model_size, manifest.model_file)
    labels = _read(root / manifest.labels_file, "labels")
    _check_file(labels, manifest.labels_sha256, None, manifest.labels_file)
    listed = tuple(line.strip() for line in labels.decode("utf-8").splitlines() if line.strip())
    if listed != manifest.labels:
        raise ModelHashMismatchError(f"{manifest.labels_file} does not list the manifest's labels")
    return Bundle(root, manifest, status, signer)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleFormatError(f"the bundle has no {path.name} ({what} file missing at {path})") from None
    except OSError as exc:
        raise BundleFormatError(f"cannot read the bundle's {path.name}: {exc.strerror or exc}") from exc


def _check_file(data: bytes, sha256: str, size: int | None, name: str) -> None:
    if size is not None and len(data) != size:
        raise ModelHashMismatchError(
            f"{name} is {len(data)} bytes but the manifest says {size}: the file was changed or cut short"
        )
    if sha256_hex(data) != sha256:
        raise ModelHashMismatchError(f"{name} does not match the sha256 in the manifest: the file was changed")


def labels_text(labels: tuple[str, ...] | list[str]) -> bytes:
    """The labels file's bytes: one label per line."""
    return "".join(f"{label}\n" for label in labels).encode("utf-8")


def check_destination(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse a bundle destination that cannot be written, before any work is done."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise PublishError(f"{target} already exists: choose another --out or pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise PublishError(f"{target} exists and is not a folder")
    if not target.parent.is_dir():
        raise PublishError(f"cannot write the bundle: folder {target.parent} does not exist")
    return target


def write_bundle(
    path: str | os.PathLike,
    model: bytes,
    manifest: Manifest,
    *,
    sign_key: PrivateKeyLike | None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle into a temporary folder beside `path`, then rename it into place.

    Nothing appears at `path` unless every file was written (and signed, when `sign_key` is given):
    a reader never sees a half-written bundle. `manifest` must already carry the model's and labels'
    sha256 (see `sha256_hex`).
    """
    import uuid  # only writers need it: readers (a device's cold start) skip its import

    target = check_destination(path, overwrite=overwrite)
    labels = labels_text(manifest.labels)
    if sha256_hex(model) != manifest.model_sha256 or len(model) != manifest.model_size:
        raise UsageError("write_bundle: the manifest's model sha256/size do not describe `model`")
    if sha256_hex(labels) != manifest.labels_sha256:
        raise UsageError("write_bundle: the manifest's labels sha256 does not describe its labels")
    manifest_bytes = manifest.to_json()
    signature = sign(manifest_bytes, sign_key) if sign_key is not None else None
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _write_synced(staging / manifest.model_file, model)
        _write_synced(staging / manifest.labels_file, labels)
        _write_synced(staging / MANIFEST_FILE, manifest_bytes)
        if signature is not None:
            _write_synced(staging / SIGNATURE_FILE, signature)
        _replace(staging, target)
    except OSError as exc:
        raise PublishError(f"cannot write the bundle at {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed after."""
    import uuid

    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
