"""Full-model predictions: one `Predictor` interface, two backends, batching in front of both.

    base.Predictor          predict(name, version, batch) -> probabilities; model_status; ready; aclose
    tf_serving.py           TFServingClient (REST predict + model status) and TFServingPredictor
    embedded.py             EmbeddedPredictor: SavedModels in-process (imports TensorFlow; loaded lazily)
    batching.py             Batcher: concurrent requests -> batches (max size, max wait), per version
    service.py              PredictionService: photo bytes -> preprocess -> batch -> top-k
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ServerConfig
    from ..serving_repo import ServingRepository
    from .base import Predictor


def make_predictor(config: "ServerConfig", repository: "ServingRepository") -> "Predictor":
    """TF Serving when `config.tf_serving.url` is set, else the embedded SavedModel predictor."""
    if config.tf_serving.url:
        from .tf_serving import TFServingClient, TFServingPredictor

        return TFServingPredictor(TFServingClient(config.tf_serving))
    from .embedded import EmbeddedPredictor

    return EmbeddedPredictor(repository, max_loaded=config.embedded_max_loaded)
