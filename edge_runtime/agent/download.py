"""Resumable, verified downloads of content-addressed files into the device's store.

A file named by its sha256 is written to `DOWNLOADS/<sha256>.part` as its bytes arrive, so a
dropped connection, a killed agent or a reboot loses nothing: the next try asks for the rest with
`Range: bytes=<size of the part>-` and `If-Range: "<sha256>"` (the server's ETag). A 200 instead of
206 (the server changed its mind about the range) starts the file again. A finished file must have
the announced size and sha256; otherwise it is deleted and the download fails as corrupt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .._durable import fsync_dir
from .client import ServerUnreachableError, SyncClient, describe
from .errors import DownloadError
from .options import RetryOptions
from .retry import with_retries

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 64 * 1024
_SYNC_EVERY = 4 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """A file an assignment lists: its name in the bundle, content hash, size and URL."""

    name: str
    sha256: str
    size: int
    url: str

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise ValueError(f"{self.name}: {self.sha256!r} is not a sha256")
        if self.size < 0:
            raise ValueError(f"{self.name}: negative size")


@dataclass
class DownloadStats:
    """What downloads cost: bytes received, and where interrupted files were resumed from."""

    bytes_received: int = 0
    requests: int = 0
    resumed_from: list[int] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"bytes_received": self.bytes_received, "requests": self.requests, "resumed_from": self.resumed_from or []}


class Downloader:
    """Downloads files into `folder`, resuming what an earlier try left there."""

    def __init__(self, client: SyncClient, folder: Path, retry: RetryOptions, timeout_s: float, stop: threading.Event | None = None) -> None:
        self.client = client
        self.folder = Path(folder)
        self.retry = retry
        self.timeout_s = timeout_s
        self.stop = stop or threading.Event()

    def part_path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.part"

    def fetch(self, remote: RemoteFile, stats: DownloadStats | None = None) -> Path:
        """The verified file (downloading or resuming it), or `DownloadError` / `ServerUnreachableError`
        once the bounded retries are spent. A try that received bytes restarts the count."""
        stats = stats if stats is not None else DownloadStats()
        self.folder.mkdir(parents=True, exist_ok=True)
        moved = {"before": stats.bytes_received}

        def attempt() -> Path:
            moved["before"] = stats.bytes_received
            return self._attempt(remote, stats)

        def progressed() -> bool:
            return stats.bytes_received > moved["before"]

        return with_retries(attempt, self.retry, what=f"downloading {remote.name}", stop=self.stop, progressed=progressed)

    def clear(self) -> None:
        """Delete every partial and finished download (after an install, or a refused version)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # --- one try --------------------------------------------------------------------------------

    def _attempt(self, remote: RemoteFile, stats: DownloadStats) -> Path:
        final = self.folder / remote.sha256
        if final.is_file() and final.stat().st_size == remote.size and _sha256_of(final) == remote.sha256:
            return final
        part = self.part_path(remote.sha256)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > remote.size:
            part.unlink()
            offset = 0
        if offset == remote.size and remote.size > 0:
            return self._finish(part, final, remote)
        headers = {"Accept": "application/octet-stream"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = f'"{remote.sha256}"'
        client, path = self._client_for(remote.url)
        stats.requests += 1
        stream = client.open("GET", path, headers=headers, timeout_s=self.timeout_s, ok=(200, 206, 416))
        with stream:
            if stream.status == 416:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{remote.name}: the server cannot resume from byte {offset}; starting again")
            if stream.status == 206:
                start = _range_start(stream.header("content-range"))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"{remote.name}: the server resumed from byte {start}, not {offset}; starting again")
                if offset:
                    stats.resumed_from = (stats.resumed_from or []) + [offset]
                mode = "ab"
            else:
                offset, mode = 0, "wb"
            self._receive(stream, part, mode, offset, remote, stats)
        return self._finish(part, final, remote)

    def _receive(self, stream, part: Path, mode: str, offset: int, remote: RemoteFile, stats: DownloadStats) -> None:  # noqa: ANN001
        written = offset
        unsynced = 0
        with open(part, mode, buffering=0) as out:
            while True:
                if self.stop.is_set():
                    raise DownloadError(f"{remote.name}: stopped at byte {written} of {remote.size}")
                try:
                    chunk = stream.response.read1(_CHUNK)
                except OSError as exc:
                    raise ServerUnreachableError(f"{remote.name}: the download broke off at byte {written} of {remote.size} ({describe(exc)})") from exc
                if not chunk:
                    break
                out.write(chunk)  # unbuffered: in the page cache at once, so a killed agent keeps it
                written += len(chunk)
                stats.bytes_received += len(chunk)
                unsynced += len(chunk)
                if written > remote.size:
                    break
                if unsynced >= _SYNC_EVERY:
                    os.fsync(out.fileno())
                    unsynced = 0
            os.fsync(out.fileno())
        if written < remote.size:
            raise ServerUnreachableError(f"{remote.name}: the download broke off at byte {written} of {remote.size}")

    def _finish(self, part: Path, final: Path, remote: RemoteFile) -> Path:
        size = part.stat().st_size
        digest = _sha256_of(part) if size == remote.size else None
        if digest != remote.sha256:
            part.unlink(missing_ok=True)
            found = f"sha256 {digest[:12]}…, expected {remote.sha256[:12]}…" if digest else f"{size} bytes, expected {remote.size}"
            raise DownloadError(f"{remote.name} is not the announced file ({found}): deleted", corrupt=True)
        os.replace(part, final)
        fsync_dir(self.folder)
        return final

    def _client_for(self, url: str) -> tuple[SyncClient, str]:
        """The artifact URL's client and path: the device's own server, or (without the token) another origin."""
        if url.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(url)
            own = urllib.parse.urlsplit(self.client.server)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            if (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
                return self.client, path[len(own.path.rstrip("/")):]
            return SyncClient(f"{parts.scheme}://{parts.netloc}", None, timeout_s=self.client.timeout_s), path
        return self.client, url


def _range_start(header: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
