"""`Agent`: the long-running process: source → manager → servable, the local API, the outbox, and a
supervisor that restarts any of their loops that dies (and reports it).

    agent = Agent.create_from_options(AgentOptions(home=..., serve=ServeOptions(port=0)))
    with agent:                 # start(): load the current version, serve, follow the server
        print(agent.url)        # http://127.0.0.1:PORT  (POST /classify)
    # stop(): clean shutdown (a crash is told apart from it at the next start)

`edge-agent run` is `Agent.run_forever()`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ..fallback import FallbackClient, FallbackOptions
from ..store import ModelStore
from .client import SyncClient
from .config import AgentPaths, Identity, load_identity, write_json_atomic
from .download import Downloader
from .errors import AgentError
from .health import HealthMonitor
from .manager import Manager, Reporter
from .options import AgentOptions
from .outbox import Outbox, OutboxSender
from .servable import Loader, ServableHandle, make_loader
from .shadow import ShadowKeeper, ShadowRunner
from .serving import Classify, LocalApi
from .source import AssignmentSource
from .state import AgentState
from .supervisor import Supervisor
from .telemetry import TelemetryRecorder

log = logging.getLogger("edge_agent")


class Agent:
    """The edge agent. Build it with `create_from_options`; `start()`/`stop()` or use it as a context manager."""

    def __init__(self, options: AgentOptions, identity: Identity, *, loader: Loader | None = None) -> None:
        self.options = options
        self.identity = identity
        self.paths = AgentPaths.at(options.home)
        self._lock_file = _lock(self.paths.agent_dir / "lock")
        self.public_key = self.paths.public_key(options.public_key)
        if not self.public_key.is_file():
            raise AgentError(
                f"no trusted publisher key at {self.public_key}: the agent only installs signed bundles; copy the "
                "publisher's .pub file there (or `edge-agent enroll --public-key KEY`)"
            )
        self.store = ModelStore(self.paths.home)
        timeouts = options.timeouts
        self.client = SyncClient(identity.server, identity.token, timeout_s=timeouts.request_s, exchange_s=timeouts.exchange_s)
        self.state = AgentState(self.paths.state)
        self.outbox = Outbox(self.paths.outbox, options.outbox_max_rows)
        device = f"/v1/devices/{identity.device_id}"
        self.telemetry = TelemetryRecorder(self.outbox, device + "/telemetry", options.telemetry_period_s)
        self.sender = OutboxSender(self.outbox, self.client, options.retry, tick=self.telemetry.tick)
        self.handle = ServableHandle()
        self.manager = Manager(
            store=self.store,
            handle=self.handle,
            loader=loader or make_loader(self.public_key, self.paths.home, options.threads),
            downloader=Downloader(self.client, self.paths.downloads, options.retry, timeouts.download_s,
                                  floor_bps=timeouts.download_floor_bps, window_s=timeouts.download_window_s),
            state=self.state,
            reporter=Reporter(self.outbox, self.sender, identity.device_id),
            options=options,
            public_key=self.public_key,
        )
        self.health = HealthMonitor(options.health, self.state, self.manager.unhealthy)
        self.manager.health = self.health
        # the assignment's shadow version: a second store, one interpreter thread, run off the request path
        self.shadow = ShadowRunner(self.telemetry.record_shadow, queue_size=options.shadow.queue_size, marker=self.manager.marker)
        self.manager.shadow = ShadowKeeper(self.manager, self.shadow, loader or make_loader(self.public_key, self.paths.home, 1),
                                           ModelStore(self.paths.home / "shadow"))
        self.source = AssignmentSource(
            self.client, identity.device_id, options, self.manager.aspire, on_reachable=self.sender.kick,
            on_refused=self._assignment_refused,
        )
        self.manager.reporter.context = lambda: {"following": self.source.following()}
        self.supervisor = Supervisor(on_restart=self._loop_restarted)
        self.supervisor.watch("follower", self.source.alive, self.source.start)
        self.supervisor.watch("manager", lambda: _alive(self.manager), self.manager.start)
        self.supervisor.watch("outbox sender", lambda: _alive(self.sender), self.sender.start)
        fallback = None
        if options.fallback != "never":
            fallback = FallbackClient(FallbackOptions(identity.server, options.timeouts.fallback_s, identity.token))
        self.samples = _sample_store(options, self.paths)  # None unless --keep-low-confidence
        classify = Classify(
            self.handle, options, fallback=fallback, record=self.telemetry.record, health=self.health.record,
            updating=lambda: self.manager.updating is not None, on_classified=self.shadow.offer,
            keep=self.samples.offer if self.samples is not None else None,
        )
        self.api = LocalApi(classify, self.status, options, following=self.source.following)
        self.started_at: float | None = None
        self._stopped = threading.Event()

    @classmethod
    def create_from_options(cls, options: AgentOptions, *, loader: Loader | None = None) -> "Agent":
        """An agent for the device enrolled in `options.home` (`NotEnrolledError` when it is not)."""
        return cls(options, load_identity(AgentPaths.at(options.home)), loader=loader)

    @property
    def url(self) -> str:
        """The local API's base URL."""
        return self.api.url

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> "Agent":
        """Serve the current version at once, then follow the server in the background."""
        crashed = self.state.start_run()
        if crashed:
            log.warning("the previous run did not stop cleanly (a crash or power loss)")
        self.manager.load_at_start(crashed)
        self.api.start()
        self.started_at = time.time()
        write_json_atomic(self.paths.run_file, {"pid": os.getpid(), "url": self.url, "started": self.started_at})
        self.sender.start()
        self.manager.start()
        self.source.start()
        self.supervisor.start()
        current = self.handle.current
        log.info("edge-agent for %s on %s: serving %s on %s", self.identity.device_id, self.identity.server,
                 current.ref if current else "nothing yet", self.url)
        return self

    def stop(self) -> None:
        """Stop following, stop serving, persist the counters and mark a clean exit."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.supervisor.stop()
        self.source.stop()
        self.manager.stop()
        self.shadow.stop()
        self.api.stop()
        self.sender.stop()
        self.handle.swap(None)
        self.state.stop_run()
        self.outbox.close()
        if self.samples is not None:
            self.samples.close()
        try:
            self.paths.run_file.unlink()
        except OSError:
            pass
        self._lock_file.close()

    close = stop

    def __enter__(self) -> "Agent":
        if self.started_at is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT (Ctrl-C)."""
        done = threading.Event()

        def _signal(_signum: int, _frame: Any) -> None:
            done.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()

    # --- what the loops tell ---------------------------------------------------------------------

    def _assignment_refused(self, version: int | None, reason: str) -> None:
        """The server's assignment was malformed: say so to the server (against its version, when it had one)."""
        if version is None:
            return  # nothing a status report can name; `following` says it locally
        self.manager.reporter.status(version, running=False, load_ok=False, smoke_test_ok=None,
                                     message=f"refused (assignment): {reason}",
                                     details={"refused": True, "step": "assignment"})

    def _loop_restarted(self, name: str, why: str) -> None:
        current = self.handle.current
        if current is not None:
            self.manager.reporter.status(current.version, running=True, load_ok=True, smoke_test_ok=None,
                                         message=f"{why}; the supervisor restarted it",
                                         details={"restarted": name, "restarts": dict(self.supervisor.restarts)})

    # --- views ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `GET /status` answers."""
        current = self.handle.current
        state = self.store.state()
        return {
            "device": self.identity.public_dict(),
            "serving": current.ref.to_dict() if current else None,
            "current": state.current.to_dict() if state.current else None,
            "previous": state.previous.to_dict() if state.previous else None,
            "updating": self.manager.updating.to_dict() if self.manager.updating else None,
            "policy": self.options.policy,
            "probation": self.state.probation,
            "health": self.health.counts(),
            "refused": self.state.snapshot().get("refused", {}),
            "last_error": self.manager.last_error,
            "following": self.source.following(),
            "source": self.source.status(),
            "restarts": dict(self.supervisor.restarts),
            "samples": self.samples.status() if self.samples is not None else None,
            "outbox": {"queued": self.outbox.count(), "sent": self.sender.sent_count, "dropped": self.sender.dropped_count,
                       "last_error": self.sender.last_error},
            "shadow": self.manager.shadow.status() if self.manager.shadow is not None else None,
            "events": list(self.manager.events)[-10:],
            "pid": os.getpid(),
            "url": self.url,
        }


def _sample_store(options: AgentOptions, paths: AgentPaths) -> Any:
    """The opt-in store of low-confidence photos (None when off); its folder is noted for `edge-agent samples`."""
    if options.samples.folder is None:
        return None
    from .samples import POINTER_NAME, SampleStore

    store = SampleStore(options.samples.folder, options.samples.max_bytes)
    try:
        temp = paths.agent_dir / (POINTER_NAME + ".tmp")
        temp.write_text(str(store.folder.resolve()) + "\n", encoding="utf-8")
        os.replace(temp, paths.agent_dir / POINTER_NAME)
    except OSError:
        pass  # a full disk: `edge-agent samples --dir` still finds it
    return store


def _alive(loop: Any) -> bool:
    """Whether the loop's thread (`_thread`, set by its `start()`) still runs."""
    thread = getattr(loop, "_thread", None)
    return thread is not None and thread.is_alive()


def _lock(path) -> Any:  # noqa: ANN001
    """Hold an exclusive lock on `path` for the agent's lifetime: one agent per device store."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise AgentError(f"another edge-agent already runs on the store {path.parent.parent} (lock {path})") from None
    return handle
