"""The errors of the converter and of bundle reading.

    ConversionError                 base of everything this package raises
    ├── UsageError                  the caller asked for something impossible (bad option or combination)
    ├── InputError                  an input cannot be used; nothing was written
    │   ├── NotASavedModelError     the path is not a SavedModel directory
    │   ├── ModelContractError      the SavedModel is not image in, probabilities out, or its labels or
    │   │                           spec do not fit it
    │   ├── DataError               a calibration or validation folder is missing, empty or unreadable
    │   └── KeyFileError            a signing or verification key cannot be used
    ├── ConverterFailedError        the TFLite converter refused the model
    │   └── UnsupportedOpError      the model uses ops that TFLite has no builtin kernel for
    ├── ValidationGateError         the converted model disagrees with the SavedModel too often
    ├── PublishError                a bundle or a TF Serving version cannot be put into place
    └── BundleError                 a bundle cannot be read or trusted (raised by `read_bundle`)
        ├── BundleFormatError       files missing, manifest malformed, unknown format_version
        ├── UnsignedBundleError     there is no manifest.sig but a signature is required
        ├── SignatureMismatchError  manifest.sig does not verify against the trusted key
        └── ModelHashMismatchError  model.tflite or labels.txt is not the file the manifest describes

Every message is one line a person can act on; the CLI prints it as is, never a traceback. Errors from
TensorFlow, LiteRT or cryptography are translated once, where they are raised, with `raise ... from exc`.
"""

from __future__ import annotations

from typing import Any


class ConversionError(Exception):
    """Base class of the errors raised by `converter`."""

    #: Process exit status the CLI uses for this kind of error.
    exit_code: int = 2


class UsageError(ConversionError, ValueError):
    """Raised when options are invalid or contradict each other (e.g. int8 without calibration)."""


class InputError(ConversionError):
    """Raised when an input (model, folder, key, spec, labels) cannot be used."""


class NotASavedModelError(InputError):
    """Raised when the path given as SAVED_MODEL is not a SavedModel directory."""


class ModelContractError(InputError):
    """Raised when the SavedModel does not take an image and return probabilities, or its labels/spec misfit."""


class DataError(InputError):
    """Raised when a calibration or validation folder is missing, empty or holds unreadable photos."""


class KeyFileError(InputError):
    """Raised when a signing or verification key file is missing, malformed or not an Ed25519 key."""


class ConverterFailedError(ConversionError):
    """Raised when `tf.lite.TFLiteConverter` fails on the model."""


class UnsupportedOpError(ConverterFailedError):
    """Raised when the model uses TensorFlow ops with no TFLite builtin kernel; `.ops` names them."""

    def __init__(self, message: str, ops: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ops = ops


class ValidationGateError(ConversionError):
    """Raised when top-1 agreement is below the threshold; `.report` holds the `ValidationReport`."""

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class PublishError(ConversionError):
    """Raised when a bundle or a TF Serving version folder cannot be put into place."""


class BundleError(ConversionError):
    """Base class of the errors `read_bundle` raises: the bundle must not be used."""


class BundleFormatError(BundleError):
    """Raised when a bundle misses a file, has a malformed manifest or an unknown format_version."""


class UnsignedBundleError(BundleError):
    """Raised when a bundle has no manifest.sig and a signature is required."""


class SignatureMismatchError(BundleError):
    """Raised when manifest.sig is not a valid signature of manifest.json by the trusted key."""


class ModelHashMismatchError(BundleError):
    """Raised when model.tflite or labels.txt differs from what the (signed) manifest describes."""


__all__ = [
    "BundleError",
    "BundleFormatError",
    "ConversionError",
    "ConverterFailedError",
    "DataError",
    "InputError",
    "KeyFileError",
    "ModelContractError",
    "ModelHashMismatchError",
    "NotASavedModelError",
    "PublishError",
    "SignatureMismatchError",
    "UnsignedBundleError",
    "UnsupportedOpError",
    "UsageError",
    "ValidationGateError",
]
