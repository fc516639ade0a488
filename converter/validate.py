"""The agreement gate: the converted model against its SavedModel on labelled validation photos.

Each photo is decoded and fitted once, then normalised with both specs (float for the SavedModel, the
bundle's spec for the TFLite model: integer for int8), exactly as `preprocess` does on a device. The
run also measures the bundle's baseline (`converter.baseline`): the converted model's answers and the
input statistics of the fitted pixels, the same `InputStats` a device reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import IO, Sequence

import numpy as np

from preprocessing import InputStats, InvalidImageError, LabeledImages, PreprocessSpec, fit_pixels, load_image, normalise

from .baseline import Baseline, measure_baseline
from .errors import DataError, ModelContractError
from .lite_model import LiteClassifier
from .options import ValidationOptions
from .progress import progress
from .report import ClassAgreement, ModelScore, ValidationReport
from .saved_model import SavedModelClassifier

_BATCH = 32


@dataclass(frozen=True)
class ValidationRun:
    """What `validate` measured: the agreement report (the gate) and the bundle's baseline."""

    report: ValidationReport
    baseline: Baseline


def validate(
    source: SavedModelClassifier,
    lite: LiteClassifier,
    lite_spec: PreprocessSpec,
    photos: LabeledImages,
    options: ValidationOptions,
    *,
    tflite_size: int,
    confidence_threshold: float,
    show_progress: bool = False,
    progress_file: IO[str] | None = None,
) -> ValidationRun:
    """Run both models on every photo and measure accuracy, agreement, probability drift, latency and
    the baseline."""
    float_spec = source.spec
    n = len(photos)
    saved = np.zeros((n, source.num_classes), np.float32)
    converted = np.zeros((n, source.num_classes), np.float32)
    lite_seconds: list[float] = []
    pending: list[tuple[int, np.ndarray]] = []
    latency_inputs: list[np.ndarray] = []
    draft = float_spec.size if float_spec.jpeg_draft else None
    input_stats = InputStats()
    for i, path in enumerate(progress(photos.paths, total=n, desc="validating", enabled=show_progress,
                                          file=progress_file)):
        try:
            pixels = load_image(path, draft_size=draft)
        except InvalidImageError as exc:
            raise DataError(f"validation photo {path} cannot be used: {exc}") from exc
        fitted = fit_pixels(pixels, float_spec)  # lite_spec differs in dtype only: the same pixels
        input_stats.add(fitted)
        x_float = normalise(fitted, float_spec)
        x_lite = x_float if lite_spec == float_spec else normalise(fitted, lite_spec)
        started = time.perf_counter()
        converted[i] = lite.predict(x_lite)
        lite_seconds.append(time.perf_counter() - started)
        pending.append((i, x_float))
        if len(latency_inputs) < options.latency_photos:
            latency_inputs.append(x_float)
        if len(pending) == _BATCH:
            _run_batch(source, pending, saved)
    _run_batch(source, pending, saved)
    _check_probabilities(saved, source)
    saved_seconds = _saved_model_latency(source, latency_inputs)
    report = _report(
        photos, saved, converted, options,
        saved_model=_score(saved, photos.targets, source.size_bytes, saved_seconds),
        tflite=_score(converted, photos.targets, tflite_size, lite_seconds[1:] or lite_seconds),
        confidence_threshold=confidence_threshold,
    )
    return ValidationRun(report, measure_baseline(converted, saved, photos.targets, confidence_threshold, input_stats))


def _run_batch(source: SavedModelClassifier, pending: list[tuple[int, np.ndarray]], out: np.ndarray) -> None:
    if not pending:
        return
    indices = [i for i, _ in pending]
    out[indices] = source.predict(np.stack([x for _, x in pending]))
    pending.clear()


def _saved_model_latency(source: SavedModelClassifier, inputs: list[np.ndarray]) -> list[float]:
    source.predict(inputs[0][None, ...])  # warm-up: the first call traces and allocates
    seconds = []
    for x in inputs:
        started = time.perf_counter()
        source.predict(x[None, ...])
        seconds.append(time.perf_counter() - started)
    return seconds


def _check_probabilities(saved: np.ndarray, source: SavedModelClassifier) -> None:
    sums = saved.sum(axis=1)
    worst = float(sums[np.argmax(np.abs(sums - 1.0))])
    if abs(worst - 1.0) > 0.01 or saved.min() < -1e-4 or saved.max() > 1.0001:
        raise ModelContractError(
            f"{source.path}'s output '{source.output_name}' is not probabilities (a row sums to {worst:.3g}): "
            "end the model with a softmax"
        )


def _score(probabilities: np.ndarray, targets: Sequence[int], size: int, seconds: list[float]) -> ModelScore:
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == np.asarray(targets)))
    ms = np.asarray(seconds) * 1000.0
    return ModelScore(accuracy, int(size), round(float(np.median(ms)), 4), round(float(np.percentile(ms, 90)), 4))


def _report(
    photos: LabeledImages,
    saved: np.ndarray,
    converted: np.ndarray,
    options: ValidationOptions,
    *,
    saved_model: ModelScore,
    tflite: ModelScore,
    confidence_threshold: float,
) -> ValidationReport:
    targets = np.asarray(photos.targets)
    saved_top, lite_top = saved.argmax(axis=1), converted.argmax(axis=1)
    agree = saved_top == lite_top
    diff = np.abs(converted - saved)
    per_class = []
    for index, label in enumerate(photos.labels):
        mask = targets == index
        if mask.any():
            per_class.append(ClassAgreement(
                label, int(mask.sum()), float(np.mean(saved_top[mask] == index)),
                float(np.mean(lite_top[mask] == index)), float(np.mean(agree[mask])),
            ))
    confident = converted.max(axis=1) >= confidence_threshold
    failures = []
    agreement = float(agree.mean())
    if agreement < options.min_agreement:
        failures.append(f"top-1 agreement {agreement:.1%} is below --min-agreement {options.min_agreement:.1%}")
    for c in per_class:
        if c.agreement < options.min_class_agreement:
            failures.append(
                f"class '{c.label}' agreement {c.agreement:.1%} is below --min-class-agreement "
                f"{options.min_class_agreement:.1%}"
            )
    return ValidationReport(
        images=len(photos),
        saved_model=saved_model,
        tflite=tflite,
        agreement=agreement,
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=float(diff.max()),
        per_class=tuple(per_class),
        min_agreement=options.min_agreement,
        min_class_agreement=options.min_class_agreement,
        confidence_threshold=confidence_threshold,
        coverage_at_threshold=float(confident.mean()),
        accuracy_at_threshold=float(np.mean(lite_top[confident] == targets[confident])) if confident.any() else 0.0,
        threads=options.threads,
        failures=tuple(failures),
    )
