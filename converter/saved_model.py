"""Load a SavedModel and check it keeps the contract: one image in, one row of probabilities out.

The contract (what `edge_demo.train` exports): a `serving_default` signature taking float32
[batch, H, W, 3], already normalised by the `PreprocessSpec`, and returning [batch, num_classes]
probabilities; beside `saved_model.pb`, `labels.txt` and `preprocess_spec.json` (and `training.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import DatasetError, PreprocessSpec, SpecError, read_labels

from .errors import ModelContractError, NotASavedModelError

SIGNATURE_KEY = "serving_default"
LABELS_FILE = "labels.txt"
SPEC_FILE = "preprocess_spec.json"
TRAINING_FILE = "training.json"
_MODEL_PARTS = ("saved_model.pb", "variables", "assets")


class SavedModelClassifier:
    """A loaded SavedModel that keeps the contract, with its labels, spec and fingerprint."""

    def __init__(self, path: str | os.PathLike, *, labels_file: str | os.PathLike | None = None,
                 spec_file: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        _check_is_saved_model(self.path)
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:  # TF raises many types for a damaged SavedModel  # noqa: BLE001
            raise NotASavedModelError(f"{self.path} cannot be loaded as a SavedModel: {_first_line(exc)}") from exc
        signatures = getattr(self._loaded, "signatures", {})
        if SIGNATURE_KEY not in signatures:
            found = ", ".join(sorted(signatures)) or "none"
            raise ModelContractError(
                f"{self.path} has no '{SIGNATURE_KEY}' signature (it has: {found}); export the model with "
                "model.export() or tf.saved_model.save(..., signatures=...)"
            )
        self._fn = signatures[SIGNATURE_KEY]
        self.input_name, self.height, self.width = _image_input(self._fn, self.path)
        self.output_name, self.num_classes = _probability_output(self._fn, self.path)
        self.labels = _labels(self.path, labels_file, self.num_classes)
        self.spec = _spec(self.path, spec_file, self.height, self.width)
        self.training = _training(self.path)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of prepared float32 photos (N, H, W, 3)."""
        import tensorflow as tf

        out = self._fn(**{self.input_name: tf.constant(batch, dtype=tf.float32)})
        return np.asarray(out[self.output_name].numpy(), dtype=np.float32)

    @property
    def size_bytes(self) -> int:
        """Bytes of saved_model.pb, variables/ and assets/ (what TF Serving loads)."""
        return sum(p.stat().st_size for p in _model_files(self.path))

    def fingerprint(self) -> dict[str, Any]:
        """TensorFlow's SavedModel fingerprint (when fingerprint.pb exists) and a sha256 over the model files."""
        digest = hashlib.sha256()
        for file in _model_files(self.path):
            digest.update(file.relative_to(self.path).as_posix().encode("utf-8") + b"\0")
            digest.update(file.read_bytes())
        result: dict[str, Any] = {"files_sha256": digest.hexdigest()}
        try:
            import tensorflow as tf

            fp = tf.saved_model.experimental.read_fingerprint(str(self.path))
            result.update(
                singleprint=fp.singleprint(),
                saved_model_checksum=int(fp.saved_model_checksum),
                graph_def_program_hash=int(fp.graph_def_program_hash),
                signature_def_hash=int(fp.signature_def_hash),
                saved_object_graph_hash=int(fp.saved_object_graph_hash),
                checkpoint_hash=int(fp.checkpoint_hash),
            )
        except Exception:  # no fingerprint.pb (older exporters): the files' sha256 stands alone  # noqa: BLE001
            pass
        return result


def _check_is_saved_model(path: Path) -> None:
    if not path.exists():
        raise NotASavedModelError(f"{path} does not exist")
    if path.is_file():
        hint = ""
        if path.suffix in (".keras", ".h5", ".hdf5"):
            hint = " (a Keras file: export a SavedModel with model.export(DIR) or model.save(DIR, save_format='tf'))"
        elif path.name == "saved_model.pb":
            hint = f" (pass its folder, {path.parent})"
        raise NotASavedModelError(f"{path} is a file, not a SavedModel folder{hint}")
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise NotASavedModelError(f"{path} is not a SavedModel: it has no saved_model.pb")


def _image_input(fn: Any, path: Path) -> tuple[str, int, int]:
    _, inputs = fn.structured_input_signature
    if len(inputs) != 1:
        raise ModelContractError(
            f"{path}'s {SIGNATURE_KEY} takes {len(inputs)} inputs ({', '.join(sorted(inputs))}); an image "
            "classifier takes one image tensor"
        )
    name, spec = next(iter(inputs.items()))
    shape = spec.shape.as_list() if spec.shape.rank is not None else None
    described = f"{spec.dtype.name} {shape}"
    if shape is None or len(shape) != 4 or shape[3] != 3:
        raise ModelContractError(
            f"{path}'s input '{name}' is {described}, not an image: expected float32 [batch, height, width, 3]"
        )
    if spec.dtype.name != "float32":
        raise ModelContractError(
            f"{path}'s input '{name}' is {described}: expected float32 pixels normalised by the PreprocessSpec"
        )
    if shape[1] is None or shape[2] is None:
        raise ModelContractError(f"{path}'s input '{name}' is {described}: height and width must be fixed")
    return name, int(shape[1]), int(shape[2])


def _probability_output(fn: Any, path: Path) -> tuple[str, int]:
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or not outputs:
        raise ModelContractError(f"{path}'s {SIGNATURE_KEY} returns no named output")
    if len(outputs) > 1:
        if "probabilities" not in outputs:
            raise ModelContractError(
                f"{path}'s {SIGNATURE_KEY} returns {len(outputs)} outputs ({', '.join(sorted(outputs))}); "
                "expected one (or one named 'probabilities')"
            )
        name = "probabilities"
    else:
        name = next(iter(outputs))
    spec = outputs[name]
    shape = spec.shape.as_list() if spec.shape.rank is not None else None
    if shape is None or len(shape) != 2 or shape[1] is None or shape[1] < 2 or spec.dtype.name != "float32":
        raise ModelContractError(
            f"{path}'s output '{name}' is {spec.dtype.name} {shape}: expected float32 probabilities "
            "[batch, num_classes]"
        )
    return name, int(shape[1])


def _labels(path: Path, labels_file: str | os.PathLike | None, num_classes: int) -> tuple[str, ...]:
    source = Path(labels_file) if labels_file is not None else path / LABELS_FILE
    if not source.is_file():
        if labels_file is not None:
            raise ModelContractError(f"labels file {source} does not exist")
        raise ModelContractError(f"{path} has no {LABELS_FILE} beside saved_model.pb: pass --labels FILE")
    try:
        labels = read_labels(source)
    except DatasetError as exc:
        raise ModelContractError(str(exc)) from exc
    if len(labels) != num_classes:
        raise ModelContractError(
            f"{source} lists {len(labels)} labels but the model outputs {num_classes} probabilities"
        )
    return labels


def _spec(path: Path, spec_file: str | os.PathLike | None, height: int, width: int) -> PreprocessSpec:
    source = Path(spec_file) if spec_file is not None else path / SPEC_FILE
    if not source.is_file():
        if spec_file is not None:
            raise ModelContractError(f"spec file {source} does not exist")
        raise ModelContractError(
            f"{path} has no {SPEC_FILE} beside saved_model.pb: pass --spec FILE (PreprocessSpec JSON)"
        )
    try:
        spec = PreprocessSpec.from_json(source.read_bytes())
    except SpecError as exc:
        raise ModelContractError(f"{source}: {exc}") from exc
    if spec.dtype != "float32":
        raise ModelContractError(f"{source} has dtype {spec.dtype}; the SavedModel's spec must be float32")
    if (spec.height, spec.width) != (height, width):
        raise ModelContractError(
            f"{source} prepares {spec.height}x{spec.width} photos but the model takes {height}x{width}"
        )
    return spec


def _training(path: Path) -> dict[str, Any] | None:
    file = path / TRAINING_FILE
    if not file.is_file() or file.stat().st_size > 64 * 1024:
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _model_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for part in _MODEL_PARTS:
        item = path / part
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
    return files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
