"""Bounded retries with exponential backoff and jitter: no call retries forever, none hangs.

`backoff_delay(n, options)` is the wait before try n+1: base·2^n, capped at `max_s`, of which up to
`jitter` is taken off at random (so that devices that lost the server together do not come back in
step). `with_retries` runs a call at most `attempts` times and then raises `ServerUnreachableError`
saying how often it tried and why the last try failed. A server's Retry-After (429, 503) is honoured
within bounds: never sooner than it asks, never longer than `max_s` (`retry_delay`).
"""

from __future__ import annotations

import random
import threading
from typing import Callable, TypeVar

from .errors import DiskFullError, DownloadError, DownloadSupersededError, ServerRejectedError, ServerUnreachableError
from .options import RetryOptions

T = TypeVar("T")


def backoff_delay(attempt: int, options: RetryOptions, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed try number `attempt` (0-based)."""
    ceiling = min(options.max_s, options.base_s * (2 ** min(attempt, 30)))
    return ceiling * (1.0 - options.jitter * rng())


def retry_delay(exc: BaseException | None, attempt: int, options: RetryOptions, rng: Callable[[], float] = random.random) -> float:
    """The wait after failed try `attempt`: the backoff, or the server's Retry-After when longer, capped at
    `options.max_s` (a server asking for a day must not park a device for a day)."""
    delay = backoff_delay(attempt, options, rng)
    asked = getattr(exc, "retry_after_s", None)
    if asked is not None:
        delay = max(delay, min(float(asked), options.max_s))
    return delay


def is_transient(exc: BaseException) -> bool:
    """Worth another try: the network, a timeout, a server error, 408 or 429; not a refusal, a full disk or
    a download a newer assignment replaced."""
    if isinstance(exc, ServerRejectedError):
        return not exc.permanent
    if isinstance(exc, (DiskFullError, DownloadSupersededError)):
        return False  # the manager decides: wait for room, or follow the newer assignment
    if isinstance(exc, DownloadError):
        return not exc.corrupt
    return isinstance(exc, ServerUnreachableError)


def with_retries(
    call: Callable[[], T],
    options: RetryOptions,
    *,
    what: str,
    stop: threading.Event | None = None,
    progressed: Callable[[], bool] | None = None,
) -> T:
    """`call()`, tried up to `options.attempts` times while it fails transiently.

    `progressed()` (optional) says whether the failed try got somewhere (a download whose part file
    grew past its furthest point so far): then the count starts again, so a slow but moving download is
    never abandoned, while one that fetches the same bytes again and again is. `stop` ends the waiting
    early. Permanent failures are raised at once.
    """
    stop = stop or threading.Event()
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if progressed is not None and progressed():
                failures = 0
            failures += 1
            if failures >= options.attempts or stop.is_set():
                raise ServerUnreachableError(f"{what}: gave up after {failures} tries ({exc})") from exc
            if stop.wait(retry_delay(exc, failures - 1, options)):
                raise ServerUnreachableError(f"{what}: stopped while retrying ({exc})") from exc
