"""`manifest.json`: what a bundle holds, how to feed its model, and how well it was validated.

The manifest is the signed part of a bundle: its sha256 of `model.tflite` and `labels.txt` ties the
files to the signature. Reading it needs no TensorFlow (stdlib, numpy and `preprocessing` only).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from preprocessing import PreprocessSpec, SpecError

from .baseline import Baseline
from .errors import BundleFormatError
from .report import GpuReport, ValidationReport

#: Version of the manifest layout; readers refuse versions they do not know.
FORMAT_VERSION = 1
#: The quantization modes the converter offers.
QUANTIZATION_MODES: tuple[str, ...] = ("float32", "dynamic", "float16", "int8")
#: Hardware the bundle is tuned for.
TARGETS: tuple[str, ...] = ("cpu", "gpu")
#: Bundle and model names: usable as a folder name and in a URL.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the interpreter reports it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    #: (scale, zero_point) for integer tensors, else None.
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        q = None if self.quantization is None else {"scale": self.quantization[0], "zero_point": self.quantization[1]}
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "quantization": q}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorInfo":
        q = data.get("quantization")
        quantization = None if q is None else (float(q["scale"]), int(q["zero_point"]))
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]), quantization)


@dataclass(frozen=True)
class SmokeCase:
    """A small golden photo (PNG) and what the converted model answered for it."""

    image_png: bytes
    expected_label: str
    expected_probabilities: tuple[float, ...]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_png_base64": base64.b64encode(self.image_png).decode("ascii"),
            "expected_label": self.expected_label,
            "expected_probabilities": [round(p, 6) for p in self.expected_probabilities],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SmokeCase":
        try:
            png = base64.b64decode(data["image_png_base64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BundleFormatError("a smoke_test image is not base64") from exc
        return cls(png, str(data["expected_label"]), tuple(float(p) for p in data["expected_probabilities"]),
                   str(data.get("source", "")))


@dataclass(frozen=True)
class SmokeTest:
    """Golden photos a device runs after download: same top-1, probabilities within `tolerance`."""

    cases: tuple[SmokeCase, ...]
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SmokeTest":
        return cls(tuple(SmokeCase.from_dict(c) for c in data["cases"]), float(data["tolerance"]))


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` says about a bundle."""

    name: str
    version: int
    created: str
    quantization: str
    target: str
    model_file: str
    model_sha256: str
    model_size: int
    labels: tuple[str, ...]
    labels_file: str
    labels_sha256: str
    input: TensorInfo
    output: TensorInfo
    #: The spec whose `preprocess(photo, spec)` output feeds the model directly (integer for int8).
    preprocess_spec: PreprocessSpec
    #: The float spec the SavedModel was trained with.
    float_preprocess_spec: PreprocessSpec
    confidence_threshold: float
    smoke_test: SmokeTest
    source: dict[str, Any] = field(default_factory=dict)
    validation: ValidationReport | None = None
    gpu: GpuReport | None = None
    #: What the converted model answered on the validation photos (None: validation skipped, or an
    #: older bundle); devices and the server measure drift against it.
    baseline: Baseline | None = None
    serving: dict[str, Any] | None = None
    converter: dict[str, Any] = field(default_factory=dict)
    #: {"algorithm": "Ed25519", "key_id": ...} of the key that signs it, or None for an unsigned bundle.
    signing: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "quantization": self.quantization,
            "target": self.target,
            "model": {"file": self.model_file, "sha256": self.model_sha256, "size": self.model_size},
            "labels": list(self.labels),
            "labels_file": {"file": self.labels_file, "sha256": self.labels_sha256},
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "preprocess_spec": self.preprocess_spec.to_dict(),
            "float_preprocess_spec": self.float_preprocess_spec.to_dict(),
            "confidence_threshold": self.confidence_threshold,
            "smoke_test": self.smoke_test.to_dict(),
            "source": self.source,
            "validation": None if self.validation is None else self.validation.to_dict(),
            "gpu": None if self.gpu is None else self.gpu.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "serving": self.serving,
            "converter": self.converter,
            "signing": self.signing,
        }

    def to_json(self) -> bytes:
        """The exact bytes written to manifest.json (and signed)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse manifest.json; raises `BundleFormatError` when it is malformed or of an unknown version."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleFormatError(f"manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise BundleFormatError("manifest.json is not a JSON object")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleFormatError(
                f"manifest format_version {version!r} is not supported (this edge-classify reads "
                f"{FORMAT_VERSION}): update edge-classify"
            )
        try:
            return cls(
                name=str(doc["name"]),
                version=int(doc["version"]),
                created=str(doc["created"]),
                quantization=str(doc["quantization"]),
                target=str(doc["target"]),
                model_file=str(doc["model"]["file"]),
                model_sha256=str(doc["model"]["sha256"]),
                model_size=int(doc["model"]["size"]),
                labels=tuple(str(label) for label in doc["labels"]),
                labels_file=str(doc["labels_file"]["file"]),
                labels_sha256=str(doc["labels_file"]["sha256"]),
                input=TensorInfo.from_dict(doc["input"]),
                output=TensorInfo.from_dict(doc["output"]),
                preprocess_spec=PreprocessSpec.from_dict(doc["preprocess_spec"]),
                float_preprocess_spec=PreprocessSpec.from_dict(doc["float_preprocess_spec"]),
                confidence_threshold=float(doc["confidence_threshold"]),
                smoke_test=SmokeTest.from_dict(doc["smoke_test"]),
                source=dict(doc.get("source") or {}),
                validation=None if doc.get("validation") is None else ValidationReport.from_dict(doc["validation"]),
                gpu=None if doc.get("gpu") is None else GpuReport.from_dict(doc["gpu"]),
                baseline=_baseline(doc),
                serving=doc.get("serving"),
                converter=dict(doc.get("converter") or {}),
                signing=doc.get("signing"),
                format_version=version,
            )
        except SpecError as exc:
            raise BundleFormatError(f"manifest.json has a bad preprocessing spec: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            missing = f"field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BundleFormatError(f"manifest.json is malformed ({missing})") from exc


def _baseline(doc: dict[str, Any]) -> Baseline | None:
    """The "baseline" entry (absent in bundles older than it, or null when validation was skipped)."""
    if doc.get("baseline") is None:
        return None
    baseline = Baseline.from_dict(doc["baseline"])
    if len(baseline.class_counts) != len(doc["labels"]):
        raise BundleFormatError(
            f"manifest.json baseline has {len(baseline.class_counts)} class_counts for {len(doc['labels'])} labels"
        )
    return baseline
