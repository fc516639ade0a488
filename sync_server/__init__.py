"""sync_server: model registry, staged rollout, pushed updates and full-model fallback (`sync-server`).

The public surface is small and cheap to import (no FastAPI, no TensorFlow until used):

    ServerConfig, BatchingOptions, TFServingOptions, UploadLimits, RolloutOptions   options (config.py)
    create_app(config) -> FastAPI                                                     the HTTP app (app.py)
    SyncServerError and its subclasses                                                errors (errors.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import BatchingOptions, RolloutOptions, ServerConfig, TFServingOptions, UploadLimits
from .errors import (
    AuthenticationError,
    BackendError,
    BackendFailedError,
    BackendUnavailableError,
    BadRequestError,
    BundleRejectedError,
    ConfigError,
    ConflictError,
    InvalidPhotoError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RangeNotSatisfiableError,
    RequestError,
    SyncServerError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendFailedError",
    "BackendUnavailableError",
    "BadRequestError",
    "BatchingOptions",
    "BundleRejectedError",
    "ConfigError",
    "ConflictError",
    "InvalidPhotoError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RangeNotSatisfiableError",
    "RequestError",
    "RolloutOptions",
    "ServerConfig",
    "SyncServerError",
    "TFServingOptions",
    "UploadLimits",
    "create_app",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imports FastAPI: only when asked for
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'sync_server' has no attribute {name!r}")
