"""The errors of the sync server: one tree, each class with its HTTP status and a machine-readable code.

    SyncServerError                    base of everything sync_server raises on purpose
    ├── ConfigError                    the server's own configuration is unusable (bad flag, bad key file)
    ├── RequestError                   the caller's mistake: a 4xx answer
    │   ├── BadRequestError            400  malformed input that is not a photo (bad JSON field, bad tar)
    │   ├── AuthenticationError        401  no token, or a token we do not know
    │   ├── PermissionDeniedError      403  a valid token that may not do this
    │   ├── NotFoundError              404  unknown model, version, channel, device or artifact
    │   ├── ConflictError              409  a version that exists with other content; an impossible rollout step
    │   ├── PayloadTooLargeError       413  an upload over the configured limit
    │   ├── UnsupportedMediaTypeError  415  a body in a content type the endpoint does not take
    │   ├── RangeNotSatisfiableError   416  a download range outside the file
    │   ├── BundleRejectedError        422  a bundle or SavedModel that does not verify
    │   └── InvalidPhotoError          422  (400/413 by code) a photo `preprocessing` refuses
    └── BackendError                   failures of the world, not of the caller
        ├── BackendUnavailableError    503  TF Serving down, timing out, or the version not loaded yet
        │   └── DatabaseUnavailableError  503  the database cannot be reached or is locked (Retry-After)
        ├── DiskFullError              507  no space left for the database, artifacts or uploads
        ├── ServerBusyError            503  too many photos being decoded at once (Retry-After)
        └── BackendFailedError         502  the backend answered, but with an error we cannot pass on

Every error renders as `{"error": {"code": ..., "message": ...}}`; `message` is one sentence that names
the problem. Errors from libraries underneath (httpx, SQLAlchemy, TensorFlow) are translated once, at
the module that calls them, with `raise ... from exc`.
"""

from __future__ import annotations

from typing import Any


class SyncServerError(Exception):
    """Base class of the errors raised by `sync_server`."""

    status: int = 500
    default_code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the error answer."""
        return {"error": {"code": self.code, "message": self.message}}


class ConfigError(SyncServerError):
    """Raised when a setting, a key file or the data directory cannot be used."""

    default_code = "config"


class RequestError(SyncServerError):
    """Raised for a request the server cannot honour because of what the caller sent."""

    status = 400
    default_code = "bad_request"


class BadRequestError(RequestError):
    """Raised for malformed input: a bad query parameter, JSON field, archive or Range header."""


class AuthenticationError(RequestError):
    """Raised when a call has no bearer token or one the server does not know (401)."""

    status = 401
    default_code = "bad_token"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": 'Bearer realm="sync-server"'})


class PermissionDeniedError(RequestError):
    """Raised when a known token asks for something it may not see or change (403)."""

    status = 403
    default_code = "forbidden"


class NotFoundError(RequestError):
    """Raised for an unknown model, version, channel, device, artifact or route (404)."""

    status = 404
    default_code = "not_found"


class ConflictError(RequestError):
    """Raised when a request contradicts the stored state: a version re-published with other content (409)."""

    status = 409
    default_code = "conflict"


class PayloadTooLargeError(RequestError):
    """Raised when an upload is larger than the configured limit (413)."""

    status = 413
    default_code = "too_large"


class UnsupportedMediaTypeError(RequestError):
    """Raised when a body's Content-Type is not the one the endpoint reads (415)."""

    status = 415
    default_code = "unsupported_media_type"


class RangeNotSatisfiableError(RequestError):
    """Raised when a Range header asks for bytes past the end of an artifact (416)."""

    status = 416
    default_code = "range_not_satisfiable"


class BundleRejectedError(RequestError):
    """Raised when a bundle or its SavedModel fails verification: signature, hash, manifest, layout (422)."""

    status = 422
    default_code = "bundle_rejected"


class InvalidPhotoError(RequestError):
    """Raised when `preprocessing` refuses a photo; `code` is the preprocessing code (`not_an_image`, ...)."""

    status = 422

    #: Codes that are better told with another status than 422.
    STATUS_BY_CODE = {"empty": 400, "too_large": 413}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = self.STATUS_BY_CODE.get(code, 422)


class BackendError(SyncServerError):
    """Raised when something the server depends on fails: not the caller's fault."""

    status = 502
    default_code = "backend_error"


class BackendUnavailableError(BackendError):
    """Raised when the prediction backend cannot answer now; the answer carries Retry-After (503)."""

    status = 503
    default_code = "backend_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, int(retry_after_s)))})
        self.retry_after_s = retry_after_s


class DatabaseUnavailableError(BackendUnavailableError):
    """Raised when the database cannot be reached, refuses connections or stays locked (503, Retry-After)."""

    default_code = "database_unavailable"


class DiskFullError(BackendError):
    """Raised when a write fails for want of space (ENOSPC, SQLite's "database or disk is full") (507)."""

    status = 507
    default_code = "disk_full"


class ServerBusyError(BackendError):
    """Raised when the decode budget stayed full for the whole wait: the photo is fine, send it again (503)."""

    status = 503
    default_code = "busy"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})
        self.retry_after_s = retry_after_s


class BackendFailedError(BackendError):
    """Raised when the backend answered with an error that is not the caller's (502)."""
