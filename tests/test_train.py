"""edge_demo.model and edge_demo.train: the classifier, the training data path, the export, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_demo.synthetic import CATEGORIES
from edge_demo.train import (
    LAYOUT,
    TrainingError,
    TrainOptions,
    augment_batch,
    check_layout,
    demo_spec,
    load_data,
    main,
    train,
)
from preprocessing import PreprocessSpec, preprocess, read_labels
from tests.model_fixtures import DEMO_SPLITS, TINY_INPUT, tiny_train_options

tf = pytest.importorskip("tensorflow")

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------


def test_classifier_shape_names_and_seed():
    from edge_demo.model import build_classifier

    model = build_classifier(6, (32, 48), width=0.25, seed=3)
    assert model.input_shape == (None, 32, 48, 3)
    assert model.output_shape == (None, 6)
    assert model.layers[-1].name == "probabilities"
    again = build_classifier(6, (32, 48), width=0.25, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights()))
    other = build_classifier(6, (32, 48), width=0.25, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), other.get_weights()))
    out = model(np.zeros((2, 32, 48, 3), np.float32), training=False).numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_classifier_uses_only_edge_friendly_layers():
    from edge_demo.model import build_classifier

    allowed = {
        "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
        "GlobalAveragePooling2D", "Dropout", "Dense",
    }
    model = build_classifier(3, (32, 32), width=0.25)
    assert {type(layer).__name__ for layer in model.layers} <= allowed
    assert all(layer.max_value == 6 for layer in model.layers if type(layer).__name__ == "ReLU")


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 3, "width": 0}, {"num_classes": 3, "dropout": 1.0}])
def test_classifier_refuses_bad_arguments(kwargs):
    from edge_demo.model import build_classifier

    with pytest.raises(ValueError):
        build_classifier(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# the export
# ----------------------------------------------------------------------------------------------------------


def _photos(root: Path, split: str, labels: tuple[str, ...], per_label: int = 2) -> tuple[list[Path], list[int]]:
    paths, targets = [], []
    for target, label in enumerate(labels):
        found = sorted((root / split / label).glob("*.jpg"))[:per_label]
        paths += found
        targets += [target] * len(found)
    return paths, targets


def test_export_serves_probabilities(tiny_saved_model, tiny_training, demo_dataset):
    loaded = tf.saved_model.load(str(tiny_saved_model))
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert list(inputs) == ["image"]
    assert inputs["image"].dtype == tf.float32
    assert inputs["image"].shape.as_list() == [None, *TINY_INPUT, 3]
    assert list(serve.structured_outputs) == ["probabilities"]

    spec = tiny_train_options().spec
    paths, _ = _photos(demo_dataset, "val", tiny_training.labels, per_label=1)
    batch = np.stack([preprocess(p, spec) for p in paths])
    probabilities = serve(image=tf.constant(batch))["probabilities"].numpy()
    assert probabilities.shape == (len(CATEGORIES), len(CATEGORIES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # the SavedModel computes what the trained Keras model computes
    np.testing.assert_allclose(probabilities, tiny_training.model.predict(batch, verbose=0), atol=1e-5)


def test_export_carries_labels_spec_and_report(tiny_saved_model, tiny_training, demo_dataset):
    labels = read_labels(tiny_saved_model / "labels.txt")
    assert labels == read_labels(demo_dataset / "labels.txt") == CATEGORIES == tiny_training.labels

    spec = PreprocessSpec.from_json((tiny_saved_model / "preprocess_spec.json").read_text())
    assert spec == tiny_train_options().spec

    report = json.loads((tiny_saved_model / "training.json").read_text())
    assert report["images"] == {split: n * len(CATEGORIES) for split, n in DEMO_SPLITS}
    assert report["epochs"] == tiny_training.epochs == 2
    assert 0.0 <= report["val_accuracy"] <= 1.0 and 0.0 <= report["test_accuracy"] <= 1.0
    assert report["val_accuracy"] == pytest.approx(tiny_training.val_accuracy)
    assert report["test_accuracy"] == pytest.approx(tiny_training.test_accuracy)
    assert report["seconds"] > 0
    assert PreprocessSpec.from_dict(report["options"]["spec"]) == spec
    assert report["options"]["width"] == tiny_train_options().width
    assert report["labels"] == list(CATEGORIES)


def test_export_keras_model_reloads(tiny_saved_model, tiny_training):
    import tf_keras as keras

    model = keras.models.load_model(tiny_saved_model / "model.keras")
    x = np.random.default_rng(0).uniform(-1, 1, (2, *TINY_INPUT, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), tiny_training.model.predict(x, verbose=0), atol=1e-6)


def test_result_repr_leaves_out_the_model(tiny_training):
    assert "model=" not in repr(tiny_training)
    assert tiny_training.export_dir.is_dir()


# ----------------------------------------------------------------------------------------------------------
# the data path: exactly `preprocess`, decoded once
# ----------------------------------------------------------------------------------------------------------


def test_training_tensors_are_preprocess_output(demo_dataset):
    spec = tiny_train_options().spec
    data = load_data(demo_dataset, spec)
    assert data.labels == CATEGORIES
    assert set(data.splits) == {"train", "val", "test"}
    for split in ("train", "val"):
        listing = data.splits[split]
        seen = list(data.datasets[split].as_numpy_iterator())
        assert len(seen) == len(listing) == dict(DEMO_SPLITS)[split] * len(CATEGORIES)
        for (image, target), path, expected_target in zip(seen, listing.paths, listing.targets):
            assert image.dtype == np.float32 and image.shape == (*TINY_INPUT, 3)
            assert np.array_equal(image, preprocess(path, spec)), path
            assert target == expected_target
            assert data.labels[target] == path.parent.name


def test_augmentation_is_seeded_and_stays_in_range():
    spec = demo_spec().replace(height=16, width=16)
    images = tf.constant(np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32))
    seed = tf.constant([7, 8], tf.int64)
    a = augment_batch(images, seed, spec).numpy()
    b = augment_batch(images, seed, spec).numpy()
    c = augment_batch(images, tf.constant([9, 8], tf.int64), spec).numpy()
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    assert 0.0 < np.abs(a - images.numpy()).mean() < 0.5  # light, not a different picture


# ----------------------------------------------------------------------------------------------------------
# bad layouts
# ----------------------------------------------------------------------------------------------------------


def _tiny_layout(root: Path, splits: dict[str, tuple[str, ...]], labels: tuple[str, ...] | None = ("a", "b")) -> Path:
    for split, folders in splits.items():
        for i, label in enumerate(folders):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (24, 16), (40 * i, 100, 200)).save(root / split / label / "x.jpg")
    if labels is not None:
        (root / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    return root


def _refused(data_dir: Path, tmp_path: Path) -> str:
    with pytest.raises(TrainingError) as info:
        train(data_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    message = str(info.value)
    assert LAYOUT in message
    return message


def test_missing_data_dir_is_refused(tmp_path):
    assert "does not exist" in _refused(tmp_path / "nowhere", tmp_path)


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_is_refused(tmp_path, missing):
    splits = {"train": ("a", "b"), "val": ("a", "b")}
    del splits[missing]
    message = _refused(_tiny_layout(tmp_path / "data", splits), tmp_path)
    assert f"no {missing}/ split" in message


def test_val_with_a_label_train_lacks_is_refused(tmp_path):
    root = _tiny_layout(tmp_path / "data", {"train": ("a", "b"), "val": ("a", "b", "c")})
    message = _refused(root, tmp_path)
    assert "val split" in message and "c" in message


def test_val_missing_a_label_is_refused(tmp_path):
    root = _tiny_layout(tmp_path / "data", {"train": ("a", "b"), "val": ("a",)})
    message = _refused(root, tmp_path)
    assert "val split's labels differ from the train split's" in message and "no photos of b" in message


def test_train_missing_a_listed_label_is_refused(tmp_path):
    root = _tiny_layout(tmp_path / "data", {"train": ("a",), "val": ("a",)})
    assert "train split has no photos of b" in _refused(root, tmp_path)


def test_unreadable_photo_is_named(tmp_path):
    root = _tiny_layout(tmp_path / "data", {"train": ("a", "b"), "val": ("a", "b")})
    bad = root / "train" / "a" / "cut.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(TrainingError, match=re.escape(f"cannot use {bad}")):
        train(root, tmp_path / "export", TrainOptions(epochs=1, spec=demo_spec().replace(height=16, width=16)))
    assert not (tmp_path / "export").exists()


def test_labels_default_to_the_train_folders(tmp_path):
    root = _tiny_layout(tmp_path / "data", {"train": ("b", "a"), "val": ("a", "b")}, labels=None)
    labels, splits = check_layout(root)
    assert labels == ("a", "b") and set(splits) == {"train", "val"}


def test_options_are_checked():
    with pytest.raises(TrainingError, match="epochs"):
        TrainOptions(epochs=0)
    with pytest.raises(TrainingError, match="float32"):
        TrainOptions(spec=demo_spec().replace(dtype="uint8"))


# ----------------------------------------------------------------------------------------------------------
# export folder: never overwritten by accident, replaced atomically when asked
# ----------------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_an_export(demo_dataset, tiny_saved_model, tmp_path):
    existing = tmp_path / "existing"
    shutil.copytree(tiny_saved_model, existing)
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    with pytest.raises(TrainingError, match="already holds files"):
        train(demo_dataset, existing, tiny_train_options())
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before


def test_overwrite_replaces_the_export(demo_dataset, tmp_path):
    export = tmp_path / "model"
    export.mkdir()
    (export / "stale.txt").write_text("from an earlier run")
    options = TrainOptions(**{**tiny_train_options().__dict__, "epochs": 1})
    result = train(demo_dataset, export, options, overwrite=True)
    assert result.export_dir == export and result.epochs == 1
    assert not (export / "stale.txt").exists()
    assert {"saved_model.pb", "labels.txt", "preprocess_spec.json", "training.json"} <= {p.name for p in export.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left behind


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------


def test_cli_missing_folder_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_demo.train", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_export(demo_dataset, tiny_saved_model, capsys):
    assert main([str(demo_dataset), str(tiny_saved_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0]
