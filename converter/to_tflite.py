"""Run `tf.lite.TFLiteConverter` on a SavedModel in one of the four quantization modes.

    float32   no optimisation
    dynamic   int8 weights, float activations (no calibration)
    float16   float16 weights, the GPU delegate's format
    int8      full integer, uint8 input and output, calibrated on photos prepared by `preprocessing`
              (a quantization-aware-trained model converts without calibration photos)

The converter's native log is captured, not printed; when it fails, its message is turned into one
line that names the problem (e.g. the ops TFLite has no kernel for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from preprocessing import InvalidImageError, PreprocessSpec, prepare, preprocess

from .errors import ConverterFailedError, DataError, UnsupportedOpError, UsageError
from .progress import native_log_captured, progress

_NO_KERNEL = re.compile(r"'(tf\.[A-Za-z0-9_]+)' op is neither a custom op nor a flex op")
_CUSTOM_OPS = re.compile(r"(?:Custom|Flex) ops: ([A-Za-z0-9_, ]+)")


@dataclass(frozen=True)
class TfliteConversion:
    """The converted model and what happened on the way."""

    model: bytes
    log: str
    calibration_photos: int = 0
    calibration_skipped: tuple[str, ...] = ()


def convert_to_tflite(
    saved_model: Path,
    mode: str,
    spec: PreprocessSpec,
    *,
    calibration: Sequence[Path] = (),
    show_progress: bool = False,
    progress_file: IO[str] | None = None,
) -> TfliteConversion:
    """Convert `saved_model` in `mode`; int8 calibrates on `calibration` (photos prepared with `spec`)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    feed = _CalibrationFeed(calibration, spec, show_progress)
    with native_log_captured() as (log, terminal):
        if mode == "int8":
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
            if calibration:
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                feed.progress_file = progress_file or terminal
                converter.representative_dataset = feed
        failure: BaseException | None = None
        try:
            model = converter.convert()
        except Exception as exc:  # the converter raises ConverterError, ValueError, RuntimeError...  # noqa: BLE001
            failure = exc
    if failure is not None:  # translated once the native log has been collected
        raise _translate(failure, log.getvalue(), mode, bool(calibration)) from failure
    if mode == "int8" and calibration and feed.used == 0:
        raise DataError(f"none of the {len(calibration)} calibration photos could be read")
    return TfliteConversion(bytes(model), log.getvalue(), feed.used, tuple(feed.skipped))


class _CalibrationFeed:
    """The converter's `representative_dataset`: a black and a white frame (so the uint8 input spans every
    pixel value, as runtimes that feed raw pixels expect), then each photo through `preprocess`.

    Unreadable photos are skipped and listed in `skipped`; `used` counts the photos fed.
    """

    def __init__(self, paths: Sequence[Path], spec: PreprocessSpec, show_progress: bool) -> None:
        self.paths, self.spec, self.show_progress = list(paths), spec, show_progress
        self.progress_file: IO[str] | None = None
        self.used = 0
        self.skipped: list[str] = []

    def __call__(self) -> Iterator[list[np.ndarray]]:
        spec = self.spec
        for value in (0, 255):
            yield [prepare(np.full((spec.height, spec.width, 3), value, np.uint8), spec)[None, ...]]
        photos = progress(self.paths, total=len(self.paths), desc="calibrating", enabled=self.show_progress,
                          file=self.progress_file)
        for path in photos:
            try:
                sample = preprocess(path, spec)
            except InvalidImageError as exc:
                self.skipped.append(f"{path}: {exc}")
                continue
            self.used += 1
            yield [sample[None, ...]]


def _translate(exc: BaseException, log: str, mode: str, calibrated: bool) -> Exception:
    text = f"{exc}\n{log}"
    if isinstance(exc, (DataError, UsageError)):
        return exc
    ops = sorted(set(_NO_KERNEL.findall(text)))
    if not ops:
        for group in _CUSTOM_OPS.findall(text):
            ops.extend(f"tf.{name.strip()}" for name in group.split(",") if name.strip())
        ops = sorted(set(ops))
    if ops:
        return UnsupportedOpError(
            f"the model uses {len(ops)} op(s) TFLite has no builtin kernel for: {', '.join(ops)}; "
            "replace them in the model (devices run builtin ops only)",
            tuple(ops),
        )
    if mode == "int8" and not calibrated and (
        "representative_dataset" in text or "must be tf.float32" in text
    ):
        return UsageError(
            "--quantize int8 needs --calibration DIR (photos to calibrate on); only a model trained "
            "with quantization-aware training converts without"
        )
    return ConverterFailedError(f"the TFLite converter failed ({mode}): {_first_error_line(text)}")


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if "error:" in stripped:
            return stripped.split("error:", 1)[1].strip()[:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no message"
