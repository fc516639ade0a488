"""The artifact store: bundle files on the local file system, named by their SHA-256.

    DATA/artifacts/sha256/ab/abcdef...     one file per distinct content, never changed once written

A file is copied to a temporary name in the same folder, hashed while copying, fsynced and renamed
into place, so a reader sees a whole file or none. The same content published twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .claims import claimed_tempfile
from .errors import NotFoundError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """A stored file: its content hash and size."""

    sha256: str
    size: int


class ArtifactStore:
    """Content-addressed files under `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        """Where the content with this hash lives (whether or not it is there)."""
        if not _SHA256.match(sha256):
            raise NotFoundError(f"{sha256!r} is not a SHA-256 content hash", code="unknown_artifact")
        return self.root / "sha256" / sha256[:2] / sha256

    def open_path(self, sha256: str) -> Path:
        """The path of a stored artifact, or NotFoundError."""
        path = self.path_of(sha256)
        if not path.is_file():
            raise NotFoundError(f"no artifact with content hash {sha256}", code="unknown_artifact")
        return path

    def put_file(self, source: str | Path, *, verify_existing: bool = False) -> Artifact:
        """Store a copy of `source` (if its content is new) and return its hash and size.

        `verify_existing` re-reads a stored copy of the same content and replaces it when it is damaged
        (publishing a version again restores what `sync-server check` found missing or damaged)."""
        source = Path(source)
        fd, tmp, claim = claimed_tempfile(self.staging_dir, ".incoming-")
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            artifact = Artifact(digest.hexdigest(), size)
            final = self.path_of(artifact.sha256)
            if final.is_file() and final.stat().st_size == size and (
                not verify_existing or sha256_file(final) == artifact.sha256
            ):
                tmp.unlink()
                return artifact
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            return artifact
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            claim.release()

    @property
    def staging_dir(self) -> Path:
        """Where copies are written before they are renamed into place (claimed: see `claims`)."""
        return self.root / "tmp"

    def stored(self) -> list[Path]:
        """Every stored artifact file (for `sync-server check`)."""
        root = self.root / "sha256"
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("*/*") if p.is_file() or p.is_symlink())

    def is_whole(self, sha256: str, size: int | None = None) -> bool:
        """Whether the stored artifact exists and its content still hashes to its name (reads it all)."""
        path = self.path_of(sha256)
        try:
            if size is not None and path.stat().st_size != size:
                return False
            return sha256_file(path) == sha256
        except OSError:
            return False

    def remove(self, sha256: str) -> int:
        """Delete a stored artifact (no longer referenced); returns the bytes freed (0 if absent)."""
        path = self.path_of(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
