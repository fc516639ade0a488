"""The TensorFlow Serving model repository and its model config file, written by the server.

    DATA/tf-serving/models/NAME/VERSION/    the full SavedModel of each published version
    DATA/tf-serving/models.config           ModelServerConfig in protobuf text format
    DATA/tf-serving/state.json              what the last config said (labels, versions), for restarts

Point TF Serving at the file (`--model_config_file=.../models.config
--model_config_file_poll_wait_seconds=N`) and it loads the versions listed in each model's
`model_version_policy` and unloads the others, without downtime: a new version loads before an old
one is dropped. Two rules of TF Serving shape how the files are written:

- a version folder must never be seen half-copied: it is copied to a hidden temporary folder and
  renamed into place;
- a version label may only name a version that is already loaded, so `ServingReconciler` moves labels
  in two steps (`write(..., labels=old)` with the new versions, wait until they are AVAILABLE, then
  `write(..., labels=new)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .claims import claimed_tempdir, claimed_tempfile
from .errors import BundleRejectedError

#: Files of an export folder that TF Serving does not need (the tf_keras model duplicates the weights).
_SKIP_IN_REPOSITORY = frozenset({"model.keras"})


@dataclass(frozen=True)
class ServedModel:
    """What TF Serving should hold for one model: the versions to load and the label of each channel."""

    versions: frozenset[int]
    labels: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"versions": sorted(self.versions), "labels": dict(sorted(self.labels.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "ServedModel":
        return cls(frozenset(int(v) for v in data.get("versions", [])), {str(k): int(v) for k, v in dict(data.get("labels", {})).items()})  # type: ignore[arg-type]


class ServingRepository:
    """The folder TF Serving loads from, and the config file that tells it what to load."""

    def __init__(self, root: str | Path, base_path: str | None = None) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.config_path = self.root / "models.config"
        self.state_path = self.root / "state.json"
        #: The repository as TF Serving sees it (another path when it runs in its own container).
        self.base_path = (base_path or str(self.models_dir.resolve())).rstrip("/")

    def path_of(self, name: str, version: int) -> Path:
        return self.models_dir / name / str(version)

    def install(self, name: str, version: int, saved_model_dir: Path, digest: str) -> bool:
        """Put a SavedModel at `models/NAME/VERSION/` whose content digest is `digest`; True when it
        placed a new folder, False when one with that content was there already.

        The copy goes to a hidden incoming folder (TF Serving ignores names that are not numbers), is
        fsynced, hashed and compared with `digest`, and only then renamed into place: TF Serving never
        lists a folder with other content than the registry records. A folder with other content (left
        by a publish that was killed before it was recorded) is replaced. The caller holds the publish
        lock of this version (`PublishLocks.version`), so no other instance writes it meanwhile.
        Folders are 0755 and files 0644: TF Serving often runs as another user.
        """
        target = self.path_of(name, version)
        if target.is_dir() and _digest_or_none(target) == digest:
            _make_readable(target)
            return False
        _make_dirs(target.parent)
        staging, claim = claimed_tempdir(target.parent, f".{version}-incoming-")
        try:
            for entry in sorted(saved_model_dir.iterdir()):
                if entry.name in _SKIP_IN_REPOSITORY or entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name, symlinks=False)
                else:
                    shutil.copyfile(entry, staging / entry.name)
            _make_readable(staging)
            _fsync_tree(staging)
            copied = _digest_or_none(staging)
            if copied != digest:
                raise BundleRejectedError(
                    f"the copy of the SavedModel for version {version} of {name} does not match the one that was "
                    "checked (it changed while it was copied); publish again",
                    code="saved_model_changed",
                )
            if target.exists():  # stale leftover with other content: move it aside, then replace
                _discard(target, f".{version}-stale-")
            os.replace(staging, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            claim.release()
        return True

    def content_digest(self, name: str, version: int) -> str | None:
        """The content digest of a version's folder; None when it is missing or holds no SavedModel."""
        target = self.path_of(name, version)
        return _digest_or_none(target) if target.is_dir() else None

    def remove(self, name: str, version: int) -> int:
        """Delete a version's SavedModel folder (moved aside first, so TF Serving never sees half of
        one); returns the bytes freed."""
        target = self.path_of(name, version)
        if not target.is_dir():
            return 0
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        _discard(target, f".{version}-deleted-")
        return size

    # --- the config file ------------------------------------------------------------------------

    def written(self) -> dict[str, ServedModel]:
        """What the last `write` put in the config (empty before the first)."""
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            return {name: ServedModel.from_dict(item) for name, item in data.get("models", {}).items()}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return {}

    def write(self, models: Mapping[str, ServedModel]) -> bool:
        """Write the config (atomically) if it differs from the file; True when it changed.

        A model enters the config only once at least one of its version folders exists: TF Serving
        blocks every later config reload behind a model whose base_path is missing.
        """
        present: dict[str, ServedModel] = {}
        for name, served in models.items():
            versions = frozenset(v for v in served.versions if self.path_of(name, v).is_dir())
            if versions:
                labels = {label: v for label, v in served.labels.items() if v in versions}
                present[name] = ServedModel(versions, labels)
        text = render_config(present, self.base_path)
        try:
            if self.config_path.read_text(encoding="utf-8") == text:
                self._write_state(present)
                return False
        except FileNotFoundError:
            pass
        _atomic_write(self.config_path, text)
        self._write_state(present)
        return True

    def _write_state(self, models: Mapping[str, ServedModel]) -> None:
        state = {"models": {name: served.to_dict() for name, served in sorted(models.items())}}
        _atomic_write(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n")


def render_config(models: Mapping[str, ServedModel], base_path: str) -> str:
    """A `ModelServerConfig` in protobuf text format, as `--model_config_file` reads it."""
    lines = ["# Written by sync-server; do not edit: it is rewritten whenever a channel changes.", "model_config_list {"]
    for name in sorted(models):
        served = models[name]
        lines += [
            "  config {",
            f"    name: {_quote(name)}",
            f"    base_path: {_quote(base_path + '/' + name)}",
            '    model_platform: "tensorflow"',
            "    model_version_policy {",
            "      specific {",
        ]
        lines += [f"        versions: {v}" for v in sorted(served.versions)]
        lines += ["      }", "    }"]
        for label, version in sorted(served.labels.items()):
            lines.append(f"    version_labels {{ key: {_quote(label)} value: {version} }}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def saved_model_digest(folder: Path) -> str:
    """A content hash of a SavedModel folder: SHA-256 over the sorted (path, file hash) list.

    Only the files TF Serving loads count (`saved_model.pb`/`.pbtxt`, `variables/`, `assets/`,
    `assets.extra/`, `fingerprint.pb`) plus `labels.txt` and `preprocess_spec.json`.
    """
    lines = []
    for path in _saved_model_files(folder):
        relative = path.relative_to(folder).as_posix()
        lines.append(f"{relative}\0{_sha256(path)}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


#: TF Serving's warm-up requests in a version folder (written by the converter, see converter/warmup.py).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


def check_warmup(folder: Path, manifest: Mapping[str, object]) -> None:
    """Refuse a SavedModel whose warm-up file is not the one the converter signed.

    `assets.extra/` counts in the digest the registry records, so TF Serving lists only what was
    recorded; this ties the warm-up file to the signature too: its sha256 must equal the signed
    manifest's `serving.warmup.sha256`. TF Serving runs these requests at load (a bad file fails the
    load), so an unsigned file is refused rather than served. A SavedModel without one is fine.
    """
    path = folder / WARMUP_FILE
    if not path.is_file():
        return
    serving = manifest.get("serving")
    warmup = serving.get("warmup") if isinstance(serving, Mapping) else None
    expected = warmup.get("sha256") if isinstance(warmup, Mapping) else None
    if not isinstance(expected, str):
        raise BundleRejectedError(
            f"the SavedModel has {WARMUP_FILE} but the bundle's signed manifest records no warm-up file "
            "(serving.warmup): publish the TF Serving export edge-convert wrote with this bundle, or remove the file",
            code="saved_model_mismatch",
        )
    if _sha256(path) != expected:
        raise BundleRejectedError(
            f"the SavedModel's {WARMUP_FILE} is not the one the converter signed (its sha256 differs from the "
            "manifest's serving.warmup.sha256): publish the TF Serving export edge-convert wrote with this bundle",
            code="saved_model_mismatch",
        )


_DIGEST_TOP = ("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "labels.txt", "preprocess_spec.json")
_DIGEST_DIRS = ("variables", "assets", "assets.extra")


def _saved_model_files(folder: Path) -> Iterable[Path]:
    found = [folder / name for name in _DIGEST_TOP if (folder / name).is_file()]
    for sub in _DIGEST_DIRS:
        root = folder / sub
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.is_file()]
    if not found:
        raise BundleRejectedError(f"{folder} holds no SavedModel files", code="bad_saved_model")
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp, claim = claimed_tempfile(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        claim.release()


def _discard(folder: Path, prefix: str) -> None:
    """Remove a version folder in one rename (into a hidden trash folder beside it, which TF Serving
    ignores), then delete it: TF Serving never sees half of one."""
    trash, claim = claimed_tempdir(folder.parent, prefix)
    try:
        os.replace(folder, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        claim.release()


def _digest_or_none(folder: Path) -> str | None:
    try:
        return saved_model_digest(folder)
    except (BundleRejectedError, OSError):
        return None


def _make_dirs(folder: Path) -> None:
    """`folder` and its missing parents, 0755 whatever the umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        os.chmod(path, 0o755)


def _make_readable(root: Path) -> None:
    """Folders 0755, files 0644 (mkdtemp makes 0700; uploads may carry 0600): TF Serving may run as another user."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
