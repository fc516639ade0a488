"""The device's local model store: versions side by side and an atomic `current` pointer.

Layout under the store's home (`EDGE_CLASSIFY_HOME`, default `~/.local/share/edge-classify`):

    models/<name>/<version>/    one verified bundle per version (model.tflite, manifest.json, ...)
    state.json                  {"current": {"name", "version"}, "previous": {...} | null}

A version folder is copied under a temporary name, fsynced and renamed into place; `state.json` is
written to a temporary file, fsynced and renamed over the old one. A crash or power loss at any
moment therefore leaves either the old or the new pointer, each naming a complete version.

Damage is repaired, never fatal: a pointer file that is empty, random, half-written or not an object
is rebuilt from the intact installed versions (newest current, the next previous) with one warning;
`check` compares a version's files with the sizes and sha256 its manifest lists, `load_current`
verifies the current version (signature included) and falls back to an intact previous one, and
`discard` removes a damaged version even when the pointer names it. Temporary copies and pointer
files that a killed process left behind are removed by `clean_leftovers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ._durable import fsync_dir, fsync_file
from .errors import BundleRejectedError, StoreError

if TYPE_CHECKING:
    from .bundles import LoadedBundle

HOME_ENV = "EDGE_CLASSIFY_HOME"
_STATE = "state.json"
_BUNDLE_FILES = ("model.tflite", "manifest.json", "manifest.sig", "labels.txt")
#: A manifest larger than this is not one (the converter writes a few kilobytes).
_MAX_MANIFEST_BYTES = 1 << 20
#: Temporary names: a version being copied in, a version being deleted, a pointer being written.
_STAGING, _TRASH, _STATE_TMP = ".staging-", ".trash-", ".state-"


def default_home() -> Path:
    """`$EDGE_CLASSIFY_HOME`, else `$XDG_DATA_HOME/edge-classify`, else `~/.local/share/edge-classify`."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edge-classify"


@dataclass(frozen=True, order=True)
class ModelRef:
    """A model version by name and number."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class StoreState:
    """What the pointer file says."""

    current: ModelRef | None
    previous: ModelRef | None


class ModelStore:
    """Versions of verified bundles on the device, with an atomically switched current version."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.models_dir = self.home / "models"
        #: Why the pointer file was rebuilt, when it was (None: it was intact).
        self.repaired: str | None = None

    # --- reading -------------------------------------------------------------------------------

    def path_of(self, ref: ModelRef) -> Path:
        """The folder holding `ref`'s bundle."""
        return self.models_dir / _safe_name(ref.name) / str(ref.version)

    def versions(self) -> list[ModelRef]:
        """Every complete version in the store, sorted by name and version."""
        found = []
        if not self.models_dir.is_dir():
            return found
        for name_dir in self.models_dir.iterdir():
            if not name_dir.is_dir() or name_dir.name.startswith("."):
                continue
            for version_dir in name_dir.iterdir():
                if version_dir.name.isdigit() and (version_dir / "manifest.json").is_file():
                    found.append(ModelRef(name_dir.name, int(version_dir.name)))
        return sorted(found)

    def state(self) -> StoreState:
        """The pointer file, or an empty state before the first `use`.

        A damaged pointer (empty, random, half-written, `[]`, `null`, a version that is no ref) is
        rebuilt from the intact installed versions, written back, and warned about once.
        """
        path = self.home / _STATE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return StoreState(None, None)
        except IsADirectoryError:
            return self._rebuild(f"{path} is a folder")
        except OSError as exc:
            raise StoreError(f"the model store's pointer file {path} is unreadable: {exc.strerror or exc}") from exc
        try:
            data = json.loads(raw[: 1 << 16].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return self._rebuild("it is empty or not JSON" if raw.strip() else "it is empty")
        if not isinstance(data, dict):
            return self._rebuild(f"it holds {type(data).__name__ if data is not None else 'null'}, not an object")
        refs = []
        for key in ("current", "previous"):
            value = data.get(key)
            ref = _ref(value)
            if value is not None and ref is None:
                return self._rebuild(f"its {key!r} is not a model version")
            refs.append(ref)
        return StoreState(refs[0], refs[1])

    def current(self) -> ModelRef | None:
        """The version to load: the current one, or the previous one if the current folder is gone."""
        state = self.state()
        for ref in (state.current, state.previous):
            if ref is not None and (self.path_of(ref) / "manifest.json").is_file():
                return ref
        return None

    def check(self, ref: ModelRef) -> str | None:
        """What is wrong with `ref`'s files, or None when they are intact.

        Compares the model and labels files with the size and sha256 the manifest lists (the
        manifest's signature is what `bundles.load_bundle` checks; this needs no key and no crypto).
        """
        folder = self.path_of(ref)
        try:
            raw = (folder / "manifest.json").read_bytes()
        except FileNotFoundError:
            return f"{ref} has no manifest.json"
        except OSError as exc:
            return f"{ref}'s manifest.json is unreadable ({exc.strerror or exc})"
        try:
            if len(raw) > _MAX_MANIFEST_BYTES:
                raise ValueError("too large")
            doc = json.loads(raw)
            labels = doc.get("labels_file") or {}
            files = [(str(doc["model"]["file"]), str(doc["model"]["sha256"]), int(doc["model"]["size"])),
                     (str(labels.get("file", "labels.txt")), labels.get("sha256"), None)]
        except (ValueError, TypeError, KeyError, AttributeError):
            return f"{ref}'s manifest.json is damaged"
        for name, sha256, size in files:
            if sha256 is None or "/" in name or name.startswith("."):
                continue
            path = folder / name
            try:
                found = path.stat().st_size
            except OSError:
                return f"{ref}'s {name} is missing"
            if size is not None and found != size:
                return f"{ref}'s {name} has {found} bytes, its manifest says {size}"
            if file_sha256(path) != sha256:
                return f"{ref}'s {name} does not match its manifest's sha256 (damaged on the disk)"
        return None

    def verify(self, ref: ModelRef, public_key: str | Path) -> LoadedBundle:
        """`ref`'s bundle, verified with the pinned key (signature, sizes, sha256), or `BundleRejectedError`."""
        from .bundles import load_bundle

        return load_bundle(self.path_of(ref), public_key)

    def load_current(self, public_key: str | Path) -> tuple[LoadedBundle, str | None]:
        """The verified bundle to run: the current version, else an intact previous one.

        Returns the bundle and, when the current version was damaged and the previous one is used,
        the reason in words (for one warning). Raises `BundleRejectedError` when neither verifies and
        `StoreError` when nothing is installed.
        """
        state = self.state()
        problems: list[str] = []
        for ref in dict.fromkeys(r for r in (state.current, state.previous) if r is not None):
            if not (self.path_of(ref) / "manifest.json").is_file():
                problems.append(f"{ref} is not installed")
                continue
            try:
                bundle = self.verify(ref, public_key)
            except BundleRejectedError as exc:
                problems.append(str(exc))
                continue
            if ref == state.current:
                return bundle, None
            return bundle, f"the current version is damaged ({'; '.join(problems)}): using {ref} instead"
        if not problems:
            raise StoreError(f"no model is current in {self.home}")
        raise BundleRejectedError("no intact model version in the store: " + "; ".join(problems))

    # --- changing ------------------------------------------------------------------------------

    def install(self, bundle_dir: str | Path, ref: ModelRef, verify: Callable[[Path], object] | None = None,
                *, link: bool = False) -> Path:
        """Copy a bundle into the store as `ref` (verifying the copy), without switching to it.

        Installing a version that is already there is a no-op when the files are the same. With
        `link`, files are hard-linked where the file system allows (no second copy on the disk: for
        the agent's verified downloads, which nothing else writes).
        """
        bundle_dir = Path(bundle_dir)
        target = self.path_of(ref)
        if target.exists():
            if _same_files(bundle_dir, target):
                return target
            raise StoreError(f"{ref} is already installed with different files; remove it first")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{ref.version}-{os.getpid()}-", dir=target.parent))
        try:
            for name in _BUNDLE_FILES:
                source = bundle_dir / name
                if source.is_file():
                    if not (link and _try_link(source, staging / name)):
                        shutil.copyfile(source, staging / name)
                    fsync_file(staging / name)
            if verify is not None:
                verify(staging)  # raises on a bad bundle; nothing enters the store
            os.replace(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def use(self, ref: ModelRef) -> StoreState:
        """Make `ref` current; the old current becomes previous. Atomic."""
        if not (self.path_of(ref) / "manifest.json").is_file():
            installed = ", ".join(str(r) for r in self.versions()) or "none"
            raise StoreError(f"{ref} is not installed (installed: {installed})")
        state = self.state()
        previous = state.current if state.current != ref else state.previous
        new_state = StoreState(ref, previous)
        self._write_state(new_state)
        return new_state

    def rollback(self) -> StoreState:
        """Switch back to the previous version. Atomic."""
        state = self.state()
        if state.previous is None:
            raise StoreError("there is no previous version to roll back to")
        if not (self.path_of(state.previous) / "manifest.json").is_file():
            raise StoreError(f"the previous version {state.previous} is no longer installed")
        new_state = StoreState(state.previous, state.current)
        self._write_state(new_state)
        return new_state

    def remove(self, ref: ModelRef) -> None:
        """Delete an installed version that is neither current nor previous."""
        state = self.state()
        if ref in (state.current, state.previous):
            raise StoreError(f"{ref} is in use (current or previous) and cannot be removed")
        path = self.path_of(ref)
        if not path.exists():
            raise StoreError(f"{ref} is not installed")
        self._delete(ref)

    def discard(self, ref: ModelRef) -> StoreState:
        """Delete a damaged version, even the current or previous one; the pointer forgets it."""
        state = self.state()
        current = state.previous if state.current == ref else state.current
        previous = state.previous if state.previous not in (ref, current) else None
        if (current, previous) != (state.current, state.previous):
            self._write_state(StoreState(current, previous))
        if self.path_of(ref).exists():
            self._delete(ref)
        return StoreState(current, previous)

    def clean_leftovers(self) -> list[Path]:
        """Remove what interrupted work left: half-copied versions, versions half-deleted, pointer
        files half-written. Ones a live process is still writing are kept (the pid is in the name)."""
        removed: list[Path] = []
        for path in self.home.glob(f"{_STATE_TMP}*") if self.home.is_dir() else ():
            if _abandoned(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
        if self.models_dir.is_dir():
            for name_dir in self.models_dir.iterdir():
                if not name_dir.is_dir():
                    continue
                for path in name_dir.iterdir():
                    if path.name.startswith(".") and _abandoned(path.name):
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                        removed.append(path)
        return removed

    def _delete(self, ref: ModelRef) -> None:
        path = self.path_of(ref)
        trash = path.with_name(f"{_TRASH}{ref.version}-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)  # atomically out of sight, then delete at leisure
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self) -> list[ModelRef]:
        """Remove every version except current and previous; returns what was removed."""
        state = self.state()
        removed = [r for r in self.versions() if r not in (state.current, state.previous)]
        for ref in removed:
            self.remove(ref)
        return removed

    def _write_state(self, state: StoreState) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = {
            "current": state.current.to_dict() if state.current else None,
            "previous": state.previous.to_dict() if state.previous else None,
        }
        fd, tmp = tempfile.mkstemp(prefix=f"{_STATE_TMP}{os.getpid()}-", dir=self.home)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.home / _STATE)
            fsync_dir(self.home)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


    def _rebuild(self, why: str) -> StoreState:
        """A new pointer from the intact installed versions: the newest current, the next previous."""
        intact = [ref for ref in sorted(self.versions(), key=lambda r: (r.version, r.name), reverse=True)
                  if self.check(ref) is None]
        current = intact[0] if intact else None
        previous = next((r for r in intact[1:] if r.name == current.name), None) if current else None
        state = StoreState(current, previous)
        path = self.home / _STATE
        self.repaired = f"the model store's pointer file {path} was damaged ({why})"
        try:
            self._write_state(state)
        except OSError as exc:  # a read-only or full disk: use the rebuilt pointer without saving it
            self.repaired += f"; could not save the rebuilt one ({exc.strerror or exc})"
        what = f"current {current}" + (f", previous {previous}" if previous else "") if current else "no intact version installed"
        self.repaired += f": rebuilt it from the installed versions ({what})"
        warnings.warn(self.repaired, RuntimeWarning, stacklevel=3)
        return state


def _ref(data: object) -> ModelRef | None:
    if not isinstance(data, dict):
        return None
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return None
    try:
        _safe_name(name)
    except StoreError:
        return None
    return ModelRef(name, version)


def _abandoned(name: str) -> bool:
    """True for a temporary name whose process is gone, or that carries no pid (older leftovers).

    Names: `.staging-<version>-<pid>-<random>`, `.trash-<version>-<pid>`, `.state-<pid>-<random>`.
    """
    pid = None
    for prefix, index in ((_STAGING, 1), (_TRASH, 1), (_STATE_TMP, 0)):
        if name.startswith(prefix):
            parts = name[len(prefix):].split("-")
            pid = int(parts[index]) if len(parts) > index and parts[index].isdigit() else None
            break
    if pid is None:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def _try_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time (the store and the downloader check files with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
        raise StoreError(f"{name!r} is not a usable model name")
    return name


def _same_files(a: Path, b: Path) -> bool:
    for name in _BUNDLE_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file():
            return False
        if fa.is_file() and fa.read_bytes() != fb.read_bytes():
            return False
    return True
