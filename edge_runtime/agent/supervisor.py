"""The supervisor: a thread that restarts any of the agent's loops that died, and says so.

Each loop (the follower, the manager, the outbox sender with the telemetry it ticks) guards its own
rounds, so a dead loop is a bug nobody foresaw; the supervisor still checks every `check_s` seconds,
restarts it, logs it once per loop and calls `on_restart(name, why)` (the agent reports it to the
server). A loop restarted more than `max_restarts_per_hour` times is restarted less often (backoff),
never given up on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("edge_agent.supervisor")


@dataclass
class _Watched:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]
    restarts: list[float] = field(default_factory=list)
    not_before: float = 0.0


class Supervisor:
    """Watches named loops: `watch(name, alive, restart)`, then `start()`; `stop()` before the loops stop."""

    def __init__(self, check_s: float = 1.0, on_restart: Callable[[str, str], None] = lambda _name, _why: None,
                 max_restarts_per_hour: int = 20) -> None:
        self.check_s = check_s
        self.on_restart = on_restart
        self.max_restarts_per_hour = max_restarts_per_hour
        self.restarts: dict[str, int] = {}
        self._watched: list[_Watched] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, alive: Callable[[], bool], restart: Callable[[], None]) -> None:
        self._watched.append(_Watched(name, alive, restart))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edge-agent-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            for watched in self._watched:
                try:
                    self._check(watched)
                except Exception:  # the supervisor outlives a failed restart  # noqa: BLE001
                    log.exception("restarting the %s loop failed; trying again", watched.name)

    def _check(self, watched: _Watched) -> None:
        if self._stop.is_set() or watched.alive():
            return
        now = time.monotonic()
        if now < watched.not_before:
            return
        watched.restarts = [t for t in watched.restarts if now - t < 3600] + [now]
        if len(watched.restarts) > self.max_restarts_per_hour:
            watched.not_before = now + 60.0
        why = f"the {watched.name} loop stopped"
        count = self.restarts.get(watched.name, 0) + 1
        self.restarts[watched.name] = count
        log.log(logging.ERROR if count == 1 else logging.DEBUG, "%s; restarting it (restart %d)", why, count)
        watched.restart()
        self.on_restart(watched.name, why)
