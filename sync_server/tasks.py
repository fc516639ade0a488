"""Background asyncio tasks: stopped for certain, restarted after failures, run periodically.

On Python 3.11 and older, `asyncio.wait_for` can swallow a cancellation that arrives just as the
awaited event fires (CPython gh-86296): a loop like `while True: await wait_for(event.wait(), t)` then
keeps running and a plain `task.cancel(); await task` waits forever. `cancel_and_wait` cancels again
until every task has really finished.

`supervised` keeps a background loop alive: it restarts the loop after a failure, and `every` runs a
step periodically (the telemetry retention).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Iterable

#: How long to wait for tasks after each round of cancellation.
ROUND_S = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task], *, round_s: float = ROUND_S) -> None:
    """Cancel `tasks` and wait until all are done, cancelling again any that ignored it."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=round_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


async def supervised(name: str, run: Callable[[], Awaitable[None]], *, restart_s: float = 5.0,
                     log: logging.Logger | None = None) -> None:
    """Run `run()` for ever: when it raises (a database outage, a bug), log it and start it again after
    `restart_s` seconds; when it returns, start it again too. Only cancellation stops it."""
    logger = log or logging.getLogger("sync_server")
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (a background loop must outlive its failures)
            logger.warning("background task failed; restarting it", extra={"task": name, "error": f"{type(exc).__name__}: {exc}",
                                                                            "restart_s": restart_s})
        await asyncio.sleep(restart_s)


async def every(interval_s: float, step: Callable[[], Awaitable[object]], *, first_s: float = 0.0) -> None:
    """Await `step()` after `first_s` seconds and then every `interval_s` (a failure ends the loop: run it
    under `supervised`)."""
    await asyncio.sleep(first_s)
    while True:
        await step()
        await asyncio.sleep(interval_s)
