"""The embedded predictor: SavedModels loaded in this process, used when no TF Serving URL is set.

It reads the same repository TF Serving would (`models/NAME/VERSION/`) and calls each version's
`serving_default` signature. Loaded versions are kept in a small LRU (`max_loaded`); a version is
loaded before an older one is dropped, the same availability-preserving order TF Serving follows, so
memory briefly holds one extra model during a switch. TensorFlow is imported here and only here.

A version is warmed up as TF Serving does it before it counts as loaded: the requests in its
`assets.extra/tf_serving_warmup_requests` (the converter writes them), or without that file one
zero photo of the signature's input shape, run once; a version whose warm-up fails is not served.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from ..errors import BackendFailedError, BackendUnavailableError
from ..serving_repo import ServingRepository
from .tf_serving import OUTPUT_NAMES

log = logging.getLogger("sync_server.embedded")

#: TF Serving's warm-up file, relative to a version folder, and the most of it read (TF Serving: 1000 records).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
MAX_WARMUP_BYTES = 256 << 20


@dataclass
class _Loaded:
    model: Any  # keeps the trackable object (and its variables) alive
    function: Any
    input_name: str
    output_name: str
    #: Warm-up requests run at load, where they came from ("records" or "zeros"), and how long they took.
    warmup_requests: int = 0
    warmup_source: str = ""
    warmup_s: float = 0.0


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
        #: (name, version) -> warm-up requests run when it was last loaded.
        self.warmed_up: dict[tuple[str, int], int] = {}

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
        loaded = _Loaded(model, function, input_name, output_name)
        self._warm_up(name, version, path, loaded, inputs[input_name])
        # A loaded SavedModel leaves ~300k tracked objects that live as long as the version: without this,
        # each full collection walks them all (0.5-0.8 s measured), stalling every request in flight.
        gc.freeze()
        log.info("loaded SavedModel", extra={"model": name, "version": version, "warmup_requests": loaded.warmup_requests,
                                             "warmup_source": loaded.warmup_source, "warmup_s": round(loaded.warmup_s, 3)})
        return loaded

    def _warm_up(self, name: str, version: int, path: Path, loaded: _Loaded, spec: Any) -> None:
        """Run the version's warm-up requests (or one zero photo) once; BackendFailedError if they fail."""
        import tensorflow as tf

        started = time.perf_counter()
        batches, source = _warmup_batches(path / WARMUP_FILE, loaded.input_name, spec, name, version)
        for batch in batches:
            try:
                loaded.function(**{loaded.input_name: tf.constant(batch, dtype=tf.float32)})
            except (tf.errors.OpError, ValueError, TypeError) as exc:
                raise BackendFailedError(
                    f"version {version} of model {name} failed its warm-up request of shape {list(batch.shape)}: "
                    f"{_first_line(exc)}", code="warmup_failed") from exc
        loaded.warmup_requests, loaded.warmup_source = len(batches), source
        loaded.warmup_s = time.perf_counter() - started
        self.warmed_up[(name, version)] = len(batches)

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


def _warmup_batches(file: Path, input_name: str, spec: Any, name: str, version: int) -> tuple[list[np.ndarray], str]:
    """The warm-up batches of a version: its TF Serving warm-up records, checked against the signature's
    input, or (without the file) one zero photo of the input's shape."""
    shape = [1 if d is None else int(d) for d in spec.shape.as_list()] if spec.shape.rank is not None else None
    if not file.is_file():
        if shape is None:
            return [], "none"
        return [np.zeros(shape, dtype=np.float32)], "zeros"

    def refuse(reason: str) -> BackendFailedError:
        return BackendFailedError(f"the warm-up requests of version {version} of model {name} ({WARMUP_FILE}) {reason}",
                                  code="warmup_failed")

    if file.stat().st_size > MAX_WARMUP_BYTES:
        raise refuse(f"are over {MAX_WARMUP_BYTES >> 20} MiB")
    try:
        from converter.errors import DataError
        from converter.warmup import read_warmup, request_inputs
    except ImportError as exc:  # tensorflow-serving-api missing: the shape is what warms the model up
        log.warning("cannot read warm-up records, warming up with zeros", extra={"model": name, "version": version, "error": str(exc)})
        return ([np.zeros(shape, dtype=np.float32)], "zeros") if shape is not None else ([], "none")
    batches = []
    try:
        for record in read_warmup(file, MAX_WARMUP_RECORDS):
            inputs = request_inputs(record)
            if set(inputs) != {input_name}:
                raise refuse(f"name inputs {sorted(inputs)}; the signature takes {input_name!r}")
            batch = inputs[input_name]
            if batch.dtype != np.float32 or (shape is not None and (batch.ndim != len(shape) or list(batch.shape[1:]) != shape[1:])):
                raise refuse(f"hold a {batch.dtype} tensor of shape {list(batch.shape)}; the signature takes float32 {spec.shape}")
            batches.append(batch)
    except DataError as exc:
        raise refuse(f"are unreadable: {exc}") from exc
    return batches, "records"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
