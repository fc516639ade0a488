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

from typing import TYPE_CHECKING

from preprocessing._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
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
    from .lite_model import LiteClassifier
    from .manifest import FORMAT_VERSION, QUANTIZATION_MODES, Manifest, SmokeTest, TensorInfo
    from .metadata import read_metadata
    from .options import ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions
    from .pipeline import ConversionResult, convert
    from .report import ClassAgreement, GpuReport, ModelScore, ValidationReport
    from .serving import export_for_serving
    from .signing import generate_keypair, key_id, load_private_key, load_public_key, sign, verify, write_keypair
    from .smoke import run_smoke_test

# Every public name loads on first use (PEP 562), from the module below. A device that only reads
# bundles (`from converter.bundle import read_bundle`) runs this file too, so it must import nothing:
# options, reports and signing keys cost a cold `edge-classify` tens of milliseconds it does not
# need, and `convert`, `export_for_serving`, `read_metadata`, `run_smoke_test` and `LiteClassifier`
# pull in TensorFlow or LiteRT.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "bundle": ("MANIFEST_FILE", "MODEL_FILE", "SIGNATURE_FILE", "Bundle", "read_bundle", "write_bundle"),
    "errors": (
        "BundleError", "BundleFormatError", "ConversionError", "ConverterFailedError", "DataError", "InputError",
        "KeyFileError", "ModelContractError", "ModelHashMismatchError", "NotASavedModelError", "PublishError",
        "SignatureMismatchError", "UnsignedBundleError", "UnsupportedOpError", "UsageError", "ValidationGateError",
    ),
    "manifest": ("FORMAT_VERSION", "QUANTIZATION_MODES", "Manifest", "SmokeTest", "TensorInfo"),
    "options": ("ConvertOptions", "QuantizationOptions", "SigningOptions", "ValidationOptions"),
    "report": ("ClassAgreement", "GpuReport", "ModelScore", "ValidationReport"),
    "signing": (
        "generate_keypair", "key_id", "load_private_key", "load_public_key", "sign", "verify", "write_keypair",
    ),
    "pipeline": ("convert", "ConversionResult"),
    "serving": ("export_for_serving",),
    "metadata": ("read_metadata",),
    "smoke": ("run_smoke_test",),
    "lite_model": ("LiteClassifier",),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


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
