"""The errors of the preprocessing package.

    PreprocessingError            base of everything this package raises
    ├── InvalidImageError         (ValueError) the photo cannot be used; `.code` says why
    ├── DecodeBusyError           the decode budget stayed full for its whole wait: the photo is fine,
    │                             the process is busy (a server answers 503 with Retry-After)
    └── SpecError                 (ValueError) a PreprocessSpec or its JSON is malformed

`InvalidImageError.code` is short and machine-readable, for JSON output and HTTP error bodies; the
message is one sentence a seller can act on.
"""

from __future__ import annotations

#: Every code an `InvalidImageError` can carry, with what it means.
ERROR_CODES: dict[str, str] = {
    "empty": "the file or upload has no bytes",
    "not_found": "the path does not exist or cannot be read",
    "not_an_image": "the bytes are not an image format we recognise",
    "unsupported_format": "an image format we recognise but do not accept (TIFF, HEIC, ...)",
    "truncated": "the image data ends before the picture is complete",
    "corrupt": "the image data is damaged",
    "too_large": "the file or the picture is larger than the configured limit",
    "invalid_dimensions": "the picture has no pixels",
}


class PreprocessingError(Exception):
    """Base class of the errors raised by `preprocessing`."""


class InvalidImageError(PreprocessingError, ValueError):
    """Raised when a photo cannot be decoded or is refused by the limits.

    `code` is one of `ERROR_CODES`; `str(error)` is the human message.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:  # a programming error, not a user one
            raise AssertionError(f"unknown InvalidImageError code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The `{code, message}` object used in JSON output and HTTP error bodies."""
        return {"code": self.code, "message": self.message}


class DecodeBusyError(PreprocessingError):
    """Raised when a `DecodeBudget` had no room for a photo during the whole wait.

    Not a bad photo: the same photo decodes once other decodes finish. `code` is always `busy`;
    `retry_after_s` is a suggestion for the caller's Retry-After.
    """

    code = "busy"

    def __init__(self, message: str, *, waited_s: float = 0.0, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, str]:
        """The `{code, message}` object used in JSON output and HTTP error bodies."""
        return {"code": self.code, "message": self.message}


class SpecError(PreprocessingError, ValueError):
    """Raised when a `PreprocessSpec` has a bad field or its JSON cannot be read."""
