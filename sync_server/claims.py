"""Temporary files and folders that tell whether the process that made them still works on them.

A publish writes into temporary items (artifact copies, TF Serving incoming folders, trash folders);
a process killed half-way leaves them behind. Its maker holds an exclusive `flock` on each item for as
long as it uses it; the kernel drops the lock with the process, so `sync-server check` can tell a
leftover (nobody holds its lock) from work in progress (someone does) without guessing from its age.
(`flock` is local to one machine's file system: instances that share a data directory over NFS must
not run `check --repair` while another instance publishes.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

#: How often a maker retries when `check` removed its fresh item between creating and locking it.
_TRIES = 5


class Claim:
    """An exclusive lock on a temporary item, held until `release` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _claim(path: Path) -> Claim | None:
    """Lock `path`, which this process has just made; None when it vanished before the lock was held
    (a `check` took it for a leftover in that instant: the caller makes another)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a `check` holds it (it is deleting it then)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return Claim(path, fd)


def claimed_tempdir(parent: Path, prefix: str) -> tuple[Path, Claim]:
    """A new empty folder under `parent` (mode 0700 until its maker says otherwise), locked by this process."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_TRIES):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        claim = _claim(path)
        if claim is not None:
            return path, claim
    raise OSError(errno.EAGAIN, f"could not make a temporary folder in {parent}")


def claimed_tempfile(parent: Path, prefix: str) -> tuple[int, Path, Claim]:
    """A new empty file under `parent`, open for writing (the returned fd), locked by this process."""
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_TRIES):
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        claim = _claim(Path(name))
        if claim is not None:
            return fd, Path(name), claim
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not make a temporary file in {parent}")


@contextlib.contextmanager
def if_abandoned(path: Path) -> Iterator[bool]:
    """True when no process holds `path`'s claim; the lock is then held by the caller for the block
    (so its maker cannot take it back while the caller removes it). False when it is in use or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
