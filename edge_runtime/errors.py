"""The errors of the edge runtime.

    EdgeRuntimeError               base of everything edge_runtime raises
    ├── ModelNotFoundError         no model given and none installed in the local store
    ├── ModelLoadError             the interpreter or a delegate could not load the model
    ├── BundleRejectedError        a bundle failed verification (hash, size, signature, manifest)
    ├── StoreError                 the local model store is unusable (permissions, unknown version)
    └── FallbackUnavailableError   the server could not answer in time (offline, timeout, error)

Bad photos are not runtime errors: they are `preprocessing.InvalidImageError`, reported per photo.
"""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base class of the errors raised by `edge_runtime`."""


class ModelNotFoundError(EdgeRuntimeError):
    """Raised when no model was given and the local store has no current model."""


class ModelLoadError(EdgeRuntimeError):
    """Raised when the interpreter cannot load a model file."""


class BundleRejectedError(EdgeRuntimeError):
    """Raised when a model bundle does not verify: hash, size, signature or manifest."""


class StoreError(EdgeRuntimeError):
    """Raised when the local model store cannot do what was asked."""


class FallbackUnavailableError(EdgeRuntimeError):
    """Raised when the server's full model could not answer within the time allowed."""
