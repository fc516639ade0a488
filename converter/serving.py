"""Lay a SavedModel into a TensorFlow Serving model repository: REPO/NAME/VERSION/.

TF Serving's file-system source loads any all-digit folder it sees, even one still being copied, so the
version is copied into a hidden, non-numeric folder beside it and renamed into place in one step.
Versions are immutable: an existing version folder is never replaced. With `warmup` (the bytes
`converter.warmup.build_warmup` made), the copy gets `assets.extra/tf_serving_warmup_requests` before
the rename, so TF Serving warms the version up at load.

`add_pixel_signatures` writes a copy of a SavedModel with two more signatures beside `serving_default`,
so the server can send a backend the device's fitted uint8 pixels instead of 4-byte floats:

    pixels        uint8 [N, H, W, 3] (`preprocessing.preprocess_pixels` output), normalised in the graph
                  exactly as `preprocessing.normalise` does with the float spec, then serving_default
    pixels_png    string [N]: each photo's fitted pixels as a PNG (lossless), decoded in the graph, then
                  as `pixels`; for TF Serving's REST API, whose JSON carries bytes only as {"b64": ...}
                  for string inputs (150.5 KB of uint8 pixels would be ~600 KB as JSON integers)

Everything but `add_pixel_signatures` and `serving_signatures` (TensorFlow) is stdlib only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .errors import NotASavedModelError, PublishError, UsageError
from .manifest import NAME_PATTERN


def versions(repo: str | os.PathLike, name: str) -> list[int]:
    """The versions of `name` already in `repo`, sorted."""
    folder = Path(repo) / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repo: str | os.PathLike, name: str) -> int:
    """One more than the newest version of `name` in `repo` (1 for a new model)."""
    existing = versions(repo, name)
    return existing[-1] + 1 if existing else 1


def version_path(repo: str | os.PathLike, name: str, version: int) -> Path:
    """Where `export_for_serving` puts a version; raises `PublishError` if it cannot go there."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"the TF Serving version must be a whole number of at least 1, got {version!r}")
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise PublishError(f"TF Serving repository {root} is a file, not a folder")
    if not root.parent.is_dir():
        raise PublishError(f"cannot create TF Serving repository {root}: {root.parent} does not exist")
    target = root / name / str(version)
    if target.exists():
        raise PublishError(
            f"{target} already exists: TF Serving versions are immutable, publish version "
            f"{next_version(root, name)} instead"
        )
    return target


#: The extra signatures `add_pixel_signatures` writes, and their inputs' names.
PIXELS_SIGNATURE = "pixels"
PIXELS_INPUT = "pixels"
PNG_SIGNATURE = "pixels_png"
PNG_INPUT = "png"
#: Files beside saved_model.pb that travel with a SavedModel (labels, spec, training record, warm-up).
_EXTRA_FILES = ("labels.txt", "preprocess_spec.json", "training.json", "assets.extra")


def serving_signatures(saved_model: str | os.PathLike) -> dict[str, object]:
    """The manifest's record of what a served SavedModel offers the server: `{"signatures": [...]}`
    (sorted; `pixels` and `pixels_png` among them when `add_pixel_signatures` wrote it). Reads
    saved_model.pb with TensorFlow's protos, without loading the model."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((Path(saved_model) / "saved_model.pb").read_bytes())
    names = {name for graph in proto.meta_graphs for name in graph.signature_def if not name.startswith("__")}
    return {"signatures": sorted(names)}


def add_pixel_signatures(saved_model: str | os.PathLike, out: str | os.PathLike, spec: object | None = None) -> Path:
    """Write `saved_model` again to `out` with the `pixels` and `pixels_png` signatures beside its
    `serving_default` (unchanged), and its labels, spec and training files; returns `out`.

    `spec` (a float `PreprocessSpec`) is the normalisation; default: the folder's preprocess_spec.json.
    Other signatures of the source (Keras' `serve`, say) are not written: the server calls these three.
    The new files are another SavedModel: convert *this* folder, so the bundle's source fingerprint is
    the served model's. A source that has both signatures already is copied as it is.
    """
    import numpy as np
    import tensorflow as tf

    from preprocessing import PreprocessSpec

    source, target = Path(saved_model), Path(out)
    if not (source / "saved_model.pb").is_file():
        raise NotASavedModelError(f"{source} is not a SavedModel folder (no saved_model.pb)")
    if target.exists():
        raise UsageError(f"{target} already exists; add_pixel_signatures writes a new folder")
    if spec is None:
        spec_file = source / "preprocess_spec.json"
        if not spec_file.is_file():
            raise UsageError(f"{source} has no preprocess_spec.json: pass the float spec")
        spec = PreprocessSpec.from_json(spec_file.read_bytes())
    if getattr(spec, "dtype", None) != "float32":
        raise UsageError("the pixel signatures normalise with the model's float32 spec")
    if {PIXELS_SIGNATURE, PNG_SIGNATURE} <= set(serving_signatures(source)["signatures"]):  # type: ignore[arg-type]
        shutil.copytree(source, target)
        return target
    model = tf.saved_model.load(str(source))
    serve = model.signatures["serving_default"]
    inputs = serve.structured_input_signature[1]
    if len(inputs) != 1:
        raise UsageError(f"serving_default of {source} takes {len(inputs)} inputs, so it cannot get the pixel signatures "
                         "(one image input is expected): convert with --no-pixel-signatures")
    (input_name, input_spec), = inputs.items()
    height, width = spec.height, spec.width  # type: ignore[attr-defined]
    # preprocessing.normalise: (pixels.astype(float32) * float32(scale) - mean) / std, in float32, in that order.
    scale = tf.constant(np.float32(spec.scale))  # type: ignore[attr-defined]
    mean = tf.constant(np.asarray(spec.mean, dtype=np.float32))  # type: ignore[attr-defined]
    std = tf.constant(np.asarray(spec.std, dtype=np.float32))  # type: ignore[attr-defined]

    def normalised(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return serve(**{input_name: (tf.cast(pixels, tf.float32) * scale - mean) / std})

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name=input_name)])
    def serving_default(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return serve(**{input_name: x})

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=PIXELS_INPUT)])
    def pixels(p: tf.Tensor) -> dict[str, tf.Tensor]:
        return normalised(p)

    def decode(png: tf.Tensor) -> tf.Tensor:
        return tf.ensure_shape(tf.io.decode_png(png, channels=3, dtype=tf.uint8), [height, width, 3])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=PNG_INPUT)])
    def pixels_png(png: tf.Tensor) -> dict[str, tf.Tensor]:
        return normalised(tf.map_fn(decode, png, fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8)))

    if input_spec.dtype != tf.float32 or input_spec.shape.as_list()[1:] != [height, width, 3]:
        raise UsageError(f"serving_default of {source} takes {input_spec.dtype.name} {input_spec.shape}; "
                         f"the spec prepares float32 [N, {height}, {width}, 3], so it cannot get the pixel signatures: "
                         "convert with --no-pixel-signatures")
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tf.saved_model.save(model, str(staging), signatures={
            "serving_default": serving_default, PIXELS_SIGNATURE: pixels, PNG_SIGNATURE: pixels_png})
        for name in _EXTRA_FILES:
            item = source / name
            if item.is_dir():
                shutil.copytree(item, staging / name)
            elif item.is_file():
                shutil.copy2(item, staging / name)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


#: The warm-up file's place in a version folder (converter.warmup.WARMUP_FILE; repeated to stay stdlib-only).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


def export_for_serving(saved_model: str | os.PathLike, repo: str | os.PathLike, name: str, version: int,
                       *, warmup: bytes | None = None) -> Path:
    """Copy the SavedModel (with its labels and spec files, and `warmup` as its TF Serving warm-up
    records when given) to REPO/NAME/VERSION/, atomically."""
    source = Path(saved_model)
    if not (source / "saved_model.pb").is_file():
        raise NotASavedModelError(f"{source} is not a SavedModel folder (no saved_model.pb)")
    target = version_path(repo, name, version)
    staging = target.parent / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, staging)
        if warmup is not None:  # replaces any warm-up file the SavedModel brought along
            (staging / WARMUP_FILE).parent.mkdir(exist_ok=True)
            (staging / WARMUP_FILE).write_bytes(warmup)
        os.rename(staging, target)
    except OSError as exc:
        raise PublishError(f"cannot publish {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
