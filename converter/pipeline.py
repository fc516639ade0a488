"""`convert`: SavedModel in, verified and signed bundle out, or an error and nothing written.

Order: check options, key and destinations (cheap, before any work); load the SavedModel and check
its contract; for a TF Serving version with pixel signatures, write the SavedModel again with them into a
scratch folder and carry on with that copy (so what is converted, validated, fingerprinted and served is
one model); convert; add the metadata; validate against the SavedModel (the gate); pick the smoke
test; then publish the TF Serving version (if asked) and the bundle, each by renaming a finished
temporary folder into place.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from preprocessing import DatasetError, LabeledImages, PreprocessSpec, list_images, list_labeled_images

from .baseline import Baseline
from .bundle import LABELS_FILE, MODEL_FILE, check_destination, labels_text, sha256_hex, write_bundle
from .errors import DataError, ValidationGateError
from .gpu import check_gpu_compatibility
from .lite_model import LiteClassifier
from .manifest import FORMAT_VERSION, Manifest, TensorInfo
from .metadata import ClassifierMetadata, write_metadata
from .options import DEFAULT_WARMUP_PHOTOS, ConvertOptions
from .progress import native_log_captured
from .report import GpuReport, ValidationReport
from .saved_model import SavedModelClassifier
from .serving import PIXELS_SIGNATURE, add_pixel_signatures, export_for_serving, next_version, serving_signatures, version_path
from .signing import KEY_PASSWORD_ENV, key_id, load_private_key
from .smoke import make_smoke_test
from .to_tflite import convert_to_tflite
from .validate import validate
from .warmup import WarmupRecords, build_warmup, warmup_batches, warmup_pixel_batches


@dataclass(frozen=True)
class ConversionResult:
    """What `convert` produced."""

    bundle: Path
    manifest: Manifest
    validation: ValidationReport | None
    gpu: GpuReport | None
    serving_path: Path | None
    seconds: float
    warnings: tuple[str, ...] = ()
    #: TensorFlow's native log during the conversion (hidden; `edge-convert --verbose` prints it).
    converter_log: str = ""


def convert(saved_model: str | os.PathLike, options: ConvertOptions) -> ConversionResult:
    """Convert `saved_model` into a bundle at `options.out`; see the module docstring for the steps.

    Raises a `ConversionError` subclass on any problem (`ValidationGateError` when the converted model
    disagrees too often); no bundle and no serving version exist then.
    """
    started = time.perf_counter()
    options = options.checked()
    with native_log_captured() as (log, terminal), tempfile.TemporaryDirectory(prefix="edge-convert-") as scratch:
        result = _convert(Path(saved_model), options, terminal, Path(scratch))
    return replace(result, seconds=time.perf_counter() - started, converter_log=result.converter_log + log.getvalue())


def _convert(saved_model: Path, options: ConvertOptions, terminal: IO[str] | None, scratch: Path) -> ConversionResult:
    q, v = options.quantization, options.validation
    sign_key = _signing_key(options)
    check_destination(options.out, overwrite=options.overwrite)
    calibration = _calibration_photos(q.calibration, q.calibration_limit) if q.calibration else []
    source = SavedModelClassifier(saved_model, labels_file=options.labels, spec_file=options.spec)
    name = options.name or _default_name(source.path)
    version = options.version or (next_version(options.serving_repo, name) if options.serving_repo else 1)
    if options.serving_repo is not None:
        version_path(options.serving_repo, name, version)  # refuses an existing version now, not later
    photos = None if v.skip else _validation_photos(v.images, source.labels)
    if options.pixel_signatures:
        served = add_pixel_signatures(source.path, scratch / source.path.resolve().name, spec=source.spec)
        source = SavedModelClassifier(served, labels_file=options.labels, spec_file=options.spec)

    converted = convert_to_tflite(source.path, q.mode, source.spec, calibration=calibration,
                                  show_progress=options.show_progress, progress_file=terminal)
    model = write_metadata(converted.model, ClassifierMetadata(
        name=name,
        description=f"Image classifier over {len(source.labels)} labels ({q.mode}).",
        version=str(version),
        author="edge-classify",
        license="",
        labels=source.labels,
        mean=source.spec.pixel_mean,
        std=source.spec.pixel_std,
    ), integer_input=q.mode == "int8")

    with LiteClassifier(model, threads=v.threads) as lite:
        lite_spec = _lite_spec(source.spec, lite.input)
        gpu = check_gpu_compatibility(model) if options.target == "gpu" else None
        report: ValidationReport | None = None
        baseline: Baseline | None = None
        if photos is not None:
            run = validate(source, lite, lite_spec, photos, v, tflite_size=len(model),
                           confidence_threshold=options.confidence_threshold,
                           show_progress=options.show_progress, progress_file=terminal)
            report, baseline = run.report, run.baseline
            if not report.passed:
                raise ValidationGateError(
                    f"conversion refused, no bundle written: {'; '.join(report.failures)}", report
                )
        candidates = list(photos.paths) if photos is not None else calibration
        warmup = None
        if options.serving_repo is not None and options.warmup_photos:
            warmup = _warmup_records(source, name, calibration or candidates, options.warmup_photos)
        smoke = make_smoke_test(lite, lite_spec, source.labels, candidates, q.mode, options.smoke_cases)
        manifest = Manifest(
            name=name,
            version=version,
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            quantization=q.mode,
            target=options.target,
            model_file=MODEL_FILE,
            model_sha256=sha256_hex(model),
            model_size=len(model),
            labels=source.labels,
            labels_file=LABELS_FILE,
            labels_sha256=sha256_hex(labels_text(source.labels)),
            input=lite.input,
            output=lite.output,
            preprocess_spec=lite_spec,
            float_preprocess_spec=source.spec,
            confidence_threshold=options.confidence_threshold,
            smoke_test=smoke,
            source=_source_record(source, saved_model),
            validation=report,
            gpu=gpu,
            baseline=baseline,
            serving=_serving_record(name, version, warmup, source.path) if options.serving_repo is not None else None,
            converter=_versions(converted.calibration_photos),
            signing={"algorithm": "Ed25519", "key_id": key_id(sign_key)} if sign_key is not None else None,
            format_version=FORMAT_VERSION,
        )
    serving_path = None
    if options.serving_repo is not None:
        serving_path = export_for_serving(source.path, options.serving_repo, name, version,
                                          warmup=None if warmup is None else warmup.data)
    try:
        bundle = write_bundle(options.out, model, manifest, sign_key=sign_key, overwrite=options.overwrite)
    except BaseException:
        if serving_path is not None:  # both or neither: the server must not get a version devices lack
            shutil.rmtree(serving_path, ignore_errors=True)
        raise
    warnings = tuple(f"skipped calibration photo {s}" for s in converted.calibration_skipped)
    return ConversionResult(bundle, manifest, report, gpu, serving_path, 0.0, warnings, converted.log)


def _warmup_records(source: SavedModelClassifier, name: str, photos: list[Path], limit: int) -> WarmupRecords:
    """TF Serving warm-up requests from the photos (calibration first), prepared with the float spec; for a
    SavedModel with the pixel signatures, the same photos' fitted uint8 pixels (and PNGs) warm those up too."""
    pixels = []
    if PIXELS_SIGNATURE in serving_signatures(source.path)["signatures"]:  # type: ignore[operator]
        pixels = warmup_pixel_batches(photos, source.spec, limit)
    return build_warmup(name, source.input_name, warmup_batches(photos, source.spec, limit), pixels=pixels)


def warmup_for_serving(saved_model: str | os.PathLike, name: str, photos: Path | None = None,
                       limit: int = DEFAULT_WARMUP_PHOTOS) -> WarmupRecords:
    """Warm-up records for `edge-convert serving-export`: from the photos in `photos` (any layout) when
    given, else from one mid-grey photo of the model's input shape."""
    source = SavedModelClassifier(saved_model)
    found = _calibration_photos(photos, limit) if photos is not None else []
    return _warmup_records(source, name, found, limit)


def _serving_record(name: str, version: int, warmup: WarmupRecords | None, served: Path) -> dict[str, object]:
    """The manifest's `serving` entry: the version, the signatures it offers the server (`pixels` among
    them when it takes uint8), and the warm-up file's sha256, all signed with the manifest."""
    record: dict[str, object] = {"name": name, "version": version, **serving_signatures(served)}
    if warmup is not None:
        record["warmup"] = warmup.to_dict()
    return record


def _signing_key(options: ConvertOptions) -> Ed25519PrivateKey | None:
    """The private key, loaded before any work so a bad key fails in a second, not after conversion."""
    if options.signing.key is None:
        return None
    password = options.signing.password
    if password is None and os.environ.get(KEY_PASSWORD_ENV):
        password = os.environ[KEY_PASSWORD_ENV].encode("utf-8")
    return load_private_key(options.signing.key, password)


def _source_record(source: SavedModelClassifier, given: Path) -> dict[str, object]:
    # The given folder's name only: the bundle travels to devices, and the build machine's paths are nobody's
    # business there. The fingerprint is what identifies the SavedModel (with pixel signatures: the copy
    # that was converted and served, not the folder given).
    return {
        "saved_model": given.resolve().name,
        "signature": "serving_default",
        "input": source.input_name,
        "output": source.output_name,
        "size": source.size_bytes,
        "fingerprint": source.fingerprint(),
        "training": source.training,
    }


def _lite_spec(float_spec: PreprocessSpec, model_input: TensorInfo) -> PreprocessSpec:
    """The spec whose `preprocess` output feeds the converted model: integer when its input is."""
    if model_input.dtype == "float32":
        return float_spec
    return float_spec.replace(dtype=model_input.dtype, quantization=model_input.quantization)


def _calibration_photos(root: Path, limit: int) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"calibration folder {root} does not exist")
    try:
        found = list_images(root)
    except DatasetError as exc:
        raise DataError(f"calibration folder {root}: {exc}") from exc
    if not found:
        raise DataError(f"calibration folder {root} holds no photos (.jpg, .png, .webp, .bmp, .gif)")
    if len(found) <= limit:
        return found
    step = len(found) / limit
    return [found[int(i * step)] for i in range(limit)]


def _validation_photos(root: Path | None, labels: tuple[str, ...]) -> LabeledImages:
    assert root is not None
    try:
        return list_labeled_images(root, labels)
    except DatasetError as exc:
        raise DataError(f"validation folder: {exc}") from exc


def _default_name(path: Path) -> str:
    resolved = path.resolve()
    name = resolved.parent.name if resolved.name.isdigit() else resolved.name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-._") or "model"
    return cleaned[:100]


def _versions(calibration_photos: int) -> dict[str, object]:
    from importlib import metadata

    def version_of(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "edge_classify": version_of("edge-classify"),
        "tensorflow": version_of("tensorflow"),
        "ai_edge_litert": version_of("ai-edge-litert"),
        "calibration_photos": calibration_photos,
    }
