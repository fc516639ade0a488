"""The device's local model store: versions side by side and an atomic `current` pointer.

Layout under the store's home (`EDGE_CLASSIFY_HOME`, default `~/.local/share/edge-classify`):

    models/<name>/<version>/    one verified bundle per version (model.tflite, manifest.json, ...)
    state.json                  {"current": {"name", "version"}, "previous": {...} | null}

A version folder is copied under a temporary name, fsynced and renamed into place; `state.json` is
written to a temporary file, fsynced and renamed over the old one. A crash or power loss at any
moment therefore leaves either the old or the new pointer, each naming a complete version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ._durable import fsync_dir, fsync_file
from .errors import StoreError

HOME_ENV = "EDGE_CLASSIFY_HOME"
_STATE = "state.json"
_BUNDLE_FILES = ("model.tflite", "manifest.json", "manifest.sig", "labels.txt")


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
        """The pointer file, or an empty state before the first `use`."""
        path = self.home / _STATE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return StoreState(None, None)
        except (OSError, ValueError) as exc:
            raise StoreError(f"the model store's pointer file {path} is unreadable: {exc}") from exc
        return StoreState(_ref(data.get("current")), _ref(data.get("previous")))

    def current(self) -> ModelRef | None:
        """The version to load: the current one, or the previous one if the current folder is gone."""
        state = self.state()
        for ref in (state.current, state.previous):
            if ref is not None and (self.path_of(ref) / "manifest.json").is_file():
                return ref
        return None

    # --- changing ------------------------------------------------------------------------------

    def install(self, bundle_dir: str | Path, ref: ModelRef, verify: Callable[[Path], object] | None = None) -> Path:
        """Copy a bundle into the store as `ref` (verifying the copy), without switching to it.

        Installing a version that is already there is a no-op when the files are the same.
        """
        bundle_dir = Path(bundle_dir)
        target = self.path_of(ref)
        if target.exists():
            if _same_files(bundle_dir, target):
                return target
            raise StoreError(f"{ref} is already installed with different files; remove it first")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
        try:
            for name in _BUNDLE_FILES:
                source = bundle_dir / name
                if source.is_file():
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
        trash = path.with_name(f".trash-{ref.version}")
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
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.home)
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


def _ref(data: object) -> ModelRef | None:
    if not isinstance(data, dict):
        return None
    try:
        return ModelRef(str(data["name"]), int(data["version"]))
    except (KeyError, TypeError, ValueError):
        return None


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
