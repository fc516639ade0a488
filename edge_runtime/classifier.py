"""The loader: a verified model bundle wrapped around a TFLite interpreter.

`Classifier.create_from_options(ClassifierOptions(...))` verifies the bundle (model hash and size
against the manifest, the manifest's Ed25519 signature against the device's pinned key), builds the
interpreter on the best available backend and delegate, and classifies prepared photos. Anything
holding an interpreter has `close()` and works as a context manager.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing import DEFAULT_BUDGET, DecodeBudget, ImageSource, PreprocessSpec, normalise, preprocess, preprocess_pixels

from . import backends
from ._memory import keep_freed_memory
from .bundles import LoadedBundle, load_bundle
from .errors import ModelLoadError, ModelNotFoundError
from .results import Category

DELEGATES = ("auto", "cpu", "gpu")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ClassifierOptions:
    """What to load and how to run it.

    `model` is a bundle folder (or the `model.tflite` inside one); None means the local store's
    current version. `public_key` is the publisher key pinned on this device (PEM file); None takes
    `EDGE_CLASSIFY_PUBLIC_KEY` or `<store home>/trusted.pub`.
    """

    model: str | Path | None = None
    top_k: int = 3
    threads: int | None = None
    delegate: str = "auto"
    gpu_delegate_path: str | None = None
    backend: str | None = None
    public_key: str | Path | None = None
    store_home: str | Path | None = None
    decode_budget: DecodeBudget | None = None  # decoded pixels in flight; None: preprocessing.DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if self.delegate not in DELEGATES:
            raise ValueError(f"delegate must be one of {', '.join(DELEGATES)}, got {self.delegate!r}")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")


def locate_model(options: ClassifierOptions) -> tuple[Path, str | Path]:
    """The bundle the options name (unverified) and the publisher key to verify it with.

    Raises `ModelNotFoundError` when no model is given and the local store has no current one.
    """
    path = Path(options.model) if options.model is not None else None
    key = options.public_key or os.environ.get("EDGE_CLASSIFY_PUBLIC_KEY")
    if path is not None and key:
        return path, key  # the store is not consulted: a kiosk's cold start skips importing it
    from .store import ModelStore

    store = ModelStore(options.store_home)
    if path is None:
        ref = store.current()
        if ref is None:
            raise ModelNotFoundError(
                f"no model is installed in {store.home}: pass --model BUNDLE, install one with "
                "`edge-classify models install BUNDLE`, or enrol the device with `edge-agent`"
            )
        path = store.path_of(ref)
    return path, key or (store.home / "trusted.pub")


class Classifier:
    """A loaded model version: prepare photos with its spec, run them, name the top categories."""

    def __init__(self, bundle: LoadedBundle, options: ClassifierOptions) -> None:
        keep_freed_memory()  # a classifying process reuses the same buffers photo after photo
        self.bundle = bundle
        self.options = options
        #: Every photo this classifier prepares (its pipeline's workers included) decodes inside it.
        self.decode_budget = options.decode_budget or DEFAULT_BUDGET
        self.backend = backends.find_backend(options.backend)
        gpu_path = None
        if options.delegate == "gpu" or (options.delegate == "auto" and bundle.quantization == "float16"):
            gpu_path = backends.gpu_delegate_path(options.gpu_delegate_path)
            if gpu_path is None and options.delegate == "gpu":
                import warnings

                warnings.warn(
                    f"GPU delegate unavailable (no library given: use --gpu-delegate or "
                    f"{backends.GPU_DELEGATE_ENV}); running on the CPU",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._interpreter, self.delegate = backends.make_interpreter(
            self.backend,
            model_content=bundle.model_bytes,
            threads=options.threads,
            gpu_delegate_path=gpu_path,
        )
        self._lock = threading.Lock()
        input_detail = self._interpreter.get_input_details()[0]
        output_detail = self._interpreter.get_output_details()[0]
        self._input_index = input_detail["index"]
        self._output_index = output_detail["index"]
        self._input_dtype = np.dtype(input_detail["dtype"])
        self._batch_resizable = int(input_detail.get("shape_signature", input_detail["shape"])[0]) == -1
        self._batch = int(input_detail["shape"][0])
        out_scale, out_zero = output_detail.get("quantization", (0.0, 0))
        self._output_quantization = (float(out_scale), int(out_zero)) if out_scale else None
        expected = (bundle.spec.height, bundle.spec.width, 3)
        if tuple(int(d) for d in input_detail["shape"][1:]) != expected:
            raise ModelLoadError(
                f"the model's input {tuple(input_detail['shape'])} does not match its spec {expected}"
            )
        if self._input_dtype != np.dtype(bundle.spec.dtype):
            raise ModelLoadError(
                f"the model takes {self._input_dtype} input but its spec prepares {bundle.spec.dtype}"
            )
        n_outputs = int(output_detail["shape"][-1])
        if n_outputs != len(bundle.labels):
            raise ModelLoadError(f"the model has {n_outputs} outputs but {len(bundle.labels)} labels")

    @classmethod
    def create_from_options(cls, options: ClassifierOptions) -> "Classifier":
        """Find, verify and load the model the options name.

        Without `model`, the store's current version is used; when it is damaged, an intact previous
        version is loaded instead, with one warning saying why.
        """
        path, key = locate_model(options)
        if options.model is None:
            from .store import ModelStore

            bundle, fell_back = ModelStore(options.store_home).load_current(key)
            if fell_back:
                import warnings

                warnings.warn(fell_back, RuntimeWarning, stacklevel=2)
            return cls(bundle, options)
        return cls(load_bundle(path, key), options)

    # --- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.labels

    @property
    def spec(self) -> PreprocessSpec:
        return self.bundle.spec

    @property
    def threshold(self) -> float:
        """The manifest's low-confidence threshold (below it the server is asked)."""
        return self.bundle.confidence_threshold if self.bundle.confidence_threshold is not None else DEFAULT_THRESHOLD

    @property
    def max_batch(self) -> int:
        """How many photos one `run_batch` call takes (1 when the model has a fixed batch)."""
        return 16 if self._batch_resizable else self._batch

    # --- work ----------------------------------------------------------------------------------

    def prepare(self, source: ImageSource) -> np.ndarray:
        """Decode and prepare a photo with this model's spec (thread-safe; no interpreter needed)."""
        return preprocess(source, self.bundle.spec, budget=self.decode_budget)

    def prepare_pixels(self, source: ImageSource) -> np.ndarray:
        """The same decode and fit as `prepare`, stopping before normalisation: uint8 `spec.pixel_shape`
        (the same budget, limits and errors). `normalise(prepare_pixels(s))` equals `prepare(s)`."""
        return preprocess_pixels(source, self.bundle.spec, budget=self.decode_budget)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """The model input for pixels from `prepare_pixels` (scale, mean, std, int8/uint8 quantization)."""
        return normalise(pixels, self.bundle.spec)

    def run(self, prepared: np.ndarray) -> tuple[Category, ...]:
        """The top-k categories of one prepared photo."""
        return self.run_batch(prepared[None, ...])[0]

    def run_batch(self, batch: np.ndarray) -> list[tuple[Category, ...]]:
        """The top-k categories of a batch of prepared photos (N, H, W, 3)."""
        n = int(batch.shape[0])
        if n > self.max_batch and self.max_batch == 1:
            return [self.run(x) for x in batch]
        with self._lock:
            if self._batch_resizable and n != self._batch:
                self._interpreter.resize_tensor_input(self._input_index, [n, *batch.shape[1:]], strict=False)
                self._interpreter.allocate_tensors()
                self._batch = n
            self._interpreter.set_tensor(self._input_index, np.ascontiguousarray(batch, dtype=self._input_dtype))
            self._interpreter.invoke()
            scores = np.array(self._interpreter.get_tensor(self._output_index), copy=True)
        if self._output_quantization is not None:
            q_scale, q_zero = self._output_quantization
            scores = (scores.astype(np.float32) - q_zero) * q_scale
        return [self._top_k(row) for row in scores.astype(np.float32)]

    def classify(self, source: ImageSource) -> tuple[tuple[Category, ...], float]:
        """Decode, prepare and run one photo; returns its categories and the milliseconds taken."""
        started = time.perf_counter()
        categories = self.run(self.prepare(source))
        return categories, (time.perf_counter() - started) * 1000

    def describe(self) -> dict[str, Any]:
        """What `--verbose` prints: model, quantization, backend and delegate."""
        return {
            "model": {"name": self.name, "version": self.version},
            "quantization": self.bundle.quantization,
            "backend": self.backend.describe(),
            "delegate": self.delegate,
            "threads": self.options.threads,
            "input": {"shape": [self.spec.height, self.spec.width, 3], "dtype": self.spec.dtype},
            "threshold": self.threshold,
        }

    def _top_k(self, scores: np.ndarray) -> tuple[Category, ...]:
        k = min(self.options.top_k, scores.shape[-1])
        order = np.argsort(-scores, kind="stable")[:k]
        return tuple(Category(self.bundle.labels[i], float(scores[i])) for i in order)

    def close(self) -> None:
        """Release the interpreter."""
        self._interpreter = None

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
