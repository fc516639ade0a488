"""Structured logs: one JSON object a line (or plain text), with the `extra` fields of each call."""

from __future__ import annotations

import errno
import json
import logging
import sys
import threading
import time

# Attributes every LogRecord has; anything else came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "msg": ..., **extra}`; exceptions as one string field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        text = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class ResourceErrorFilter(logging.Filter):
    """Let through one "out of descriptors" record per `interval_s`, saying how many were dropped.

    When accept() fails with EMFILE, asyncio logs the error (with a traceback) once per connection
    waiting in the backlog, every time the listening socket is retried: hundreds of thousands of lines
    in seconds. The first one is kept whole; later ones at most every `interval_s`, without traceback.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._dropped = 0

    @staticmethod
    def is_resource_error(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            return True
        return "out of system resource" in str(record.msg)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_resource_error(record):
            return True
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._dropped += 1
                return False
            first = self._last == float("-inf")
            self._last, dropped, self._dropped = now, self._dropped, 0
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = f"{record.getMessage()}: {exc}" if exc is not None else record.getMessage()
        record.args = ()
        if not first:
            record.exc_info = None
            record.exc_text = None
        record.suppressed = dropped  # the same error, not logged since the last line
        return True


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send `sync_server.*`, uvicorn's error log and asyncio's to stderr in the chosen format.

    asyncio's log goes through `ResourceErrorFilter`, so running out of descriptors is a few lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("sync_server", "uvicorn.error", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper() if name != "asyncio" else "WARNING")
        logger.propagate = False
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.filters[:] = [f for f in asyncio_logger.filters if not isinstance(f, ResourceErrorFilter)]
    asyncio_logger.addFilter(ResourceErrorFilter())
