"""Run a converted classifier with LiteRT (`ai_edge_litert`), the runtime devices use; no TensorFlow.

`tf.lite.Interpreter` is deprecated, so the converter checks its output with the same interpreter a
device will load it with.
"""

from __future__ import annotations

from types import TracebackType

import numpy as np

from .errors import ConverterFailedError
from .manifest import TensorInfo


class LiteClassifier:
    """A TFLite image classifier: one prepared photo in, float probabilities out.

    Integer outputs are dequantized with the output's (scale, zero_point). Holds an interpreter:
    use it as a context manager or call `close()`.
    """

    def __init__(self, model: bytes, *, threads: int = 1) -> None:
        # Imported here, not at module level: `converter.smoke` (which devices import for the
        # smoke test) must load on a device that runs its own interpreter, e.g. tflite-runtime.
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_content=model, num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ConverterFailedError(f"LiteRT cannot load the converted model: {exc}") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConverterFailedError(
                f"the converted model has {len(inputs)} inputs and {len(outputs)} outputs; expected 1 and 1"
            )
        self._input, self._output = inputs[0], outputs[0]
        self.input = _tensor_info(self._input)
        self.output = _tensor_info(self._output)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (float32, one per label) for one prepared photo of shape (H, W, 3)."""
        batch = image[None, ...] if image.ndim == 3 else image
        if batch.dtype != self._input["dtype"]:
            raise ValueError(f"the model takes {np.dtype(self._input['dtype']).name}, got {batch.dtype}")
        self._interpreter.set_tensor(self._input["index"], batch)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output["index"])[0]
        if self.output.quantization is not None:
            scale, zero_point = self.output.quantization
            return ((raw.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)
        return raw.astype(np.float32)

    def close(self) -> None:
        self._interpreter = None  # type: ignore[assignment]

    def __enter__(self) -> "LiteClassifier":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _tensor_info(detail: dict) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"]).name
    quantization = (float(scale), int(zero_point)) if dtype in ("uint8", "int8") and scale else None
    shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
    return TensorInfo(str(detail["name"]), shape, dtype, quantization)
