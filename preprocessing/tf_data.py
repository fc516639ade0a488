"""TensorFlow adapter: `tf.data` pipelines built on the same `preprocess` the device and server run.

Only training, calibration and conversion import this (the `convert` extra); it is the one place
in `preprocessing` that imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from ._decode import DEFAULT_LIMITS, DecodeLimits
from ._folders import LabeledImages, list_labeled_images
from ._prepare import preprocess
from ._spec import PreprocessSpec


def image_dataset(
    paths: Sequence[str | Path],
    spec: PreprocessSpec,
    targets: Sequence[int] | None = None,
    *,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tf.data.Dataset:
    """A dataset of prepared photos (and their targets), each made by `preprocessing.preprocess`.

    Decoding runs in parallel on tf.data's threads through `tf.numpy_function`; the tensor is
    bit-identical to what `preprocess(path, spec)` returns on a device.
    """
    dtype = tf.as_dtype(spec.dtype)
    shape = (spec.height, spec.width, 3)

    def _load(path: bytes) -> np.ndarray:
        return preprocess(path.decode("utf-8"), spec, limits=limits)

    def _map(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(_load, [path], dtype, stateful=False)
        image.set_shape(shape)
        return image

    names = tf.constant([str(p) for p in paths], dtype=tf.string)
    if targets is None:
        dataset = tf.data.Dataset.from_tensor_slices(names)
        if shuffle:
            dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        if len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        labels = tf.constant(list(targets), dtype=tf.int32)
        dataset = tf.data.Dataset.from_tensor_slices((names, labels))
        if shuffle:
            dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(
            lambda p, y: (_map(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    if batch_size:
        dataset = dataset.batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)


def folder_dataset(
    root: str | Path, spec: PreprocessSpec, **options
) -> tuple[tf.data.Dataset, LabeledImages]:
    """`image_dataset` over `root/<label>/<photo>`, with the listing it was made from."""
    listing = list_labeled_images(root)
    return image_dataset(listing.paths, spec, listing.targets, **options), listing


def representative_dataset(
    paths: Sequence[str | Path], spec: PreprocessSpec, *, limit: int | None = None
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A TFLite converter `representative_dataset`: one prepared photo (batch of 1) at a time."""
    chosen = list(paths)[:limit] if limit else list(paths)

    def generate() -> Iterator[list[np.ndarray]]:
        for path in chosen:
            yield [preprocess(path, spec)[None, ...]]

    return generate


def naive_preprocess(path: str | Path, spec: PreprocessSpec) -> tf.Tensor:
    """What a TensorFlow tutorial would write: `decode_image` + `tf.image.resize` + normalise.

    Kept as the baseline that tests and benchmarks compare against. It ignores EXIF orientation,
    stretches instead of cropping, does not antialias when it shrinks, decodes at full size and
    keeps transparent pixels' hidden colours: do not use it for real work.
    """
    raw = tf.io.read_file(str(path))
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    resized = tf.image.resize(image, (spec.height, spec.width), method="bilinear")
    mean = tf.constant(spec.mean, dtype=tf.float32)
    std = tf.constant(spec.std, dtype=tf.float32)
    return (resized * spec.scale - mean) / std
