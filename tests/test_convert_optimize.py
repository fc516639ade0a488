"""Training-time optimisations: a training script wraps its tf_keras model, trains, exports, converts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_model_optimization")

import tf_keras as keras  # noqa: E402
from PIL import Image  # noqa: E402

from converter import (  # noqa: E402
    ConvertOptions,
    QuantizationOptions,
    SigningOptions,
    UsageError,
    ValidationOptions,
    convert,
    optimize,
)
from preprocessing import PreprocessSpec, list_labeled_images, preprocess  # noqa: E402

LABELS = ("red", "green", "blue", "rows", "columns", "checks")
SPEC = PreprocessSpec(height=32, width=32)


def pattern(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 photo whose label is learnable in seconds: a colour cast, stripes or a checkerboard."""
    y, x = np.mgrid[0:32, 0:32]
    image = np.tile(rng.integers(60, 200, 3), (32, 32, 1)).astype(float)
    if kind < 3:
        image[..., kind] += 50
    else:
        cells = {3: y // 4, 4: x // 4, 5: x // 4 + y // 4}[kind]
        image[cells % 2 == 0] -= 60
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> dict:
    """train/ and val/ folders of PNG photos, and the prepared arrays of each split."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", 30), ("val", 10)):
        for kind, label in enumerate(LABELS):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(pattern(kind, rng)).save(folder / f"{i:03d}.png")
        photos = list_labeled_images(root / split, LABELS)
        splits[split] = (np.stack([preprocess(p, SPEC) for p in photos.paths]), np.asarray(photos.targets))
    return {"root": root, **splits}


def export(model: keras.Model, folder: Path) -> Path:
    """What a training script does after fine-tuning: a SavedModel with serving_default and its sidecars."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="image")])
    def serve(image):
        return {"probabilities": model(image, training=False)}

    module = tf.Module()  # the signature and the variables only: tracing every QAT layer takes seconds
    module.serve = serve
    module.weights = list(model.variables)
    tf.saved_model.save(module, str(folder), signatures={"serving_default": serve})
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "preprocess_spec.json").write_text(SPEC.to_json())
    return folder


def accuracy(model: keras.Model, split: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = split
    return float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))


@pytest.mark.slow
def test_a_quantization_aware_model_converts_to_int8_and_keeps_its_accuracy(patterns, tmp_path):
    from edge_demo.model import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier(len(LABELS), (32, 32), width=0.25, dropout=0.0)  # the demo architecture
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(*patterns["train"], epochs=10, batch_size=16, verbose=0)
    model = optimize.quantization_aware(model)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(*patterns["train"], epochs=2, batch_size=16, verbose=0, callbacks=optimize.callbacks(model))
    qat_accuracy = accuracy(model, patterns["val"])
    assert qat_accuracy >= 0.6  # it learned something worth keeping

    # No calibration photos: the quantization ranges were learned during training.
    result = convert(export(model, tmp_path / "qat"), ConvertOptions(
        out=tmp_path / "bundle",
        quantization=QuantizationOptions("int8"),
        validation=ValidationOptions(images=patterns["root"] / "val", min_agreement=0.9, min_class_agreement=0.6),
        signing=SigningOptions(unsigned=True),
    ))
    report = result.validation
    assert result.manifest.input.dtype == "uint8" and result.manifest.output.dtype == "uint8"
    assert report.saved_model.accuracy == pytest.approx(qat_accuracy)
    assert report.tflite.accuracy >= qat_accuracy - 0.07  # at most 4 of the 60 photos (here: 2)
    assert report.agreement >= 0.9
    assert report.size_ratio < 0.5


def small_model() -> keras.Model:
    """A small Conv2D + Dense classifier: the wrappers' behaviour, without the demo model's build time."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(LABELS), activation="softmax"),
    ])


@pytest.mark.slow
def test_pruning_zeroes_weights_and_strips_to_a_plain_model(patterns):
    model = optimize.prune(small_model(), optimize.PruningOptions(final_sparsity=0.6, end_step=4, frequency=1))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(*patterns["train"], epochs=1, batch_size=16, verbose=0, callbacks=optimize.callbacks(model))
    plain = optimize.strip(model)
    assert not any(type(layer).__name__ == "PruneLowMagnitude" for layer in plain.layers)
    assert optimize.sparsity(plain) == pytest.approx(0.6, abs=0.02)


@pytest.mark.slow
def test_clustering_shares_weights(patterns):
    model = optimize.cluster(small_model(), optimize.ClusteringOptions(clusters=8))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(*patterns["train"], epochs=1, batch_size=16, verbose=0)
    counts = optimize.unique_weights(optimize.strip(model))
    assert len(counts) == 2 and all(1 < n <= 8 for n in counts.values()), counts


def test_only_tf_keras_models_can_be_optimised():
    with pytest.raises(UsageError, match="tf_keras"):
        optimize.quantization_aware(object())
    with pytest.raises(UsageError, match="clusters"):
        optimize.cluster(small_model(), optimize.ClusteringOptions(clusters=1))
