"""The embedded predictor: SavedModels loaded in this process, used when no TF Serving URL is set.

It reads the same repository TF Serving would (`models/NAME/VERSION/`) and calls each version's
`serving_default` signature. Loaded versions are kept in a small LRU (`max_loaded`); a version is
loaded before an older one is dropped, the same availability-preserving order TF Serving follows, so
memory briefly holds one extra model during a switch. TensorFlow is imported here and only here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from ..errors import BackendFailedError, BackendUnavailableError
from ..serving_repo import ServingRepository
from .tf_serving import OUTPUT_NAMES

log = logging.getLogger("sync_server.embedded")


@dataclass
class _Loaded:
    model: Any  # keeps the trackable object (and its variables) alive
    function: Any
    input_name: str
    output_name: str


class EmbeddedPredictor:
    """Runs SavedModels from the repository in-process, on worker threads."""

    kind = "embedded"

    def __init__(self, repository: ServingRepository, max_loaded: int = 4, max_threads: int = 4) -> None:
        self.repository = repository
        self.max_loaded = max(1, max_loaded)
        self._loaded: collections.OrderedDict[tuple[str, int], _Loaded] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, int], threading.Lock] = collections.defaultdict(threading.Lock)
        self._limiter = anyio.CapacityLimiter(max_threads)
        self._preloads: set[asyncio.Task] = set()

    async def predict(self, name: str, version: int, batch: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        # A TensorFlow call cannot be interrupted: the caller stops waiting at its deadline instead.
        return await anyio.to_thread.run_sync(self._predict_sync, name, version, batch, limiter=self._limiter)

    def _predict_sync(self, name: str, version: int, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        loaded = self._get(name, version)
        try:
            outputs = loaded.function(**{loaded.input_name: tf.constant(batch, dtype=tf.float32)})
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            raise BackendFailedError(f"version {version} of model {name} failed on the batch: {_first_line(exc)}") from exc
        return np.asarray(outputs[loaded.output_name], dtype=np.float32)

    def _get(self, name: str, version: int) -> _Loaded:
        key = (name, version)
        with self._lock:
            found = self._loaded.get(key)
            if found is not None:
                self._loaded.move_to_end(key)
                return found
            load_lock = self._load_locks[key]
        with load_lock:  # one load per version, however many requests wait for it
            with self._lock:
                found = self._loaded.get(key)
                if found is not None:
                    return found
            loaded = self._load(name, version)
            with self._lock:
                self._loaded[key] = loaded
                while len(self._loaded) > self.max_loaded:
                    dropped, _ = self._loaded.popitem(last=False)
                    log.info("unloaded SavedModel", extra={"model": dropped[0], "version": dropped[1]})
            return loaded

    def _load(self, name: str, version: int) -> _Loaded:
        import tensorflow as tf

        path = self.repository.path_of(name, version)
        if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
            raise BackendUnavailableError(f"the SavedModel of version {version} of model {name} is not in the repository", code="version_not_loaded")
        try:
            model = tf.saved_model.load(str(path))
            function = model.signatures["serving_default"]
        except (OSError, KeyError, ValueError, tf.errors.OpError) as exc:
            raise BackendFailedError(f"the SavedModel of version {version} of model {name} cannot be loaded: {_first_line(exc)}") from exc
        inputs = function.structured_input_signature[1]
        if len(inputs) != 1:
            raise BackendFailedError(f"serving_default of {name} v{version} takes {len(inputs)} inputs; one image input is expected")
        input_name = next(iter(inputs))
        outputs = function.structured_outputs
        output_name = next((k for k in OUTPUT_NAMES if k in outputs), sorted(outputs)[0])
        log.info("loaded SavedModel", extra={"model": name, "version": version})
        return _Loaded(model, function, input_name, output_name)

    async def preload(self, name: str, version: int) -> None:
        """Start loading a version in the background, so its first request does not wait for it."""
        if (name, version) in self._loaded:
            return

        async def load() -> None:
            try:
                await anyio.to_thread.run_sync(self._get, name, version, limiter=self._limiter)
            except Exception as exc:  # reported again, to the caller, by the first request  # noqa: BLE001
                log.warning("preload failed", extra={"model": name, "version": version, "error": str(exc)})

        task = asyncio.create_task(load(), name=f"preload-{name}-{version}")
        self._preloads.add(task)
        task.add_done_callback(self._preloads.discard)

    async def model_status(self, name: str) -> dict[int, str]:
        """Every version in the repository is servable on demand: report them AVAILABLE."""
        folder = self.repository.models_dir / name
        if not folder.is_dir():
            return {}
        return {int(p.name): "AVAILABLE" for p in folder.iterdir() if p.name.isdigit()}

    async def ready(self) -> str | None:
        return None

    async def aclose(self) -> None:
        for task in list(self._preloads):
            task.cancel()
        with self._lock:
            self._loaded.clear()
        await asyncio.sleep(0)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
