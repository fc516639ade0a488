"""A durable outbox (SQLite): reports are written to disk first and sent when the server is reachable.

Each message is a POST to the device's server (a status report, a telemetry period) with a unique
idempotency key made when it was written. The sender sends the oldest first and deletes a message
only after the server accepted it; a crash between the two resends it with the same
`Idempotency-Key` header, so a server that honours the key counts it once. Messages the server
refuses for good (4xx) move to the `dead_letter` table (the last `DEAD_LETTER_ROWS`, shown by
`edge-agent status`), so one bad report cannot block the queue and none vanishes unseen. Commits are
fsynced (`synchronous=FULL`): a crash or a power cut loses no queued message, and a week offline only
makes the queue longer (it is capped at `max_rows`, oldest telemetry dropped first).

A damaged database file is moved aside (`outbox.sqlite.damaged-<time>`) and a new one started;
`recovered` says so, for the next status report. A full disk ("database or disk is full") is raised
as `DiskFullError`: the caller keeps the report in memory and tries again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .client import SyncClient
from .errors import AgentError, DiskFullError, ServerRejectedError, ServerUnreachableError
from .options import RetryOptions
from .retry import retry_delay

log = logging.getLogger("edge_agent.outbox")


class OutboxDamagedError(AgentError):
    """Raised, by a reader that does not repair, when the outbox file is not a usable database."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS open_periods (
    version INTEGER PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL,
    refused REAL NOT NULL,
    status INTEGER NOT NULL,
    error TEXT NOT NULL
);
"""
#: How many refused reports the dead-letter table keeps (the oldest go first).
DEAD_LETTER_ROWS = 1000


@dataclass(frozen=True)
class Message:
    """One queued POST."""

    id: int
    key: str
    kind: str
    path: str
    body: dict[str, Any]
    created: float
    attempts: int


class Outbox:
    """The queue on disk. Thread-safe; one connection guarded by a lock."""

    def __init__(self, path: str | Path, max_rows: int = 100_000, *, recover: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._lock = threading.RLock()
        #: Set when a damaged database was moved aside at open: what was lost, in words.
        self.recovered: str | None = None
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise DiskFullError(f"the outbox {self.path} cannot be opened: the disk is full") from exc
            if not recover:  # a reader (`edge-agent status`) leaves the repair to the agent
                raise OutboxDamagedError(f"the outbox {self.path} is damaged ({exc})") from exc
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.replace(f"{aside}{suffix}")
            self.recovered = (f"the outbox {self.path} was damaged ({exc}): moved it aside to {aside.name} and started a new "
                              "one; the reports queued in it are lost")
            log.warning(self.recovered)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: used to move a telemetry period into the queue atomically.

        A full disk raises `DiskFullError` (nothing was written)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _translated(exc, self.path) from exc
            try:
                yield self._db
            except sqlite3.OperationalError as exc:
                self._rollback()
                raise _translated(exc, self.path) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                raise _translated(exc, self.path) from exc

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # no transaction open any more (SQLite rolled it back itself)

    def put(self, kind: str, path: str, body: dict[str, Any], *, db: sqlite3.Connection | None = None) -> str:
        """Queue a POST of `body` to `path`; returns its idempotency key."""
        key = uuid.uuid4().hex
        row = (key, kind, path, json.dumps(body, sort_keys=True), time.time())
        if db is not None:
            db.execute("INSERT INTO outbox (key, kind, path, body, created) VALUES (?, ?, ?, ?, ?)", row)
            return key
        with self.transaction() as tx:
            tx.execute("INSERT INTO outbox (key, kind, path, body, created) VALUES (?, ?, ?, ?, ?)", row)
            self._trim(tx)
        return key

    def peek(self, limit: int = 50) -> list[Message]:
        """The oldest messages, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, kind, path, body, created, attempts FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [Message(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]

    def sent(self, message_id: int) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def dead(self, message: Message, status: int, error: str) -> None:
        """The server refused `message` for good: keep it in the dead-letter table, out of the queue."""
        with self.transaction() as tx:
            tx.execute("INSERT INTO dead_letter (key, kind, path, body, created, refused, status, error) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (message.key, message.kind, message.path, json.dumps(message.body, sort_keys=True), message.created,
                        time.time(), status, error[:500]))
            tx.execute("DELETE FROM outbox WHERE id = ?", (message.id,))
            tx.execute("DELETE FROM dead_letter WHERE id <= (SELECT max(id) FROM dead_letter) - ?", (DEAD_LETTER_ROWS,))

    def dead_letters(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest refused reports: kind, path, status, error, when."""
        with self._lock:
            rows = self._db.execute("SELECT kind, path, status, error, created, refused FROM dead_letter ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"kind": r[0], "path": r[1], "status": r[2], "error": r[3], "created": r[4], "refused": r[5]} for r in rows]

    def dead_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM dead_letter").fetchone()[0])

    def failed(self, message_id: int, error: str) -> None:
        try:
            with self.transaction() as tx:
                tx.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error[:500], message_id))
        except DiskFullError:
            pass  # only bookkeeping

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            return int(self._db.execute("SELECT count(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()[0])

    def last_error(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY id LIMIT 1").fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _trim(self, tx: sqlite3.Connection) -> None:
        excess = int(tx.execute("SELECT count(*) FROM outbox").fetchone()[0]) - self.max_rows
        if excess > 0:
            tx.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY kind = 'status', id LIMIT ?)", (excess,)
            )
            log.warning("the outbox is full: dropped the %d oldest reports", excess)


class OutboxSender:
    """Sends the queue in order on its own thread; backs off (with jitter) while the server is away.

    `tick` runs every loop (the telemetry recorder uses it to persist and close its periods).
    """

    def __init__(
        self,
        outbox: Outbox,
        client: SyncClient,
        retry: RetryOptions,
        *,
        tick: Callable[[], None] | None = None,
        tick_s: float = 1.0,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.retry = retry
        self.tick = tick or (lambda: None)
        self.tick_s = tick_s
        self.sent_count = 0
        self.dropped_count = 0
        self.disk_full = False
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._next_try = 0.0
        self._not_before = 0.0  # a Retry-After the server asked for: a kick does not cut it short
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-outbox", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Try now (or once the server's Retry-After has passed): there is something new, or the server is reachable again."""
        self._next_try = self._not_before
        self._failures = 0
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._safe_tick()

    def flush(self) -> int:
        """Send what is queued, oldest first, until the queue is empty or a send fails; returns how many went."""
        sent = 0
        while not self._stop.is_set():
            batch = self.outbox.peek()
            if not batch:
                return sent
            for message in batch:
                try:
                    self.client.request("POST", message.path, body=message.body, headers={"Idempotency-Key": message.key})
                except ServerRejectedError as exc:
                    if not exc.permanent:
                        self._note_failure(message, exc)
                        return sent
                    self.outbox.dead(message, exc.status, str(exc))
                    self.dropped_count += 1
                    log.warning("the server refused a %s report (%s): kept in the dead-letter table, see `edge-agent status`",
                                message.kind, exc)
                    continue
                except ServerUnreachableError as exc:
                    self._note_failure(message, exc)
                    return sent
                self.outbox.sent(message.id)
                self.sent_count += 1
                sent += 1
                self._failures = 0
                self.last_error = None
        return sent

    def _note_failure(self, message: Message, exc: Exception) -> None:
        self.outbox.failed(message.id, str(exc))
        self.last_error = str(exc)
        delay = retry_delay(exc, self._failures, self.retry)  # the server's Retry-After, within bounds
        self._failures += 1
        self._next_try = time.monotonic() + delay
        asked = getattr(exc, "retry_after_s", None)
        self._not_before = self._next_try if asked else 0.0
        log.info("reports wait in the outbox (%d queued); next try in %.1f s: %s", self.outbox.count(), delay, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._safe_tick()
            if time.monotonic() >= self._next_try:
                try:
                    self.flush()
                except DiskFullError as exc:  # a sent report is resent (same key) once there is room
                    self.last_error = str(exc)
                    self._next_try = time.monotonic() + self.retry.max_s
                except Exception:  # never let the sender die  # noqa: BLE001
                    log.exception("the outbox sender failed; trying again later")
                    self._next_try = time.monotonic() + self.retry.max_s
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except DiskFullError as exc:  # counts stay in memory until there is room; said once
            if not self.disk_full:
                log.warning("telemetry waits in memory: %s", exc)
            self.disk_full = True
            return
        except Exception:  # noqa: BLE001
            log.exception("telemetry bookkeeping failed")
            return
        if self.disk_full:
            log.info("the outbox has room again: telemetry is saved")
        self.disk_full = False


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL


def _translated(exc: sqlite3.OperationalError, path: Path) -> Exception:
    if _is_full(exc):
        return DiskFullError(f"the outbox {path} cannot grow: the disk is full")
    return exc
