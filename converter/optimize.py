"""Training-time optimisations from tensorflow-model-optimization, for a training script's `tf_keras` model.

Each function wraps a model for fine-tuning; train the result as usual, then export it:

    model = optimize.quantization_aware(model)        # or prune(model) / cluster(model)
    model.compile(...); model.fit(..., callbacks=optimize.callbacks(model))
    model = optimize.strip(model)                     # removes pruning/clustering wrappers
    # export a SavedModel with the usual serving_default signature, labels.txt and
    # preprocess_spec.json (as edge_demo.train does), then run `edge-convert` as usual

- `quantization_aware`: fake-quantises weights and activations while training, so full-int8
  conversion loses (almost) nothing; such a model converts to int8 even without calibration photos.
- `prune`: drives a fraction of the weights to zero (smaller after compression, same file size).
- `cluster`: shares each layer's weights among a few centroids (compresses well; combine with int8).

Only tf_keras (Keras 2) models are supported: tensorflow-model-optimization does not wrap Keras 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from .errors import UsageError


@dataclass(frozen=True)
class PruningOptions:
    """Polynomial decay from `initial_sparsity` to `final_sparsity` between `begin_step` and `end_step`."""

    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100


@dataclass(frozen=True)
class ClusteringOptions:
    """How many centroids each layer's weights share, and how they start."""

    clusters: int = 16
    init: str = "kmeans++"  # or "linear", "density-based", "random"


_CENTROID_INIT = {
    "kmeans++": "KMEANS_PLUS_PLUS",
    "linear": "LINEAR",
    "density-based": "DENSITY_BASED",
    "random": "RANDOM",
}


def quantization_aware(model: keras.Model) -> keras.Model:
    """The model wrapped for quantization-aware training (compile and fine-tune it before exporting)."""
    _check_model(model)
    return tfmot.quantization.keras.quantize_model(model)


def prune(model: keras.Model, options: PruningOptions = PruningOptions()) -> keras.Model:
    """The model wrapped for magnitude pruning; train it with `callbacks(model)`, then `strip` it."""
    _check_model(model)
    if not 0.0 <= options.initial_sparsity <= options.final_sparsity < 1.0:
        raise UsageError("pruning needs 0 <= initial_sparsity <= final_sparsity < 1")
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=options.initial_sparsity,
        final_sparsity=options.final_sparsity,
        begin_step=options.begin_step,
        end_step=options.end_step,
        frequency=options.frequency,
    )
    return tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)


def cluster(model: keras.Model, options: ClusteringOptions = ClusteringOptions()) -> keras.Model:
    """The model wrapped for weight clustering; fine-tune it briefly, then `strip` it.

    tensorflow-model-optimization clusters Conv2D and Dense kernels; depthwise kernels stay as they are.
    """
    _check_model(model)
    if options.clusters < 2:
        raise UsageError(f"clustering needs at least 2 clusters, got {options.clusters}")
    if options.init not in _CENTROID_INIT:
        raise UsageError(f"clustering init must be one of {', '.join(_CENTROID_INIT)}, got {options.init!r}")
    init = getattr(tfmot.clustering.keras.CentroidInitialization, _CENTROID_INIT[options.init])
    return tfmot.clustering.keras.cluster_weights(
        model, number_of_clusters=options.clusters, cluster_centroids_init=init
    )


def callbacks(model: keras.Model) -> list[Any]:
    """The callbacks `fit` needs for the wrapped model (pruning steps its schedule; others need none)."""
    if _has_layer(model, "PruneLowMagnitude"):
        return [tfmot.sparsity.keras.UpdatePruningStep()]
    return []


def strip(model: keras.Model) -> keras.Model:
    """The model without pruning or clustering wrappers, ready to export (QAT models keep theirs)."""
    if _has_layer(model, "PruneLowMagnitude"):
        model = tfmot.sparsity.keras.strip_pruning(model)
    if _has_layer(model, "ClusterWeights"):
        model = tfmot.clustering.keras.strip_clustering(model)
    return model


def sparsity(model: keras.Model) -> float:
    """Fraction of zero weights in the model's kernels (what pruning achieved)."""
    zeros = total = 0
    for weight in model.weights:
        if "kernel" in weight.name:
            values = np.asarray(weight.numpy())
            zeros += int(np.sum(values == 0))
            total += values.size
    return zeros / total if total else 0.0


def unique_weights(model: keras.Model) -> dict[str, int]:
    """Distinct values in each kernel, by weight name (what clustering achieved)."""
    return {f"{layer.name}/{w.name}": len(np.unique(w.numpy()))
            for layer in model.layers for w in layer.weights if "kernel" in w.name}


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise UsageError(
            f"tensorflow-model-optimization wraps tf_keras models; got {type(model).__module__}."
            f"{type(model).__name__} (build the model with `import tf_keras as keras`)"
        )


def _has_layer(model: keras.Model, class_name: str) -> bool:
    return any(type(layer).__name__ == class_name for layer in model.layers)
