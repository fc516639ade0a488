"""The manager: reconciles the version the source aspires to with the version being served.

One step at a time, on its own thread, under a named policy:

    availability (default)  download → verify → load → smoke test → swap → unload the old version.
                            Requests never wait; memory holds two versions during the switch.
    resource                unload the old version first, then load the new one: half the memory,
                            but requests get 503 `updating` while it loads (for very small devices).

A candidate that fails any step is deleted, reported to the server and not tried again until the
server assigns another version; the device keeps serving what it had. Network failures are retried
with capped backoff (downloads resume). A version switched to is watched by the `HealthMonitor`; when
it trips, the manager rolls back to the previous version and reports why.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..bundles import load_bundle
from ..errors import BundleRejectedError, EdgeRuntimeError, ModelLoadError, StoreError
from ..store import ModelRef, ModelStore
from .assignment import Assignment
from .download import Downloader, DownloadStats
from .errors import DownloadError, UpdateRefusedError
from .health import HealthMonitor
from .options import AgentOptions
from .outbox import Outbox, OutboxSender
from .retry import backoff_delay
from .servable import Loader, Servable, ServableHandle
from .state import AgentState

log = logging.getLogger("edge_agent.manager")


class Reporter:
    """Status reports to the server, through the outbox (durable, sent in order)."""

    def __init__(self, outbox: Outbox, sender: OutboxSender, device_id: str) -> None:
        self.outbox = outbox
        self.sender = sender
        self.path = f"/v1/devices/{device_id}/status"

    def status(self, version: int, *, running: bool, load_ok: bool, smoke_test_ok: bool | None,
               message: str | None = None, details: dict[str, Any] | None = None) -> None:
        body = {"version": version, "running": running, "load_ok": load_ok, "smoke_test_ok": smoke_test_ok,
                "message": message[:2000] if message else None, "details": {"at": time.time(), **(details or {})}}
        self.outbox.put("status", self.path, body)
        self.sender.kick()


class Manager:
    """Keeps the served version equal to the aspired one, safely; see the module docstring."""

    def __init__(
        self,
        *,
        store: ModelStore,
        handle: ServableHandle,
        loader: Loader,
        downloader: Downloader,
        state: AgentState,
        reporter: Reporter,
        options: AgentOptions,
        public_key: Path,
    ) -> None:
        self.store = store
        self.handle = handle
        self.loader = loader
        self.downloader = downloader
        self.state = state
        self.reporter = reporter
        self.options = options
        self.public_key = public_key
        self.health: HealthMonitor | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self.updating: ModelRef | None = None
        self.last_error: str | None = None
        self._aspired: Assignment | None = None
        self._attempted: tuple[ModelRef | None, str | None] | None = None
        self._unhealthy: tuple[ModelRef, str, dict[str, Any]] | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.downloader.stop = self._stop

    # --- called from other threads --------------------------------------------------------------

    def aspire(self, assignment: Assignment) -> None:
        """The source says what to run (only the latest matters)."""
        self._aspired = assignment
        self._wake.set()

    def unhealthy(self, ref: ModelRef, reason: str, details: dict[str, Any]) -> None:
        """The health monitor says `ref` must go."""
        self._unhealthy = (ref, reason, details)
        self._wake.set()

    # --- life cycle -----------------------------------------------------------------------------

    def load_at_start(self, crashed: bool) -> None:
        """Before serving: count a crash against the version on probation, then load the current version."""
        if crashed:
            self.state.loading_crashed()
            if self.health is not None:
                self.health.after_crash(self.store.current())
        if self._unhealthy is not None:
            self._roll_back(*self._take_unhealthy())
        if self.handle.current is None:
            self._load_current()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = 1.0 if self._retry_at is None else max(0.0, min(1.0, self._retry_at - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except Exception as exc:  # the manager must outlive any bug in one step  # noqa: BLE001
                log.exception("the manager's step failed")
                self._schedule_retry(f"unexpected error: {exc}")

    def _step(self) -> None:
        if self._unhealthy is not None:
            self._roll_back(*self._take_unhealthy())
        if self.health is not None and (passed := self.health.expire()) is not None:
            self._event("probation_passed", passed, f"{passed} passed its probation")
        assignment = self._aspired
        if assignment is None:
            return
        key = (assignment.ref, assignment.etag)
        if key == self._attempted and (self._retry_at is None or time.monotonic() < self._retry_at):
            return
        self._attempted = key
        self._retry_at = None
        self._reconcile(assignment)

    # --- reconciling ----------------------------------------------------------------------------

    def _reconcile(self, assignment: Assignment) -> None:
        target = assignment.ref
        self.state.forget_refusals_except(target)
        if target is None:
            return  # nothing assigned yet: keep serving what we have
        current = self.handle.current
        if current is not None and current.ref == target:
            self._failures = 0
            return
        refusal = self.state.refused(target)
        if refusal is not None:
            log.info("not switching to %s: refused earlier (%s)", target, refusal["reason"])
            return
        self.updating = target
        try:
            self._switch_to(target, assignment)
            self._failures = 0
            self.last_error = None
        except UpdateRefusedError as exc:
            self._refuse(target, exc)
        except (EdgeRuntimeError, OSError) as exc:  # the network, a full disk: try again later
            self._schedule_retry(f"cannot switch to {target} yet: {exc}")
        finally:
            self.updating = None

    def _switch_to(self, target: ModelRef, assignment: Assignment) -> None:
        started = time.perf_counter()
        stats = DownloadStats()
        installed = (self.store.path_of(target) / "manifest.json").is_file()
        if not installed:
            staging = self._download(assignment, stats)
            try:
                self.store.install(staging, target, verify=self._verifier(target))
            except BundleRejectedError as exc:
                raise UpdateRefusedError(str(exc), step="signature", load_ok=False, smoke_test_ok=None) from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        download_s = time.perf_counter() - started
        old: Servable | None = None
        if self.options.policy == "resource" and self.handle.current is not None:
            old = self.handle.swap(None, wait_s=self.options.timeouts.request_s)
        try:
            new, load_ms, smoke = self._load_candidate(target)
        except UpdateRefusedError:
            if old is not None:
                self._load_current()
            raise
        previous = self.store.state().current
        self.store.use(target)
        replaced = self.handle.swap(new)
        if self.health is not None:
            self.health.watch(target, previous if previous != target else None)
        self.downloader.clear()
        self._prune()
        total_s = time.perf_counter() - started
        details = {
            "previous": previous.version if previous else None,
            "download": stats.to_dict(),
            "download_s": round(download_s, 3),
            "load_ms": round(load_ms, 1),
            "smoke_test": smoke,
            "switch_s": round(total_s, 3),
            "policy": self.options.policy,
        }
        self.reporter.status(target.version, running=True, load_ok=True, smoke_test_ok=True, details=details)
        was = previous or (replaced.ref if replaced else None)
        message = f"switched to {target}" + (f" from v{was.version}" if was else "") + (
            f" (downloaded {stats.bytes_received} bytes" + (f", resumed at {stats.resumed_from}" if stats.resumed_from else "")
            + f"; load {load_ms:.0f} ms; smoke test {sum(c['passed'] for c in smoke['cases'])}/{len(smoke['cases'])})"
        )
        self._event("switched", target, message, details)

    def _download(self, assignment: Assignment, stats: DownloadStats) -> Path:
        """Fetch the assignment's files (resuming partial ones) into a bundle folder."""
        staging = self.downloader.folder / f"bundle-{assignment.model}-{assignment.version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            self._fetch_all(assignment, stats, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _fetch_all(self, assignment: Assignment, stats: DownloadStats, staging: Path) -> None:
        for name, remote in assignment.files.items():
            try:
                path = self.downloader.fetch(remote, stats)
            except DownloadError as exc:
                if not exc.corrupt:
                    raise
                log.warning("%s; downloading it again from the start", exc)
                try:
                    path = self.downloader.fetch(remote, stats)
                except DownloadError as again:
                    if again.corrupt:
                        raise UpdateRefusedError(str(again), step="files", load_ok=False, smoke_test_ok=None) from again
                    raise
            _link_or_copy(path, staging / name)

    def _verifier(self, target: ModelRef) -> Callable[[Path], object]:
        def verify(path: Path) -> object:
            bundle = load_bundle(path, self.public_key)
            if (bundle.name, bundle.version) != (target.name, target.version):
                raise BundleRejectedError(
                    f"the bundle is {bundle.name} v{bundle.version}, but the server assigned {target}"
                )
            return bundle

        return verify

    def _load_candidate(self, target: ModelRef) -> tuple[Servable, float, dict[str, Any]]:
        crashes = self.state.begin_loading(target)
        if crashes >= self.options.health.max_crashes:
            self.state.end_loading()
            raise UpdateRefusedError(
                f"{target} crashed the agent {crashes} times while loading", step="load", load_ok=False, smoke_test_ok=None
            )
        started = time.perf_counter()
        try:
            try:
                new = self.loader(self.store.path_of(target))
            except BundleRejectedError as exc:
                raise UpdateRefusedError(str(exc), step="signature", load_ok=False, smoke_test_ok=None) from exc
            except (ModelLoadError, EdgeRuntimeError, ValueError) as exc:
                raise UpdateRefusedError(f"{target} does not load: {exc}", step="load", load_ok=False, smoke_test_ok=None) from exc
            load_ms = (time.perf_counter() - started) * 1000
            try:
                smoke = new.smoke_test()
            except Exception as exc:  # noqa: BLE001
                smoke = {"passed": False, "cases": [], "error": str(exc)}
            if not smoke["passed"]:
                new.close()
                failed = [c for c in smoke["cases"] if not c["passed"]]
                what = smoke.get("error") or ", ".join(
                    f"expected {c['expected']}, got {c['got']} (diff {c['max_abs_diff']})" for c in failed
                ) or "no golden cases"
                raise UpdateRefusedError(f"{target} failed its smoke test: {what}", step="smoke_test", load_ok=True, smoke_test_ok=False)
            return new, load_ms, smoke
        finally:
            self.state.end_loading()

    def _refuse(self, target: ModelRef, exc: UpdateRefusedError) -> None:
        self.state.refuse(target, exc.step, str(exc))
        state = self.store.state()
        if target not in (state.current, state.previous) and (self.store.path_of(target) / "manifest.json").is_file():
            try:
                self.store.remove(target)
            except StoreError:
                pass
        self.downloader.clear()
        self.last_error = str(exc)
        self.reporter.status(target.version, running=False, load_ok=exc.load_ok, smoke_test_ok=exc.smoke_test_ok,
                             message=f"refused ({exc.step}): {exc}", details={"refused": True, "step": exc.step})
        self._event("refused", target, f"refused {target} ({exc.step}): {exc}; still serving "
                    f"{self.handle.current.ref if self.handle.current else 'nothing'}")

    def _schedule_retry(self, message: str) -> None:
        delay = backoff_delay(self._failures, self.options.retry)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        self.last_error = message
        log.log(logging.WARNING if self._failures <= 1 else logging.DEBUG, "%s; trying again in %.0f s (still serving %s)",
                message, delay, self.handle.current.ref if self.handle.current else "nothing")
        self._event("retry", self.updating, f"{message}; next try in {delay:.1f} s")

    # --- rolling back ---------------------------------------------------------------------------

    def _take_unhealthy(self) -> tuple[ModelRef, str, dict[str, Any]]:
        item = self._unhealthy
        self._unhealthy = None
        assert item is not None
        return item

    def _roll_back(self, bad: ModelRef, reason: str, details: dict[str, Any]) -> None:
        state = self.store.state()
        if state.current != bad:
            return
        previous = state.previous
        if previous is None or not (self.store.path_of(previous) / "manifest.json").is_file():
            self.state.end_probation()
            self._event("rollback_impossible", bad, f"{reason}; no previous version to roll back to")
            self.reporter.status(bad.version, running=True, load_ok=True, smoke_test_ok=True,
                                 message=f"unhealthy, but there is no previous version to roll back to: {reason}",
                                 details={"unhealthy": True, **details})
            return
        try:
            restored = self.loader(self.store.path_of(previous))
        except EdgeRuntimeError as exc:
            self.state.end_probation()
            self._event("rollback_failed", bad, f"{reason}; the previous version {previous} does not load: {exc}")
            return
        self.store.rollback()
        self.handle.swap(restored)
        self.state.refuse(bad, "health", reason)
        self.state.end_probation()
        message = f"rolled back to v{previous.version}: {reason}"
        self.reporter.status(bad.version, running=False, load_ok=True, smoke_test_ok=True, message=message,
                             details={"rolled_back": True, "rolled_back_to": previous.version, **details})
        self.reporter.status(previous.version, running=True, load_ok=True, smoke_test_ok=None,
                             message=f"rolled back from v{bad.version}: {reason}")
        self._event("rolled_back", bad, f"{bad} {message}", details)

    # --- helpers --------------------------------------------------------------------------------

    def _load_current(self) -> None:
        """Serve the store's current version (or its previous one when current does not load)."""
        state = self.store.state()
        for ref in (self.store.current(), state.previous):
            if ref is None:
                continue
            try:
                servable = self.loader(self.store.path_of(ref))
            except EdgeRuntimeError as exc:
                log.error("cannot load %s from the store: %s", ref, exc)
                self.last_error = f"cannot load {ref}: {exc}"
                continue
            if ref != state.current:
                self.store.use(ref)
            self.handle.swap(servable)
            self.reporter.status(ref.version, running=True, load_ok=True, smoke_test_ok=None, message="serving after start")
            self._event("loaded", ref, f"serving {ref} from the local store")
            return

    def _prune(self) -> None:
        try:
            self.store.prune()
        except (StoreError, OSError) as exc:
            log.warning("could not remove old versions: %s", exc)

    def _event(self, kind: str, ref: ModelRef | None, message: str, details: dict[str, Any] | None = None) -> None:
        self.events.append({"at": time.time(), "kind": kind, "version": ref.version if ref else None, "message": message,
                            **({"details": details} if details else {})})
        if kind == "retry":
            return  # logged by _schedule_retry
        level = logging.WARNING if kind in ("refused", "rolled_back", "rollback_failed", "rollback_impossible") else logging.INFO
        log.log(level, message)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
