"""Train the demo classifier on a folder of labelled photos and export it as a SavedModel.

    python -m edge_demo.train DATA_DIR EXPORT_DIR [--epochs N] [--width W] [--overwrite]

DATA_DIR holds `train/<label>/<photo>`, `val/<label>/<photo>`, optionally `test/<label>/<photo>`,
and `labels.txt` (one label per line; without it the train split's folder names, sorted, are the
labels). Every photo goes through `preprocessing.preprocess`, via `preprocessing.tf_data`, exactly
as it will on a device: training never decodes or resizes a photo any other way. Each split is
decoded once and kept in memory; augmentation works on those prepared tensors, inside the graph.

EXPORT_DIR receives, all at once (written beside it, then renamed into place):

    saved_model.pb, variables/   serving_default: image float32 [N, H, W, 3] -> probabilities [N, C]
    labels.txt                   the labels, one per line, in output order
    preprocess_spec.json         the `PreprocessSpec` that makes the model's input from a photo
    training.json                options, epochs, accuracy, time and photo counts of this run
    model.keras                  the trained tf_keras model (for quantization-aware training)

TensorFlow is imported only when training starts, so a wrong command line fails fast and quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preprocessing import DatasetError, LabeledImages, PreprocessingError, PreprocessSpec, list_labeled_images, read_labels

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf
    import tf_keras

__all__ = [
    "LAYOUT",
    "TrainOptions",
    "TrainResult",
    "TrainingData",
    "TrainingError",
    "augment_batch",
    "demo_spec",
    "load_data",
    "main",
    "train",
]

#: How a data folder must look; every layout error ends with it.
LAYOUT = (
    "expected DATA_DIR/train/<label>/<photo>, DATA_DIR/val/<label>/<photo>, "
    "optionally DATA_DIR/test/<label>/<photo>, and DATA_DIR/labels.txt with one label per line"
)
REQUIRED_SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)
#: Name of the input and the output of the exported serving signature.
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"

#: Augmentation strength, in pixel levels (0..255) and as a contrast factor range.
BRIGHTNESS_DELTA = 20.0
CONTRAST_RANGE = (0.8, 1.2)


class TrainingError(ValueError):
    """The data folder, the options or the export folder cannot be used; the message says why."""


def demo_spec() -> PreprocessSpec:
    """How the demo model's input is made from a photo.

    96x96: small enough to train from scratch on two CPU cores in minutes and to run anywhere.
    fit="pad": the synthetic products (like real shop photos) sit anywhere in frames from 16:9 to
    9:16; center_crop would cut off up to 44 % of a 16:9 photo and with it part of, or most of, an
    off-centre product, and stretch would squash shapes (a mug's proportions tell it from a
    bottle). Padding keeps the whole photo undistorted. The pad is mid grey (128), which the
    normalisation maps to ~0, i.e. "no signal" for the first convolution.
    scale 1/127.5, mean 1, std 1: pixels map to [-1, 1], MobileNet's convention, symmetric around
    0 so a float model and an int8 input quantization (scale 1/127.5, zero point 0) line up.
    bilinear: Pillow's resize antialiases when shrinking, so bilinear is already clean and cheap.
    """
    return PreprocessSpec(
        height=96,
        width=96,
        resize="bilinear",
        fit="pad",
        pad_color=(128, 128, 128),
        scale=1 / 127.5,
        mean=(1.0, 1.0, 1.0),
        std=(1.0, 1.0, 1.0),
        dtype="float32",
    )


@dataclass(frozen=True)
class TrainOptions:
    """How to train. The defaults reach >= 90 % validation accuracy on the default synthetic data.

    `patience`: stop when validation accuracy has not improved for this many epochs (0: never
    stop early). The weights of the best validation epoch are kept either way.
    """

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-3
    width: float = 0.5
    seed: int = 0
    augment: bool = True
    spec: PreprocessSpec = field(default_factory=demo_spec)
    dropout: float = 0.2
    patience: int = 10

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise TrainingError(f"TrainOptions.{name} must be a whole number >= {low}, got {value!r}")

        whole("epochs", 1)
        whole("batch_size", 1)
        whole("seed", 0)
        whole("patience", 0)
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainingError(f"TrainOptions.learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (isinstance(self.width, (int, float)) and 0 < self.width <= 4):
            raise TrainingError(f"TrainOptions.width must be a number in (0, 4], got {self.width!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise TrainingError(f"TrainOptions.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.spec, PreprocessSpec):
            raise TrainingError(f"TrainOptions.spec must be a PreprocessSpec, got {type(self.spec).__name__}")
        if self.spec.dtype != "float32":
            raise TrainingError(
                f"training needs a float32 PreprocessSpec, got dtype {self.spec.dtype}; "
                "integer inputs are made by the converter from the float model"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data


@dataclass(frozen=True)
class TrainResult:
    """What `train` made. `model` is the trained tf_keras model (best validation weights)."""

    export_dir: Path
    labels: tuple[str, ...]
    val_accuracy: float
    test_accuracy: float | None
    epochs: int
    seconds: float
    model: "tf_keras.Model" = field(repr=False, compare=False)


@dataclass(frozen=True)
class TrainingData:
    """The checked listing of each split and its dataset of prepared (image, target) pairs.

    Each dataset is unbatched, un-augmented and cached in memory: the first full pass decodes
    every photo with `preprocess`, later passes reuse the tensors.
    """

    root: Path
    labels: tuple[str, ...]
    splits: dict[str, LabeledImages]
    datasets: dict[str, "tf.data.Dataset"]

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(listing) for name, listing in self.splits.items()}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def check_layout(data_dir: str | Path) -> tuple[tuple[str, ...], dict[str, LabeledImages]]:
    """The labels and the listing of each split of `data_dir`, or a TrainingError saying what is wrong.

    Needs no TensorFlow. Every split must hold photos of exactly the labels the train split has,
    and the train split must hold photos of every label.
    """
    root = Path(data_dir)
    if not root.exists():
        raise TrainingError(f"data folder {root} does not exist ({LAYOUT})")
    if not root.is_dir():
        raise TrainingError(f"data folder {root} is not a folder ({LAYOUT})")
    for split in REQUIRED_SPLITS:
        if not (root / split).is_dir():
            raise TrainingError(f"data folder {root} has no {split}/ split ({LAYOUT})")
    labels_file = root / "labels.txt"
    try:
        if labels_file.is_file():
            labels = read_labels(labels_file)
        else:
            labels = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
            if not labels:
                raise TrainingError(f"{root / 'train'} holds no label folders ({LAYOUT})")
    except DatasetError as exc:
        raise TrainingError(f"{exc} ({LAYOUT})") from None

    splits: dict[str, LabeledImages] = {}
    for split in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        folder = root / split
        if split in OPTIONAL_SPLITS and not folder.is_dir():
            continue
        try:
            splits[split] = list_labeled_images(folder, labels)
        except DatasetError as exc:
            where = "labels.txt" if labels_file.is_file() else "the train split's folders"
            raise TrainingError(f"{split} split: {exc} (labels from {where}; {LAYOUT})") from None

    train_labels = _present(splits["train"])
    missing = [label for label in labels if label not in train_labels]
    if missing:
        raise TrainingError(
            f"the train split has no photos of {', '.join(missing)}: every label in labels.txt needs "
            f"training photos ({LAYOUT})"
        )
    for split, listing in splits.items():
        present = _present(listing)
        if split != "train" and present != train_labels:
            lacking = [label for label in labels if label in train_labels and label not in present]
            raise TrainingError(
                f"the {split} split's labels differ from the train split's: it has no photos of "
                f"{', '.join(lacking)} ({LAYOUT})"
            )
    return labels, splits


def _present(listing: LabeledImages) -> set[str]:
    return {listing.labels[t] for t in set(listing.targets)}


def load_data(data_dir: str | Path, spec: PreprocessSpec) -> TrainingData:
    """Check `data_dir` and build each split's cached dataset of `preprocess(path, spec)` tensors."""
    from preprocessing.tf_data import image_dataset

    labels, splits = check_layout(data_dir)
    datasets = {
        name: image_dataset(listing.paths, spec, listing.targets).cache() for name, listing in splits.items()
    }
    return TrainingData(Path(data_dir), labels, splits, datasets)


def augment_batch(images: "tf.Tensor", seed: "tf.Tensor", spec: PreprocessSpec) -> "tf.Tensor":
    """Light, seeded augmentation of a batch of prepared images, in the graph.

    Per image: a horizontal flip (half the time), a brightness shift of up to BRIGHTNESS_DELTA
    pixel levels and a contrast change by CONTRAST_RANGE around the image's mean; then clipped to
    what `spec` can produce from pixels 0..255. The products are all left/right symmetric classes,
    so a flip never changes the label. `seed` is a stateless seed, shape [2].
    """
    import tensorflow as tf

    flip_seed, brightness_seed, contrast_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    n = tf.shape(images)[0]
    scale = tf.constant(spec.scale, tf.float32)
    mean = tf.constant(spec.mean, tf.float32)
    std = tf.constant(spec.std, tf.float32)
    low = (0.0 * scale - mean) / std
    high = (255.0 * scale - mean) / std

    flip = tf.random.stateless_uniform([n, 1, 1, 1], flip_seed) < 0.5
    images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    delta = tf.random.stateless_uniform([n, 1, 1, 1], brightness_seed, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    images = images + delta * scale / std
    factor = tf.random.stateless_uniform([n, 1, 1, 1], contrast_seed, *CONTRAST_RANGE)
    centre = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    images = (images - centre) * factor + centre
    return tf.clip_by_value(images, low, high)


def _training_batches(data: TrainingData, options: TrainOptions) -> "tf.data.Dataset":
    import tensorflow as tf

    n = len(data.splits["train"])
    batches = (
        data.datasets["train"]
        .shuffle(n, seed=options.seed, reshuffle_each_iteration=True)
        .batch(options.batch_size)
    )
    if options.augment:
        seeds = tf.data.Dataset.random(seed=options.seed, rerandomize_each_iteration=True).batch(2)
        batches = tf.data.Dataset.zip((batches, seeds)).map(
            lambda pair, seed: (augment_batch(pair[0], seed, options.spec), pair[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return batches.prefetch(tf.data.AUTOTUNE)


def _decode_all(data: TrainingData, spec: PreprocessSpec, progress: bool) -> None:
    """Run the first pass over every split so that all photos are decoded once, up front.

    A photo that cannot be used fails here, named, instead of in the middle of an epoch.
    """
    import tensorflow as tf

    from preprocessing import preprocess

    for name, dataset in data.datasets.items():
        started = time.perf_counter()
        try:
            for _ in dataset.batch(256):
                pass
        except tf.errors.OpError as exc:
            # tf.data's message does not say which file; find it (only on this error path).
            for path in data.splits[name].paths:
                try:
                    preprocess(path, spec)
                except PreprocessingError as bad:
                    raise TrainingError(f"cannot use {path}: {bad}") from None
            raise TrainingError(f"cannot prepare the {name} photos: {_python_error(exc.message)}") from None
        if progress:
            print(f"decoded {len(data.splits[name])} {name} photos in {time.perf_counter() - started:.1f} s", flush=True)


def _python_error(message: str) -> str:
    """The Python error inside a tf.data error message (raised in tf.numpy_function), else its first line."""
    found = re.findall(r"\b(\w+(?:Error|Exception): .+)", str(message))
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _keep_best_callback(patience: int):
    import tf_keras as keras

    class KeepBest(keras.callbacks.Callback):
        """Remember the weights of the best validation epoch (accuracy, then loss), restore them at the end."""

        def __init__(self) -> None:
            super().__init__()
            self.best: tuple[float, float] = (-1.0, math.inf)
            self.best_epoch = 0
            self.weights: list | None = None
            self.wait = 0

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            accuracy, loss = float(logs.get("val_accuracy", 0.0)), float(logs.get("val_loss", math.inf))
            if accuracy > self.best[0] or (accuracy == self.best[0] and loss < self.best[1]):
                self.best, self.best_epoch, self.wait = (accuracy, loss), epoch + 1, 0
                self.weights = self.model.get_weights()
            else:
                self.wait += 1
                if patience and self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return KeepBest()


def _accuracy(model: "tf_keras.Model", dataset: "tf.data.Dataset", listing: LabeledImages, batch_size: int) -> float:
    import numpy as np

    probabilities = model.predict(dataset.batch(batch_size * 2), verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=1) == np.asarray(listing.targets)))


def train(
    data_dir: str | Path,
    export_dir: str | Path,
    options: TrainOptions = TrainOptions(),
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> TrainResult:
    """Train a classifier on `data_dir` and export it to `export_dir` (see the module docstring).

    Raises TrainingError for a bad data folder or an `export_dir` that already holds files
    (unless `overwrite`); nothing is written to `export_dir` unless training succeeds.
    """
    started = time.perf_counter()
    if not isinstance(options, TrainOptions):
        raise TrainingError(f"options must be TrainOptions, got {type(options).__name__}")
    export_dir = Path(export_dir)
    _check_export_dir(export_dir, overwrite)
    check_layout(data_dir)  # before TensorFlow is imported: bad folders fail fast

    import tensorflow as tf
    import tf_keras as keras

    from edge_demo.model import build_classifier

    keras.utils.set_random_seed(options.seed)
    spec = options.spec
    data = load_data(data_dir, spec)
    decode_started = time.perf_counter()
    _decode_all(data, spec, progress)
    decode_seconds = time.perf_counter() - decode_started

    model = build_classifier(
        len(data.labels), (spec.height, spec.width), width=options.width, dropout=options.dropout, seed=options.seed
    )
    steps = math.ceil(len(data.splits["train"]) / options.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(options.learning_rate, steps * options.epochs, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    keep_best = _keep_best_callback(options.patience)
    fit_started = time.perf_counter()
    history = model.fit(
        _training_batches(data, options),
        validation_data=data.datasets["val"].batch(options.batch_size * 2).prefetch(tf.data.AUTOTUNE),
        epochs=options.epochs,
        callbacks=[keep_best],
        verbose=2 if progress else 0,
    )
    fit_seconds = time.perf_counter() - fit_started
    epochs_run = len(history.history.get("loss", []))

    val_accuracy = _accuracy(model, data.datasets["val"], data.splits["val"], options.batch_size)
    test_accuracy = (
        _accuracy(model, data.datasets["test"], data.splits["test"], options.batch_size) if "test" in data.splits else None
    )
    seconds = time.perf_counter() - started
    report = {
        "labels": list(data.labels),
        "images": data.counts,
        "options": options.to_dict(),
        "epochs": epochs_run,
        "best_epoch": keep_best.best_epoch,
        "val_accuracy": val_accuracy,
        "test_accuracy": test_accuracy,
        "seconds": round(seconds, 2),
        "decode_seconds": round(decode_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "history": {key: [round(float(v), 5) for v in values] for key, values in history.history.items()},
        "input": {"name": INPUT_NAME, "shape": [None, spec.height, spec.width, 3], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(data.labels)], "dtype": "float32"},
        "model": {"name": model.name, "parameters": int(model.count_params())},
        "tensorflow": tf.__version__,
    }
    _export(model, spec, data.labels, report, export_dir, overwrite)
    if progress:
        print(f"exported to {export_dir}", flush=True)
    return TrainResult(export_dir, data.labels, val_accuracy, test_accuracy, epochs_run, seconds, model)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def _check_export_dir(export_dir: Path, overwrite: bool) -> None:
    if export_dir.is_symlink() or (export_dir.exists() and not export_dir.is_dir()):
        raise TrainingError(f"export folder {export_dir} exists and is not a folder")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite:
        raise TrainingError(
            f"export folder {export_dir} already holds files; "
            "choose another folder or pass overwrite=True (--overwrite)"
        )


def _export(
    model: "tf_keras.Model",
    spec: PreprocessSpec,
    labels: tuple[str, ...],
    report: dict[str, Any],
    export_dir: Path,
    overwrite: bool,
) -> None:
    """Write the bundle into a temporary folder beside `export_dir`, then rename it into place."""
    import contextlib
    import io

    import tensorflow as tf
    import tf_keras as keras

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", suffix=".tmp", dir=export_dir.parent))
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serve",
            lambda image: {OUTPUT_NAME: model(image, training=False)},
            input_signature=[tf.TensorSpec([None, spec.height, spec.width, 3], tf.float32, name=INPUT_NAME)],
        )
        with contextlib.redirect_stdout(io.StringIO()):  # ExportArchive prints its endpoints
            archive.write_out(str(tmp))  # serving_default = the first endpoint
        model.save(tmp / "model.keras")
        (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        (tmp / "preprocess_spec.json").write_text(spec.to_json() + "\n", encoding="utf-8")
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _chmod_like_a_new_folder(tmp)
        _move_into_place(tmp, export_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chmod_like_a_new_folder(path: Path) -> None:
    """mkdtemp makes a folder only its owner can read; give it the permissions mkdir would."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _move_into_place(tmp: Path, export_dir: Path, overwrite: bool) -> None:
    _check_export_dir(export_dir, overwrite)  # again: something may have appeared while training
    old: Path | None = None
    if export_dir.is_dir():
        if any(export_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", suffix=".old", dir=export_dir.parent))
            os.replace(export_dir, old / "previous")
        else:
            export_dir.rmdir()
    try:
        os.replace(tmp, export_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", export_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (2 with a one-line message for bad input)."""
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(
        prog="python -m edge_demo.train",
        description="Train the demo classifier on DATA_DIR/{train,val[,test]}/<label>/<photo> and export a SavedModel.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", type=Path)
    parser.add_argument("export_dir", metavar="EXPORT_DIR", type=Path)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="at most this many epochs (default: %(default)s)")
    parser.add_argument("--width", type=float, default=defaults.width, help="width multiplier (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument("--quiet", action="store_true", help="print only the result")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ INFO lines are noise here
    try:
        options = TrainOptions(epochs=args.epochs, width=args.width, seed=args.seed)
        result = train(args.data_dir, args.export_dir, options, progress=not args.quiet, overwrite=args.overwrite)
    except (TrainingError, PreprocessingError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    test = f", test accuracy {result.test_accuracy:.1%}" if result.test_accuracy is not None else ""
    print(
        f"validation accuracy {result.val_accuracy:.1%}{test} "
        f"({result.epochs} epochs, {result.seconds:.0f} s); SavedModel in {result.export_dir}"
    )
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
