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

Faults of the device are not faults of a release:

- a full disk (`DiskFullError`, ENOSPC) is `disk_full`: the manager frees what is safe (partial
  downloads, leftovers, versions beyond current and previous), says so once (log and one status
  report about the version it runs, which no rollout counts as a failure) and tries again with
  backoff until there is room; a newer assignment is tried at once;
- a crash counts against a version only when the agent died while that version was inside the
  interpreter (`CallMarker`); a power cut or a kill between calls counts against none, and a version
  refused for crashes is tried again after `HealthPolicy.crash_retry_s`;
- an installed version whose files are damaged is deleted and downloaded again, never refused.

The assignment's shadow version (a candidate run beside the served one, never served) is the
`ShadowKeeper`'s (`shadow.py`), on this thread after each step: it shares the downloader, the
verifier and the marker, comes after the served version (a newer assignment interrupts its
download; a full disk drops it) and its faults never count against the version served.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..bundles import load_bundle
from ..errors import BundleRejectedError, EdgeRuntimeError, ModelLoadError, StoreError
from ..store import ModelRef, ModelStore
from .assignment import Assignment
from .download import Downloader, DownloadStats
from . import errors as _errors
from .errors import DiskFullError, DownloadError, UpdateRefusedError
from .health import HealthMonitor
from .options import AgentOptions
from .outbox import Outbox, OutboxSender
from .retry import backoff_delay
from .servable import CallMarker, Loader, Servable, ServableHandle
from .state import AgentState

if TYPE_CHECKING:
    from .shadow import ShadowKeeper

log = logging.getLogger("edge_agent.manager")


#: Reports kept in memory while the outbox cannot grow (a full disk); the oldest go first beyond it.
_PENDING_REPORTS = 100


class Reporter:
    """Status reports to the server, through the outbox (durable, sent in order).

    While the disk is full a report waits in memory (the last `_PENDING_REPORTS`) and is queued as
    soon as the outbox has room; the condition is logged once."""

    def __init__(self, outbox: Outbox, sender: OutboxSender, device_id: str) -> None:
        self.outbox = outbox
        self.sender = sender
        self.path = f"/v1/devices/{device_id}/status"
        self.context: Callable[[], dict[str, Any]] = dict  # said in every report (the daemon adds `following`)
        self.pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=_PENDING_REPORTS)
        self.full = False
        self._lock = threading.Lock()

    def status(self, version: int, *, running: bool, load_ok: bool, smoke_test_ok: bool | None,
               message: str | None = None, details: dict[str, Any] | None = None) -> None:
        body = {"version": version, "running": running, "load_ok": load_ok, "smoke_test_ok": smoke_test_ok,
                "message": message[:2000] if message else None,
                "details": {"at": time.time(), **self._context(), **(details or {})}}
        with self._lock:
            self.pending.append(body)
        self.drain()

    def _context(self) -> dict[str, Any]:
        try:
            return dict(self.context())
        except Exception:  # noqa: BLE001  (a report is never lost to its context)
            return {}

    def drain(self) -> None:
        """Queue what waits in memory (a no-op when nothing does)."""
        with self._lock:
            queued = False
            while self.pending:
                try:
                    self.outbox.put("status", self.path, self.pending[0])
                except DiskFullError as exc:
                    if not self.full:
                        log.warning("status reports wait in memory: %s", exc)
                    self.full = True
                    break
                self.pending.popleft()
                queued = True
            else:
                if self.full:
                    log.info("the outbox has room again: status reports are queued")
                self.full = False
        if queued:
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
        self.shadow: ShadowKeeper | None = None  # set by the daemon: the assignment's shadow version
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
        self.downloader.superseded = self._superseded_by
        #: What is inside the interpreter (and what was, when the last run died): see `CallMarker`.
        self.marker = CallMarker(self.state.path.parent / "in_model")
        #: Set while the disk is full: since when, why, for which version (None: there is room).
        self.disk_full: dict[str, Any] | None = None
        self._notes: dict[str, Any] = {}  # said in the next status report (a damaged outbox moved aside)

    # --- called from other threads --------------------------------------------------------------

    def aspire(self, assignment: Assignment) -> None:
        """The source says what to run (only the latest matters); a download for another version stops."""
        self._aspired = assignment
        if self.updating is not None and assignment.ref != self.updating:
            self.downloader.interrupt()
        elif self._shadow_superseded(assignment) is not None:
            self.downloader.interrupt()
        self._wake.set()

    def _superseded_by(self) -> str | None:
        """The newer assignment that replaces the version being downloaded, if one came."""
        aspired, updating = self._aspired, self.updating
        if aspired is not None and updating is None:
            return self._shadow_superseded(aspired)
        if aspired is None or updating is None or aspired.ref == updating:
            return None
        return f"the newer assignment {aspired.ref}" if aspired.ref else "the server's newer assignment"

    def _shadow_superseded(self, aspired: Assignment) -> str | None:
        """The newer assignment that stops the shadow download in flight: another shadow, or a version to switch to."""
        installing = self.shadow.updating if self.shadow is not None else None
        if installing is None:
            return None
        if aspired.shadow_ref != installing:
            return f"the newer assignment's shadow {aspired.shadow_ref}" if aspired.shadow_ref else "the newer assignment (no shadow)"
        current = self.handle.current
        if aspired.ref is not None and (current is None or current.ref != aspired.ref) and self.state.refused(aspired.ref) is None:
            return f"the newer assignment {aspired.ref}"
        return None

    def unhealthy(self, ref: ModelRef, reason: str, details: dict[str, Any]) -> None:
        """The health monitor says `ref` must go."""
        self._unhealthy = (ref, reason, details)
        self._wake.set()

    # --- life cycle -----------------------------------------------------------------------------

    def load_at_start(self, crashed: bool) -> None:
        """Before serving: remove leftovers, count a crash against the version that was inside the
        interpreter when the last run died (if any), then load the current version."""
        self._clean_start()
        if crashed:
            self._count_crash()
        if self._unhealthy is not None:
            self._roll_back(*self._take_unhealthy())
        if self.handle.current is None:
            self._load_current()

    def _count_crash(self) -> None:
        found = self.marker.found
        inside = [(ref, step) for ref, step in found if not step.startswith("shadow_")]  # a candidate's crash is its own
        if self.shadow is not None and len(inside) < len(found) and not self.state.rebooted:
            self.shadow.crashed(found)
        if self.state.rebooted:
            log.warning("the device restarted since the last run (a power cut or a reboot): counted against no version")
            return
        if not inside and found:
            return
        if not inside:
            log.warning("the last run was killed between model calls (a kill or a power cut): counted against no version")
            return
        what = ", ".join(f"{ref} ({step})" for ref, step in inside)
        log.warning("the last run died while %s was inside the interpreter: counted as a crash of that version", what)
        loading = (self.state.snapshot().get("loading") or {}).get("key")
        if any(f"{ref.name}:{ref.version}" == loading and step in ("load", "smoke_test") for ref, step in inside):
            self.state.loading_crashed()
        if self.health is not None:
            probation = self.health.on_probation()
            if probation is not None and any(ref == probation for ref, _ in inside):
                self.health.after_crash(self.store.current())

    def _clean_start(self) -> None:
        """Remove what killed work left: half-copied versions, temporary files, staging folders."""
        removed = [str(p) for p in self.store.clean_leftovers()]
        if self.shadow is not None:
            removed += [str(p) for p in self.shadow.store.clean_leftovers()]
        folder = self.downloader.folder
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_dir() and path.name.startswith("bundle-"):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path))
        agent_dir = self.state.path.parent
        for path in agent_dir.glob(".*.json-*") if agent_dir.is_dir() else ():
            path.unlink(missing_ok=True)
            removed.append(str(path))
        if removed:
            log.info("removed %d leftover(s) of interrupted work: %s", len(removed), ", ".join(removed[:5]))
        recovered = getattr(self.reporter.outbox, "recovered", None)
        if recovered:
            self._event("outbox_recovered", None, recovered)
            self._notes["outbox_lost"] = recovered

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.marker.close()

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
        self.reporter.drain()
        if self._unhealthy is not None:
            self._roll_back(*self._take_unhealthy())
        if self.health is not None and (passed := self.health.expire()) is not None:
            self._event("probation_passed", passed, f"{passed} passed its probation")
        assignment = self._aspired
        if assignment is None:
            return
        key = (assignment.ref, assignment.etag)
        if key != self._attempted or (self._retry_at is not None and time.monotonic() >= self._retry_at):
            self._attempted = key
            self._retry_at = None
            self._reconcile(assignment)
        if self.shadow is not None and self._aspired is assignment and self.updating is None:
            try:
                self.shadow.step(assignment)
            except Exception:  # noqa: BLE001  (a shadow bug never stops the served version's updates)
                log.exception("the shadow step failed")

    # --- reconciling ----------------------------------------------------------------------------

    def _reconcile(self, assignment: Assignment) -> None:
        target = assignment.ref
        self.state.forget_refusals_except(target)
        if target is None:
            return  # nothing assigned yet: keep serving what we have
        self._drop_stale_downloads(assignment)
        current = self.handle.current
        if current is not None and current.ref == target:
            self._failures = 0
            self._room_again()
            return
        refusal = self.state.refused(target)
        if refusal is not None:
            if refusal.get("retry_at") is not None:
                self._retry_at = time.monotonic() + max(0.0, float(refusal["retry_at"]) - time.time())
            log.info("not switching to %s: refused earlier (%s)", target, refusal["reason"])
            return
        self.updating = target
        try:
            self._switch_to(target, assignment)
            self._failures = 0
            self.last_error = None
            self._room_again()
        except UpdateRefusedError as exc:
            self._refuse(target, exc)
        except DiskFullError as exc:
            self._on_disk_full(target, exc)
        except _Superseded as exc:
            self._event("superseded", target, f"stopped updating to {target}: {exc}")
            self._attempted = None  # a newer assignment is waiting: take it at once
            self._wake.set()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._on_disk_full(target, DiskFullError(f"no room on the disk for {target}: {exc.strerror or exc}"))
            else:
                self._schedule_retry(f"cannot switch to {target} yet: {exc}")
        except EdgeRuntimeError as exc:  # the network: try again later
            self._schedule_retry(f"cannot switch to {target} yet: {exc}")
        finally:
            self.updating = None

    def _switch_to(self, target: ModelRef, assignment: Assignment) -> None:
        started = time.perf_counter()
        stats = DownloadStats()
        installed = (self.store.path_of(target) / "manifest.json").is_file()
        if installed:
            try:
                self._verifier(target)(self.store.path_of(target))
            except BundleRejectedError as exc:  # damaged on this disk: not the release's fault
                log.warning("the installed %s is damaged (%s): downloading it again", target, exc)
                self._event("damaged", target, f"the installed {target} is damaged: downloading it again")
                self.store.discard(target)
                installed = False
        if not installed:
            staging = self._staging_from_shadow(target) or self._download(assignment, stats)
            try:
                self.store.install(staging, target, verify=self._verifier(target), link=True)
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
        self.state.accepted(target)
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

    def _staging_from_shadow(self, target: ModelRef) -> Path | None:
        """A bundle folder of `target` linked from its verified shadow copy (a promotion downloads nothing)."""
        folder = self.shadow.installed(target) if self.shadow is not None else None
        if folder is None:
            return None
        staging = self.downloader.folder / f"bundle-{target.name}-{target.version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in folder.iterdir():
            if path.is_file():
                _link_or_copy(path, staging / path.name)
        try:
            self._verifier(target)(staging)
        except BundleRejectedError as exc:
            log.warning("the shadow copy of %s is damaged (%s): downloading it", target, exc)
            shutil.rmtree(staging, ignore_errors=True)
            return None
        log.info("%s: using the files verified for its shadow run (nothing to download)", target)
        return staging

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
                f"{target} crashed the agent {crashes} times while loading", step="load", load_ok=False, smoke_test_ok=None,
                retry_s=self.options.health.crash_retry_s,
            )
        started = time.perf_counter()
        try:
            try:
                new = self._load(target)
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
        refusal = self.state.refuse(target, exc.step, str(exc), retry_s=exc.retry_s)
        if refusal.get("retry_at") is not None:
            self._retry_at = time.monotonic() + max(0.0, refusal["retry_at"] - time.time())
        state = self.store.state()
        if target not in (state.current, state.previous) and (self.store.path_of(target) / "manifest.json").is_file():
            try:
                self.store.remove(target)
            except StoreError:
                pass
        self.downloader.clear()
        self.last_error = str(exc)
        self.reporter.status(target.version, running=False, load_ok=exc.load_ok, smoke_test_ok=exc.smoke_test_ok,
                             message=f"refused ({exc.step}): {exc}",
                             details={"refused": True, "step": exc.step, **({"retry_at": refusal["retry_at"]} if exc.retry_s else {})})
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
            restored = self._load(previous)
        except EdgeRuntimeError as exc:
            self.state.end_probation()
            self._event("rollback_failed", bad, f"{reason}; the previous version {previous} does not load: {exc}")
            return
        self.store.rollback()
        self.handle.swap(restored)
        crashed = "crashes" in details  # a transient reason: tried again later
        self.state.refuse(bad, "health", reason, retry_s=self.options.health.crash_retry_s if crashed else None)
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
                servable = self._load(ref)
            except BundleRejectedError as exc:  # damaged on this disk: delete it, the server's copy is fine
                log.error("the installed %s is damaged (%s): deleted it; it is downloaded again when assigned", ref, exc)
                self.last_error = f"{ref} was damaged: {exc}"
                self._event("damaged", ref, f"the installed {ref} was damaged and deleted")
                try:
                    self.store.discard(ref)
                except (StoreError, OSError) as error:
                    log.warning("could not delete the damaged %s: %s", ref, error)
                continue
            except EdgeRuntimeError as exc:
                log.error("cannot load %s from the store: %s", ref, exc)
                self.last_error = f"cannot load {ref}: {exc}"
                continue
            if ref != self.store.state().current:
                self.store.use(ref)
            self.handle.swap(servable)
            details, self._notes = dict(self._notes), {}
            self.reporter.status(ref.version, running=True, load_ok=True, smoke_test_ok=None, message="serving after start",
                                 details=details)
            self._event("loaded", ref, f"serving {ref} from the local store")
            return

    def _load(self, ref: ModelRef) -> Servable:
        """Load `ref` with the loader, noted as inside the interpreter (a death now is its crash)."""
        with self.marker.inside(ref, "load"):
            servable = self.loader(self.store.path_of(ref))
        servable.marker = self.marker
        return servable

    # --- the disk -------------------------------------------------------------------------------

    def _on_disk_full(self, target: ModelRef, exc: DiskFullError) -> None:
        """`disk_full`: free what is safe, say so once, try again with backoff (never a refusal)."""
        if self.shadow is not None and self.shadow.runner.current is not None:  # the version served comes first
            self.shadow.drop(self.shadow.runner.current.ref, f"the disk has no room for {target}")
        freed = self._free_space()
        first = self.disk_full is None or self.disk_full.get("version") != target.version
        self.disk_full = {"since": (self.disk_full or {}).get("since", time.time()), "version": target.version,
                          "reason": str(exc), "needed": exc.needed, "free": exc.free}
        delay = backoff_delay(self._failures, self.options.retry)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        self.last_error = f"disk_full: {exc}"
        if not first:
            log.debug("still no room for %s; trying again in %.0f s", target, delay)
            return
        running = self.handle.current
        log.warning("disk_full: cannot install %s: %s (freed %d bytes of partial downloads, leftovers and old versions; "
                    "said once, tried again every %.0f s at most; still serving %s)", target, exc, freed,
                    self.options.retry.max_s, running.ref if running else "nothing")
        self._event("disk_full", target, f"disk_full: cannot install {target}: {exc}")
        if running is not None:  # a report about the version that runs: no rollout counts it as a failure
            self.reporter.status(running.version, running=True, load_ok=True, smoke_test_ok=None,
                                 message=f"disk_full: cannot install v{target.version}: {exc}"[:2000],
                                 details={"state": "disk_full", "assigned": target.version, "needed": exc.needed,
                                          "free": exc.free, "freed": freed})

    def _room_again(self) -> None:
        if self.disk_full is not None:
            log.info("the disk has room again (it was full since %s)", time.strftime("%H:%M:%S", time.localtime(self.disk_full["since"])))
            self.disk_full = None

    def _free_space(self) -> int:
        """Delete what is safe to delete: partial downloads, leftovers, versions beyond current and previous."""
        before = _usage(self.store.home)
        try:
            self.downloader.clear()
            self.store.clean_leftovers()
        except OSError as exc:
            log.debug("freeing space: %s", exc)
        self._prune()
        return max(0, before - _usage(self.store.home))

    def _drop_stale_downloads(self, assignment: Assignment) -> None:
        """Partial downloads of files the assignment no longer lists go (the disk is not theirs)."""
        folder = self.downloader.folder
        if not folder.is_dir():
            return
        wanted = {remote.sha256 for remote in assignment.files.values()}
        if assignment.shadow is not None:
            wanted |= {remote.sha256 for remote in assignment.shadow.files.values()}
        for path in folder.iterdir():
            if path.is_file() and path.name.split(".")[0] not in wanted:
                path.unlink(missing_ok=True)

    def _prune(self) -> None:
        try:
            self.store.prune()
        except (StoreError, OSError) as exc:
            log.warning("could not remove old versions: %s", exc)

    def _event(self, kind: str, ref: ModelRef | None, message: str, details: dict[str, Any] | None = None) -> None:
        self.events.append({"at": time.time(), "kind": kind, "version": ref.version if ref else None, "message": message,
                            **({"details": details} if details else {})})
        if kind in ("retry", "disk_full", "outbox_recovered"):
            return  # logged where it happened
        level = logging.WARNING if kind in ("refused", "rolled_back", "rollback_failed", "rollback_impossible") else logging.INFO
        log.log(level, message)


#: A newer assignment arrived during a download (raised by the downloader, where it knows the case).
_Superseded: type[BaseException] = getattr(_errors, "DownloadSupersededError", type("_NeverRaised", (Exception,), {}))


def _usage(folder: Path) -> int:
    """Bytes the files under `folder` hold on the disk."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
