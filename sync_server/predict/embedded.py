"""The embedded predictor: SavedModels loaded in this process, used when no TF Serving URL is set.

It reads the same repository TF Serving would (`models/NAME/VERSION/`) and calls each version's
`serving_default` signature on float batches, or its `pixels` signature on uint8 batches when the version
has one (the converter's `add_pixel_signatures`: the model normalises the device's pixels itself, so the
server does not; `takes_pixels` says which). Loaded versions are kept in a small LRU (`max_loaded`); a version is
loaded before an older one is dropped, the same availability-preserving order TF Serving follows, so
memory briefly holds one extra model during a switch. TensorFlow is imported here and only here.

A version is warmed up as TF Serving does it before it counts as loaded: the requests in its
`assets.extra/tf_serving_warmup_requests` (the converter writes them), or without that file one
zero photo of the signature's input shape (and of `pixels`, when the version has it), run once (records
for `pixels` and `pixels_png` run through those signatures); a version whose warm-up fails is not served.
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
#: The signature that takes the fitted uint8 pixels (converter.serving.PIXELS_SIGNATURE).
PIXELS_SIGNATURE = "pixels"


@dataclass
class _Loaded:
    model: Any  # keeps the trackable object (and its variables) alive
    function: Any
    input_name: str
    output_name: str
    #: The `pixels` signature (uint8 [N, H, W, 3] in) and its input's name, when the version has it.
    pixels_function: Any = None
    pixels_input: str = ""
    #: Every signature of the version (warm-up records may name any of them).
    signatures: Any = None
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

    async def takes_pixels(self, name: str, version: int, *, timeout_s: float | None = None) -> bool:
        """Whether the version has the `pixels` signature (loads it when it is not loaded yet)."""
        loaded = self._loaded.get((name, version))
        if loaded is None:
            loaded = await anyio.to_thread.run_sync(self._get, name, version, limiter=self._limiter)
        return loaded.pixels_function is not None

    def _predict_sync(self, name: str, version: int, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        loaded = self._get(name, version)
        try:
            if batch.dtype == np.uint8:
                if loaded.pixels_function is None:
                    raise BackendFailedError(f"version {version} of model {name} has no {PIXELS_SIGNATURE!r} signature for uint8 pixels")
                outputs = loaded.pixels_function(**{loaded.pixels_input: tf.constant(batch, dtype=tf.uint8)})
            else:
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
        loaded = _Loaded(model, function, input_name, output_name, signatures=dict(model.signatures))
        pixels = model.signatures.get(PIXELS_SIGNATURE)
        if pixels is not None:
            pixel_inputs = pixels.structured_input_signature[1]
            pixel_spec = next(iter(pixel_inputs.values()), None)
            if len(pixel_inputs) == 1 and pixel_spec.dtype == tf.uint8 and output_name in pixels.structured_outputs:
                loaded.pixels_function, loaded.pixels_input = pixels, next(iter(pixel_inputs))
            else:
                log.warning("ignoring a pixels signature that does not take one uint8 input", extra={"model": name, "version": version})
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
        requests, source = _warmup_requests(path / WARMUP_FILE, loaded, spec, name, version)
        for signature, key, batch in requests:
            function = loaded.signatures[signature]
            try:
                function(**{key: tf.constant(batch)})
            except (tf.errors.OpError, ValueError, TypeError) as exc:
                raise BackendFailedError(
                    f"version {version} of model {name} failed its {signature} warm-up request of shape {list(batch.shape)}: "
                    f"{_first_line(exc)}", code="warmup_failed") from exc
        loaded.warmup_requests, loaded.warmup_source = len(requests), source
        loaded.warmup_s = time.perf_counter() - started
        self.warmed_up[(name, version)] = len(requests)

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


def _warmup_requests(file: Path, loaded: _Loaded, spec: Any, name: str, version: int) -> tuple[list[tuple[str, str, np.ndarray]], str]:
    """The warm-up requests of a version, (signature, input, batch) each: its TF Serving warm-up records,
    checked against the signatures' inputs, or (without the file) one zero photo of the input's shape."""
    shape = [1 if d is None else int(d) for d in spec.shape.as_list()] if spec.shape.rank is not None else None
    default = "serving_default"
    if not file.is_file():
        if shape is None:
            return [], "none"
        zeros = [(default, loaded.input_name, np.zeros(shape, dtype=np.float32))]
        if loaded.pixels_function is not None:  # its first call would pay TensorFlow's lazy set-up too
            zeros.append((PIXELS_SIGNATURE, loaded.pixels_input, np.zeros(shape, dtype=np.uint8)))
        return zeros, "zeros"

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
        return ([(default, loaded.input_name, np.zeros(shape, dtype=np.float32))], "zeros") if shape is not None else ([], "none")
    requests = []
    try:
        for record in read_warmup(file, MAX_WARMUP_RECORDS):
            signature = record.predict_log.request.model_spec.signature_name or default
            function = loaded.signatures.get(signature)
            if function is None:
                raise refuse(f"name signature {signature!r}, which the version does not have ({sorted(loaded.signatures)})")
            inputs = request_inputs(record)
            expected = function.structured_input_signature[1]
            if set(inputs) != set(expected):
                raise refuse(f"name inputs {sorted(inputs)} for {signature}; it takes {sorted(expected)}")
            (key, batch), = inputs.items()
            want = expected[key]
            dtype_ok = (batch.dtype == object) if want.dtype.name == "string" else (batch.dtype == np.dtype(want.dtype.as_numpy_dtype))
            dims = want.shape.as_list() if want.shape.rank is not None else None
            shape_ok = dims is None or (batch.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims[1:], batch.shape[1:])))
            if not (dtype_ok and shape_ok):
                raise refuse(f"hold a {batch.dtype} tensor of shape {list(batch.shape)}; {signature} takes {want.dtype.name} {want.shape}")
            requests.append((signature, key, batch))
    except DataError as exc:
        raise refuse(f"are unreadable: {exc}") from exc
    return requests, "records"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
