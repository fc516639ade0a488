"""A client of TensorFlow Serving's gRPC API, and the predictor that uses it.

    tensorflow.serving.PredictionService/Predict          PredictRequest{model_spec, inputs{NAME: TensorProto}}
    tensorflow.serving.PredictionService/GetModelMetadata  the signatures' input names (once per version)
    tensorflow.serving.ModelService/GetModelStatus         {version: state}

The batch goes as one `TensorProto` with `tensor_content`: the array's raw little-endian bytes (4 bytes
a value for float32, 1 for uint8), not one protobuf field per value and not JSON text. A version with the
converter's `pixels` signature gets the device's fitted uint8 pixels there (150.5 KB for 224x224 instead
of 602 KB of float32), other versions float32 on `serving_default`. It behaves like
the REST client (`tf_serving.py`): a version by number or a label, only connection failures retried
and only while the call's time lasts, a call with `timeout_s` ends within it; a server that cannot be
reached, times out or has not loaded the version is `BackendUnavailableError` (503 with Retry-After),
any other refusal `BackendFailedError` (502). Answers larger than `max_receive_bytes` are refused by
gRPC itself before they are read into memory.

The protos come from the `tensorflow-serving-api` package. They live under the `tensorflow` package but
are loaded without running TensorFlow (`_import_protos_without_tensorflow`), when the client is built;
no TensorFlow function builds or reads the tensors.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import sys
import types
from typing import Any

import numpy as np

from ..config import TFServingOptions
from ..errors import BackendFailedError, BackendUnavailableError, ConfigError
from .tf_serving import OUTPUT_NAMES, PIXELS_SIGNATURE, TFServingPredictor

log = logging.getLogger("sync_server.tf_serving_grpc")

#: Largest answer read from TF Serving (an answer is [batch, classes] floats: 32 x 100,000 is 12.8 MB).
MAX_RECEIVE_BYTES = 32 * 1024 * 1024
#: Reconnection backoff after TF Serving went away (gRPC's default starts at 1 s and grows to 120 s).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),  # retries are ours: only connection failures, only within the deadline
)
# gRPC's own messages for "nothing reached the server" (UNAVAILABLE covers a dropped call too).
_CONNECT_FAILURES = ("failed to connect", "connection refused", "connections to all backends failing",
                     "dns resolution failed", "connect failed", "name resolution", "no route to host")

# DataType enum values (tensorflow/core/framework/types.proto) for the dtypes a batch may have.
_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3, np.dtype(np.uint8): 4,
           np.dtype(np.float16): 19}
_NUMPY = {code: dtype for dtype, code in _DTYPES.items()}
_VALUE_FIELDS = {1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 19: "half_val"}


def grpc_target(url: str) -> str:
    """`grpc://host:port` or `host:port` as gRPC's `host:port` target; ConfigError when it is not one."""
    text = url.strip()
    if text.startswith("grpc://"):
        text = text[len("grpc://"):]
    elif "://" in text:
        raise ConfigError(f"a TF Serving gRPC address is grpc://host:port or host:port, got {url!r}")
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"a TF Serving gRPC address is grpc://host:port or host:port (e.g. tf-serving:8500), got {url!r}")
    return text


@functools.cache
def _protos() -> Any:
    """The tensorflow-serving-api modules, imported once, without TensorFlow itself when it is not loaded yet."""
    try:
        if "tensorflow" in sys.modules:  # loaded (or loading): the ordinary import
            tensor_pb2, tensor_shape_pb2, apis = _import_protos()
        else:
            tensor_pb2, tensor_shape_pb2, apis = _import_protos_without_tensorflow()
    except ImportError as exc:  # pragma: no cover - the server extra installs it
        raise ConfigError(
            f"the tf-serving-grpc backend needs the tensorflow-serving-api package (pip install 'edge-classify[server]'): {exc}"
        ) from exc
    get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc = apis

    class P:  # a namespace
        pass

    p = P()
    p.tensor_pb2, p.tensor_shape_pb2 = tensor_pb2, tensor_shape_pb2
    p.predict_pb2, p.get_model_metadata_pb2, p.get_model_status_pb2 = predict_pb2, get_model_metadata_pb2, get_model_status_pb2
    p.PredictionServiceStub = prediction_service_pb2_grpc.PredictionServiceStub
    p.ModelServiceStub = model_service_pb2_grpc.ModelServiceStub
    return p


def _import_protos() -> tuple[Any, Any, tuple[Any, ...]]:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    return tensor_pb2, tensor_shape_pb2, (
        get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc
    )


def _import_protos_without_tensorflow() -> tuple[Any, Any, tuple[Any, ...]]:
    """The generated `*_pb2` modules under `tensorflow/core/` need only protobuf, but importing them runs
    `tensorflow/__init__.py` (all of TensorFlow: 2.5 s and hundreds of MB here, for a server whose model runs in
    TF Serving). So the package is stood in for while they load (0.15 s), and every `tensorflow.*` entry
    is taken out of `sys.modules` again: a later `import tensorflow` loads the real package and finds the
    same message classes (the descriptors are in protobuf's default pool once)."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tensorflow package (whose protos tensorflow-serving-api uses) is not installed")
    stand_in = types.ModuleType("tensorflow")
    stand_in.__path__ = list(spec.submodule_search_locations)
    before = set(sys.modules)
    sys.modules["tensorflow"] = stand_in
    try:
        return _import_protos()
    finally:
        for name in set(sys.modules) - before:
            if name == "tensorflow" or name.startswith("tensorflow."):
                del sys.modules[name]


def encode_tensor(array: np.ndarray) -> Any:
    """`array` as a TensorProto: dtype, shape and the raw little-endian bytes in `tensor_content`."""
    array = np.asarray(array)
    code = _DTYPES.get(array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype)
    if code is None:
        raise ValueError(f"cannot send a {array.dtype} tensor to TF Serving (float32, float64, float16, int32 or uint8)")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ValueError("the tensor holds NaN or infinity")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    p = _protos()
    shape = p.tensor_shape_pb2.TensorShapeProto(dim=[p.tensor_shape_pb2.TensorShapeProto.Dim(size=int(n)) for n in data.shape])
    return p.tensor_pb2.TensorProto(dtype=code, tensor_shape=shape, tensor_content=data.tobytes())


def decode_tensor(proto: Any) -> np.ndarray:
    """A TensorProto (values in `tensor_content` or in the typed `*_val` field) as an array; ValueError when malformed."""
    dtype = _NUMPY.get(int(proto.dtype))
    if dtype is None:
        raise ValueError(f"unexpected output dtype {int(proto.dtype)} (expected a float or integer tensor)")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(n < 0 for n in shape):
        raise ValueError(f"output shape {shape} has an unknown dimension")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise ValueError(f"output tensor_content holds {len(proto.tensor_content)} bytes, shape {shape} needs {count * dtype.itemsize}")
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = getattr(proto, _VALUE_FIELDS[int(proto.dtype)])
    if int(proto.dtype) == 19:  # half_val holds the float16 bit patterns as int32
        array = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        array = np.asarray(values, dtype=dtype)
    if array.size == count:
        return array.reshape(shape)
    if array.size == 1 and count > 0:  # TensorProto's shorthand: one value fills the tensor
        return np.full(shape, array[0], dtype=dtype)
    raise ValueError(f"output holds {array.size} values, shape {shape} needs {count}")


class TFServingGrpcClient:
    """Talks to one TF Serving gRPC endpoint (`grpc://host:8500` or `host:8500`), plaintext."""

    def __init__(self, options: TFServingOptions, *, max_receive_bytes: int = MAX_RECEIVE_BYTES) -> None:
        if not options.url:
            raise ValueError("TFServingGrpcClient needs options.url")
        self.options = options
        self.target = grpc_target(options.url)
        self.url = "grpc://" + self.target
        self.max_receive_bytes = max_receive_bytes
        _protos()  # at start-up, before any thread could import TensorFlow meanwhile
        self._channel: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stubs: tuple[Any, Any] = (None, None)
        self._inputs: dict[tuple[str, int, str], str] = {}  # (model, version, signature) -> input name
        self._signatures: dict[tuple[str, int], dict[str, str]] = {}  # (model, version) -> {signature: input name}
        #: Serialized size of the last PredictRequest, for the benchmark and tests.
        self.last_request_bytes = 0

    async def predict(
        self,
        name: str,
        instances: np.ndarray,
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str | None = None,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """The model's output for a batch (any dtype `encode_tensor` takes); float32 [N, classes]; within `timeout_s`."""
        if version is not None and label is not None:
            raise ValueError("ask for a version or a label, not both")
        p = _protos()
        tensor = encode_tensor(instances)
        loop = asyncio.get_running_loop()
        budget = self.options.timeout_s if timeout_s is None else min(timeout_s, self.options.timeout_s)
        deadline = loop.time() + budget
        signature = signature_name or "serving_default"
        what = _servable(name, version, label)
        input_name = None
        if version is not None:  # known from an earlier GetModelMetadata of this version
            input_name = self._inputs.get((name, version, signature)) or self._signatures.get((name, version), {}).get(signature)
        if input_name is None:
            metadata = await self._metadata(name, version, label, deadline, budget, what)
            input_name = _input_name(p, metadata, signature, what)
            if version is not None:
                self._inputs[(name, version, signature)] = input_name
        request = p.predict_pb2.PredictRequest()
        self._spec(request.model_spec, name, version, label)
        request.model_spec.signature_name = signature
        request.inputs[input_name].CopyFrom(tensor)
        self.last_request_bytes = request.ByteSize()
        response = await self._call("Predict", request, deadline, budget, what)
        try:
            outputs = dict(response.outputs)
            if not outputs:
                raise ValueError("the answer holds no outputs")
            key = next((k for k in OUTPUT_NAMES if k in outputs), sorted(outputs)[0])
            array = decode_tensor(outputs[key]).astype(np.float32, copy=False)
            if array.ndim != 2 or array.shape[0] != tensor.tensor_shape.dim[0].size:
                raise ValueError(f"expected [batch, classes] probabilities for {tensor.tensor_shape.dim[0].size} photos, got shape {array.shape}")
            return array
        except ValueError as exc:
            raise BackendFailedError(f"TF Serving's predict answer could not be read: {exc}") from exc

    async def predict_pixels(self, name: str, pixels: np.ndarray, *, version: int, timeout_s: float | None = None) -> np.ndarray:
        """The model's output for uint8 pixels [N, H, W, 3], as tensor_content bytes to the version's `pixels` signature."""
        if pixels.dtype != np.uint8:
            raise ValueError(f"pixels are uint8, got {pixels.dtype}")
        return await self.predict(name, pixels, version=version, signature_name=PIXELS_SIGNATURE, timeout_s=timeout_s)

    async def signatures(self, name: str, version: int, *, timeout_s: float | None = None) -> dict[str, str]:
        """{signature: its input's name} of a version's one-input signatures (GetModelMetadata, asked once and kept)."""
        found = self._signatures.get((name, version))
        if found is not None:
            return found
        p = _protos()
        budget = self.options.timeout_s if timeout_s is None else min(timeout_s, self.options.timeout_s)
        deadline = asyncio.get_running_loop().time() + budget
        metadata = await self._metadata(name, version, None, deadline, budget, _servable(name, version, None))
        found = {key: list(sig.inputs)[0] for key, sig in _signature_defs(p, metadata, _servable(name, version, None)).items()
                 if len(sig.inputs) == 1}
        self._signatures[(name, version)] = found
        return found

    async def _metadata(self, name: str, version: int | None, label: str | None, deadline: float, budget: float, what: str) -> Any:
        p = _protos()
        request = p.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, name, version, label)
        return await self._call("GetModelMetadata", request, deadline, budget, what)

    async def model_status(self, name: str) -> dict[int, str]:
        """{version: state} for a model; {} when TF Serving does not know the model (yet)."""
        p = _protos()
        request = p.get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        loop = asyncio.get_running_loop()
        try:
            response = await self._call("GetModelStatus", request, loop.time() + self.options.timeout_s,
                                        self.options.timeout_s, f"the status of model {name}", not_found_is_error=False)
        except _NotFound:
            return {}
        states = p.get_model_status_pb2.ModelVersionStatus.State
        result: dict[int, str] = {}
        for item in response.model_version_status:
            try:
                result[int(item.version)] = states.Name(item.state)
            except ValueError:
                result[int(item.version)] = "UNKNOWN"
        return result

    async def ping(self) -> str | None:
        """None when TF Serving's gRPC server answers at all, else why not (one try, 2 s)."""
        import grpc

        p = _protos()
        request = p.get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "_readiness_probe"
        try:
            await self._stub("GetModelStatus")(request, timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                return None  # it answered, about a model it does not have
            return f"TF Serving at {self.url} is unreachable ({exc.code().name}: {_details(exc)})"
        return None

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace=None)

    # --- internals ------------------------------------------------------------------------------

    @staticmethod
    def _spec(spec: Any, name: str, version: int | None, label: str | None) -> None:
        spec.name = name
        if version is not None:
            spec.version.value = int(version)
        elif label is not None:
            spec.version_label = label

    def _stub(self, method: str) -> Any:
        import grpc

        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:  # an aio channel belongs to one event loop
            options = list(_CHANNEL_OPTIONS) + [("grpc.max_receive_message_length", self.max_receive_bytes),
                                                ("grpc.max_send_message_length", -1)]
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
            self._loop = loop
            p = _protos()
            self._stubs = (p.ModelServiceStub(self._channel), p.PredictionServiceStub(self._channel))
        models, predictions = self._stubs
        return getattr(models if method == "GetModelStatus" else predictions, method)

    async def _call(self, method: str, request: Any, deadline: float, budget: float, what: str,
                    not_found_is_error: bool = True) -> Any:
        import grpc

        loop = asyncio.get_running_loop()
        attempts = 1 + max(0, self.options.retries)
        for attempt in range(attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout(budget)
            try:
                async with asyncio.timeout_at(deadline):  # gRPC's deadline, and ours in case it is late
                    return await self._stub(method)(request, timeout=remaining)
            except TimeoutError as exc:
                raise self._timeout(budget) from exc
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), _details(exc)
                if code == grpc.StatusCode.UNAVAILABLE and any(m in details.lower() for m in _CONNECT_FAILURES):
                    backoff = self.options.retry_backoff_s * (2**attempt)
                    if attempt + 1 < attempts and loop.time() + backoff < deadline:
                        await asyncio.sleep(backoff)
                        continue
                    raise BackendUnavailableError(
                        f"TF Serving at {self.url} is unreachable ({details}); try again shortly",
                        retry_after_s=self.options.retry_after_s,
                    ) from exc
                if code == grpc.StatusCode.NOT_FOUND and not not_found_is_error:
                    raise _NotFound() from exc
                raise self._error(code, details, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _timeout(self, budget: float) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"TF Serving at {self.url} did not answer within {budget:g} s",
            retry_after_s=self.options.retry_after_s,
            code="backend_timeout",
        )

    def _error(self, code: Any, details: str, what: str) -> Exception:
        import grpc

        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._timeout(self.options.timeout_s)
        if code == grpc.StatusCode.NOT_FOUND or "Unrecognized servable version label" in details:
            return BackendUnavailableError(
                f"TF Serving has not loaded {what} yet ({details})",
                retry_after_s=self.options.retry_after_s,
                code="version_not_loaded",
            )
        if code == grpc.StatusCode.UNAVAILABLE or (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" not in details.lower()
        ):
            return BackendUnavailableError(
                f"TF Serving is overloaded or unavailable ({code.name}: {details})", retry_after_s=self.options.retry_after_s
            )
        return BackendFailedError(f"TF Serving refused {what}: {code.name}: {details}")


class TFServingGrpcPredictor(TFServingPredictor):
    """The `Predictor` backed by TF Serving's gRPC API: asks for each version by number (the client
    has the REST client's methods, so the REST predictor's delegation serves both)."""

    kind = "tf_serving_grpc"
    pixels_signature = PIXELS_SIGNATURE

    def __init__(self, client: TFServingGrpcClient) -> None:  # type: ignore[override]
        self.client = client  # type: ignore[assignment]


class _NotFound(Exception):
    pass


def _signature_defs(p: Any, metadata: Any, what: str) -> Any:
    """The SignatureDefMap of a GetModelMetadataResponse; BackendFailedError when there is none."""
    packed = metadata.metadata.get("signature_def")
    if packed is None:
        raise BackendFailedError(f"TF Serving sent no signature_def for {what}")
    defs = p.get_model_metadata_pb2.SignatureDefMap()
    if not packed.Unpack(defs):
        raise BackendFailedError(f"TF Serving's signature_def for {what} is not a SignatureDefMap")
    return defs.signature_def


def _input_name(p: Any, metadata: Any, signature: str, what: str) -> str:
    """The one input of `signature` in a GetModelMetadataResponse; BackendFailedError when there is not one."""
    defs = _signature_defs(p, metadata, what)
    if signature not in defs:
        raise BackendFailedError(f"{what} has no signature {signature!r} (it has {sorted(defs)})")
    inputs = list(defs[signature].inputs)
    if len(inputs) != 1:
        raise BackendFailedError(f"signature {signature!r} of {what} takes {len(inputs)} inputs, expected one image tensor")
    return inputs[0]


def _details(exc: Any) -> str:
    return (exc.details() or "").strip() or exc.code().name


def _servable(name: str, version: int | None, label: str | None) -> str:
    if version is not None:
        return f"version {version} of model {name}"
    if label is not None:
        return f"label {label!r} of model {name}"
    return f"model {name}"
