"""Automatic rollback: a version just switched to is on probation until it has proved itself.

During `HealthPolicy.probation_s` after a switch, the monitor counts the requests the version
answered and those that failed inside the model (a bad photo is the photo's fault and does not
count). When more than `max_error_rate` of at least `min_requests` requests failed, or the agent
crashed `max_crashes` times running that version (counted at start from the state file), it asks the
manager to roll back, once, with the reason in words.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ..store import ModelRef
from .options import HealthPolicy
from .state import AgentState

Unhealthy = Callable[[ModelRef, str, dict[str, Any]], None]


class HealthMonitor:
    """Counts the probation version's requests and errors; calls `on_unhealthy(ref, reason, details)`."""

    def __init__(self, policy: HealthPolicy, state: AgentState, on_unhealthy: Unhealthy) -> None:
        self.policy = policy
        self.state = state
        self.on_unhealthy = on_unhealthy
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._fired = False

    def on_probation(self) -> ModelRef | None:
        probation = self.state.probation
        return ModelRef(probation["name"], int(probation["version"])) if probation else None

    def watch(self, ref: ModelRef, previous: ModelRef | None) -> None:
        """Start the probation of `ref` (just switched to from `previous`)."""
        with self._lock:
            self._requests = self._errors = 0
            self._fired = False
        self.state.start_probation(ref, previous)

    def record(self, ref: ModelRef, *, error: bool) -> None:
        """Count one request answered (or failed) by `ref`."""
        probation = self.state.probation
        if not probation or (probation["name"], probation["version"]) != (ref.name, ref.version):
            return
        with self._lock:
            self._requests += 1
            self._errors += int(error)
            requests, errors = self._requests, self._errors
            tripped = (
                not self._fired
                and requests >= self.policy.min_requests
                and errors / requests > self.policy.max_error_rate
            )
            if tripped:
                self._fired = True
        if tripped:
            reason = (
                f"{errors} of {requests} requests failed on {ref} ({errors / requests:.0%}, above the "
                f"{self.policy.max_error_rate:.0%} limit)"
            )
            self.on_unhealthy(ref, reason, {"requests": requests, "errors": errors, "error_rate": round(errors / requests, 4)})

    def after_crash(self, current: ModelRef | None) -> None:
        """At start, after an unclean exit: count a crash against the version on probation."""
        probation = self.on_probation()
        if probation is None or probation != current:
            return
        crashes = self.state.probation_crashed()
        if crashes >= self.policy.max_crashes:
            with self._lock:
                self._fired = True
            self.on_unhealthy(
                probation,
                f"the agent crashed {crashes} times running {probation} (limit {self.policy.max_crashes})",
                {"crashes": crashes},
            )

    def expire(self) -> ModelRef | None:
        """End the probation when its time is up; returns the version that passed it."""
        probation = self.state.probation
        if probation and time.time() - float(probation["started"]) >= self.policy.probation_s:
            self.state.end_probation()
            return ModelRef(probation["name"], int(probation["version"]))
        return None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self._requests, "errors": self._errors}
