"""Stop background asyncio tasks for certain.

On Python 3.11 and older, `asyncio.wait_for` can swallow a cancellation that arrives just as the
awaited event fires (CPython gh-86296): a loop like `while True: await wait_for(event.wait(), t)` then
keeps running and a plain `task.cancel(); await task` waits forever. `cancel_and_wait` cancels again
until every task has really finished.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

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
