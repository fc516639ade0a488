"""The converter: SavedModel in, verified and signed TFLite bundle out; and reading bundles back.

Importing `converter` never imports TensorFlow: bundle reading, signatures, manifests and metadata
(what devices and the server use) need only the stdlib, cryptography, numpy, flatbuffers and
`preprocessing`. `convert` and the training-time optimisations in `converter.optimize` load
TensorFlow when they are first used.

    from converter import ConvertOptions, QuantizationOptions, ValidationOptions, SigningOptions, convert
    result = convert("model/", ConvertOptions(out=Path("bundle"), ...))
    bundle = read_bundle("bundle", public_key="key.pub")     # raises BundleError if not trustworthy
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Bundle, read_bundle, write_bundle
from .errors import (
    BundleError,
    BundleFormatError,
    ConversionError,
    ConverterFailedError,
    DataError,
    InputError,
    KeyFileError,
    ModelContractError,
    ModelHashMismatchError,
    NotASavedModelError,
    PublishError,
    SignatureMismatchError,
    UnsignedBundleError,
    UnsupportedOpError,
    UsageError,
    ValidationGateError,
)
from .manifest import FORMAT_VERSION, QUANTIZATION_MODES, Manifest, SmokeTest, TensorInfo
from .options import ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions
from .report import ClassAgreement, GpuReport, ModelScore, ValidationReport
from .signing import generate_keypair, key_id, load_private_key, load_public_key, sign, verify, write_keypair

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import ConversionResult, convert

# Imported on first use: they pull in TensorFlow or LiteRT.
_LAZY = {
    "convert": "pipeline",
    "ConversionResult": "pipeline",
    "export_for_serving": "serving",
    "read_metadata": "metadata",
    "run_smoke_test": "smoke",
    "LiteClassifier": "lite_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")


__all__ = [
    "Bundle",
    "BundleError",
    "BundleFormatError",
    "ClassAgreement",
    "ConversionError",
    "ConversionResult",
    "ConvertOptions",
    "ConverterFailedError",
    "DataError",
    "FORMAT_VERSION",
    "GpuReport",
    "InputError",
    "KeyFileError",
    "LiteClassifier",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "Manifest",
    "ModelContractError",
    "ModelHashMismatchError",
    "ModelScore",
    "NotASavedModelError",
    "PublishError",
    "QUANTIZATION_MODES",
    "QuantizationOptions",
    "SIGNATURE_FILE",
    "SignatureMismatchError",
    "SigningOptions",
    "SmokeTest",
    "TensorInfo",
    "UnsignedBundleError",
    "UnsupportedOpError",
    "UsageError",
    "ValidationGateError",
    "ValidationOptions",
    "ValidationReport",
    "convert",
    "export_for_serving",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_bundle",
    "read_metadata",
    "run_smoke_test",
    "sign",
    "verify",
    "write_bundle",
    "write_keypair",
]
