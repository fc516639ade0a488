"""The one implementation of photo decoding, validation and tensor preparation.

Training, calibration, the device and the server all call `preprocess(source, spec)`, so a photo
gives the same tensor everywhere. Needs only Pillow and numpy; the TensorFlow adapter lives in
`preprocessing.tf_data` and is imported only by code that trains or converts.

The names below load on first use (PEP 562): reading a spec or an error class costs no numpy or
Pillow import, which a cold `edge-classify` uses to start decoding a photo sooner.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ._decode import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image, read_source
    from ._errors import ERROR_CODES, InvalidImageError, PreprocessingError, SpecError
    from ._folders import DatasetError, LabeledImages, list_images, list_labeled_images, read_labels
    from ._prepare import prepare, preprocess
    from ._sniff import ACCEPTED_FORMATS, sniff_format
    from ._spec import DTYPES, FIT_POLICIES, RESIZE_FILTERS, PreprocessSpec

# Public name -> the private module that defines it.
_SOURCES: dict[str, str] = {
    "DEFAULT_LIMITS": "_decode",
    "DecodeLimits": "_decode",
    "ImageSource": "_decode",
    "load_image": "_decode",
    "read_source": "_decode",
    "ERROR_CODES": "_errors",
    "InvalidImageError": "_errors",
    "PreprocessingError": "_errors",
    "SpecError": "_errors",
    "DatasetError": "_folders",
    "LabeledImages": "_folders",
    "list_images": "_folders",
    "list_labeled_images": "_folders",
    "read_labels": "_folders",
    "prepare": "_prepare",
    "preprocess": "_prepare",
    "ACCEPTED_FORMATS": "_sniff",
    "sniff_format": "_sniff",
    "DTYPES": "_spec",
    "FIT_POLICIES": "_spec",
    "RESIZE_FILTERS": "_spec",
    "PreprocessSpec": "_spec",
}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'preprocessing' has no attribute {name!r}")
    value = getattr(import_module(f".{source}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_LIMITS",
    "DTYPES",
    "DatasetError",
    "DecodeLimits",
    "ERROR_CODES",
    "FIT_POLICIES",
    "ImageSource",
    "InvalidImageError",
    "LabeledImages",
    "PreprocessSpec",
    "PreprocessingError",
    "RESIZE_FILTERS",
    "SpecError",
    "list_images",
    "list_labeled_images",
    "load_image",
    "prepare",
    "preprocess",
    "read_labels",
    "read_source",
    "sniff_format",
]
