"""The interface every prediction backend implements: a batch in, probabilities out."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Predictor(Protocol):
    """Runs the full model of one published version on a batch of prepared photos.

    `batch` is float32 [N, H, W, 3], prepared with the version's float PreprocessSpec, or, for a
    version that `takes_pixels`, the fitted uint8 pixels [N, H, W, 3] before normalisation (the model
    normalises them itself: the converter's `pixels` signature); the answer is float32 [N, num_classes]. Implementations raise `BackendUnavailableError` (503) when they cannot
    answer now and `BackendFailedError` (502) when the backend refuses the call.
    """

    #: Short name for metrics and logs: "embedded" or "tf_serving".
    kind: str

    async def predict(self, name: str, version: int, batch: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """Probabilities for `batch`; `timeout_s` is what the requests' deadlines leave for this call."""
        ...

    async def takes_pixels(self, name: str, version: int, *, timeout_s: float | None = None) -> bool:
        """Whether `predict` should get this version's photos as uint8 pixels (optional: without it, float32)."""
        ...

    async def model_status(self, name: str) -> dict[int, str]:
        """{version: state} of what the backend has loaded (TF Serving's states: LOADING, AVAILABLE, ...)."""
        ...

    async def ready(self) -> str | None:
        """None when the backend can serve, else one line saying why not (for /readyz)."""
        ...

    async def aclose(self) -> None: ...
