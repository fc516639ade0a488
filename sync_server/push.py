"""Push: wake the Server-Sent Events streams of devices whose assignment may have changed.

A change made by this instance wakes the streams of that model at once (`notify`). Changes made by
another instance (or by `sync-server publish` on the same database) are seen by `watch_revision`, which
polls the shared assignment revision every `push_poll_s` seconds and wakes every stream. A woken stream
recomputes its device's assignment and sends an event only when the ETag changed, so spurious wake-ups
cost one small query and nothing on the wire.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("sync_server.push")


class Subscription:
    """One stream's doorbell."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._event = asyncio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """True when rung (and re-armed), False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self._event.clear()
        return True


class PushHub:
    """The set of open device streams, by model. `notify` may be called from any thread."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notifications = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def streams(self) -> int:
        return sum(len(s) for s in self._subscriptions.values())

    def subscribe(self, model: str) -> Subscription:
        subscription = Subscription(model)
        self._subscriptions.setdefault(model, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        group = self._subscriptions.get(subscription.model)
        if group is not None:
            group.discard(subscription)
            if not group:
                del self._subscriptions[subscription.model]

    def notify(self, model: str | None = None) -> None:
        """Wake the streams of `model` (all streams when None). Thread-safe."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._ring(model)
        else:
            loop.call_soon_threadsafe(self._ring, model)

    def _ring(self, model: str | None) -> None:
        self.notifications += 1
        groups = self._subscriptions.values() if model is None else [self._subscriptions.get(model, set())]
        for group in list(groups):
            for subscription in list(group):
                subscription.ring()


async def watch_revision(
    read_revision: Callable[[], Awaitable[int]],
    interval_s: float,
    on_change: Callable[[], None],
    only_local: Callable[[int, int], bool] | None = None,
) -> None:
    """Call `on_change` whenever the shared revision moves, unless `only_local(last, current)` says this
    instance made every change in between (its streams were told at once); runs until cancelled."""
    last: int | None = None
    while True:
        try:
            current = await read_revision()
            if last is not None and current != last and not (only_local and only_local(last, current)):
                on_change()
            last = current
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be briefly away; keep watching  # noqa: BLE001
            log.warning("cannot read the assignment revision", extra={"error": str(exc)})
        await asyncio.sleep(interval_s)
