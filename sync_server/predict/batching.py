"""Combine concurrent single-photo requests into batches, per servable, only when there is load.

Each servable (model name, version) has a lane: a queue, `num_batch_threads` batch slots and a
scheduler task. The policy is adaptive, like TF Serving's and Triton's dynamic batching with a queue
delay that only applies while the backend is already busy:

- **Idle: no wait.** When a slot is free and no batch of the servable is running, the scheduler sends
  what is queued at once, so a lone request goes straight to the backend (the batch window costs
  nothing at low load). With a second slot free beside the one the waiting scheduler holds
  (`num_batch_threads` >= 2), the submitting task sends it itself, without the hop through the queue
  and the scheduler task.
- **Loaded: batches grow by themselves.** While every slot is busy, requests queue; as soon as a slot
  frees, everything queued (up to `max_batch_size`) goes as the next batch.
- **Busy but a slot free: a short wait.** When another batch is running and a slot is free, the
  scheduler waits up to `max_wait_ms` (or until the batch is full, or until no batch is running any
  more) before sending: under load a few milliseconds gather a batch that costs far less per photo
  than two small calls competing for the same cores.

Deadlines: `submit(key, x, deadline=...)` (a `loop.time()`) says when the caller stops waiting. A
request whose deadline passes while it is queued is never sent (its caller, cancelled at the deadline
by the prediction service, answers 503 then); a batch is sent with the time its latest deadline leaves
as the backend's timeout (`run(key, batch, timeout_s=...)`), so no backend call outlives the requests
it answers. The wait for a batch to fill never runs past the earliest deadline in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
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


@dataclass
class _Lane:
    """One servable's queue, its batch slots and how many of its batches are running."""

    queue: asyncio.Queue[_Item]
    slots: asyncio.Semaphore
    in_flight: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever one of its batches ends
    idle: bool = False  # the scheduler holds a slot and waits for the queue's next request


@dataclass(frozen=True)
class BatchRecord:
    """One batch sent to the backend: how many photos, and how long they had waited in the queue."""

    size: int
    waited_s: float  # from the first photo's submit to the batch's send
    others_in_flight: int  # batches of the same servable running when this one was sent


class Batcher:
    """Batches calls to `run(key, batch)`; `submit(key, x)` returns the row of the answer for `x`."""

    #: How many `BatchRecord`s `recent` keeps (for tests and the benchmark; /metrics has the totals).
    RECENT = 256

    def __init__(
        self,
        run: RunBatch,
        options: BatchingOptions,
        on_batch: Callable[[Hashable, int, float], None] | None = None,
    ) -> None:
        self._run = run
        self.options = options
        self._on_batch = on_batch
        self._lanes: dict[Hashable, _Lane] = {}
        self._schedulers: dict[Hashable, asyncio.Task] = {}
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self.recent: list[BatchRecord] = []

    def in_flight(self, key: Hashable) -> int:
        """Batches of `key` being run by the backend now."""
        lane = self._lanes.get(key)
        return lane.in_flight if lane is not None else 0

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
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(asyncio.Queue(), asyncio.Semaphore(self.options.num_batch_threads))
            self._schedulers[key] = asyncio.create_task(self._schedule(key, lane), name=f"batcher-{key}")
        if lane.idle and lane.in_flight == 0 and lane.queue.empty() and not lane.slots.locked():
            return await self._run_alone(key, lane, x, deadline)
        lane.queue.put_nowait(item)
        return await item.future

    async def _run_alone(self, key: Hashable, lane: _Lane, x: np.ndarray, deadline: float | None) -> np.ndarray:
        """An idle servable's request, sent by its own task: a batch of one, in a slot like any other."""
        await lane.slots.acquire()  # free (checked by the caller): returns without waiting
        self._record(BatchRecord(1, 0.0, 0))
        lane.in_flight += 1
        started = time.perf_counter()
        try:
            if deadline is None:
                outputs = await self._run(key, x[None])
            else:
                outputs = await self._run(key, x[None], timeout_s=max(0.001, deadline - asyncio.get_running_loop().time()))
            if len(outputs) != 1:
                raise RuntimeError(f"the backend answered {len(outputs)} rows for a batch of 1")
            return outputs[0]
        finally:
            lane.in_flight -= 1
            lane.finished.set()
            lane.slots.release()
            if self._on_batch is not None:
                self._on_batch(key, 1, time.perf_counter() - started)

    async def _schedule(self, key: Hashable, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        max_size = self.options.max_batch_size
        max_wait = self.options.max_wait_ms / 1000.0
        while True:
            await lane.slots.acquire()
            batch: list[_Item] = []
            try:
                lane.idle = True
                try:
                    batch.append(await lane.queue.get())
                finally:
                    lane.idle = False
                self._drain(lane, batch, max_size)
                if len(batch) < max_size and max_wait > 0 and lane.in_flight > 0:
                    await self._gather_more(lane, batch, max_size, loop.time() + max_wait)
            except asyncio.CancelledError:  # closing: the photos taken from the queue are answered too
                lane.slots.release()
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            now = loop.time()
            batch = [item for item in batch if not item.expired(now)]  # nobody waits for these any more
            if not batch:
                lane.slots.release()
                continue
            self._record(BatchRecord(len(batch), time.perf_counter() - batch[0].queued_at, lane.in_flight))
            lane.in_flight += 1
            task = asyncio.create_task(self._execute(key, lane, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    @staticmethod
    def _drain(lane: _Lane, batch: list[_Item], max_size: int) -> None:
        while len(batch) < max_size and not lane.queue.empty():
            batch.append(lane.queue.get_nowait())

    async def _gather_more(self, lane: _Lane, batch: list[_Item], max_size: int, until: float) -> None:
        """Add photos to `batch` until it is full, `until` passes, or no other batch is running."""
        loop = asyncio.get_running_loop()
        deadlines = [item.deadline for item in batch if item.deadline is not None]
        if deadlines:
            until = min(until, min(deadlines))
        while len(batch) < max_size and lane.in_flight > 0:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            lane.finished.clear()
            getter = asyncio.ensure_future(lane.queue.get())
            finished = asyncio.ensure_future(lane.finished.wait())
            try:
                await asyncio.wait((getter, finished), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (getter, finished):
                    if not waiter.done():
                        waiter.cancel()  # a cancelled Queue.get leaves its item in the queue
            if getter.done() and not getter.cancelled():
                batch.append(getter.result())
                if batch[-1].deadline is not None:
                    until = min(until, batch[-1].deadline)  # type: ignore[type-var]
                self._drain(lane, batch, max_size)
            else:
                return

    def _record(self, record: BatchRecord) -> None:
        self.recent.append(record)
        if len(self.recent) > self.RECENT:
            del self.recent[: len(self.recent) - self.RECENT]

    async def _execute(self, key: Hashable, lane: _Lane, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            x = batch[0].x[None] if len(batch) == 1 else np.stack([item.x for item in batch])  # a lone photo: no copy
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
            lane.in_flight -= 1
            lane.finished.set()
            lane.slots.release()
            if self._on_batch is not None:
                self._on_batch(key, len(batch), time.perf_counter() - started)

    async def aclose(self) -> None:
        """Stop the schedulers; requests still queued get a CancelledError."""
        self._closed = True
        await cancel_and_wait(list(self._schedulers.values()) + list(self._running))
        for lane in self._lanes.values():
            while not lane.queue.empty():
                item = lane.queue.get_nowait()
                if not item.future.done():
                    item.future.cancel()
