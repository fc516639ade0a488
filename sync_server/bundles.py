"""Verify what a publisher sends: a signed bundle (the converter's format) and its full SavedModel.

The bundle is read with `converter.bundle.read_bundle` against each trusted publisher key: the
signature over manifest.json first, then the sha256 and size of model.tflite and labels.txt. The
SavedModel must be the one the bundle was converted from: same labels, same float PreprocessSpec, and
(when the manifest records it) the same source fingerprint. Uploaded archives are unpacked with
tarfile's `data` filter: no absolute paths, no `..`, no links out, no devices.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from preprocessing import PreprocessSpec, SpecError

from .claims import Claim, claimed_tempdir
from .errors import BundleRejectedError, ConfigError, DiskFullError, PayloadTooLargeError
from .serving_repo import check_warmup, saved_model_digest

#: Model names: a folder name and a URL segment (the converter's NAME_PATTERN).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
BUNDLE_FILES = ("model.tflite", "manifest.json", "manifest.sig", "labels.txt")
#: Most entries in one uploaded archive (a SavedModel has tens; a bundle four).
MAX_ARCHIVE_MEMBERS = 20_000
#: The largest version number (versions are 32-bit INTEGER columns on PostgreSQL).
MAX_VERSION = 2**31 - 1


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and file hashes verified, and the facts the server keeps about it."""

    path: Path
    name: str
    version: int
    manifest: dict[str, Any]
    manifest_sha256: str
    labels: tuple[str, ...]
    float_spec: PreprocessSpec
    key_id: str | None
    files: dict[str, Path]


@dataclass(frozen=True)
class CheckedSavedModel:
    """A SavedModel folder that fits its bundle; `digest` is its content hash."""

    path: Path
    digest: str


def load_trusted_keys(paths: Sequence[Path], keys_dir: Path | None = None) -> list[Any]:
    """The Ed25519 public keys from `paths` and every file in `keys_dir`; ConfigError if one is unusable."""
    from converter.errors import KeyFileError
    from converter.signing import load_public_keys

    files = list(paths)
    if keys_dir is not None and keys_dir.is_dir():
        files += sorted(p for p in keys_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    keys = []
    for path in files:
        try:
            keys.extend(load_public_keys(path))  # a file may hold a key ring
        except KeyFileError as exc:
            raise ConfigError(f"trusted publisher key: {exc}") from exc
    return keys


def verify_bundle(path: Path, keys: Sequence[Any]) -> VerifiedBundle:
    """Read and check a bundle folder against the trusted keys; BundleRejectedError says what is wrong."""
    from converter.bundle import MANIFEST_FILE, SIGNATURE_FILE, read_bundle, sha256_hex
    from converter.errors import (
        BundleError,
        BundleFormatError,
        ModelHashMismatchError,
        SignatureMismatchError,
        UnsignedBundleError,
    )

    if not keys:
        raise BundleRejectedError(
            "the server trusts no publisher key, so it cannot verify any bundle: start it with "
            "--publisher-keys KEY.pub (or put the key in DATA/trusted-keys/)",
            code="no_trusted_keys",
        )
    bundle = None
    mismatch: SignatureMismatchError | None = None
    try:
        for key in keys:
            try:
                bundle = read_bundle(path, key)
                break
            except SignatureMismatchError as exc:
                mismatch = exc
    except UnsignedBundleError as exc:
        raise BundleRejectedError(f"the bundle is not signed: {exc}", code="unsigned_bundle") from exc
    except ModelHashMismatchError as exc:
        raise BundleRejectedError(f"a bundle file does not match its manifest: {exc}", code="hash_mismatch") from exc
    except BundleFormatError as exc:
        raise BundleRejectedError(f"the bundle is malformed: {exc}", code="bad_bundle") from exc
    except BundleError as exc:
        raise BundleRejectedError(f"the bundle was refused: {exc}", code="bad_bundle") from exc
    if bundle is None:
        detail = f": {mismatch}" if len(keys) == 1 and mismatch else f" with any of the {len(keys)} trusted keys"
        raise BundleRejectedError(f"the bundle's signature does not verify{detail}", code="bad_signature")

    manifest = bundle.manifest
    if not NAME_PATTERN.match(manifest.name):
        raise BundleRejectedError(
            f"model name {manifest.name!r} is not usable: letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, at most 100 characters",
            code="bad_bundle",
        )
    if not 1 <= manifest.version <= MAX_VERSION:
        raise BundleRejectedError(f"model version must be 1 to {MAX_VERSION}, got {manifest.version}", code="bad_bundle")
    manifest_bytes = (path / MANIFEST_FILE).read_bytes()
    files = {
        "model.tflite": path / manifest.model_file,
        "manifest.json": path / MANIFEST_FILE,
        "manifest.sig": path / SIGNATURE_FILE,
        "labels.txt": path / manifest.labels_file,
    }
    return VerifiedBundle(
        path=path,
        name=manifest.name,
        version=manifest.version,
        manifest=json.loads(manifest_bytes),
        manifest_sha256=sha256_hex(manifest_bytes),
        labels=tuple(manifest.labels),
        float_spec=manifest.float_preprocess_spec,
        key_id=bundle.key_id,
        files=files,
    )


def check_saved_model(path: Path, bundle: VerifiedBundle) -> CheckedSavedModel:
    """Check that `path` is the bundle's full SavedModel: layout, labels, float spec, fingerprint."""
    if not path.is_dir():
        raise BundleRejectedError(f"the SavedModel {path.name} is not a folder", code="bad_saved_model")
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise BundleRejectedError("the SavedModel has no saved_model.pb", code="bad_saved_model")
    if not (path / "variables").is_dir():
        raise BundleRejectedError("the SavedModel has no variables/ folder", code="bad_saved_model")
    labels_file = path / "labels.txt"
    if not labels_file.is_file():
        raise BundleRejectedError("the SavedModel has no labels.txt beside saved_model.pb", code="bad_saved_model")
    labels = tuple(line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip())
    if labels != bundle.labels:
        raise BundleRejectedError(
            f"the SavedModel's labels.txt ({len(labels)} labels) differs from the bundle's labels "
            f"({len(bundle.labels)}): it is not the model this bundle was converted from",
            code="saved_model_mismatch",
        )
    spec_file = path / "preprocess_spec.json"
    if spec_file.is_file():
        try:
            spec = PreprocessSpec.from_json(spec_file.read_bytes())
        except SpecError as exc:
            raise BundleRejectedError(f"the SavedModel's preprocess_spec.json is bad: {exc}", code="bad_saved_model") from exc
        if spec != bundle.float_spec:
            raise BundleRejectedError(
                "the SavedModel's preprocess_spec.json differs from the bundle's float_preprocess_spec: "
                "it is not the model this bundle was converted from",
                code="saved_model_mismatch",
            )
    digest = saved_model_digest(path)
    _check_fingerprint(path, bundle)
    check_warmup(path, bundle.manifest)
    return CheckedSavedModel(path, digest)


def _check_fingerprint(path: Path, bundle: VerifiedBundle) -> None:
    """Compare the SavedModel with the manifest's `source.fingerprint.files_sha256`, when present.

    The converter computes it as SHA-256 over, for each file of saved_model.pb, variables/ and assets/
    (each folder's files sorted), the relative path, a NUL byte and the file's bytes.
    """
    source = bundle.manifest.get("source")
    fingerprint = source.get("fingerprint") if isinstance(source, dict) else None
    expected = fingerprint.get("files_sha256") if isinstance(fingerprint, dict) else None
    if not expected:
        return
    digest = hashlib.sha256()
    for part in ("saved_model.pb", "variables", "assets"):
        item = path / part
        files = [item] if item.is_file() else sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else []
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    if digest.hexdigest() != expected:
        raise BundleRejectedError(
            "the SavedModel is not the one the bundle was converted from: its files differ from the "
            "manifest's source fingerprint (source.fingerprint.files_sha256)",
            code="saved_model_mismatch",
        )


# ----------------------------------------------------------------------------------------------------------
# Uploaded archives
# ----------------------------------------------------------------------------------------------------------


def unpack_archive(
    archive: Path | BinaryIO, into: Path, *, max_bytes: int, what: str, max_members: int = MAX_ARCHIVE_MEMBERS
) -> Path:
    """Unpack a tar (optionally gzip/bz2/xz) safely into `into`; returns the folder that holds the files.

    `archive` is a path or a binary file object. Members are read one at a time and the archive is
    refused as soon as it has more than `max_members` entries or its files add up to more than
    `max_bytes`: a small archive of a million empty members costs its first `max_members` headers,
    not a list of a million in memory. An archive whose only top-level entry is a folder yields that
    folder, so both `tar -C BUNDLE .` and `tar -C PARENT BUNDLE` work.
    """
    try:
        opened = tarfile.open(archive, "r:*") if isinstance(archive, Path) else tarfile.open(fileobj=archive, mode="r:*")
        with opened as tar:
            into.mkdir(parents=True, exist_ok=True)
            count = total = 0
            while (member := tar.next()) is not None:
                count += 1
                if count > max_members:
                    raise BundleRejectedError(
                        f"the {what} archive has more than {max_members} entries; a bundle or SavedModel has far fewer",
                        code="bad_archive",
                    )
                if member.isfile():
                    total += member.size
                    if total > max_bytes:
                        raise PayloadTooLargeError(f"the {what} archive unpacks to more than {max_bytes} bytes (the limit)")
                tar.extract(member, into, filter="data")
                tar.members.clear()  # nothing needs the headers already extracted
    except tarfile.TarError as exc:
        raise BundleRejectedError(f"the {what} upload is not a readable tar archive: {exc}", code="bad_archive") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the server's disk is full: the {what} archive cannot be unpacked; free space and try again") from exc
        raise BundleRejectedError(f"the {what} archive cannot be unpacked: {exc}", code="bad_archive") from exc
    except EOFError as exc:
        raise BundleRejectedError(f"the {what} archive cannot be unpacked: {exc}", code="bad_archive") from exc
    entries = [p for p in into.iterdir() if not p.name.startswith("._")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return into


def staging_dir(parent: Path) -> tuple[Path, Claim]:
    """A fresh temporary folder under `parent` (same file system as the data it will become), claimed
    by this process until the caller releases the claim, so `sync-server check` never takes a live
    upload for a leftover."""
    return claimed_tempdir(parent, "upload-")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
