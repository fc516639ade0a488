"""`DecodeBudget`: a bound on the decoded pixels held in memory by all threads of a process at once.

A small file can decode to a huge picture (a 37 KB GIF to 7000x7000). Limits on one photo bound what
one decode costs; a budget bounds what concurrent decodes cost together. `load_image` and
`preprocess` reserve the bytes a decode will allocate (estimated from the header, before any pixel
is decoded) and give them back when the photo is ready:

- a decode that fits starts at once; one that does not waits, in arrival order, at most `wait_s`,
  then fails with `DecodeBusyError` (code `busy`: the process is busy, the photo is fine);
- a decode larger than the whole budget can never fit and is refused at once as `too_large`.

After a large decode the freed memory is handed back to the operating system (glibc keeps freed
blocks in its per-thread arenas otherwise: eight concurrent big decodes left 5 GB held).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import deque
from types import TracebackType

from ._errors import DecodeBusyError, InvalidImageError

MiB = 1 << 20

#: Default wait for room in a budget before `DecodeBusyError`.
DEFAULT_WAIT_S = 30.0
#: Reservations at least this large hand freed memory back to the OS when they end.
DEFAULT_TRIM_ABOVE = 64 * MiB


def default_budget_bytes() -> int:
    """The process-wide default: a quarter of the machine's memory, at most 1 GiB, at least 256 MiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume a small one
        physical = 2 << 30
    return int(min(1 << 30, max(256 * MiB, physical // 4)))


class DecodeBudget:
    """Decoded bytes in flight across threads, at most `max_bytes`; waits are bounded by `wait_s`.

    Share one budget between every thread that decodes photos (a server's request workers, a
    device's decode pool). `reserve(n)` is a context manager; thread-safe; first come, first served
    (a big decode is not starved by a stream of small ones).
    """

    def __init__(self, max_bytes: int, *, wait_s: float = DEFAULT_WAIT_S, trim_above: int | None = DEFAULT_TRIM_ABOVE) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"DecodeBudget.max_bytes must be a positive whole number, got {max_bytes!r}")
        if not wait_s >= 0:
            raise ValueError(f"DecodeBudget.wait_s must be 0 or more seconds, got {wait_s!r}")
        self.max_bytes = max_bytes
        self.wait_s = float(wait_s)
        self.trim_above = trim_above
        self._in_use = 0
        self._peak = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition(threading.Lock())

    def __repr__(self) -> str:
        return f"DecodeBudget(max_bytes={self.max_bytes}, wait_s={self.wait_s}, in_use={self._in_use})"

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        return self._in_use

    @property
    def peak(self) -> int:
        """The most bytes ever reserved at once (for tests and metrics)."""
        return self._peak

    @property
    def waiting(self) -> int:
        """Decodes waiting for room right now."""
        return len(self._queue)

    def reserve(self, nbytes: int, *, what: str = "Decoding this picture") -> "Reservation":
        """Wait for `nbytes` of room (at most `wait_s`) and hold it until the `with` block ends.

        Raises `InvalidImageError("too_large")` at once when `nbytes` exceeds the whole budget, and
        `DecodeBusyError` when no room was free for the whole wait. `what` starts the messages.
        """
        nbytes = max(0, int(nbytes))
        if nbytes > self.max_bytes:
            raise InvalidImageError(
                "too_large",
                f"{what} needs {nbytes / MiB:.0f} MiB of memory; this process decodes at most "
                f"{self.max_bytes / MiB:.0f} MiB of pictures at a time: send a smaller photo.",
            )
        ticket = object()
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._in_use + nbytes > self.max_bytes:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DecodeBusyError(
                            f"{what} needs {nbytes / MiB:.0f} MiB and the decode budget of "
                            f"{self.max_bytes / MiB:.0f} MiB stayed full for {self.wait_s:g} s: "
                            "the photo is fine, send it again in a moment.",
                            waited_s=self.wait_s,
                        )
                    self._changed.wait(left)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now (or be first now)
            self._in_use += nbytes
            self._peak = max(self._peak, self._in_use)
        return Reservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._changed:
            self._in_use -= nbytes
            self._changed.notify_all()
        if self.trim_above is not None and nbytes >= self.trim_above:
            release_freed_memory()


class Reservation:
    """Bytes held in a `DecodeBudget` until `release()` or the end of the `with` block."""

    __slots__ = ("budget", "nbytes", "_held")

    def __init__(self, budget: DecodeBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.budget._release(self.nbytes)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


#: The budget `load_image` and `preprocess` use unless told otherwise (`budget=None`: unbounded).
DEFAULT_BUDGET = DecodeBudget(default_budget_bytes())


_malloc_trim = None
_trim_looked_up = False


def release_freed_memory() -> bool:
    """Hand memory freed by this process back to the OS (glibc `malloc_trim(0)`); False where unavailable.

    glibc keeps freed heap blocks in each thread's arena for reuse; after a 200 MB decode on each of
    eight threads that is gigabytes held by an idle process. Trimming costs about a millisecond.
    """
    global _malloc_trim, _trim_looked_up
    if not _trim_looked_up:
        _trim_looked_up = True
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None).malloc_trim
                function.argtypes = (ctypes.c_size_t,)
                function.restype = ctypes.c_int
                _malloc_trim = function
            except (OSError, AttributeError):  # musl: no malloc_trim, and no per-thread arenas to trim
                _malloc_trim = None
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
