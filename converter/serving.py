"""Lay a SavedModel into a TensorFlow Serving model repository: REPO/NAME/VERSION/.

TF Serving's file-system source loads any all-digit folder it sees, even one still being copied, so the
version is copied into a hidden, non-numeric folder beside it and renamed into place in one step.
Versions are immutable: an existing version folder is never replaced. With `warmup` (the bytes
`converter.warmup.build_warmup` made), the copy gets `assets.extra/tf_serving_warmup_requests` before
the rename, so TF Serving warms the version up at load. Stdlib only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .errors import NotASavedModelError, PublishError, UsageError
from .manifest import NAME_PATTERN


def versions(repo: str | os.PathLike, name: str) -> list[int]:
    """The versions of `name` already in `repo`, sorted."""
    folder = Path(repo) / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repo: str | os.PathLike, name: str) -> int:
    """One more than the newest version of `name` in `repo` (1 for a new model)."""
    existing = versions(repo, name)
    return existing[-1] + 1 if existing else 1


def version_path(repo: str | os.PathLike, name: str, version: int) -> Path:
    """Where `export_for_serving` puts a version; raises `PublishError` if it cannot go there."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"the TF Serving version must be a whole number of at least 1, got {version!r}")
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise PublishError(f"TF Serving repository {root} is a file, not a folder")
    if not root.parent.is_dir():
        raise PublishError(f"cannot create TF Serving repository {root}: {root.parent} does not exist")
    target = root / name / str(version)
    if target.exists():
        raise PublishError(
            f"{target} already exists: TF Serving versions are immutable, publish version "
            f"{next_version(root, name)} instead"
        )
    return target


#: The warm-up file's place in a version folder (converter.warmup.WARMUP_FILE; repeated to stay stdlib-only).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


def export_for_serving(saved_model: str | os.PathLike, repo: str | os.PathLike, name: str, version: int,
                       *, warmup: bytes | None = None) -> Path:
    """Copy the SavedModel (with its labels and spec files, and `warmup` as its TF Serving warm-up
    records when given) to REPO/NAME/VERSION/, atomically."""
    source = Path(saved_model)
    if not (source / "saved_model.pb").is_file():
        raise NotASavedModelError(f"{source} is not a SavedModel folder (no saved_model.pb)")
    target = version_path(repo, name, version)
    staging = target.parent / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging)
        if warmup is not None:  # replaces any warm-up file the SavedModel brought along
            (staging / WARMUP_FILE).parent.mkdir(exist_ok=True)
            (staging / WARMUP_FILE).write_bytes(warmup)
        os.rename(staging, target)
    except OSError as exc:
        raise PublishError(f"cannot publish {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
