"""Locks that order publishes across server instances, so one winner per (model, version) is chosen
before any file moves.

    PostgreSQL   transaction-level advisory locks on a connection of their own: every publish (and
                 delete) holds the shared "registry" lock and the exclusive lock of its (model, version);
                 `sync-server check` holds the registry lock exclusively, so it never sees a publish
                 half-way. A killed instance's connection ends, and PostgreSQL drops its locks.
    SQLite       one database file, so one machine: an exclusive `flock` on DATA/publish.lock, taken
                 by every publish, delete and check (publishes are rare; they queue).

Both wait at most `timeout_s`, then raise ConflictError (`publish_in_progress`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from .db import Database
from .errors import ConflictError

#: Advisory lock namespaces (the first of PostgreSQL's two 32-bit keys): "registry" and "version".
_REGISTRY_NS = 0x5EC1_0B15
_VERSION_NS = 0x5EC1_0B16
#: How long a publish waits for another one of the same version (or a check) to finish.
DEFAULT_TIMEOUT_S = 300.0
_POLL_S = 0.05


def _version_key(name: str, version: int) -> int:
    """A signed 32-bit key for (model, version); a collision only makes two publishes queue."""
    digest = hashlib.sha256(f"{name}\0{version}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


class PublishLocks:
    """The cross-instance locks of one registry (its database and its data directory)."""

    def __init__(self, db: Database, data_dir: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.db = db
        self.lock_path = Path(data_dir) / "publish.lock"
        self.timeout_s = timeout_s
        self._local = threading.RLock()  # flock is per process: threads of this one queue here

    @contextlib.contextmanager
    def version(self, name: str, version: int) -> Iterator[None]:
        """Held while one publish (or delete) of `name` version `version` checks, moves files and records."""
        what = f"version {version} of model {name}"
        with self._local_lock(what):
            if self.db.dialect == "postgresql":
                with self._advisory([("shared", _REGISTRY_NS, 0), ("exclusive", _VERSION_NS, _version_key(name, version))], what):
                    yield
            else:
                with self._file_lock(what):
                    yield

    @contextlib.contextmanager
    def everything(self, timeout_s: float | None = None) -> Iterator[None]:
        """Held while nothing may publish or delete anywhere (`sync-server check`)."""
        what = "the registry"
        with self._local_lock(what, timeout_s):
            if self.db.dialect == "postgresql":
                with self._advisory([("exclusive", _REGISTRY_NS, 0)], what, timeout_s):
                    yield
            else:
                with self._file_lock(what, timeout_s):
                    yield

    # --- internals ------------------------------------------------------------------------------

    def _busy(self, what: str, timeout_s: float) -> ConflictError:
        return ConflictError(
            f"another publish, delete or check of {what} has been running for {timeout_s:g} s; try again when it is done",
            code="publish_in_progress",
        )

    @contextlib.contextmanager
    def _local_lock(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self._local.acquire(timeout=timeout):
            raise self._busy(what, timeout)
        try:
            yield
        finally:
            self._local.release()

    @contextlib.contextmanager
    def _advisory(self, locks: list[tuple[str, int, int]], what: str, timeout_s: float | None = None) -> Iterator[None]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self.db.engine.connect() as connection:
            try:
                for mode, ns, key in locks:
                    function = "pg_try_advisory_xact_lock_shared" if mode == "shared" else "pg_try_advisory_xact_lock"
                    while not connection.execute(text(f"SELECT {function}(:ns, :key)"), {"ns": ns, "key": key}).scalar():
                        if time.monotonic() >= deadline:
                            raise self._busy(what, timeout)
                        time.sleep(_POLL_S)
                yield
            finally:
                try:
                    connection.rollback()  # ends the transaction: PostgreSQL releases its advisory locks
                except OperationalError:
                    connection.invalidate()  # a dead connection: its locks went with it

    @contextlib.contextmanager
    def _file_lock(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._busy(what, timeout) from None
                    time.sleep(_POLL_S)
            yield
        finally:
            os.close(fd)
