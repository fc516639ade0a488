"""A durable outbox (SQLite): reports are written to disk first and sent when the server is reachable.

Each message is a POST to the device's server (a status report, a telemetry period) with a unique
idempotency key made when it was written. The sender sends the oldest first and deletes a message
only after the server accepted it; a crash between the two resends it with the same
`Idempotency-Key` header, so a server that honours the key counts it once. Messages the server
refuses for good (4xx) are dropped and logged, so one bad report cannot block the queue. Commits are
fsynced (`synchronous=FULL`): a crash or a power cut loses no message, and a week offline only
makes the queue longer (it is capped at `max_rows`, oldest telemetry dropped first).
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
from .errors import ServerRejectedError, ServerUnreachableError
from .options import RetryOptions
from .retry import backoff_delay

log = logging.getLogger("edge_agent.outbox")

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
"""


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

    def __init__(self, path: str | Path, max_rows: int = 100_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: used to move a telemetry period into the queue atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def failed(self, message_id: int, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error[:500], message_id))

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
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._next_try = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-outbox", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Try now: there is something new, or the server is reachable again."""
        self._next_try = 0.0
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
                    self.outbox.sent(message.id)
                    self.dropped_count += 1
                    log.warning("dropped a %s report the server refused: %s", message.kind, exc)
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
        delay = backoff_delay(self._failures, self.retry)
        self._failures += 1
        self._next_try = time.monotonic() + delay
        log.info("reports wait in the outbox (%d queued); next try in %.1f s: %s", self.outbox.count(), delay, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._safe_tick()
            if time.monotonic() >= self._next_try:
                try:
                    self.flush()
                except Exception:  # never let the sender die  # noqa: BLE001
                    log.exception("the outbox sender failed; trying again later")
                    self._next_try = time.monotonic() + self.retry.max_s
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception:  # noqa: BLE001
            log.exception("telemetry bookkeeping failed")
