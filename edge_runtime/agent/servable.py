"""The loader and the servable: a verified bundle around a TFLite interpreter, and the handle that
lets the manager swap versions between requests.

`load_servable(path, ...)` is the default loader (any callable `Path -> Servable` can replace it, which
is how tests inject a faulty version). `ServableHandle` holds the version requests use: `acquire()`
pins it for one request; `swap(new)` makes `new` the one later requests get and closes the old one
as soon as its last in-flight request is done. A swap is a pointer change under a lock: no request
waits for a load.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..classifier import Classifier, ClassifierOptions
from ..results import Category
from ..store import ModelRef

#: Classifiers are built with every label ranked; each request then keeps its own top_k.
_ALL_LABELS = 10_000


class Servable:
    """A loaded model version that the local API classifies with."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.ref = ModelRef(classifier.name, classifier.version)
        self._index = {label: i for i, label in enumerate(classifier.labels)}

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> int:
        return self.ref.version

    @property
    def threshold(self) -> float:
        return self.classifier.threshold

    def classify(self, data: bytes, top_k: int) -> tuple[tuple[Category, ...], float]:
        """Top-k categories of a photo and the milliseconds taken. A bad photo raises
        `InvalidImageError`; anything else raised is a failure of the model."""
        started = time.perf_counter()
        categories = self.classifier.run(self.classifier.prepare(data))
        return categories[:top_k], (time.perf_counter() - started) * 1000

    def predict(self, prepared: np.ndarray) -> np.ndarray:
        """Probabilities in label order (what `converter.smoke.run_smoke_test` replays)."""
        probabilities = np.zeros(len(self._index), dtype=np.float32)
        for category in self.classifier.run(prepared):
            probabilities[self._index[category.label]] = category.score
        return probabilities

    def smoke_test(self) -> dict[str, Any]:
        """Replay the manifest's golden photos; `{"passed", "cases": [...]}`."""
        from converter.smoke import run_smoke_test

        bundle = self.classifier.bundle
        result = run_smoke_test(bundle.manifest.smoke_test, self, bundle.spec, bundle.labels)
        return {
            "passed": result.passed,
            "cases": [
                {"expected": o.expected_label, "got": o.label, "max_abs_diff": round(o.max_abs_diff, 5), "passed": o.passed}
                for o in result.outcomes
            ],
        }

    def close(self) -> None:
        self.classifier.close()


Loader = Callable[[Path], Servable]


def make_loader(public_key: Path, store_home: Path, threads: int | None = None) -> Loader:
    """The default loader: verify the bundle folder against the pinned key and build its interpreter."""

    def load(path: Path) -> Servable:
        options = ClassifierOptions(model=path, top_k=_ALL_LABELS, threads=threads, delegate="auto",
                                    public_key=public_key, store_home=store_home)
        return Servable(Classifier.create_from_options(options))

    return load


class _Slot:
    def __init__(self, servable: Servable) -> None:
        self.servable = servable
        self.users = 0
        self.retired = False


class ServableHandle:
    """The version requests are served with, swapped atomically between requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slot: _Slot | None = None
        self._drained = threading.Condition(self._lock)

    @property
    def current(self) -> Servable | None:
        slot = self._slot
        return slot.servable if slot else None

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Servable | None]:
        """The current version, kept open until the block ends (None while there is none)."""
        with self._lock:
            slot = self._slot
            if slot is not None:
                slot.users += 1
        try:
            yield slot.servable if slot else None
        finally:
            if slot is not None:
                close = False
                with self._lock:
                    slot.users -= 1
                    close = slot.retired and slot.users == 0
                    if close:
                        self._drained.notify_all()
                if close:
                    slot.servable.close()

    def swap(self, new: Servable | None, *, wait_s: float = 0.0) -> Servable | None:
        """Serve `new` from now on; the old version closes when its last request finishes.

        With `wait_s`, wait that long for the old version's requests to finish (the resource-
        preserving policy unloads before it loads). Returns the old version.
        """
        with self._lock:
            old = self._slot
            self._slot = _Slot(new) if new is not None else None
            if old is None:
                return None
            old.retired = True
            close_now = old.users == 0
            if not close_now and wait_s > 0:
                deadline = time.monotonic() + wait_s
                while old.users and time.monotonic() < deadline:
                    self._drained.wait(max(0.0, deadline - time.monotonic()))
                close_now = False  # the last user closes it
        if close_now:
            old.servable.close()
        return old.servable
