"""The loader and the servable: a verified bundle around a TFLite interpreter, and the handle that
lets the manager swap versions between requests.

`load_servable(path, ...)` is the default loader (any callable `Path -> Servable` can replace it, which
is how tests inject a faulty version). `ServableHandle` holds the version requests use: `acquire()`
pins it for one request; `swap(new)` makes `new` the one later requests get and closes the old one
as soon as its last in-flight request is done. A swap is a pointer change under a lock: no request
waits for a load.

`CallMarker` tells a model crash from a power cut or a kill: every call into the interpreter (load,
smoke test, classify) is noted, while it runs, in a small memory-mapped file (`HOME/agent/in_model`).
Its pages belong to the kernel's page cache, so they outlive the process: a run that died while a
version was inside the interpreter (a segfault, an abort, the OOM killer) leaves that version named
there; a kill -9 or a power cut between calls leaves it empty, and counts against no model. Noting
costs a few microseconds and no disk write.
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import os
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


class CallMarker:
    """Which versions are inside the interpreter right now, in a file that outlives the process."""

    SIZE = 4096

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._inside: collections.Counter[tuple[str, int, str]] = collections.Counter()
        self._map: mmap.mmap | None = None
        self.found: list[tuple[ModelRef, str]] = []
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self.found = _parse_marker(os.pread(fd, self.SIZE, 0))  # what the last run was doing when it died
            os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)
        self._write()

    @contextlib.contextmanager
    def inside(self, ref: ModelRef, what: str) -> Iterator[None]:
        """Note `ref` inside the interpreter (`what`: load, smoke_test, invoke) for the block."""
        key = (ref.name, ref.version, what)
        with self._lock:
            self._inside[key] += 1
            self._write()
        try:
            yield
        finally:
            with self._lock:
                self._inside[key] -= 1
                if self._inside[key] <= 0:
                    del self._inside[key]
                self._write()

    def close(self) -> None:
        with self._lock:
            self._inside.clear()
            self._write()
            if self._map is not None:
                self._map.close()
                self._map = None

    def _write(self) -> None:
        if self._map is None:
            return
        data = json.dumps(sorted(self._inside)).encode()[: self.SIZE - 8]
        self._map[4:4 + len(data)] = data
        self._map[0:4] = len(data).to_bytes(4, "little")  # the length last: a torn note reads as its old length


def _parse_marker(raw: bytes) -> list[tuple[ModelRef, str]]:
    try:
        length = int.from_bytes(raw[:4], "little")
        items = json.loads(raw[4:4 + length]) if 0 < length <= len(raw) - 4 else []
        return [(ModelRef(str(n), int(v)), str(w)) for n, v, w in items]
    except (ValueError, TypeError):
        return []


#: Used until the agent opens its own (tests that build servables by hand note nothing).
NO_MARKER = CallMarker()


class Classified(tuple):
    """What `Servable.classify` returns: the pair (categories, milliseconds), as before, plus the fitted
    uint8 pixels the model ran and the top-1 label's index. Servables that return a plain pair (tests'
    doubles) still work: callers read the extras with `getattr(result, "pixels", None)`."""

    pixels: np.ndarray | None
    label_index: int | None

    def __new__(cls, categories: tuple[Category, ...], ms: float, pixels: np.ndarray | None = None,
                label_index: int | None = None) -> "Classified":
        self = super().__new__(cls, (categories, ms))
        self.pixels = pixels
        self.label_index = label_index
        return self

    @property
    def categories(self) -> tuple[Category, ...]:
        return self[0]

    @property
    def ms(self) -> float:
        return self[1]


class Servable:
    """A loaded model version that the local API classifies with."""

    marker: CallMarker = NO_MARKER

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

    def classify(self, data: bytes, top_k: int) -> "Classified":
        """Top-k categories of a photo and the milliseconds taken (a pair), with the fitted pixels the
        model ran (`.pixels`, decoded once) and the top-1 label's index (`.label_index`). A bad photo
        raises `InvalidImageError`; anything else raised is a failure of the model."""
        started = time.perf_counter()
        pixels = self.classifier.prepare_pixels(data)
        prepared = self.classifier.normalise(pixels)
        with self.marker.inside(self.ref, "invoke"):
            categories = self.classifier.run(prepared)
        index = self._index.get(categories[0].label) if categories else None
        return Classified(categories[:top_k], (time.perf_counter() - started) * 1000, pixels, index)

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
        with self.marker.inside(self.ref, "smoke_test"):
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
