"""The one implementation of photo decoding, validation and tensor preparation.

Training, calibration, the device and the server all call `preprocess(source, spec)`, so a photo
gives the same tensor everywhere. Needs only Pillow and numpy; the TensorFlow adapter lives in
`preprocessing.tf_data` and is imported only by code that trains or converts.

The names below load on first use (PEP 562): reading a spec or an error class costs no numpy or
Pillow import, which a cold `edge-classify` uses to start decoding a photo sooner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    from ._budget import DEFAULT_BUDGET, DecodeBudget, release_freed_memory
    from ._decode import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image, read_source
    from ._errors import ERROR_CODES, DecodeBusyError, InvalidImageError, PreprocessingError, SpecError
    from ._folders import DatasetError, LabeledImages, list_images, list_labeled_images, read_labels
    from ._prepare import fit_pixels, normalise, prepare, preprocess, preprocess_pixels
    from ._sniff import ACCEPTED_FORMATS, sniff_format
    from ._spec import DTYPES, FIT_POLICIES, RESIZE_FILTERS, PreprocessSpec
    from ._stats import InputStats, mean_shift

# Private module -> the public names it defines.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "_budget": ("DEFAULT_BUDGET", "DecodeBudget", "release_freed_memory"),
    "_decode": ("DEFAULT_LIMITS", "DecodeLimits", "ImageSource", "load_image", "read_source"),
    "_errors": ("ERROR_CODES", "DecodeBusyError", "InvalidImageError", "PreprocessingError", "SpecError"),
    "_folders": ("DatasetError", "LabeledImages", "list_images", "list_labeled_images", "read_labels"),
    "_prepare": ("fit_pixels", "normalise", "prepare", "preprocess", "preprocess_pixels"),
    "_sniff": ("ACCEPTED_FORMATS", "sniff_format"),
    "_spec": ("DTYPES", "FIT_POLICIES", "RESIZE_FILTERS", "PreprocessSpec"),
    "_stats": ("InputStats", "mean_shift"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_BUDGET",
    "DEFAULT_LIMITS",
    "DTYPES",
    "DatasetError",
    "DecodeBudget",
    "DecodeBusyError",
    "DecodeLimits",
    "ERROR_CODES",
    "FIT_POLICIES",
    "ImageSource",
    "InputStats",
    "InvalidImageError",
    "LabeledImages",
    "PreprocessSpec",
    "PreprocessingError",
    "RESIZE_FILTERS",
    "SpecError",
    "fit_pixels",
    "list_images",
    "list_labeled_images",
    "load_image",
    "mean_shift",
    "normalise",
    "prepare",
    "preprocess",
    "preprocess_pixels",
    "read_labels",
    "read_source",
    "release_freed_memory",
    "sniff_format",
]
