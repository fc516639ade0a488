"""The full-model fallback: photo bytes in, the full model's top-k out.

The photo is prepared with the version's *float* spec on a worker thread, then goes through the batcher
(or straight to the backend when batching is off) to the predictor: the embedded SavedModel, TF Serving
or an OIP server. A version whose backend `takes_pixels` (the converter's `pixels` signature: the model
normalises in its graph) gets the fitted uint8 pixels, `preprocessing.preprocess_pixels` for a photo and
the device's pixels as they came (no work here at all); any other gets `preprocessing.preprocess` /
`normalise` float32, four times the bytes.

Every prediction has a deadline (`deadline_s` from its arrival): preparing, queueing in the batcher
and the backend call all fit in it, and at the deadline the caller gets 503 `deadline_exceeded`, not
a late answer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Callable

import anyio
import numpy as np

from preprocessing import (
    DecodeBudget,
    DecodeBusyError,
    DecodeLimits,
    InvalidImageError,
    PreprocessSpec,
    normalise,
    preprocess,
    preprocess_pixels,
)

from ..config import BatchingOptions, UploadLimits
from ..errors import BackendUnavailableError, InvalidPhotoError, ServerBusyError
from .base import Predictor
from .batching import Batcher

#: Largest top_k the API accepts.
MAX_TOP_K = 100


@dataclass(frozen=True)
class Category:
    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """The full model's answer for one photo."""

    model: str
    version: int
    top_k: tuple[Category, ...]
    latency_ms: float

    def to_dict(self) -> dict[str, object]:
        return {
            "model": {"name": self.model, "version": self.version},
            "top_k": [{"label": c.label, "score": round(c.score, 6)} for c in self.top_k],
            "latency_ms": round(self.latency_ms, 2),
        }


class PredictionService:
    """Prepares photos and asks the predictor, batching concurrent requests per version."""

    def __init__(
        self,
        predictor: Predictor,
        version_info: Callable[[str, int], object],
        batching: BatchingOptions,
        limits: UploadLimits,
        on_batch: Callable[[object, int, float], None] | None = None,
        prepare_threads: int = 8,
        *,
        cached_info: Callable[[str, int], object | None] | None = None,
        deadline_s: float = 10.0,
        retry_after_s: int = 5,
    ) -> None:
        self.predictor = predictor
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self._version_info = version_info
        self._cached_info = cached_info or (lambda _name, _version: None)
        self._decode_limits = DecodeLimits(
            max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes, max_decoded_pixels=limits.max_decoded_pixels
        )
        # Every prepare thread decodes inside one budget: no request mix holds more decoded pixels.
        self.decode_budget = DecodeBudget(limits.decode_budget_bytes, wait_s=limits.decode_wait_s)
        self._on_batch = on_batch
        self._prepare_limiter = anyio.CapacityLimiter(prepare_threads)
        self.batcher = Batcher(self._run_batch, batching, on_batch) if batching.enabled else None
        #: (name, version) -> whether its backend takes uint8 pixels (versions are immutable: asked once).
        self._takes_pixels: dict[tuple[str, int], bool] = {}

    async def predict(self, name: str, version: int, photo: bytes, top_k: int) -> Prediction:
        """The top-k for a photo, or 503 `deadline_exceeded` once `deadline_s` have passed."""
        deadline = asyncio.get_running_loop().time() + self.deadline_s
        try:
            async with asyncio.timeout_at(deadline):
                return await self._predict(name, version, photo, top_k, deadline)
        except TimeoutError:
            raise BackendUnavailableError(
                f"the prediction did not finish within its {self.deadline_s:g} s deadline (the backend is slow or "
                "overloaded); try again shortly",
                retry_after_s=self.retry_after_s,
                code="deadline_exceeded",
            ) from None

    async def version_spec(self, name: str, version: int) -> PreprocessSpec:
        """The version's float spec: pixels for `predict_pixels` must be fitted with its geometry."""
        info = self._cached_info(name, version) or await anyio.to_thread.run_sync(self._version_info, name, version)
        return info.float_spec  # type: ignore[attr-defined]

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def pixels_digest(spec: PreprocessSpec) -> str:
        """`spec.pixels_digest()`, kept: it hashes the spec's JSON, 4 % of the loop's time when done per request."""
        return spec.pixels_digest()

    async def predict_pixels(self, name: str, version: int, pixels: np.ndarray, top_k: int) -> Prediction:
        """The top-k for a device's fitted uint8 pixels (`version_spec(...).pixel_shape`, digest checked by
        the caller): no decode; as they are to a backend that takes pixels, else normalised with the float
        spec; then the same batcher and deadline as photos."""
        return await self.predict(name, version, pixels, top_k)  # type: ignore[arg-type]

    async def _predict(self, name: str, version: int, photo: bytes, top_k: int, deadline: float) -> Prediction:
        started = time.perf_counter()
        info = self._cached_info(name, version) or await anyio.to_thread.run_sync(self._version_info, name, version)
        pixels_in = self._takes_pixels.get((name, version))
        if pixels_in is None:
            pixels_in = await self._ask_takes_pixels(name, version, deadline)
        if isinstance(photo, np.ndarray):
            # The device's pixels: as they are, or normalised here, in the loop. Normalising 224x224 takes
            # ~0.3 ms; handing it to a worker thread cost the loop more (a thread wake-up under the GIL:
            # 16 % of the loop's time at 64 clients, measured with py-spy).
            x = photo if pixels_in else normalise(photo, info.float_spec)  # type: ignore[attr-defined]
        else:
            x = await anyio.to_thread.run_sync(self._prepare, photo, info.float_spec, pixels_in, limiter=self._prepare_limiter)  # type: ignore[attr-defined]
        if self.batcher is not None:
            probabilities = await self.batcher.submit((name, version), x, deadline)
        else:
            batch_started = time.perf_counter()
            remaining = deadline - asyncio.get_running_loop().time()
            probabilities = (await self.predictor.predict(name, version, x[None], timeout_s=max(0.001, remaining)))[0]
            if self._on_batch is not None:
                self._on_batch((name, version), 1, time.perf_counter() - batch_started)
        labels = info.labels  # type: ignore[attr-defined]
        if len(probabilities) != len(labels):
            from ..errors import BackendFailedError

            raise BackendFailedError(
                f"version {version} of model {name} answered {len(probabilities)} scores for {len(labels)} labels"
            )
        order = np.argsort(-probabilities, kind="stable")[: max(1, min(top_k, len(labels)))]
        top = tuple(Category(labels[i], float(probabilities[i])) for i in order)
        return Prediction(name, version, top, (time.perf_counter() - started) * 1000.0)

    async def _ask_takes_pixels(self, name: str, version: int, deadline: float) -> bool:
        ask = getattr(self.predictor, "takes_pixels", None)
        answer = False
        if ask is not None:
            answer = bool(await ask(name, version, timeout_s=max(0.001, deadline - asyncio.get_running_loop().time())))
        self._takes_pixels[(name, version)] = answer
        return answer

    def _prepare(self, photo: bytes, spec, pixels: bool = False) -> np.ndarray:  # type: ignore[no-untyped-def]
        if isinstance(photo, np.ndarray):  # a device's fitted pixels (predict_pixels): normalise only
            return photo if pixels else normalise(photo, spec)
        try:
            if pixels:
                return preprocess_pixels(photo, spec, limits=self._decode_limits, budget=self.decode_budget)
            return preprocess(photo, spec, limits=self._decode_limits, budget=self.decode_budget)
        except InvalidImageError as exc:
            raise InvalidPhotoError(exc.code, exc.message) from exc
        except DecodeBusyError as exc:
            raise ServerBusyError(exc.message, retry_after_s=exc.retry_after_s) from exc

    async def _run_batch(self, key: object, batch: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        name, version = key  # type: ignore[misc]
        return await self.predictor.predict(name, version, batch, timeout_s=timeout_s)

    async def aclose(self) -> None:
        if self.batcher is not None:
            await self.batcher.aclose()
        await self.predictor.aclose()
