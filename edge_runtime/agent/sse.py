"""Read a Server-Sent Events stream (text/event-stream) line by line, as the WHATWG spec says, bounded.

Fields `event`, `data` (several lines are joined with newlines), `id` and `retry`; lines starting
with ':' are comments (the server's keepalives); a blank line dispatches the event; unknown fields are
ignored. The stream is hostile input: a line longer than `MAX_LINE_BYTES`, an event larger than
`MAX_EVENT_BYTES` or bytes that are not UTF-8 raise `StreamGarbageError`, and no more than that is ever
held in memory (`read_lines` reads with a limit), so a 128 MB line costs 1 MB, not 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

#: The longest line read (an assignment event is one `data:` line of ~100 KB).
MAX_LINE_BYTES = 1024 * 1024
#: The largest event (all its data lines together).
MAX_EVENT_BYTES = 4 * 1024 * 1024


class StreamGarbageError(ValueError):
    """Raised when the push stream is not an event stream (or exceeds the bounds); the source then polls."""


@dataclass(frozen=True)
class Event:
    """One dispatched event."""

    event: str
    data: str
    id: str | None
    retry_ms: int | None = None


def read_lines(readline: Callable[[int], bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Lines from `readline(limit)` (e.g. `HTTPResponse.readline`), none longer than `max_line` bytes."""
    while True:
        line = readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line:
            raise StreamGarbageError(f"the push stream sent a line longer than {max_line} bytes")
        yield line


def parse_events(lines: Iterable[bytes | str], max_event: int = MAX_EVENT_BYTES) -> Iterator[Event | None]:
    """Events from raw lines; yields None for each comment (a sign of life) too."""
    event, data, last_id, retry, size = "", [], None, None, 0
    for raw in lines:
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StreamGarbageError("the push stream sent bytes that are not UTF-8 text") from None
        else:
            line = raw
        line = line.rstrip("\r\n")
        if line == "":
            if data:
                yield Event(event or "message", "\n".join(data), last_id, retry)
            event, data, retry, size = "", [], None, 0
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value[:64]
        elif name == "data":
            size += len(value) + 1
            if size > max_event:
                raise StreamGarbageError(f"the push stream sent an event larger than {max_event} bytes")
            data.append(value)
        elif name == "id" and "\x00" not in value:
            last_id = value[:200]
        elif name == "retry" and value.isdigit():
            retry = int(value[:9])
