"""`Services`: every long-lived part of a server, built from one `ServerConfig`, started and stopped together.

The HTTP app holds one (`app.state.services`); the CLI builds one to publish without a running server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any

from . import retention
from .artifacts import ArtifactStore
from .bundles import load_trusted_keys
from .config import ServerConfig
from .db import Database
from .devices import Devices
from .locks import PublishLocks
from .metrics import Metrics
from .predict.base import Predictor
from .push import PushHub, watch_revision
from .registry import Registry
from .rollout import Rollouts
from .serving_repo import ServingRepository
from .serving_sync import ServingReconciler
from .tasks import cancel_and_wait

log = logging.getLogger("sync_server")


@dataclass
class Services:
    """The server's parts. Build with `Services.build(config)`; `start()`/`stop()` run the background tasks."""

    config: ServerConfig
    db: Database
    artifacts: ArtifactStore
    repository: ServingRepository
    registry: Registry
    rollouts: Rollouts
    devices: Devices
    hub: PushHub
    reconciler: ServingReconciler
    metrics: Metrics
    predictor: Predictor | None = None
    prediction: Any = None  # PredictionService, built by `start` (needs the event loop's thread)
    last_check: Any = None  # the CheckReport of the start-up check (`check.check_at_start`)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    #: Runs the background tasks' database reads; joined at `stop` so none outlives the engine.
    _background: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync-server-bg")
    )

    @classmethod
    def build(cls, config: ServerConfig, *, predictor: Predictor | None = None, with_predictor: bool = True) -> "Services":
        config = config.with_secrets()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(config.resolved_database_url)
        artifacts = ArtifactStore(config.artifacts_dir)
        repository = ServingRepository(config.serving_dir, config.tf_serving.base_path)
        keys = load_trusted_keys(config.publisher_keys, config.trusted_keys_dir)
        registry = Registry(db, artifacts, repository, keys, PublishLocks(db, config.data_dir))
        hub = PushHub()
        metrics = Metrics()
        if predictor is None and with_predictor:
            from .predict import make_predictor

            predictor = make_predictor(config, repository)

        refs: dict[str, Any] = {}

        def changed(model: str) -> None:
            refs["devices"].invalidate()  # first: woken streams must see the new state
            hub.notify(model)
            refs["reconciler"].trigger()

        rollouts = Rollouts(db, config.rollout, on_change=changed, gates=config.quality_gates)
        devices = Devices(db, rollouts, config.enrollment_secret or "", on_change=changed)
        refs["devices"] = devices
        preload = getattr(predictor, "preload", None) if config.embedded_preload else None
        background = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync-server-bg")
        reconciler = ServingReconciler(
            rollouts.desired_serving,
            repository,
            # TF Serving (REST or gRPC) loads versions from the config file we write; wait for its status.
            model_status=predictor.model_status if (predictor is not None and config.uses_tf_serving) else None,
            load_timeout_s=config.tf_serving.load_timeout_s,
            poll_s=config.tf_serving.status_poll_s,
            watch_s=config.tf_serving.watch_s,
            preload=preload,
            executor=background,
        )
        refs["reconciler"] = reconciler
        return cls(
            config, db, artifacts, repository, registry, rollouts, devices, hub, reconciler, metrics, predictor,
            _background=background,
        )

    async def start(self) -> None:
        """Migrate the database, then start the push watcher, the TF Serving reconciler and batching."""
        from .predict.service import PredictionService

        if self.config.auto_migrate:
            await asyncio.to_thread(self.db.migrate)
        loop = asyncio.get_running_loop()
        self.hub.bind(loop)
        if self.predictor is not None:
            kind = self.predictor.kind

            def on_batch(_key: object, size: int, seconds: float) -> None:
                self.metrics.batch_size.labels(kind).observe(size)
                self.metrics.batch_seconds.labels(kind).observe(seconds)

            self.prediction = PredictionService(
                self.predictor, self.registry.version_info, self.config.batching, self.config.limits, on_batch,
                cached_info=self.registry.cached_version_info, deadline_s=self.config.prediction_deadline_s,
                retry_after_s=self.config.tf_serving.retry_after_s,
            )

        async def read_revision() -> int:
            return await loop.run_in_executor(self._background, self.db.revision)

        def remote_change() -> None:
            self.devices.invalidate()
            self.hub.notify(None)
            self.reconciler.trigger()

        self._tasks = [
            asyncio.create_task(self._check_at_start(), name="check-at-start"),
            asyncio.create_task(
                watch_revision(read_revision, self.config.push_poll_s, remote_change, self.db.only_local_changes),
                name="push-watch",
            ),
            asyncio.create_task(self.reconciler.run(), name="serving-reconciler"),
            asyncio.create_task(retention.run(self.db, self.config.retention, self._background), name="telemetry-retention"),
        ]
        log.info(
            "sync-server started",
            extra={
                "data_dir": str(self.config.data_dir),
                "database": self.db.safe_url,
                "backend": self.predictor.kind if self.predictor else None,
                "tf_serving_url": self.config.tf_serving.url,
                "backend_protocol": self.config.tf_serving.protocol if self.config.tf_serving.url else None,
                "tf_serving_config": str(self.repository.config_path),
                "trusted_keys": len(self.registry.keys),
            },
        )

    async def _check_at_start(self) -> None:
        from .check import check_at_start

        try:
            self.last_check = await asyncio.get_running_loop().run_in_executor(
                self._background, check_at_start, self.db, self.artifacts, self.repository, self.registry.locks,
                self.config.data_dir,
            )
        except Exception as exc:  # noqa: BLE001  (the server runs without it; the operator can run it)
            log.warning("the start-up check failed", extra={"error": str(exc)})

    def close(self) -> None:
        """Release what `build` made, for a Services that was never started (the CLI's local publish)."""
        self.rollouts.close()
        self._background.shutdown(wait=True)
        self.db.dispose()

    async def stop(self) -> None:
        self.rollouts.close()  # no trailing quality check after this
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await asyncio.get_running_loop().run_in_executor(None, self._background.shutdown, True)
        if self.prediction is not None:
            await self.prediction.aclose()
        elif self.predictor is not None:
            await self.predictor.aclose()
        self.db.dispose()
