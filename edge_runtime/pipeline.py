"""Classify many photos fast: decode and prepare on worker threads while the interpreter runs.

Results come back in input order. Photos are batched when the model takes a variable batch. A bad
photo yields a result with its error and never stops the others. Low-confidence photos go to the
server's full model when a fallback client is given.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from preprocessing import InvalidImageError, preprocess, read_source

from .classifier import Classifier
from .errors import FallbackUnavailableError
from .results import Classification

if TYPE_CHECKING:  # the fallback client pulls in urllib and ssl: only load it when a server is used
    from .fallback import FallbackClient

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
    error: InvalidImageError | None
    ms: float


def classify_paths(
    paths: Iterable[str | Path],
    classifier: Classifier,
    options: PipelineOptions = PipelineOptions(),
    fallback: FallbackClient | None = None,
) -> Iterator[Classification]:
    """Classify each photo in order, pipelined; yields one `Classification` per path."""
    keep_bytes = fallback is not None and options.fallback != "never"
    batch_size = max(1, classifier.max_batch)
    window = max(batch_size, options.workers * 4)
    threshold = options.threshold if options.threshold is not None else classifier.threshold

    def load(path: str) -> _Prepared:
        started = time.perf_counter()
        try:
            data = read_source(path)
            tensor = preprocess(data, classifier.spec)
            return _Prepared(path, tensor, data if keep_bytes else None, None, _ms(started))
        except InvalidImageError as exc:
            return _Prepared(path, None, None, exc, _ms(started))

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
        yield ask_server_if_unsure(edge, item.data, classifier, options.fallback, fallback, threshold)


def ask_server_if_unsure(
    edge: Classification,
    data: bytes | None,
    classifier: Classifier,
    mode: str,
    fallback: FallbackClient | None,
    threshold: float,
) -> Classification:
    """The server's answer when the edge is unsure (or always), else the edge answer, marked why."""
    unsure = edge.score is not None and edge.score < threshold
    if mode == "never" or (mode == "auto" and not unsure):
        return edge
    if fallback is None or data is None:
        return _replace(edge, fallback="skipped: no server configured")
    started = time.perf_counter()
    try:
        answer = fallback.predict(data, classifier.name, classifier.version, classifier.options.top_k)
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


def _replace(result: Classification, **changes: object) -> Classification:
    from dataclasses import replace

    return replace(result, **changes)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
