"""Session fixtures for tests that need demo data or a real trained SavedModel.

Loaded as a pytest plugin (`pytest_plugins = ["tests.model_fixtures"]` in tests/conftest.py):

    demo_dataset       Path of a small synthetic data set: {train,val,test}/<category>/*.jpg + labels.txt
                       (12 / 4 / 4 photos per category, 6 categories, long side 320..480 px)
    tiny_training      the `TrainResult` of 2 epochs on demo_dataset at 32x32, width 0.25
    tiny_saved_model   Path of that export: SavedModel + labels.txt, preprocess_spec.json, training.json

Accuracy of the tiny model is irrelevant; it is a real SavedModel with the real signature
(image float32 [N, 32, 32, 3] -> probabilities [N, 6]). Both are shared by the whole session:
treat them as read-only (copy the folder before changing anything in it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Photos per category in each split of `demo_dataset`.
DEMO_SPLITS: tuple[tuple[str, int], ...] = (("train", 12), ("val", 4), ("test", 4))
#: Input size (height, width) and width multiplier of the tiny model.
TINY_INPUT = (32, 32)
TINY_WIDTH = 0.25


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set in the layout `edge_demo.train` reads."""
    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    root = tmp_path_factory.mktemp("demo_dataset")
    options = GeneratorOptions(seed=0, splits=DEMO_SPLITS, long_side=(320, 480), large_fraction=0.0)
    generate_dataset(root, options)
    return root


def tiny_train_options():
    """The `TrainOptions` of `tiny_training`: seconds, not minutes."""
    from edge_demo.train import TrainOptions, demo_spec

    height, width = TINY_INPUT
    return TrainOptions(
        epochs=2,
        batch_size=16,
        learning_rate=3e-3,
        width=TINY_WIDTH,
        seed=0,
        spec=demo_spec().replace(height=height, width=width),
        patience=0,
    )


@pytest.fixture(scope="session")
def tiny_training(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """`edge_demo.train.train` on `demo_dataset` with `tiny_train_options()`: a `TrainResult`."""
    from edge_demo.train import train

    export_dir = tmp_path_factory.mktemp("tiny_model") / "model"
    return train(demo_dataset, export_dir, tiny_train_options())


@pytest.fixture(scope="session")
def tiny_saved_model(tiny_training) -> Path:
    """The export folder of `tiny_training` (read-only: copy it before changing it)."""
    return tiny_training.export_dir
