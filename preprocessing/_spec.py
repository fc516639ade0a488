"""`PreprocessSpec`: everything needed to turn a photo into the exact tensor a model was trained on.

The spec travels inside every model bundle as JSON, so the device, the server, calibration and
training all prepare a photo the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._errors import SpecError

RESIZE_FILTERS: tuple[str, ...] = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
FIT_POLICIES: tuple[str, ...] = ("stretch", "center_crop", "pad")
DTYPES: tuple[str, ...] = ("float32", "uint8", "int8")
SPEC_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded photo becomes a model input.

    A pixel value `p` in [0, 255] becomes `x = (p * scale - mean[c]) / std[c]`. For integer inputs
    (`dtype` uint8 or int8) `x` is then quantized with `quantization = (q_scale, zero_point)` as
    `round(x / q_scale) + zero_point`; uint8 without quantization feeds the raw resized pixels.
    """

    height: int = 224
    width: int = 224
    resize: str = "bilinear"
    fit: str = "center_crop"
    pad_color: tuple[int, int, int] = (255, 255, 255)
    scale: float = 1 / 127.5
    mean: tuple[float, float, float] = (1.0, 1.0, 1.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    quantization: tuple[float, int] | None = None
    jpeg_draft: bool = True
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        # Normalise sequences from JSON lists to tuples, then validate every field.
        object.__setattr__(self, "pad_color", _tuple_of(self.pad_color, 3, int, "pad_color"))
        object.__setattr__(self, "mean", _tuple_of(self.mean, 3, float, "mean"))
        object.__setattr__(self, "std", _tuple_of(self.std, 3, float, "std"))
        if self.quantization is not None:
            q = _tuple_of(self.quantization, 2, float, "quantization")
            object.__setattr__(self, "quantization", (q[0], int(q[1])))
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8192:
                raise SpecError(f"PreprocessSpec.{name} must be a whole number from 1 to 8192, got {value!r}")
        _one_of(self.resize, RESIZE_FILTERS, "resize")
        _one_of(self.fit, FIT_POLICIES, "fit")
        _one_of(self.dtype, DTYPES, "dtype")
        if not all(0 <= c <= 255 for c in self.pad_color):
            raise SpecError(f"PreprocessSpec.pad_color values must be 0..255, got {self.pad_color}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise SpecError(f"PreprocessSpec.scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if not all(math.isfinite(m) for m in self.mean):
            raise SpecError(f"PreprocessSpec.mean must be finite numbers, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise SpecError(f"PreprocessSpec.std must be positive numbers, got {self.std}")
        if self.quantization is not None:
            q_scale, zero_point = self.quantization
            if not (math.isfinite(q_scale) and q_scale > 0):
                raise SpecError(f"PreprocessSpec.quantization scale must be positive, got {q_scale}")
            low, high = (0, 255) if self.dtype == "uint8" else (-128, 127)
            if self.dtype == "float32" or not low <= zero_point <= high:
                raise SpecError(
                    "PreprocessSpec.quantization needs dtype uint8 (zero point 0..255) or int8 "
                    f"(zero point -128..127), got dtype {self.dtype} and zero point {zero_point}"
                )
        elif self.dtype == "int8":
            raise SpecError("PreprocessSpec.dtype int8 needs quantization (scale, zero_point)")
        if not isinstance(self.jpeg_draft, bool):
            raise SpecError(f"PreprocessSpec.jpeg_draft must be true or false, got {self.jpeg_draft!r}")
        if self.version != SPEC_VERSION:
            raise SpecError(
                f"PreprocessSpec version {self.version} is not supported by this edge-classify "
                f"(it reads version {SPEC_VERSION}): update edge-classify."
            )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order Pillow uses."""
        return (self.width, self.height)

    @property
    def pixel_mean(self) -> tuple[float, float, float]:
        """Mean in pixel units, as TFLite metadata's NormalizationOptions wants: x = (p - M) / S."""
        return tuple(m / self.scale for m in self.mean)  # type: ignore[return-value]

    @property
    def pixel_std(self) -> tuple[float, float, float]:
        """Std in pixel units, as TFLite metadata's NormalizationOptions wants: x = (p - M) / S."""
        return tuple(s / self.scale for s in self.std)  # type: ignore[return-value]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(height, width, 3): the fitted uint8 pixels `preprocess_pixels` returns."""
        return (self.height, self.width, 3)

    def pixels_digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the fields that make the fitted pixels.

        Covers decode and geometry only (height, width, resize, fit, pad_color, jpeg_draft, version),
        not normalisation or dtype: a model's int8 spec and its float spec give the same pixels, so a
        device's pixels can be checked against the server's float spec by this digest.
        """
        data = self.to_dict()
        geometry = {key: data[key] for key in _PIXEL_FIELDS}
        return hashlib.sha256(json.dumps(geometry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def replace(self, **changes: Any) -> "PreprocessSpec":
        """A copy with some fields changed (and validated)."""
        return PreprocessSpec(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = asdict(self)
        for key in ("pad_color", "mean", "std", "quantization"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    def to_json(self) -> str:
        """The spec as a JSON document (keys sorted, so equal specs give equal text)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "PreprocessSpec":
        """Build a spec from a dict, refusing unknown keys: a newer spec must not be half-read."""
        if not isinstance(data, dict):
            raise SpecError(f"a preprocessing spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown preprocessing spec field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SpecError(f"bad preprocessing spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> "PreprocessSpec":
        """Parse `to_json` output."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SpecError(f"the preprocessing spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


#: The spec fields that decide the fitted pixels (before normalisation): what `pixels_digest` covers.
_PIXEL_FIELDS = ("height", "width", "resize", "fit", "pad_color", "jpeg_draft", "version")


def _one_of(value: Any, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise SpecError(f"PreprocessSpec.{name} must be one of {', '.join(allowed)}; got {value!r}")


def _tuple_of(value: Any, length: int, kind: type, name: str) -> tuple:
    try:
        items = tuple(value)
        if len(items) != length or any(isinstance(v, bool) for v in items):
            raise ValueError
        return tuple(kind(v) for v in items)
    except (TypeError, ValueError):
        raise SpecError(f"PreprocessSpec.{name} must be {length} numbers, got {value!r}") from None
