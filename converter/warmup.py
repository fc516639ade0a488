"""TF Serving warm-up records: `assets.extra/tf_serving_warmup_requests` in a served SavedModel.

TensorFlow initialises parts of a model lazily, so the first requests to a freshly loaded version are
slow. TF Serving runs the requests it finds in that file when it loads a version, before it reports the
version AVAILABLE (its SavedModel Warmup: a TFRecord file of `PredictionLog` records, at most 1000).
The converter writes them from calibration photos prepared with the model's float spec, in the shapes
the server sends (one photo, and a batch); the embedded predictor runs the same file at load. For a
SavedModel with `add_pixel_signatures`' signatures, the same photos' fitted uint8 pixels warm up `pixels`
and, as PNGs, `pixels_png` too (`build_warmup(..., pixels=warmup_pixel_batches(...))`).

TensorFlow and `tensorflow_serving` are imported inside the functions: the converter's build machine
has them, devices never import this module.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError
from .options import DEFAULT_WARMUP_PHOTOS
from .serving import PIXELS_INPUT, PIXELS_SIGNATURE, PNG_INPUT, PNG_SIGNATURE
from .serving import WARMUP_FILE  # where TF Serving looks for the records, relative to the version folder

#: TF Serving reads no more than this many records (and fails the load above it).
MAX_WARMUP_RECORDS = 1000
SIGNATURE = "serving_default"


@dataclass(frozen=True)
class WarmupRecords:
    """A serialised warm-up file and what it holds."""

    data: bytes
    records: int
    batch_sizes: tuple[int, ...]
    #: The signature of each record, when any is not serving_default.
    signatures: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def to_dict(self) -> dict[str, object]:
        """The manifest's record of the file (signed with it)."""
        record: dict[str, object] = {"file": WARMUP_FILE, "sha256": self.sha256, "size": len(self.data),
                                     "records": self.records, "batch_sizes": list(self.batch_sizes)}
        if self.signatures:
            record["signatures"] = list(self.signatures)
        return record


def warmup_batches(photos: Sequence[Path], spec: Any, limit: int = DEFAULT_WARMUP_PHOTOS) -> list[np.ndarray]:
    """Float32 batches for warm-up: each of up to `limit` photos alone, then all of them together.

    Photos that do not decode are skipped; with none left, one mid-grey photo prepared with `spec`
    stands in (warm-up needs the shapes and the code paths, not meaningful pixels).
    """
    from preprocessing import normalise

    return [np.stack([normalise(p, spec) for p in batch]).astype(np.float32) for batch in warmup_pixel_batches(photos, spec, limit)]


def warmup_pixel_batches(photos: Sequence[Path], spec: Any, limit: int = DEFAULT_WARMUP_PHOTOS) -> list[np.ndarray]:
    """The uint8 fitted pixels (`preprocess_pixels`) of the same photos in the same batches as `warmup_batches`."""
    from preprocessing import PreprocessingError, preprocess_pixels

    prepared: list[np.ndarray] = []
    for path in photos:
        if len(prepared) >= limit:
            break
        try:
            prepared.append(preprocess_pixels(path, spec, threads=1))
        except (PreprocessingError, OSError):
            continue
    if not prepared:
        prepared.append(np.full(spec.pixel_shape, 128, dtype=np.uint8))
    batches = [p[None] for p in prepared]
    if len(prepared) > 1:
        batches.append(np.stack(prepared))
    return batches


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """One photo's fitted uint8 pixels [H, W, 3] as a PNG (lossless): the `pixels_png` signature's input."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(out, "PNG", compress_level=compress_level)
    return out.getvalue()


def build_warmup(name: str, input_name: str, batches: Sequence[np.ndarray], *,
                 pixels: Sequence[np.ndarray] = ()) -> WarmupRecords:
    """Serialise one `PredictRequest` per batch (model `name`, signature serving_default) as a TFRecord file;
    with `pixels` (uint8 batches), one more per batch for `pixels` and one for `pixels_png` (as PNGs)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    requests: list[tuple[str, str, Any]] = [(SIGNATURE, input_name, np.ascontiguousarray(b, dtype=np.float32)) for b in batches]
    for batch in pixels:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        requests.append((PIXELS_SIGNATURE, PIXELS_INPUT, batch))
        requests.append((PNG_SIGNATURE, PNG_INPUT, np.array([encode_png(photo) for photo in batch], dtype=object)))
    if not batches:
        raise DataError("warm-up needs at least one batch")
    if len(requests) > MAX_WARMUP_RECORDS:
        raise DataError(f"{len(requests)} warm-up records: TF Serving reads at most {MAX_WARMUP_RECORDS}")
    fd, tmp = tempfile.mkstemp(prefix="warmup-", suffix=".tfrecord")
    os.close(fd)
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for signature, key, tensor in requests:
                request = predict_pb2.PredictRequest()
                request.model_spec.name = name
                request.model_spec.signature_name = signature
                # make_tensor_proto packs a numeric array as tensor_content (raw little-endian bytes), strings as string_val.
                request.inputs[key].CopyFrom(tf.make_tensor_proto(tensor))
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())
        data = Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
    signatures = tuple(signature for signature, _, _ in requests) if pixels else ()
    return WarmupRecords(data, len(requests), tuple(int(t.shape[0]) for _, _, t in requests), signatures)


def read_warmup(path: str | os.PathLike, max_records: int = MAX_WARMUP_RECORDS) -> list[Any]:
    """The `PredictionLog` records of a warm-up file; `DataError` when it is not one or holds too many."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    try:
        for raw in tf.data.TFRecordDataset(str(path)).take(max_records + 1):
            logs.append(prediction_log_pb2.PredictionLog.FromString(raw.numpy()))
    except (tf.errors.OpError, DecodeError) as exc:
        raise DataError(f"{path} is not a TFRecord file of PredictionLog records: {str(exc).splitlines()[0]}") from exc
    if len(logs) > max_records:
        raise DataError(f"{path} holds more than {max_records} warm-up records (TF Serving reads at most {MAX_WARMUP_RECORDS})")
    return logs


def request_inputs(log: Any) -> dict[str, np.ndarray]:
    """The input tensors of a record's PredictRequest, as numpy arrays (strings as an object array of bytes)."""
    import tensorflow as tf

    if log.WhichOneof("log_type") != "predict_log":
        raise DataError(f"warm-up record is a {log.WhichOneof('log_type')}, not a predict_log")
    return {key: tf.make_ndarray(proto) for key, proto in log.predict_log.request.inputs.items()}
