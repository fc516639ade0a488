"""Combine concurrent single-photo requests into batches, per servable, as TF Serving's batching does.

Each servable (model name, version) has a queue and a scheduler task. The scheduler waits for a free
batch slot (`num_batch_threads` batches of a servable run at once), then takes the first waiting
photo, and keeps adding photos until the batch holds `max_batch_size` or `max_wait_ms` have passed
since that first photo. Under load, photos queue while the slots are busy, so batches fill up without
waiting; a lone request waits at most `max_wait_ms`.

Deadlines: `submit(key, x, deadline=...)` (a `loop.time()`) says when the caller stops waiting. A
request whose deadline passes while it is queued is never sent (its caller, cancelled at the deadline
by the prediction service, answers 503 then); a batch is sent with the time its latest deadline leaves
as the backend's timeout (`run(key, batch, timeout_s=...)`), so no backend call outlives the requests
it answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

import numpy as np

from ..config import BatchingOptions
from ..tasks import cancel_and_wait

log = logging.getLogger("sync_server.batching")

#: `run(key, batch)`, or `run(key, batch, timeout_s=seconds)` when the batch's requests have deadlines.
RunBatch = Callable[..., Awaitable[np.ndarray]]


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    queued_at: float
    deadline: float | None = None  # loop.time() after which nobody waits for the answer

    def expired(self, now: float) -> bool:
        return self.future.cancelled() or (self.deadline is not None and now >= self.deadline)


class Batcher:
    """Batches calls to `run(key, batch)`; `submit(key, x)` returns the row of the answer for `x`."""

    def __init__(
        self,
        run: RunBatch,
        options: BatchingOptions,
        on_batch: Callable[[Hashable, int, float], None] | None = None,
    ) -> None:
        self._run = run
        self.options = options
        self._on_batch = on_batch
        self._queues: dict[Hashable, asyncio.Queue[_Item]] = {}
        self._schedulers: dict[Hashable, asyncio.Task] = {}
        self._slots: dict[Hashable, asyncio.Semaphore] = {}
        self._running: set[asyncio.Task] = set()
        self._closed = False

    async def submit(self, key: Hashable, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue one example (without the batch axis) and wait for its output row.

        `deadline` (a `loop.time()`) is when the caller gives up: past it the example is not sent, and
        a batch holding it gets no more time from the backend than its latest deadline leaves. The
        caller enforces the deadline by cancelling this call (which withdraws the example).
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), time.perf_counter(), deadline)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._slots[key] = asyncio.Semaphore(self.options.num_batch_threads)
            self._schedulers[key] = asyncio.create_task(self._schedule(key, queue), name=f"batcher-{key}")
        queue.put_nowait(item)
        return await item.future

    async def _schedule(self, key: Hashable, queue: asyncio.Queue[_Item]) -> None:
        slots = self._slots[key]
        max_size = self.options.max_batch_size
        max_wait = self.options.max_wait_ms / 1000.0
        while True:
            await slots.acquire()
            try:
                first = await queue.get()
            except asyncio.CancelledError:
                slots.release()
                raise
            batch = [first]
            deadline = time.perf_counter() + max_wait
            while len(batch) < max_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            now = asyncio.get_running_loop().time()
            batch = [item for item in batch if not item.expired(now)]  # nobody waits for these any more
            if not batch:
                slots.release()
                continue
            task = asyncio.create_task(self._execute(key, batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, key: Hashable, batch: list[_Item], slots: asyncio.Semaphore) -> None:
        started = time.perf_counter()
        try:
            x = np.stack([item.x for item in batch])
            deadlines = [item.deadline for item in batch]
            if None in deadlines:
                outputs = await self._run(key, x)
            else:
                timeout_s = max(deadlines) - asyncio.get_running_loop().time()  # type: ignore[type-var]
                outputs = await self._run(key, x, timeout_s=max(0.001, timeout_s))
            if len(outputs) != len(batch):
                raise RuntimeError(f"the backend answered {len(outputs)} rows for a batch of {len(batch)}")
        except BaseException as exc:  # every waiting request gets the error  # noqa: BLE001
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for item, row in zip(batch, outputs):
                if not item.future.done():
                    item.future.set_result(row)
        finally:
            slots.release()
            if self._on_batch is not None:
                self._on_batch(key, len(batch), time.perf_counter() - started)

    async def aclose(self) -> None:
        """Stop the schedulers; requests still queued get a CancelledError."""
        self._closed = True
        await cancel_and_wait(list(self._schedulers.values()) + list(self._running))
        for queue in self._queues.values():
            while not queue.empty():
                item = queue.get_nowait()
                if not item.future.done():
                    item.future.cancel()
