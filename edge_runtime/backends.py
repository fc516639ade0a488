"""Find a TFLite interpreter at run time: LiteRT first, then tflite-runtime, then TensorFlow Lite.

`ai-edge-litert` is what a device should install (fast int8 kernels, numpy 2, current Python);
`tflite-runtime` is accepted where a device already has it; `tensorflow.lite` is the last resort
(it costs seconds of import time). Delegates: XNNPACK on the CPU is built in; the GPU delegate is a
shared library that no desktop Linux wheel ships, so it is loaded from a path and is optional.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import ModelLoadError

#: Environment variable naming the TFLite GPU delegate library (libtensorflowlite_gpu_delegate.so).
GPU_DELEGATE_ENV = "EDGE_CLASSIFY_GPU_DELEGATE"

# (name shown to users, module, distribution) in order of preference.
_CANDIDATES: tuple[tuple[str, str, str], ...] = (
    ("ai-edge-litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow", "tensorflow"),  # tf.lite: the public API, not the tensorflow.lite package
)


@dataclass(frozen=True)
class Backend:
    """An importable TFLite interpreter implementation."""

    name: str
    distribution: str
    interpreter_class: Callable[..., Any]
    load_delegate: Callable[..., Any] | None

    @property
    def version(self) -> str:
        """The installed distribution's version (looked up on demand: it costs a scan of site-packages)."""
        from importlib import metadata

        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return "unknown"

    def describe(self) -> str:
        """`ai-edge-litert 2.3.0`: what `--version` and `--verbose` print."""
        return f"{self.name} {self.version}"


_cached: Backend | None = None


def find_backend(preferred: str | None = None) -> Backend:
    """The first interpreter backend that imports, or the one named by `preferred`.

    `preferred` may also come from the `EDGE_CLASSIFY_BACKEND` environment variable.
    """
    global _cached
    preferred = preferred or os.environ.get("EDGE_CLASSIFY_BACKEND") or None
    if preferred is None and _cached is not None:
        return _cached
    candidates = _CANDIDATES
    if preferred is not None:
        candidates = tuple(c for c in _CANDIDATES if c[0] == preferred)
        if not candidates:
            names = ", ".join(c[0] for c in _CANDIDATES)
            raise ModelLoadError(f"unknown interpreter backend {preferred!r}; choose one of {names}")
    tried = []
    for name, module_name, distribution in candidates:
        try:
            module = importlib.import_module(module_name)
            if module_name == "tensorflow":
                module = module.lite
        except (ImportError, AttributeError) as exc:
            tried.append(f"{name} ({exc.__class__.__name__})")
            continue
        interpreter_class = getattr(module, "Interpreter", None)
        if interpreter_class is None:
            tried.append(f"{name} (this version has no Interpreter)")
            continue
        if module_name == "tensorflow":
            load_delegate = getattr(getattr(module, "experimental", None), "load_delegate", None)
        else:
            load_delegate = getattr(module, "load_delegate", None)
        backend = Backend(name, distribution, interpreter_class, load_delegate)
        if preferred is None:
            _cached = backend
        return backend
    raise ModelLoadError(
        "no TFLite interpreter is installed (tried " + ", ".join(tried) + "): "
        "run `pip install 'edge-classify[edge]'` to get ai-edge-litert"
    )


def make_interpreter(
    backend: Backend,
    *,
    model_path: str | None = None,
    model_content: bytes | None = None,
    threads: int | None = None,
    gpu_delegate_path: str | None = None,
) -> tuple[Any, str]:
    """Build an interpreter with its tensors allocated; returns it and the delegate in use.

    With `gpu_delegate_path`, the GPU delegate is tried first; if the library is missing or rejects
    the model, one warning is given and the CPU (XNNPACK) is used instead.
    """
    kwargs: dict[str, Any] = {"num_threads": threads}
    if model_content is not None:
        kwargs["model_content"] = model_content
    else:
        kwargs["model_path"] = model_path
    if gpu_delegate_path:
        stage = "could not be loaded"
        try:
            if backend.load_delegate is None:
                raise ValueError(f"{backend.name} cannot load delegates")
            with _quiet_native_log():
                delegate = backend.load_delegate(gpu_delegate_path)
                stage = "rejected the model"
                interpreter = backend.interpreter_class(experimental_delegates=[delegate], **kwargs)
                interpreter.allocate_tensors()
            return interpreter, "gpu"
        except Exception as exc:  # the delegate library raises many kinds  # noqa: BLE001
            warnings.warn(
                f"GPU delegate unavailable: {gpu_delegate_path} {stage} ({_one_line(exc)}); running on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
    try:
        with _quiet_native_log():
            interpreter = backend.interpreter_class(**kwargs)
            interpreter.allocate_tensors()
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"the interpreter could not load the model: {_one_line(exc)}") from exc
    return interpreter, "cpu"


def gpu_delegate_path(option: str | None = None) -> str | None:
    """The GPU delegate library from an option, else from `EDGE_CLASSIFY_GPU_DELEGATE`."""
    return option or os.environ.get(GPU_DELEGATE_ENV) or None


@contextlib.contextmanager
def _quiet_native_log() -> Iterator[None]:
    """Hide the interpreter's C++ start-up lines ("INFO: Created TensorFlow Lite XNNPACK delegate")
    from fd 2; if loading fails, they are passed on so the cause is not lost."""
    # Imported here: `edge-classify` loads this module before its photo starts decoding, this only after.
    from converter.progress import native_log_captured

    captured: io.StringIO | None = None
    try:
        with native_log_captured() as (log, _terminal):
            captured = log
            yield
    except BaseException:
        text = captured.getvalue().strip() if captured is not None else ""
        if text:
            print(text, file=sys.stderr)
        raise


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
