"""The database: an engine for SQLite (embedded default) or PostgreSQL, sessions, and migrations.

SQLite runs in WAL mode with a busy timeout, and write transactions start with `BEGIN IMMEDIATE` so
two writers queue instead of failing half-way. On PostgreSQL, migrations hold an advisory lock, so
several instances starting together upgrade the schema once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NoReturn

from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DataError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import ConfigError
from .models import ServerState

log = logging.getLogger("sync_server.db")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_ADVISORY_LOCK_ID = 0x5E_C1A5_51F7  # "edge-classify sync-server migrations"
REVISION_KEY = "assignment_revision"


class Database:
    """An engine plus the two kinds of sessions the server uses (read and write)."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"the database URL {url!r} cannot be parsed: {exc}") from None
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _configure_sqlite(self.engine)
        elif self.dialect == "postgresql":
            if parsed.drivername == "postgresql":  # plain postgresql:// means psycopg 3 here, not psycopg2
                url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        else:
            raise ConfigError(f"unsupported database {self.dialect!r}: use sqlite:///PATH or postgresql://...")
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False)
        self._local_revisions: set[int] = set()  # revisions this process's own commits made
        self._local_lock = threading.Lock()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; rolled back at the end. A database that cannot answer raises
        DatabaseUnavailableError (503), a full disk DiskFullError (507) (see `translate_error`)."""
        try:
            with self._reader() as session:
                try:
                    yield session
                finally:
                    session.rollback()
        except (SQLAlchemyError, OverflowError) as exc:
            _reraise(exc)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits at the end (rolled back on an exception); errors as `read`."""
        try:
            with self._writer() as session:
                with session.begin():
                    yield session
                bumped = session.info.pop(_BUMPED, None)
        except (SQLAlchemyError, OverflowError) as exc:
            _reraise(exc)
        if bumped:  # committed: these revisions are this process's own changes
            with self._local_lock:
                self._local_revisions.update(bumped)

    def only_local_changes(self, old: int, new: int) -> bool:
        """Whether every revision after `old` up to `new` was made by this process's own commits (whose
        callers already told their streams); forgets revisions up to `new`."""
        with self._local_lock:
            ours = all(r in self._local_revisions for r in range(old + 1, new + 1)) if new > old else False
            self._local_revisions = {r for r in self._local_revisions if r > new}
        return ours

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        try:
            with self.engine.connect() as connection:
                if self.dialect == "postgresql":
                    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
                    connection.commit()
                try:
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    connection.commit()
                finally:
                    if self.dialect == "postgresql":
                        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_ID})
                        connection.commit()
        except OperationalError as exc:
            raise ConfigError(f"cannot reach the database {self.safe_url}: {_first_line(exc)}") from exc

    def check(self) -> None:
        """Raise if the database cannot answer `SELECT 1`."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def revision(self) -> int:
        """The shared assignment revision: it grows with every change that can alter an assignment."""
        with self.read() as session:
            value = session.scalar(select(ServerState.value).where(ServerState.key == REVISION_KEY))
            return int(value or 0)

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def bump_revision(session: Session) -> None:
    """Advance the shared assignment revision inside the caller's write transaction (`Database.write`
    remembers the new value once it commits, so this instance's watch can skip its own change)."""
    result = session.execute(
        update(ServerState).where(ServerState.key == REVISION_KEY).values(value=ServerState.value + 1)
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        session.add(ServerState(key=REVISION_KEY, value=1))
        value = 1
    else:
        value = session.scalar(select(ServerState.value).where(ServerState.key == REVISION_KEY))
    session.info.setdefault(_BUMPED, []).append(int(value))


_BUMPED = "bumped_revisions"


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def iso(moment: datetime | None) -> str | None:
    moment = as_utc(moment)
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


#: What a full disk looks like in the drivers' words (SQLite, PostgreSQL's SQLSTATE 53100, the OS).
_DISK_FULL = ("database or disk is full", "no space left on device", "could not extend file", "disk full")


def translate_error(exc: BaseException) -> Exception:
    """The SyncServerError an error of the database layer means for the caller.

    A full disk is DiskFullError (507); a database that cannot be reached, refuses connections or stays
    locked is DatabaseUnavailableError (503, Retry-After); a number past a column's range (an input
    bound the schema missed) is BadRequestError. Anything else is passed on unchanged.
    """
    from .errors import BadRequestError, DatabaseUnavailableError, DiskFullError, SyncServerError

    if isinstance(exc, SyncServerError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    detail = _first_line(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
    lowered = detail.lower()
    if getattr(orig, "sqlstate", None) == "53100" or any(words in lowered for words in _DISK_FULL):
        log.error("database write failed: disk full", extra={"detail": detail})
        return DiskFullError(
            "the server's disk is full: the database cannot store this change; free space on the server "
            "(or grow its volume) and try again"
        )
    if isinstance(exc, OverflowError) or isinstance(exc, DataError):
        return BadRequestError(f"a number in the request is out of range ({detail})", code="out_of_range")
    if isinstance(exc, (OperationalError, InterfaceError)) or getattr(exc, "connection_invalidated", False):
        log.error("database unavailable", extra={"detail": detail})
        return DatabaseUnavailableError("the database is unavailable right now; try again in a few seconds")
    return exc  # type: ignore[return-value]


def _reraise(exc: BaseException) -> NoReturn:
    translated = translate_error(exc)
    if translated is exc:
        raise exc
    raise translated from exc


def _first_line(exc: SQLAlchemyError) -> str:
    text_ = str(getattr(exc, "orig", exc) or exc)
    return text_.strip().splitlines()[0] if text_.strip() else type(exc).__name__
