"""The artifact store: bundle files on the local file system, named by their SHA-256.

    DATA/artifacts/sha256/ab/abcdef...     one file per distinct content, never changed once written

A file is copied to a temporary name in the same folder, hashed while copying, fsynced and renamed
into place, so a reader sees a whole file or none. The same content published twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

    def put_file(self, source: str | Path) -> Artifact:
        """Store a copy of `source` (if its content is new) and return its hash and size."""
        source = Path(source)
        staging_dir = self.root / "tmp"
        staging_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=staging_dir)
        tmp = Path(tmp_name)
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
            if final.is_file() and final.stat().st_size == size:
                tmp.unlink()
                return artifact
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            return artifact
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


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
