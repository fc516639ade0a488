"""Keep TF Serving's model config in step with the channels, moving labels only onto loaded versions.

In TF Serving's terms the sync server is the *source*: it announces the aspired versions of each
model (`model_version_policy`) and the label of each channel (`version_labels`). TF Serving's manager
loads a new version before it unloads an old one (availability-preserving), but refuses a config whose
label names a version that is not loaded yet. So each reconciliation writes the config twice:

    1. the versions in use now, plus the versions the current labels point at; labels unchanged
    2. wait until every version in use is AVAILABLE (`GET /v1/models/NAME`; without TF Serving: at once)
    3. the versions in use and the new labels

A version that does not load within `load_timeout_s` keeps its old label (and the version it points at
stays loaded); the problem is reported by `problems` (shown by /readyz and the metrics). A new change
arriving while step 2 waits starts the reconciliation over with the newest state.

Every `watch_s` seconds the reconciler asks TF Serving whether it still holds the labelled versions. A
restarted TF Serving holds none and refuses the config (its labels name versions it has not loaded):
then step 1 writes the config with labels only on versions TF Serving has loaded, and steps 2 and 3
move them back once the versions load. `backend_problem` says when a model in use has no version
loaded at all (/readyz is not ready then).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Awaitable, Callable

from .errors import SyncServerError
from .serving_repo import ServedModel, ServingRepository

log = logging.getLogger("sync_server.serving")

StatusFn = Callable[[str], Awaitable[dict[int, str]]]


class ServingReconciler:
    """Runs reconciliations when triggered (thread-safe `trigger`) and every `resync_s` seconds."""

    def __init__(
        self,
        desired: Callable[[], dict[str, ServedModel]],
        repository: ServingRepository,
        *,
        model_status: StatusFn | None,
        load_timeout_s: float = 300.0,
        poll_s: float = 1.0,
        resync_s: float = 60.0,
        watch_s: float = 5.0,
        preload: Callable[[str, int], Awaitable[None]] | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self._desired = desired
        self.repository = repository
        self._model_status = model_status  # None: no TF Serving to wait for
        self.load_timeout_s = load_timeout_s
        self.poll_s = poll_s
        self.resync_s = resync_s
        self.watch_s = watch_s
        self.in_use: dict[str, set[int]] = {}  # the versions the channels use, as of the last reconciliation
        self._preload = preload
        self._executor = executor  # where database reads run (None: the loop's default executor)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.problems: dict[str, str] = {}
        self.available: dict[str, set[int]] = {}
        self.runs = 0
        self.idle = asyncio.Event()

    def trigger(self) -> None:
        """Ask for a reconciliation soon. Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            same = asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            self._set()
        else:
            loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        self.idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Reconcile now, then whenever triggered; runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake.set()
        next_resync = time.monotonic() + self.resync_s
        while True:
            wait_s = max(0.0, next_resync - time.monotonic())
            if self._model_status is not None:
                wait_s = min(wait_s, self.watch_s)
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except asyncio.TimeoutError:
                if time.monotonic() < next_resync and not await self._labels_lost():
                    continue
            next_resync = time.monotonic() + self.resync_s
            self._wake.clear()
            self.idle.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the loop alive; the next trigger retries  # noqa: BLE001
                log.error("TF Serving config update failed", extra={"error": str(exc)}, exc_info=not isinstance(exc, SyncServerError))
                self.problems["_config"] = f"the TF Serving config could not be written: {exc}"
            if not self._wake.is_set():
                self.idle.set()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no reconciliation is pending (tests and the CLI)."""
        await asyncio.wait_for(self.idle.wait(), timeout)

    def backend_problem(self) -> str | None:
        """Why TF Serving cannot serve a model in use (it holds none of its versions), or None."""
        if self._model_status is None:
            return None
        for name in sorted(self.in_use):
            versions = self.in_use[name]
            if versions and not versions & self.available.get(name, set()):
                listed = ", ".join(map(str, sorted(versions)))
                return f"TF Serving has no version of {name} loaded (in use: {listed}); the config is being rewritten"
        return None

    async def _status(self, name: str) -> dict[int, str] | None:
        """{version: state} from TF Serving; None when it cannot be asked now."""
        assert self._model_status is not None
        try:
            return await self._model_status(name)
        except SyncServerError as exc:
            log.info("TF Serving status unavailable", extra={"model": name, "error": exc.message})
            return None

    async def _labels_lost(self) -> bool:
        """Ask TF Serving about every model in the config; True when a labelled version is not loaded
        (TF Serving restarted, or dropped it): the config must be written again."""
        lost = False
        for name, served in self.repository.written().items():
            states = await self._status(name)
            if states is None:  # unreachable: /readyz says so; nothing to rewrite before it answers
                continue
            self.available[name] = {v for v, state in states.items() if state == "AVAILABLE"}
            missing = sorted(set(served.labels.values()) - self.available[name])
            if missing:
                log.warning("TF Serving lost labelled versions; rewriting its config",
                            extra={"model": name, "versions": missing})
                lost = True
        return lost

    async def reconcile(self) -> None:
        """One reconciliation (the three steps of the module docstring)."""
        self.runs += 1
        desired = await asyncio.get_running_loop().run_in_executor(self._executor, self._desired)
        written = self.repository.written()
        self.in_use = {name: set(want.versions) for name, want in desired.items()}

        # Step 1: load what is needed, keep the labels where they are (on versions TF Serving holds:
        # after a restart it holds none, and refuses a config with a label on a version not loaded).
        step1: dict[str, ServedModel] = {}
        for name in set(desired) | set(written):
            want = desired.get(name)
            old = written.get(name)
            versions = set(want.versions if want else ()) | set(old.labels.values() if old else ())
            labels = dict(old.labels) if old else {}
            if labels and self._model_status is not None:
                states = await self._status(name)
                if states is not None:
                    self.available[name] = {v for v, state in states.items() if state == "AVAILABLE"}
                    labels = {label: v for label, v in labels.items() if v in self.available[name]}
            if versions:
                step1[name] = ServedModel(frozenset(versions), labels)
        if self.repository.write(step1):
            log.info("TF Serving config written (loading)", extra={"models": {n: m.to_dict() for n, m in step1.items()}})

        if self._preload is not None:
            for name, want in desired.items():
                for version in sorted(want.versions):
                    await self._preload(name, version)

        # Step 2: wait until the versions in use are loaded.
        wanted = {name: set(want.versions) for name, want in desired.items()}
        available = await self._wait_available(wanted)
        if available is None:  # a newer change arrived: start over with it
            return
        self.available.update(available)

        # Step 3: move the labels onto loaded versions; drop what nothing uses.
        final: dict[str, ServedModel] = {}
        problems: dict[str, str] = {}
        for name, want in desired.items():
            old = written.get(name)
            versions = set(want.versions)
            labels: dict[str, int] = {}
            for label, version in want.labels.items():
                if version in available.get(name, set()):
                    labels[label] = version
                elif old is not None and label in old.labels and old.labels[label] in available.get(name, set()):
                    labels[label] = old.labels[label]  # keep the old label, and its version loaded
                    versions.add(old.labels[label])
            missing = sorted(set(want.versions) - available.get(name, set()))
            if missing:
                problems[name] = (
                    f"TF Serving has not loaded version(s) {', '.join(map(str, missing))} of {name} within "
                    f"{self.load_timeout_s:g} s; their labels stay where they were"
                )
            final[name] = ServedModel(frozenset(versions), labels)
        if self.repository.write(final):
            log.info("TF Serving config written (labels)", extra={"models": {n: m.to_dict() for n, m in final.items()}})
        self.problems = problems
        for name, text in problems.items():
            log.warning("version not loaded", extra={"model": name, "problem": text})

    async def _wait_available(self, wanted: dict[str, set[int]]) -> dict[str, set[int]] | None:
        if self._model_status is None:
            return {name: set(versions) for name, versions in wanted.items()}
        deadline = time.monotonic() + self.load_timeout_s
        available: dict[str, set[int]] = {}
        while True:
            for name in wanted:
                try:
                    states = await self._model_status(name)
                except SyncServerError as exc:
                    log.info("TF Serving status unavailable", extra={"model": name, "error": exc.message})
                    states = {}
                available[name] = {v for v, state in states.items() if state == "AVAILABLE"}
            if all(versions <= available.get(name, set()) for name, versions in wanted.items()):
                return available
            if time.monotonic() >= deadline:
                return available
            if self._wake.is_set():
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
                return None
            except asyncio.TimeoutError:
                pass
