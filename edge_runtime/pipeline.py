"""Classify many photos fast: decode and prepare on worker threads while the interpreter runs.

Results come back in input order. Photos are batched when the model takes a variable batch. A bad
photo yields a result with its error and never stops the others. Low-confidence photos go to the
server's full model when a fallback client is given.

A cold command with one or two photos starts their decode (`EarlyStart`) before the classifier
exists: the second core decodes while the first imports LiteRT and verifies the bundle.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from preprocessing import (
    DEFAULT_BUDGET, DecodeBudget, DecodeBusyError, InvalidImageError, PreprocessSpec, normalise, preprocess, preprocess_pixels,
    read_source,
)

from .errors import FallbackUnavailableError
from .results import Classification

if TYPE_CHECKING:  # annotations only: each loads when used (the fallback client pulls in urllib and ssl)
    from concurrent.futures import Future

    from .classifier import Classifier
    from .fallback import FallbackClient, PixelPayload

FALLBACK_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class PipelineOptions:
    """How to run a batch of photos."""

    workers: int = 2
    fallback: str = "auto"
    threshold: float | None = None  # None: the model's own threshold

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACK_MODES)}, got {self.fallback!r}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the threshold must be between 0 and 1, got {self.threshold}")


@dataclass
class _Prepared:
    path: str
    tensor: np.ndarray | None
    data: bytes | None
    error: InvalidImageError | DecodeBusyError | None
    ms: float
    pixels: np.ndarray | None = None  # the fitted uint8 pixels behind `tensor`, kept with `data` for the server


def _load(
    path: str, spec: PreprocessSpec, keep_bytes: bool, threads: int | None = None, budget: DecodeBudget | None = DEFAULT_BUDGET
) -> _Prepared:
    """Read, decode and prepare one photo; a bad photo becomes its error, timed like a good one.

    `threads` bounds the cores one big JPEG's decode uses (None: all it can); callers that already
    keep the cores busy pass 1. Decodes run inside `budget` (the classifier's); a photo that found
    no room in it for the budget's whole wait gets the error `busy` and the others go on.
    """
    started = time.perf_counter()
    try:
        data = read_source(path)
        if not keep_bytes:
            return _Prepared(path, preprocess(data, spec, threads=threads, budget=budget), None, None, _ms(started))
        pixels = preprocess_pixels(data, spec, threads=threads, budget=budget)  # the same steps, kept for the server
        return _Prepared(path, normalise(pixels, spec), data, None, _ms(started), pixels)
    except (InvalidImageError, DecodeBusyError) as exc:
        return _Prepared(path, None, None, exc, _ms(started))


class EarlyStart:
    """Decode and prepare a few photos on a background thread while the classifier is still loading.

    A cold start spends most of its time importing numpy, cryptography and LiteRT and verifying the
    bundle, on one core; Pillow decodes without holding the GIL, so the photos decode on the other
    core meanwhile. `spec` comes from the bundle's manifest BEFORE its signature is checked (see
    `bundles.peek_spec`): `classify_paths` uses this work only when the verified spec is equal, and
    nothing is printed or run until the classifier (and so the verification) exists.

    Warnings raised while decoding are held until `take` and then shown, so none is lost while the
    interpreter's start-up hides stderr, and none appears when the bundle is refused. Call `close`
    when the command ends either way.
    """

    def __init__(self, paths: Sequence[str], spec: PreprocessSpec, *, keep_bytes: bool) -> None:
        self.paths = tuple(str(p) for p in paths)
        self.spec = spec
        self.keep_bytes = keep_bytes
        self._items: list[_Prepared] = []
        self._failure: BaseException | None = None
        self._held: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._run, name="edge-early-decode")
        _skip_pillow_preinit()  # before the thread starts: its decode begins sooner
        self._show = warnings.showwarning
        warnings.showwarning = self._hold_or_show
        try:
            self._thread.start()
        except BaseException:
            warnings.showwarning = self._show
            raise

    def take(self, spec: PreprocessSpec, keep_bytes: bool) -> list[_Prepared] | None:
        """The prepared photos, in order, if they were made with `spec` (and kept their bytes if asked)."""
        self.close()
        for args, kwargs in self._held:
            warnings.showwarning(*args, **kwargs)
        self._held.clear()
        if spec != self.spec or (keep_bytes and not self.keep_bytes):
            return None
        if self._failure is not None:
            raise self._failure  # what the worker pool would raise: not a bad photo, a bug or out of memory
        return self._items

    def close(self) -> None:
        """Wait for the thread and stop holding warnings (the held ones are dropped unless taken)."""
        self._thread.join()
        if warnings.showwarning == self._hold_or_show:
            warnings.showwarning = self._show

    def _run(self) -> None:
        try:
            for path in self.paths:
                # One core: the other one is importing and verifying on the main thread meanwhile.
                self._items.append(_load(path, self.spec, self.keep_bytes, threads=1))
        except BaseException as exc:  # re-raised by `take` on the main thread  # noqa: BLE001
            self._failure = exc

    def _hold_or_show(self, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is self._thread:
            self._held.append((args, kwargs))
        else:
            self._show(*args, **kwargs)


def _skip_pillow_preinit() -> None:
    """Load Pillow's JPEG plugin alone, instead of the five its first `Image.open` imports.

    Opening a file object, Pillow first imports its BMP, GIF, JPEG, PPM and PNG plugins ("preinit"):
    about 10 ms of imports that hold the GIL, on a cold start's critical path, when almost every
    photo is a JPEG. With preinit marked done, a photo in another format makes Pillow import all its
    plugins at that moment (`Image.open` calls `init()` for a format it has not loaded), so every
    photo still opens, with the same plugin. `_initialized` is Pillow's flag for this (0, 1 after
    preinit, 2 after init); if a future Pillow drops it, nothing is changed.
    """
    from PIL import Image, JpegImagePlugin  # noqa: F401

    if getattr(Image, "_initialized", None) == 0:
        Image._initialized = 1


def classify_paths(
    paths: Iterable[str | Path],
    classifier: Classifier,
    options: PipelineOptions = PipelineOptions(),
    fallback: FallbackClient | None = None,
    early: EarlyStart | None = None,
) -> Iterator[Classification]:
    """Classify each photo in order, pipelined; yields one `Classification` per path.

    `early` is used when it prepared exactly `paths` with this classifier's spec; otherwise its work
    is dropped and the photos are prepared here.
    """
    keep_bytes = fallback is not None and options.fallback != "never"
    batch_size = max(1, classifier.max_batch)
    window = max(batch_size, options.workers * 4)
    threshold = options.threshold if options.threshold is not None else classifier.threshold

    if early is not None:
        paths = [str(p) for p in paths]
        ready = early.take(classifier.spec, keep_bytes)
        if ready is not None and [item.path for item in ready] == paths:
            for start in range(0, len(ready), batch_size):
                yield from _run_chunk(ready[start:start + batch_size], classifier, options, fallback, threshold)
            return

    # Several workers already keep the cores busy: each decodes its photo on one.
    decode_threads = 1 if options.workers > 1 else None

    budget = getattr(classifier, "decode_budget", DEFAULT_BUDGET)

    def load(path: str) -> _Prepared:
        return _load(path, classifier.spec, keep_bytes, decode_threads, budget)

    from concurrent.futures import ThreadPoolExecutor  # here: a cold single-photo command never needs it

    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="edge-decode") as pool:
        pending: deque[Future[_Prepared]] = deque()
        source = iter(str(p) for p in paths)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    pending.append(pool.submit(load, next(source)))
                except StopIteration:
                    exhausted = True
            if not pending:
                return
            chunk = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            yield from _run_chunk(chunk, classifier, options, fallback, threshold)


def _run_chunk(
    chunk: list[_Prepared],
    classifier: Classifier,
    options: PipelineOptions,
    fallback: FallbackClient | None,
    threshold: float,
) -> Iterator[Classification]:
    good = [item for item in chunk if item.tensor is not None]
    answers: dict[int, tuple] = {}
    share_ms = 0.0
    if good:
        started = time.perf_counter()
        results = classifier.run_batch(np.stack([item.tensor for item in good]))
        share_ms = _ms(started) / len(good)
        answers = {id(item): result for item, result in zip(good, results)}
    for item in chunk:
        if item.error is not None:
            yield Classification(
                path=item.path,
                model_name=classifier.name,
                model_version=classifier.version,
                latency_ms=item.ms,
                error=item.error.to_dict(),
            )
            continue
        edge = Classification(
            path=item.path,
            categories=answers[id(item)],
            model_name=classifier.name,
            model_version=classifier.version,
            source="edge",
            latency_ms=item.ms + share_ms,
        )
        pixels = None if item.pixels is None else (lambda p=item.pixels: pixel_payload(p, classifier.spec))
        yield ask_server_if_unsure(edge, item.data, classifier, options.fallback, fallback, threshold, pixels)


def ask_server_if_unsure(
    edge: Classification,
    data: bytes | None,
    classifier: Classifier,
    mode: str,
    fallback: FallbackClient | None,
    threshold: float,
    pixels: Callable[[], PixelPayload | None] | None = None,
) -> Classification:
    """The server's answer when the edge is unsure (or always), else the edge answer, marked why.

    `pixels` makes the fitted pixels the device ran (called only when the server is asked): the
    server gets them instead of the photo when it takes them.
    """
    unsure = edge.score is not None and edge.score < threshold
    if mode == "never" or (mode == "auto" and not unsure):
        return edge
    if fallback is None or data is None:
        return _replace(edge, fallback="skipped: no server configured")
    started = time.perf_counter()
    try:
        payload = pixels() if pixels is not None and fallback.sends_pixels else None
        answer = fallback.predict(data, classifier.name, classifier.version, classifier.options.top_k, payload)
    except FallbackUnavailableError as exc:
        return _replace(edge, fallback=f"unavailable: {exc}", latency_ms=edge.latency_ms + _ms(started))
    return Classification(
        path=edge.path,
        categories=answer.categories,
        model_name=answer.model_name or edge.model_name,
        model_version=answer.model_version if answer.model_version is not None else edge.model_version,
        source="server",
        latency_ms=edge.latency_ms + _ms(started),
        fallback="answered",
    )


def pixel_payload(pixels: np.ndarray, spec: PreprocessSpec) -> PixelPayload:
    """What the fallback client sends for fitted pixels: their bytes, shape and the spec's pixel digest."""
    from .fallback import PixelPayload

    return PixelPayload.from_array(pixels, spec)


def _replace(result: Classification, **changes: object) -> Classification:
    from dataclasses import replace

    return replace(result, **changes)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
