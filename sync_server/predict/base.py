"""The interface every prediction backend implements: a batch in, probabilities out."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Predictor(Protocol):
    """Runs the full model of one published version on a batch of prepared photos.

    `batch` is float32 [N, H, W, 3], prepared with the version's float PreprocessSpec; the answer is
    float32 [N, num_classes]. Implementations raise `BackendUnavailableError` (503) when they cannot
    answer now and `BackendFailedError` (502) when the backend refuses the call.
    """

    #: Short name for metrics and logs: "embedded" or "tf_serving".
    kind: str

    async def predict(self, name: str, version: int, batch: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """Probabilities for `batch`; `timeout_s` is what the requests' deadlines leave for this call."""
        ...

    async def model_status(self, name: str) -> dict[int, str]:
        """{version: state} of what the backend has loaded (TF Serving's states: LOADING, AVAILABLE, ...)."""
        ...

    async def ready(self) -> str | None:
        """None when the backend can serve, else one line saying why not (for /readyz)."""
        ...

    async def aclose(self) -> None: ...
