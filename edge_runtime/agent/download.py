"""Resumable, verified downloads of content-addressed files into the device's store.

A file named by its sha256 is written to `DOWNLOADS/<sha256>.part` as its bytes arrive, so a
dropped connection, a killed agent or a reboot loses nothing: the next try asks for the rest with
`Range: bytes=<size of the part>-` and `If-Range: "<sha256>"` (the server's ETag). A 200 instead of
206 (the server changed its mind about the range) starts the file again. A finished file must have
the announced size and sha256; otherwise it is deleted and the download fails as corrupt.

Bounded, whatever the server does:
- a size the server contradicts (its Content-Length or Content-Range, or a body that ends early but
  complete) fails at once as corrupt: the manager tries once more, then refuses the version, so a wrong
  declared size costs two requests, not endless re-downloads;
- a try slower than `floor_bps` over `window_s` is abandoned (the part file stays; the next try resumes);
- a try only restarts the retry count when the part file grew `_PROGRESS_BYTES` past its best so far;
- a newer assignment (`superseded()`, `interrupt()`) stops the download at once, keeping the part file;
- free space is checked against the declared size (plus `DISK_MARGIN_BYTES`) before a byte is asked
  for, and ENOSPC or a short write raises `DiskFullError` and deletes the part file, so a version too
  big for the disk never leaves the disk full.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .._durable import fsync_dir
from ..store import file_sha256
from .client import ServerUnreachableError, Stream, SyncClient, describe
from .errors import DiskFullError, DownloadError, DownloadSupersededError
from .options import RetryOptions
from .retry import with_retries

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 64 * 1024
_SYNC_EVERY = 4 * 1024 * 1024
#: Room left free besides a download (the outbox, the state file, the store's own writes).
DISK_MARGIN_BYTES = 1024 * 1024
#: How far a failed try must have moved the part file for the retry count to start again.
_PROGRESS_BYTES = 64 * 1024
#: Defaults of the throughput floor (see `TimeoutOptions`).
FLOOR_BPS = 4096.0
WINDOW_S = 30.0


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
    """Downloads files into `folder`, resuming what an earlier try left there.

    `superseded()` (set by the manager) names a newer assignment when there is one; `interrupt()` cuts
    the transfer in flight so that it notices at once."""

    def __init__(self, client: SyncClient, folder: Path, retry: RetryOptions, timeout_s: float, stop: threading.Event | None = None,
                 *, floor_bps: float = FLOOR_BPS, window_s: float = WINDOW_S) -> None:
        self.client = client
        self.folder = Path(folder)
        self.retry = retry
        self.timeout_s = timeout_s
        self.stop = stop or threading.Event()
        self.floor_bps = floor_bps
        self.window_s = window_s
        self.superseded: Callable[[], str | None] = lambda: None
        self._stream: Stream | None = None
        self._interrupted = False

    def part_path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.part"

    def fetch(self, remote: RemoteFile, stats: DownloadStats | None = None) -> Path:
        """The verified file (downloading or resuming it), or `DownloadError` / `ServerUnreachableError`
        once the bounded retries are spent. A try that moved the part file past its best restarts the count."""
        stats = stats if stats is not None else DownloadStats()
        self.folder.mkdir(parents=True, exist_ok=True)
        best = {"size": self._part_size(remote)}

        def attempt() -> Path:
            self._check_superseded(remote)
            return self._attempt(remote, stats)

        def progressed() -> bool:
            size = self._part_size(remote)
            if size >= best["size"] + _PROGRESS_BYTES:
                best["size"] = size
                return True
            return False

        return with_retries(attempt, self.retry, what=f"downloading {remote.name}", stop=self.stop, progressed=progressed)

    def interrupt(self) -> None:
        """Cut the transfer in flight (a newer assignment came); the part file stays for a later try."""
        self._interrupted = True
        stream = self._stream
        if stream is not None:
            stream.cut()

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
        if final.is_file() and final.stat().st_size == remote.size and file_sha256(final) == remote.sha256:
            return final
        part = self.part_path(remote.sha256)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > remote.size:
            part.unlink()
            offset = 0
        if offset == remote.size and remote.size > 0:
            return self._finish(part, final, remote)
        self._check_space(remote, remote.size - offset, part)
        headers = {"Accept": "application/octet-stream"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = f'"{remote.sha256}"'
        client, path = self._client_for(remote.url)
        stats.requests += 1
        self._interrupted = False
        stream = client.open("GET", path, headers=headers, timeout_s=self.timeout_s, ok=(200, 206, 416))
        self._stream = stream
        try:
            with stream:
                if stream.status == 416:
                    total = _range_total(stream.header("content-range"))
                    part.unlink(missing_ok=True)
                    if total is not None and total != remote.size:
                        raise self._mismatch(remote, total)
                    raise DownloadError(f"{remote.name}: the server cannot resume from byte {offset}; starting again")
                if stream.status == 206:
                    start = _range_start(stream.header("content-range"))
                    total = _range_total(stream.header("content-range"))
                    if total is not None and total != remote.size:
                        part.unlink(missing_ok=True)
                        raise self._mismatch(remote, total)
                    if start != offset:
                        part.unlink(missing_ok=True)
                        raise DownloadError(f"{remote.name}: the server resumed from byte {start}, not {offset}; starting again")
                    if offset:
                        stats.resumed_from = (stats.resumed_from or []) + [offset]
                    mode = "ab"
                else:
                    length = stream.header("content-length")
                    if length is not None and length.strip().isdigit() and int(length) != remote.size:
                        part.unlink(missing_ok=True)
                        raise self._mismatch(remote, int(length))
                    offset, mode = 0, "wb"
                self._receive(stream, part, mode, offset, remote, stats)
        finally:
            self._stream = None
        return self._finish(part, final, remote)

    def _receive(self, stream: Stream, part: Path, mode: str, offset: int, remote: RemoteFile, stats: DownloadStats) -> None:
        written = offset
        unsynced = 0
        window_start, window_bytes = time.monotonic(), 0
        slow = f"slower than {self.floor_bps:g} B/s over {self.window_s:g} s"
        stream.expire_at(window_start + 2 * self.window_s, slow)  # a silent window is cut, too
        with open(part, mode, buffering=0) as out:
            try:
                while True:
                    if self.stop.is_set():
                        raise DownloadError(f"{remote.name}: stopped at byte {written} of {remote.size}")
                    self._check_superseded(remote)
                    try:
                        chunk = stream.response.read1(_CHUNK)
                    except (OSError, ValueError, AttributeError) as exc:
                        self._check_superseded(remote)
                        why = stream.expired or describe(exc)
                        raise ServerUnreachableError(f"{remote.name}: the download broke off at byte {written} of {remote.size} ({why})") from exc
                    if not chunk:
                        break
                    if written + len(chunk) > remote.size:
                        part.unlink(missing_ok=True)
                        raise self._mismatch(remote, None, more=True)
                    _write_all(out, chunk)  # unbuffered: in the page cache at once, so a killed agent keeps it
                    written += len(chunk)
                    stats.bytes_received += len(chunk)
                    unsynced += len(chunk)
                    window_bytes += len(chunk)
                    now = time.monotonic()
                    if now - window_start >= self.window_s:
                        rate = window_bytes / (now - window_start)
                        if rate < self.floor_bps:
                            raise ServerUnreachableError(
                                f"{remote.name}: the download is {slow} ({rate:.0f} B/s); it resumes at byte {written} later")
                        window_start, window_bytes = now, 0
                        stream.expire_at(now + 2 * self.window_s, slow)
                    if unsynced >= _SYNC_EVERY:
                        os.fsync(out.fileno())
                        unsynced = 0
                os.fsync(out.fileno())
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                out.close()
                part.unlink(missing_ok=True)  # the part file must not keep the disk full
                free = _free_bytes(self.folder)
                raise DiskFullError(
                    f"{remote.name}: the disk is full at byte {written} of {remote.size} ({_mb(free)} free in {self.folder}); "
                    "deleted the partial file, trying again when there is room",
                    needed=remote.size + DISK_MARGIN_BYTES, free=free) from exc
        self._check_superseded(remote)
        if written < remote.size:
            if stream.expired:
                raise ServerUnreachableError(f"{remote.name}: the download broke off at byte {written} of {remote.size} ({stream.expired})")
            if stream.response.length or self._interrupted:  # Content-Length said more: the connection broke
                raise ServerUnreachableError(f"{remote.name}: the download broke off at byte {written} of {remote.size}")
            part.unlink(missing_ok=True)
            raise self._mismatch(remote, written)

    def _finish(self, part: Path, final: Path, remote: RemoteFile) -> Path:
        size = part.stat().st_size
        digest = file_sha256(part) if size == remote.size else None
        if digest != remote.sha256:
            part.unlink(missing_ok=True)
            found = f"sha256 {digest[:12]}…, expected {remote.sha256[:12]}…" if digest else f"{size} bytes, expected {remote.size}"
            raise DownloadError(f"{remote.name} is not the announced file ({found}): deleted", corrupt=True)
        os.replace(part, final)
        fsync_dir(self.folder)
        return final

    # --- checks ---------------------------------------------------------------------------------

    def _check_superseded(self, remote: RemoteFile) -> None:
        newer = self.superseded()
        if newer:
            raise DownloadSupersededError(f"{remote.name}: stopped for {newer} (the partial file stays)")

    def _check_space(self, remote: RemoteFile, missing: int, part: Path) -> None:
        free = _free_bytes(self.folder)
        needed = missing + DISK_MARGIN_BYTES
        if free is not None and free < needed:
            raise DiskFullError(
                f"{remote.name} needs {_mb(needed)} ({_mb(missing)} to download and {_mb(DISK_MARGIN_BYTES)} to spare) but the "
                f"disk has {_mb(free)} free in {self.folder}; trying again when there is room",
                needed=needed, free=free)

    def _mismatch(self, remote: RemoteFile, actual: int | None, *, more: bool = False) -> DownloadError:
        found = "more bytes than that" if more else f"{actual} bytes"
        return DownloadError(
            f"{remote.name} is not the announced file: the assignment says {remote.size} bytes, the server sent {found}",
            corrupt=True)

    def _part_size(self, remote: RemoteFile) -> int:
        try:
            return self.part_path(remote.sha256).stat().st_size
        except OSError:
            return 0

    def _client_for(self, url: str) -> tuple[SyncClient, str]:
        """The artifact URL's client and path: the device's own server, or (without the token) another origin."""
        if url.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(url)
            own = urllib.parse.urlsplit(self.client.server)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            if (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
                return self.client, path[len(own.path.rstrip("/")):]
            return SyncClient(f"{parts.scheme}://{parts.netloc}", None, timeout_s=self.client.timeout_s,
                              exchange_s=self.client.exchange_s), path
        return self.client, url


def _write_all(out, data: bytes) -> None:  # noqa: ANN001
    """Write every byte (an unbuffered write may take fewer); a write of nothing means the disk is full."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        if not n:
            raise OSError(errno.ENOSPC, "a write stored nothing (short write)")
        view = view[n:]


def _free_bytes(folder: Path) -> int | None:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _mb(n: int | None) -> str:
    return "? MB" if n is None else f"{n / 1e6:.1f} MB"


def _range_total(header: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", header or "")
    return int(match.group(1)) if match else None


def _range_start(header: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


