"""Shadow evaluation: a candidate version runs beside the served one on a sample of the requests,
off the request path, and its agreement, confidence and latency are reported; it never answers.

`ShadowRunner` is the runtime part. `offer(photo)` is called by the local API after an edge answer
was made: it samples `sample_rate` of the photos into a bounded queue (when full, the photo is
dropped and counted) and returns at once. One background thread, at a lower CPU priority (nice +10)
and with a one-thread interpreter, replays the photo's fitted pixels on the candidate (normalised
with the candidate's own spec; a candidate whose pixel geometry differs skips the photo, counted,
since the photo's bytes are not kept), and records the candidate's top-1 label, score, latency and
whether it agrees with the served answer (`TelemetryRecorder.record_shadow`).

`ShadowKeeper` is the manager's part, run on the manager's thread after each step: when the
assignment names a shadow version and the device's resource policy allows it (`ShadowOptions`:
switched on, not the resource-preserving policy, a model no larger than the limit, the disk keeping
its free margin after the download), it downloads and verifies the candidate with the manager's own
downloader into a separate store (`HOME/shadow/`: never current, never pruned with the served
versions), loads and smoke-tests it, and hands it to the runner. It drops the candidate (unloads and
deletes it) as soon as the assignment no longer names it; a promotion to the served version reuses
its verified files instead of downloading them again.

A shadow fault is never a fault of the served version: its calls into the interpreter are noted in
the `CallMarker` as `shadow_load`, `shadow_smoke_test` and `shadow_invoke`, so a run that died inside
the candidate refuses the candidate (in the state file, reported), not the version served; a
candidate that fails to verify, load or pass its smoke test is refused and reported the same way.

What happens to the candidate is said in status reports about the served version (the server counts
a device on the version it serves; a report about the candidate would claim to serve it), with
`details.shadow = {"version", "state": "running" | "declined" | "refused" | "failed", ...}`: "declined"
has the policy's `cause` (off, policy, model_size, disk) and `reason`; "refused" its `step`
(assignment, signature, files, load, smoke_test, crash) and `reason`. The samples themselves go in
telemetry reports with mode "shadow".
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import BundleRejectedError, EdgeRuntimeError, ModelLoadError, StoreError
from ..store import ModelRef, ModelStore
from .assignment import Assignment, ShadowAssignment
from .download import DownloadStats
from .errors import DiskFullError, DownloadError, DownloadSupersededError, UpdateRefusedError
from .retry import backoff_delay
from .servable import CallMarker, Loader, Servable, ServableHandle

if TYPE_CHECKING:
    from .manager import Manager
    from .serving import ClassifiedPhoto

log = logging.getLogger("edge_agent.shadow")

#: Marker steps of the candidate: a death inside one of them is the candidate's crash, never the served version's.
SHADOW_STEPS = ("shadow_load", "shadow_smoke_test", "shadow_invoke")
#: The background thread's niceness increment (Linux: per thread).
SHADOW_NICE = 10
#: A declined shadow (policy) is looked at again this often, in case the disk got room.
RECHECK_S = 60.0

RecordShadow = Callable[..., None]


class _ShadowMarker:
    """The `CallMarker` seen through a candidate: every step it notes is prefixed `shadow_`."""

    def __init__(self, marker: CallMarker) -> None:
        self.marker = marker

    @contextlib.contextmanager
    def inside(self, ref: ModelRef, what: str) -> Iterator[None]:
        with self.marker.inside(ref, what if what.startswith("shadow_") else f"shadow_{what}"):
            yield


class ShadowRunner:
    """Runs sampled photos on the candidate on one background thread; see the module docstring."""

    def __init__(self, record_shadow: RecordShadow, *, queue_size: int = 16, marker: CallMarker | None = None,
                 nice: int = SHADOW_NICE, on_error: Callable[[ModelRef, str], None] = lambda _ref, _why: None) -> None:
        self.record_shadow = record_shadow
        self.marker = _ShadowMarker(marker or CallMarker())
        self.nice = nice
        self.on_error = on_error
        self.handle = ServableHandle()
        self.sample_rate = 0.0
        self.counts = {"offered": 0, "sampled": 0, "run": 0, "dropped": 0, "skipped_geometry": 0, "errors": 0, "agreements": 0}
        self._queue: queue.Queue[ClassifiedPhoto | None] = queue.Queue(maxsize=queue_size)
        self._digest: tuple[str, str] | None = None  # (served spec's digest, the candidate's) when they match
        self._index: dict[str, int] = {}
        self._random = random.Random()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.native_id: int | None = None  # the shadow thread's id (its niceness is its own)

    # --- the request thread ---------------------------------------------------------------------

    @property
    def current(self) -> Servable | None:
        return self.handle.current

    def offer(self, photo: "ClassifiedPhoto") -> None:
        """A photo the served version answered: queued for the candidate on `sample_rate` of the calls.
        Never blocks and never raises for a full queue (the photo is dropped and counted)."""
        candidate = self.handle.current
        if candidate is None or candidate.ref == photo.ref:
            return
        rate = self.sample_rate
        with self._lock:  # request threads count here together (uncontended: well under a microsecond)
            self.counts["offered"] += 1
            if rate <= 0 or (rate < 1 and self._random.random() >= rate):
                return
            self.counts["sampled"] += 1
            try:
                self._queue.put_nowait(photo)
            except queue.Full:
                self.counts["dropped"] += 1

    # --- the manager's thread -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edge-agent-shadow", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def use(self, candidate: Servable | None, sample_rate: float = 0.0) -> None:
        """Run `candidate` from now on (None: none); the old one closes when its sample is done."""
        if candidate is not None:
            candidate.marker = self.marker  # type: ignore[assignment]  # its calls are noted as shadow steps
            self._index = {label: i for i, label in enumerate(candidate.classifier.labels)}
        self._digest = None
        self.sample_rate = sample_rate
        old = self.handle.swap(candidate)
        if candidate is None:
            self._drain()
        if old is not None and candidate is not None:
            log.info("shadow: %s replaces %s", candidate.ref, old.ref)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._drain()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        self.handle.swap(None)

    def status(self) -> dict[str, Any]:
        current = self.handle.current
        return {"version": current.version if current else None, "sample_rate": self.sample_rate,
                "queued": self._queue.qsize(), **self.counts}

    # --- the shadow thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        try:  # Linux: the niceness of this thread only; the requests' threads keep theirs
            os.setpriority(os.PRIO_PROCESS, self.native_id, min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
        except (OSError, AttributeError):
            pass
        while not self._stop.is_set():
            photo = self._queue.get()
            if photo is None or self._stop.is_set():
                continue
            try:
                self._sample(photo)
            except Exception:  # noqa: BLE001  (the thread outlives any bug in one sample)
                log.exception("shadow: a sample failed")

    def _sample(self, photo: "ClassifiedPhoto") -> None:
        from preprocessing import normalise

        with self.handle.acquire() as candidate:
            if candidate is None or candidate.ref == photo.ref:
                return
            classifier = candidate.classifier
            if not self._same_geometry(photo, classifier.spec):
                self.counts["skipped_geometry"] += 1
                return
            started = time.perf_counter()
            try:
                prepared = normalise(photo.pixels, classifier.spec)
                with self.marker.inside(candidate.ref, "invoke"):
                    categories = classifier.run(prepared)
                top = categories[0]
            except Exception as exc:  # noqa: BLE001  (the candidate's failure: counted, never the request's)
                ms = (time.perf_counter() - started) * 1000
                self.counts["errors"] += 1
                self.record_shadow(candidate.version, photo.ref.version, label_index=None, score=None, agrees=False,
                                   latency_ms=ms, error=True)
                if self.counts["errors"] == 1:
                    log.warning("shadow: %s failed on a photo: %s", candidate.ref, exc)
                self.on_error(candidate.ref, f"{exc.__class__.__name__}: {exc}")
                return
            ms = (time.perf_counter() - started) * 1000
            agrees = top.label == photo.label
            self.counts["run"] += 1
            self.counts["agreements"] += int(agrees)
            self.record_shadow(candidate.version, photo.ref.version, label_index=self._index.get(top.label),
                               score=float(top.score), agrees=agrees, latency_ms=ms, threshold=candidate.threshold,
                               pixels=photo.pixels)

    def _same_geometry(self, photo: "ClassifiedPhoto", spec: Any) -> bool:
        if photo.pixels is None:
            return False
        served = photo.spec.pixels_digest()
        if self._digest is not None and self._digest[0] == served:
            return True
        if served != spec.pixels_digest():
            return False
        self._digest = (served, served)
        return True

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class ShadowKeeper:
    """Installs, loads and drops the assignment's shadow version on the manager's thread."""

    def __init__(self, manager: "Manager", runner: ShadowRunner, loader: Loader, store: ModelStore) -> None:
        self.manager = manager
        self.runner = runner
        self.loader = loader
        self.store = store
        self.options = manager.options.shadow
        #: The candidate being installed (a newer assignment interrupts its download).
        self.updating: ModelRef | None = None
        self.declined: dict[str, Any] | None = None  # {"version", "reason", "at"}: the policy said no
        self.last_error: str | None = None
        self._said: set[tuple[Any, ...]] = set()  # reports made once per cause
        self._retry_at: float | None = None
        self._failures = 0
        self._errors_reported: set[ModelRef] = set()
        runner.on_error = self._failed_on_photo

    # --- the manager's step ---------------------------------------------------------------------

    def step(self, assignment: Assignment) -> None:
        """Make the candidate in use the assignment's shadow version (or none)."""
        self._say_problem(assignment)
        want = assignment.shadow_ref
        self.manager.state.forget_shadow_refusals_except(want)
        running = self.runner.current
        if running is not None and running.ref != want:
            self.drop(running.ref, "the assignment no longer names it" if want is None else f"the assignment names {want} instead")
        self._remove_others(want)
        if want is None or assignment.shadow is None:
            self.declined = None
            return
        self.runner.sample_rate = assignment.shadow.sample_rate
        if self.runner.current is not None:
            return
        serving = self.manager.handle.current
        if serving is None or self.manager.disk_full is not None:
            return  # nothing to compare with yet, or the served version needs the room
        if self.manager.state.shadow_refused(want) is not None:
            return
        now = time.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            return
        if self.declined is not None and self.declined["version"] == want.version and now - self.declined["at"] < RECHECK_S:
            return
        refusal = self._policy_says_no(assignment.shadow, want)
        if refusal is not None:
            self._decline(want, serving.ref, *refusal)
            return
        self.declined = None
        self._install_and_load(want, assignment.shadow, serving.ref)

    def drop(self, ref: ModelRef, why: str) -> None:
        """Stop running `ref` and delete its files."""
        if self.runner.current is not None and self.runner.current.ref == ref:
            self.runner.use(None)
            log.info("shadow: dropped %s (%s)", ref, why)
            self.manager._event("shadow_dropped", ref, f"shadow {ref} dropped: {why}")
        self._delete(ref)

    def installed(self, ref: ModelRef) -> Path | None:
        """The folder of `ref` when it is installed as a shadow version (a promotion reuses its files)."""
        path = self.store.path_of(ref)
        return path if (path / "manifest.json").is_file() else None

    def status(self) -> dict[str, Any]:
        return {**self.runner.status(), "enabled": self.options.enabled, "declined": self.declined,
                "installed": [ref.version for ref in self.store.versions()], "last_error": self.last_error}

    # --- the steps ------------------------------------------------------------------------------

    def _policy_says_no(self, shadow: ShadowAssignment, ref: ModelRef) -> tuple[str, str] | None:
        """(cause, why) when this device's resource policy does not run `ref` in shadow now."""
        if not self.options.enabled:
            return "off", "shadow evaluation is switched off on this device (--no-shadow)"
        if self.manager.options.policy == "resource":
            return "policy", "the resource-preserving policy keeps one model in memory"
        model = shadow.files["model.tflite"].size
        if model > self.options.max_model_bytes:
            return "model_size", (f"its model is {_mb(model)}, more than the {_mb(self.options.max_model_bytes)} "
                                  "this device loads in shadow (--shadow-max-model-mb)")
        if self.installed(ref) is None:
            needed = sum(remote.size for remote in shadow.files.values())
            self.store.home.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.store.home).free
            if free - needed < self.options.min_free_bytes:
                return "disk", (f"it needs {_mb(needed)} and the disk has {_mb(free)} free; this device keeps "
                                f"{_mb(self.options.min_free_bytes)} free (--shadow-min-free-mb)")
        return None

    def _decline(self, ref: ModelRef, serving: ModelRef, cause: str, why: str) -> None:
        """The device's policy says no (for now): said once per version and cause."""
        self.declined = {"version": ref.version, "cause": cause, "reason": why, "at": time.monotonic()}
        key = ("declined", ref, cause)
        if key in self._said:
            return
        self._said.add(key)
        log.warning("shadow: not running %s beside %s: %s", ref, serving, why)
        self.manager._event("shadow_declined", ref, f"shadow {ref} declined: {why}")
        # about the version that runs (as for a full disk): no rollout counts it as a failure
        self._say(serving, ref, f"shadow v{ref.version} declined: {why}", "declined", cause=cause, reason=why)

    def _say(self, serving: ModelRef | None, ref: ModelRef, message: str, state: str, **fields: Any) -> None:
        """A status report about the served version (the one the server counts this device on; a report
        about the candidate would count as serving it), with `details.shadow` = {version, state, ...}."""
        current = self.manager.handle.current
        serving = serving or (current.ref if current is not None else self.manager.store.current())
        if serving is None:
            return
        self.manager.reporter.status(serving.version, running=True, load_ok=True, smoke_test_ok=None, message=message[:2000],
                                     details={"shadow": {"version": ref.version, "state": state, **fields}})

    def _install_and_load(self, ref: ModelRef, shadow: ShadowAssignment, serving: ModelRef) -> None:
        manager = self.manager
        started = time.perf_counter()
        stats = DownloadStats()
        self.updating = ref
        try:
            path = self.installed(ref)
            if path is not None:
                try:
                    manager._verifier(ref)(path)
                except BundleRejectedError as exc:  # damaged on this disk: download it again
                    log.warning("shadow: the installed %s is damaged (%s): downloading it again", ref, exc)
                    self._delete(ref)
                    path = None
            if path is None:
                staging = manager._download(Assignment(ref.name, ref.version, shadow.files), stats)
                try:
                    path = self.store.install(staging, ref, verify=manager._verifier(ref), link=True)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except BundleRejectedError as exc:
            self._refuse(ref, serving, "signature", str(exc), load_ok=False, smoke_test_ok=None)
            return
        except UpdateRefusedError as exc:  # the files are not the announced ones, twice
            self._refuse(ref, serving, exc.step, str(exc), load_ok=False, smoke_test_ok=None)
            return
        except DownloadSupersededError as exc:  # the served version comes first: taken up at the next step
            log.info("shadow: %s", exc)
            return
        except DiskFullError as exc:
            manager.downloader.clear()
            self._decline(ref, serving, "disk", f"the disk is full: {exc}")
            return
        except DownloadError as exc:
            if exc.corrupt:
                self._refuse(ref, serving, "files", str(exc), load_ok=False, smoke_test_ok=None)
            else:
                self._retry(ref, f"cannot download the shadow {ref} yet: {exc}")
            return
        except EdgeRuntimeError as exc:  # the network, a newer assignment: try again later
            self._retry(ref, f"cannot install the shadow {ref} yet: {exc}")
            return
        except OSError as exc:
            self._retry(ref, f"cannot install the shadow {ref} yet: {exc.strerror or exc}")
            return
        finally:
            self.updating = None
        manager.downloader.clear()
        download_s = time.perf_counter() - started
        loaded = time.perf_counter()
        try:
            with manager.marker.inside(ref, "shadow_load"):
                candidate = self.loader(path)
        except (BundleRejectedError, ModelLoadError, EdgeRuntimeError, ValueError, OSError) as exc:
            self._refuse(ref, serving, "load", f"{ref} does not load: {exc}", load_ok=False, smoke_test_ok=None)
            return
        load_ms = (time.perf_counter() - loaded) * 1000
        candidate.marker = self.runner.marker  # type: ignore[assignment]
        try:
            smoke = candidate.smoke_test()
        except Exception as exc:  # noqa: BLE001
            smoke = {"passed": False, "cases": [], "error": str(exc)}
        if not smoke["passed"]:
            candidate.close()
            what = smoke.get("error") or ", ".join(f"expected {c['expected']}, got {c['got']}" for c in smoke["cases"]
                                                   if not c["passed"]) or "no golden cases"
            self._refuse(ref, serving, "smoke_test", f"{ref} failed its smoke test: {what}", load_ok=True, smoke_test_ok=False)
            return
        self._failures, self._retry_at, self.last_error = 0, None, None
        self.runner.use(candidate, shadow.sample_rate)
        self.runner.start()
        message = (f"shadow v{ref.version}: installed beside v{serving.version}, running on {shadow.sample_rate:.0%} of the "
                   f"requests (load {load_ms:.0f} ms, smoke test {sum(c['passed'] for c in smoke['cases'])}/{len(smoke['cases'])})")
        self._say(serving, ref, message, "running", sample_rate=shadow.sample_rate, download=stats.to_dict(),
                  download_s=round(download_s, 3), load_ms=round(load_ms, 1), load_ok=True, smoke_test_ok=True)
        manager._event("shadow_started", ref, f"shadow {ref} beside {serving}: {message}")

    def _refuse(self, ref: ModelRef, serving: ModelRef, step: str, reason: str, *, load_ok: bool, smoke_test_ok: bool | None) -> None:
        """The candidate itself is bad: never run it in shadow again (until another is named), and say so."""
        self.manager.state.refuse_shadow(ref, step, reason)
        self.manager.downloader.clear()
        self._delete(ref)
        self.last_error = reason
        log.warning("shadow: refused %s (%s): %s; still serving %s", ref, step, reason, serving)
        self.manager._event("shadow_refused", ref, f"shadow {ref} refused ({step}): {reason}")
        self._say(serving, ref, f"shadow v{ref.version} refused ({step}): {reason}", "refused", step=step, reason=reason[:500],
                  load_ok=load_ok, smoke_test_ok=smoke_test_ok)

    def crashed(self, found: list[tuple[ModelRef, str]]) -> None:
        """At start: the last run died while these candidates were inside the interpreter."""
        for ref, step in found:
            if step not in SHADOW_STEPS or self.manager.state.shadow_refused(ref) is not None:
                continue
            reason = f"the agent died while {ref} ran in shadow ({step})"
            self.manager.state.refuse_shadow(ref, "crash", reason)
            self._delete(ref)
            log.warning("shadow: %s; it is not run in shadow again (the version served is not blamed)", reason)
            self.manager._event("shadow_refused", ref, f"shadow {ref} refused (crash): {reason}")
            self._say(None, ref, f"shadow v{ref.version} refused (crash): {reason}", "refused", step="crash", crashed_in=step,
                      reason=reason)

    def _retry(self, ref: ModelRef, message: str) -> None:
        delay = backoff_delay(self._failures, self.manager.options.retry)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        self.last_error = message
        log.log(logging.WARNING if self._failures <= 1 else logging.DEBUG, "shadow: %s; trying again in %.0f s", message, delay)

    def _failed_on_photo(self, ref: ModelRef, why: str) -> None:
        """The candidate raised on a photo (counted in its telemetry): one status report per candidate."""
        if ref in self._errors_reported:
            return
        self._errors_reported.add(ref)
        self._say(None, ref, f"shadow v{ref.version} failed on a photo: {why}", "failed", error=why[:500])

    def _say_problem(self, assignment: Assignment) -> None:
        problem = assignment.shadow_problem
        if problem is None:
            return
        key = ("problem", assignment.etag, problem)
        if key in self._said:
            return
        self._said.add(key)
        version, reason = problem
        log.warning("shadow: ignored the assignment's shadow part: %s (still serving the current model)", reason)
        self.manager._event("shadow_ignored", None, f"ignored the assignment's shadow part: {reason}")
        if version is not None:
            self._say(None, ModelRef(assignment.model, version), f"shadow v{version} refused (assignment): {reason}", "refused",
                      step="assignment", reason=reason)

    def _remove_others(self, keep: ModelRef | None) -> None:
        for ref in self.store.versions():
            if ref != keep:
                self._delete(ref)

    def _delete(self, ref: ModelRef) -> None:
        if not self.store.path_of(ref).exists():
            return
        try:
            self.store.remove(ref)
        except (StoreError, OSError) as exc:
            log.warning("shadow: could not delete %s: %s", ref, exc)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
