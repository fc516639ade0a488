"""Full-model predictions: one `Predictor` interface, two backends, batching in front of both.

    base.Predictor          predict(name, version, batch) -> probabilities; takes_pixels; model_status; ready; aclose
    tf_serving.py           TFServingClient (REST predict + model status) and TFServingPredictor
    tf_serving_grpc.py      TFServingGrpcClient (gRPC Predict with tensor_content + ModelService) and its predictor
    embedded.py             EmbeddedPredictor: SavedModels in-process (imports TensorFlow; loaded lazily)
    batching.py             Batcher: concurrent requests -> batches (max size, max wait), per version
    oip.py                  OIPPredictor: Open Inference Protocol REST with the binary tensor extension
    service.py              PredictionService: photo bytes or device pixels -> prepare -> batch -> top-k

A version exported with the converter's pixel signatures (`converter.serving.add_pixel_signatures`) takes
the fitted uint8 pixels and normalises them in its graph: `takes_pixels` says so (embedded and gRPC:
the `pixels` signature; REST: `pixels_png`; OIP: a UINT8 input), and the service then sends uint8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ServerConfig
    from ..serving_repo import ServingRepository
    from .base import Predictor


def make_predictor(config: "ServerConfig", repository: "ServingRepository") -> "Predictor":
    """The backend at `config.tf_serving.url` in its `protocol`, else the embedded SavedModel predictor."""
    options = config.tf_serving
    if options.url and options.protocol == "tf-serving-grpc":
        from .tf_serving_grpc import TFServingGrpcClient, TFServingGrpcPredictor

        return TFServingGrpcPredictor(TFServingGrpcClient(options))
    if options.url and options.protocol == "oip":
        try:
            from .oip import OIPPredictor
        except ImportError as exc:
            from ..errors import ConfigError

            raise ConfigError(f"the oip backend protocol is not available in this installation ({exc})") from exc
        return OIPPredictor(options)
    if options.url:
        from .tf_serving import TFServingClient, TFServingPredictor

        return TFServingPredictor(TFServingClient(options))
    from .embedded import EmbeddedPredictor

    return EmbeddedPredictor(repository, max_loaded=config.embedded_max_loaded)
