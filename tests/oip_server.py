"""A real Open Inference Protocol server for tests: KServe's `ModelServer` serving the project's SavedModels.

Nothing of the protocol is ours: routing, the binary tensor data extension, readiness and errors are
KServe's (`kserve` 0.21, in its own virtual environment, `.venv-oip/`, because it pins protobuf < 7 and
the project's venv has protobuf 7; see tests/oip-requirements.txt). Our part is a `kserve.Model` that loads a SavedModel with TensorFlow
and calls its `serving_default` signature, as TF Serving would.

    .venv-oip/bin/python tests/oip_server.py --http-port 8080 --model demo-1=/path/to/saved_model \
        [--model demo-2u=/path:uint8] [--model demo-3=/path:pixels]

`NAME=PATH:uint8` serves a model that takes the device's uint8 pixels and normalises them itself with the
SavedModel's preprocess_spec.json (`x = (p * scale - mean) / std`), in Python. `NAME=PATH:pixels` serves the
SavedModel's `pixels` signature (the converter's `add_pixel_signatures`: UINT8 in, normalised in the graph). KServe's server has no versions in its
paths, so each version is a model of its own, named NAME-VERSION.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import kserve
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse


class SavedModelModel(kserve.Model):
    """One SavedModel behind KServe; FP32 input as the signature declares it, or UINT8 pixels normalised here."""

    def __init__(self, name: str, path: Path, uint8: bool = False, signature: str = "serving_default") -> None:
        super().__init__(name)
        self.path = path
        self.uint8 = uint8
        self.signature = signature

    def load(self) -> bool:
        import tensorflow as tf

        self._tf = tf
        self._model = tf.saved_model.load(str(self.path))
        self._fn = self._model.signatures[self.signature]
        (self.input_name, spec), = self._fn.structured_input_signature[1].items()
        self.dtype = spec.dtype
        self.input_shape = [-1 if d is None else int(d) for d in spec.shape]
        outputs = self._fn.structured_outputs
        self.output_name = next((k for k in ("probabilities", "probability", "scores", "output_0") if k in outputs), sorted(outputs)[0])
        self.output_shape = [-1 if d is None else int(d) for d in outputs[self.output_name].shape]
        if self.uint8:
            prep = json.loads((self.path / "preprocess_spec.json").read_text())
            self.scale = np.float32(prep.get("scale", 1.0))
            self.mean = np.asarray(prep.get("mean", [0.0, 0.0, 0.0]), np.float32)
            self.std = np.asarray(prep.get("std", [1.0, 1.0, 1.0]), np.float32)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        uint8 = self.uint8 or self.dtype == self._tf.uint8
        return [{"name": self.input_name, "datatype": "UINT8" if uint8 else "FP32", "shape": self.input_shape}]

    def get_output_types(self) -> list[dict]:
        return [{"name": self.output_name, "datatype": "FP32", "shape": self.output_shape}]

    async def predict(self, payload: InferRequest, headers: dict | None = None, response_headers: dict | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        if self.uint8:
            x = (x.astype(np.float32) * self.scale - self.mean) / self.std
        scores = self._fn(**{self.input_name: self._tf.constant(x, dtype=self.dtype)})[self.output_name].numpy()
        output = InferOutput(name=self.output_name, shape=list(scores.shape), datatype="FP32")
        output.set_data_from_numpy(scores.astype(np.float32))
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[output],
            requested_outputs=payload.request_outputs,
        )


def _listen_on_loopback_only() -> None:
    """KServe's REST server binds 0.0.0.0; a test server listens on 127.0.0.1 alone."""
    import uvicorn

    class LoopbackConfig(uvicorn.Config):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    uvicorn.Config = LoopbackConfig


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], help="NAME=SAVED_MODEL_DIR[:uint8|:pixels]")
    options = parser.parse_args(argv)
    models = []
    for item in options.model:
        name, _, where = item.partition("=")
        path, _, kind = where.partition(":")
        model = SavedModelModel(name, Path(path), uint8=(kind == "uint8"), signature="pixels" if kind == "pixels" else "serving_default")
        model.load()
        models.append(model)
    logging.getLogger().setLevel(logging.WARNING)
    _listen_on_loopback_only()
    server = kserve.ModelServer(http_port=options.http_port, enable_grpc=False, workers=1, enable_latency_logging=False, grace_period=1)
    server.start(models)


if __name__ == "__main__":
    main(sys.argv[1:])
