"""Read a Server-Sent Events stream (text/event-stream) line by line, as the WHATWG spec says.

Fields `event`, `data` (several lines are joined with newlines), `id` and `retry`; lines starting
with ':' are comments (the server's keepalives); a blank line dispatches the event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Event:
    """One dispatched event."""

    event: str
    data: str
    id: str | None
    retry_ms: int | None = None


def parse_events(lines: Iterable[bytes | str]) -> Iterator[Event | None]:
    """Events from raw lines; yields None for each comment (a sign of life) too."""
    event, data, last_id, retry = "", [], None, None
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if line == "":
            if data:
                yield Event(event or "message", "\n".join(data), last_id, retry)
            event, data, retry = "", [], None
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\x00" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
