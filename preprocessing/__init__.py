"""The one implementation of photo decoding, validation and tensor preparation.

Training, calibration, the device and the server all call `preprocess(source, spec)`, so a photo
gives the same tensor everywhere. Needs only Pillow and numpy; the TensorFlow adapter lives in
`preprocessing.tf_data` and is imported only by code that trains or converts.
"""

from ._decode import DEFAULT_LIMITS, DecodeLimits, ImageSource, load_image, read_source
from ._errors import ERROR_CODES, InvalidImageError, PreprocessingError, SpecError
from ._folders import DatasetError, LabeledImages, list_images, list_labeled_images, read_labels
from ._prepare import prepare, preprocess
from ._sniff import ACCEPTED_FORMATS, sniff_format
from ._spec import DTYPES, FIT_POLICIES, RESIZE_FILTERS, PreprocessSpec

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
