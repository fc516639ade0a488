"""What a conversion should do: composed, validated option dataclasses with named defaults."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import UsageError
from .manifest import NAME_PATTERN, QUANTIZATION_MODES, TARGETS

DEFAULT_MIN_AGREEMENT = 0.98
DEFAULT_MIN_CLASS_AGREEMENT = 0.80
DEFAULT_CONFIDENCE_THRESHOLD = 0.5
DEFAULT_CALIBRATION_LIMIT = 200
DEFAULT_SMOKE_CASES = 3
#: Photos turned into TF Serving warm-up requests (each alone, then all as one batch); 0 writes none.
DEFAULT_WARMUP_PHOTOS = 4


@dataclass(frozen=True)
class QuantizationOptions:
    """How to quantize. `mode=None` picks float16 for the GPU target and float32 for the CPU."""

    mode: str | None = None
    #: Folder of photos (any layout) to calibrate full-int8 on; at most `calibration_limit` are used,
    #: spread evenly over the sorted listing.
    calibration: Path | None = None
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT


@dataclass(frozen=True)
class ValidationOptions:
    """The agreement gate: compare the converted model with the SavedModel on labelled photos."""

    #: Folder laid out as `<label>/<photo>`; required unless `skip`.
    images: Path | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    #: Every class's agreement must reach this too: full-int8 sometimes collapses a single class. Lower than
    #: `min_agreement` because a class may have few validation photos (one flip in 8 is 87.5 %).
    min_class_agreement: float = DEFAULT_MIN_CLASS_AGREEMENT
    #: LiteRT threads while measuring latency (1 makes numbers comparable between machines).
    threads: int = 1
    #: How many photos the SavedModel's single-photo latency is measured on.
    latency_photos: int = 20
    skip: bool = False


@dataclass(frozen=True)
class SigningOptions:
    """Who signs the manifest. Devices refuse unsigned bundles, so `unsigned` must be asked for."""

    key: Path | Ed25519PrivateKey | None = None
    #: Password of an encrypted PEM key.
    password: bytes | None = None
    unsigned: bool = False


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert` needs besides the SavedModel path."""

    out: Path
    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    signing: SigningOptions = field(default_factory=SigningOptions)
    target: str = "cpu"
    #: Override the SavedModel's labels.txt / preprocess_spec.json.
    labels: Path | None = None
    spec: Path | None = None
    #: Bundle name; default: the SavedModel folder's name.
    name: str | None = None
    #: Bundle version (shared with TF Serving); default: the next free version in `serving_repo`, else 1.
    version: int | None = None
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    #: Also lay the SavedModel into this TF Serving model repository as REPO/NAME/VERSION/.
    serving_repo: Path | None = None
    #: Calibration (else validation) photos written as the version's TF Serving warm-up requests
    #: (`assets.extra/tf_serving_warmup_requests`); 0 writes none. At most 999 (TF Serving reads 1000).
    warmup_photos: int = DEFAULT_WARMUP_PHOTOS
    #: Give the TF Serving version the `pixels` (uint8) and `pixels_png` signatures beside serving_default
    #: (`converter.serving.add_pixel_signatures`), so the server forwards a photo's fitted uint8 pixels, not
    #: float32 (a quarter of the bytes). The copy is made before conversion and is what gets converted,
    #: validated and exported, so the bundle's source fingerprint is the served model's. Needs
    #: `serving_repo`. None (the default): on exactly when `serving_repo` is given, as `edge-convert
    #: --serving-repo` does unless --no-pixel-signatures; False keeps the SavedModel as given.
    pixel_signatures: bool | None = None
    #: Replace an existing bundle folder.
    overwrite: bool = False
    smoke_cases: int = DEFAULT_SMOKE_CASES
    show_progress: bool = False

    def checked(self) -> "ConvertOptions":
        """A copy with paths as `Path` and the quantization mode resolved; raises `UsageError` on bad values."""
        q, v, s = self.quantization, self.validation, self.signing
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        mode = q.mode or ("float16" if self.target == "gpu" else "float32")
        if mode not in QUANTIZATION_MODES:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
        if q.calibration is not None and mode != "int8":
            raise UsageError(f"--calibration is only used by --quantize int8 (this conversion is {mode})")
        if q.calibration_limit < 1:
            raise UsageError(f"--calibration-limit must be at least 1, got {q.calibration_limit}")
        for label, value in (("--min-agreement", v.min_agreement), ("--min-class-agreement", v.min_class_agreement),
                             ("--confidence-threshold", self.confidence_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise UsageError(f"{label} must be a number from 0 to 1, got {value!r}")
        if v.images is None and not v.skip:
            raise UsageError("pass --validation DIR (labelled photos the gate checks agreement on), "
                             "or --skip-validation")
        if v.threads < 1 or v.latency_photos < 1:
            raise UsageError("validation threads and latency_photos must be at least 1")
        if s.key is None and not s.unsigned:
            raise UsageError("pass --sign-key KEY (make one with `edge-convert keygen --out KEY`), or --unsigned "
                             "for a bundle devices will refuse")
        if s.key is not None and s.unsigned:
            raise UsageError("--sign-key and --unsigned contradict each other: pass one")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise UsageError(f"--name {self.name!r} must be letters, digits, '.', '_' or '-' (at most 100)")
        if self.version is not None and (isinstance(self.version, bool) or not isinstance(self.version, int)
                                         or self.version < 1):
            raise UsageError(f"--version must be a whole number of at least 1, got {self.version!r}")
        if isinstance(self.warmup_photos, bool) or not isinstance(self.warmup_photos, int) \
                or not 0 <= self.warmup_photos <= 999:
            raise UsageError(f"--warmup-photos must be a whole number from 0 to 999, got {self.warmup_photos!r}")
        if self.smoke_cases < 1:
            raise UsageError("smoke_cases must be at least 1")
        if self.pixel_signatures and self.serving_repo is None:
            raise UsageError("--pixel-signatures changes the TF Serving version: pass --serving-repo REPO too")
        return replace(
            self,
            pixel_signatures=self.serving_repo is not None if self.pixel_signatures is None else self.pixel_signatures,
            out=Path(self.out),
            quantization=replace(q, mode=mode, calibration=_path(q.calibration)),
            validation=replace(v, images=_path(v.images)),
            signing=replace(s, key=s.key if isinstance(s.key, Ed25519PrivateKey) else _path(s.key)),
            labels=_path(self.labels),
            spec=_path(self.spec),
            serving_repo=_path(self.serving_repo),
        )


def _path(value: str | os.PathLike | None) -> Path | None:
    return None if value is None else Path(value)
