"""A stand-in for TensorFlow Serving's REST API over real SavedModels, for tests.

It implements the parts of `tensorflow_model_server` the sync server relies on, as TF Serving's
REST API documentation (g3doc/api_rest.md) and its source describe them:

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status (GetModelStatusResponse as JSON)
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signature metadata
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     {"instances"|"inputs", "signature_name"?}

- errors are `{"error": "message"}` with the HTTP status TF Serving maps from the gRPC code
  (NOT_FOUND 404, INVALID_ARGUMENT and FAILED_PRECONDITION 400, ...), with TF Serving's messages
  ("Servable not found for request: Specific(demo, 3)", "Could not find any versions of model x",
  "Unrecognized servable version label: canary");
- the model config file (`--model_config_file`, text protobuf) is polled like
  `--model_config_file_poll_wait_seconds`; `model_version_policy` (specific / latest / all) decides the
  versions to load, each from BASE_PATH/VERSION with `tf.saved_model.load`, through the states
  START -> LOADING -> AVAILABLE and UNLOADING -> END; a new version loads before the old one unloads;
- a config whose `version_labels` name a version that is not AVAILABLE is refused as a whole and the
  previous config stays (TF Serving's FAILED_PRECONDITION "Request to assign label to version N of
  model M, which is not currently available for inference"), unless `allow_unavailable_labels` (the
  `--allow_version_labels_for_unavailable_models` flag).

`load_delay_s` makes loads slow, `predict_delay_s` makes every predict answer that much later (a
slow or overloaded TF Serving; it can be changed while running), `stop()` / `start()` take the server down and up on the same port
(keeping what was loaded, like a network outage), `restart()` is a new process on the same port
(nothing loaded; the config file read again and refused while a label names a version not loaded),
and `predict_batches` records the batch size of every predict call, `rest_request_bytes` the body size
of every REST predict call. REST inputs are decoded by the signature's dtype: numbers for numeric inputs,
TF Serving's `{"b64": "..."}` objects for string inputs, and instances as objects naming the input.

With `grpc=True` it also serves TF Serving's gRPC API on a second port (`grpc_url`), through the real
protos' servicers (`tensorflow_serving.apis`): PredictionService.Predict and GetModelMetadata, and
ModelService.GetModelStatus, over the same loaded SavedModels, with TF Serving's status codes
(NOT_FOUND, INVALID_ARGUMENT ...) and its default of answering with `float_val`. `grpc_request_bytes`
records the serialized size of every PredictRequest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"

_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(predict|classify|regress)$", re.I)
_STATUS = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(/metadata)?$", re.I)


class StandinError(Exception):
    """A TF Serving error: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------------------
# Model config file: the text-protobuf subset TF Serving's ModelServerConfig uses
# ----------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:(\#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([{}:\[\],<>])|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d+)?))""")


def parse_text_proto(text: str) -> dict[str, list[Any]]:
    """Parse protobuf text format into {field: [values]} (messages are nested dicts)."""
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"cannot parse the model config near {text[pos:pos + 30]!r}")
        comment, string, punct, ident, number = match.groups()
        pos = match.end()
        if comment is not None:
            continue
        if string is not None:
            body = string[1:-1]
            tokens.append(("str", bytes(body, "utf-8").decode("unicode_escape")))
        elif punct is not None:
            tokens.append(("punct", punct))
        elif ident is not None:
            tokens.append(("ident", ident))
        else:
            tokens.append(("num", int(number) if "." not in number else float(number)))

    def message(i: int, closing: str | None) -> tuple[dict[str, list[Any]], int]:
        result: dict[str, list[Any]] = {}
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "punct" and value == closing:
                return result, i + 1
            if kind != "ident":
                raise ValueError(f"expected a field name, got {value!r}")
            name = value
            i += 1
            if tokens[i] == ("punct", ":"):
                i += 1
            kind, value = tokens[i]
            if kind == "punct" and value in "{<":
                child, i = message(i + 1, "}" if value == "{" else ">")
                result.setdefault(name, []).append(child)
            elif kind in ("str", "num", "ident"):
                result.setdefault(name, []).append(value)
                i += 1
            else:
                raise ValueError(f"unexpected {value!r} after {name}")
        if closing is not None:
            raise ValueError("the model config ends inside a message")
        return result, i

    parsed, _ = message(0, None)
    return parsed


@dataclass
class ModelConfig:
    name: str
    base_path: str
    policy: tuple[str, Any]  # ("specific", {1, 2}) | ("latest", n) | ("all", None)
    labels: dict[str, int] = field(default_factory=dict)


def read_model_config(text: str) -> list[ModelConfig]:
    doc = parse_text_proto(text)
    configs = []
    for block in doc.get("model_config_list", [{}]):
        for item in block.get("config", []):
            policy: tuple[str, Any] = ("latest", 1)
            for pol in item.get("model_version_policy", []):
                if "specific" in pol:
                    policy = ("specific", {int(v) for v in pol["specific"][0].get("versions", [])})
                elif "latest" in pol:
                    policy = ("latest", int(pol["latest"][0].get("num_versions", [1])[0]))
                elif "all" in pol:
                    policy = ("all", None)
            labels = {str(entry["key"][0]): int(entry["value"][0]) for entry in item.get("version_labels", [])}
            platform = item.get("model_platform", ["tensorflow"])[0]
            if platform != "tensorflow":
                raise ValueError(f"model_platform {platform!r} is not supported")
            configs.append(ModelConfig(str(item["name"][0]), str(item["base_path"][0]), policy, labels))
    return configs


# ----------------------------------------------------------------------------------------------------------
# Servables
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Servable:
    version: int
    state: str = START
    error: str = ""
    model: Any = None
    signatures: dict[str, Any] = field(default_factory=dict)


class ModelManager:
    """Loads and unloads versions as the config asks; availability-preserving (load before unload)."""

    def __init__(self, load_delay_s: float = 0.0, allow_unavailable_labels: bool = False) -> None:
        self.load_delay_s = load_delay_s
        self.allow_unavailable_labels = allow_unavailable_labels
        self.lock = threading.RLock()
        self.models: dict[str, dict[int, Servable]] = {}
        self.labels: dict[str, dict[str, int]] = {}
        self.configs: dict[str, ModelConfig] = {}
        self.config_errors: list[str] = []
        self.applied_configs = 0

    def apply(self, configs: list[ModelConfig]) -> None:
        """Adopt a new config, or refuse it (recorded in `config_errors`) like TF Serving does."""
        with self.lock:
            if not self.allow_unavailable_labels:
                for config in configs:
                    for label, version in config.labels.items():
                        servable = self.models.get(config.name, {}).get(version)
                        if servable is None or servable.state != AVAILABLE:
                            message = (
                                f"FAILED_PRECONDITION: Request to assign label to version {version} of model "
                                f"{config.name}, which is not currently available for inference"
                            )
                            self.config_errors.append(message)
                            return
            self.configs = {c.name: c for c in configs}
            self.labels = {c.name: dict(c.labels) for c in configs}
            self.applied_configs += 1
        self.reconcile()

    def reconcile(self) -> None:
        with self.lock:
            for name, config in self.configs.items():
                aspired = self._aspired(config)
                servables = self.models.setdefault(name, {})
                for version in aspired:
                    if version not in servables or servables[version].state == END:
                        servables[version] = Servable(version)
                        threading.Thread(target=self._load, args=(name, config, version), daemon=True).start()
            for name, servables in self.models.items():
                config = self.configs.get(name)
                aspired = self._aspired(config) if config else set()
                for version, servable in servables.items():
                    if version not in aspired and servable.state == AVAILABLE:
                        threading.Thread(target=self._unload, args=(name, version, aspired), daemon=True).start()

    @staticmethod
    def _aspired(config: ModelConfig) -> set[int]:
        base = Path(config.base_path)
        on_disk = sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []
        kind, value = config.policy
        if kind == "specific":
            return {v for v in value if v in on_disk}
        if kind == "all":
            return set(on_disk)
        return set(on_disk[-value:]) if on_disk else set()

    def _load(self, name: str, config: ModelConfig, version: int) -> None:
        import tensorflow as tf

        with self.lock:
            servable = self.models[name][version]
            servable.state = LOADING
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        try:
            model = tf.saved_model.load(str(Path(config.base_path) / str(version)))
            signatures = dict(model.signatures)
        except Exception as exc:  # noqa: BLE001
            with self.lock:
                servable.state, servable.error = END, f"{type(exc).__name__}: {exc}"
            return
        with self.lock:
            servable.model, servable.signatures, servable.state = model, signatures, AVAILABLE

    def _unload(self, name: str, version: int, aspired: set[int]) -> None:
        # Availability-preserving: wait until the aspired versions are loaded before unloading.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.lock:
                pending = [v for v in aspired if self.models[name].get(v) and self.models[name][v].state in (START, LOADING)]
            if not pending:
                break
            time.sleep(0.02)
        with self.lock:
            servable = self.models[name][version]
            if servable.state != AVAILABLE:
                return
            servable.state = UNLOADING
            servable.model, servable.signatures = None, {}
            servable.state = END

    def status(self, name: str, version: int | None, label: str | None) -> dict[str, Any]:
        with self.lock:
            servables = self.models.get(name, {})
            if label is not None:
                version = self._label(name, label)
            if version is not None:
                if version not in servables:
                    raise StandinError(404, f"Could not find version {version} of model {name}")
                chosen = [servables[version]]
            else:
                if not servables:
                    raise StandinError(404, f"Could not find any versions of model {name}")
                chosen = sorted(servables.values(), key=lambda s: -s.version)
            return {
                "model_version_status": [
                    {
                        "version": str(s.version),
                        "state": s.state,
                        "status": {"error_code": "OK" if not s.error else "UNKNOWN", "error_message": s.error},
                    }
                    for s in chosen
                ]
            }

    def servable(self, name: str, version: int | None, label: str | None) -> Servable:
        with self.lock:
            if label is not None:
                version = self._label(name, label)
            servables = self.models.get(name, {})
            available = {v: s for v, s in servables.items() if s.state == AVAILABLE}
            if version is None:
                if not available:
                    raise StandinError(404, f"Servable not found for request: Latest({name})")
                return available[max(available)]
            if version not in available:
                raise StandinError(404, f"Servable not found for request: Specific({name}, {version})")
            return available[version]

    def _label(self, name: str, label: str) -> int:
        version = self.labels.get(name, {}).get(label)
        if version is None:
            raise StandinError(400, f"Unrecognized servable version label: {label}")
        return version


# ----------------------------------------------------------------------------------------------------------
# The HTTP server
# ----------------------------------------------------------------------------------------------------------


class TFServingStandin:
    """`with TFServingStandin(config_file=...) as tfs: tfs.url` — a REST model server on 127.0.0.1."""

    def __init__(
        self,
        config_file: str | Path | None = None,
        *,
        poll_s: float = 0.05,
        load_delay_s: float = 0.0,
        allow_unavailable_labels: bool = False,
        port: int = 0,
        predict_delay_s: float = 0.0,
        grpc: bool = False,
        grpc_port: int = 0,
    ) -> None:
        self.config_file = Path(config_file) if config_file else None
        self.grpc = grpc
        self._grpc_port = grpc_port
        self._grpc_server: Any = None
        self.grpc_request_bytes: list[int] = []
        self.rest_request_bytes: list[int] = []
        self.predict_delay_s = predict_delay_s
        self.poll_s = poll_s
        self.manager = ModelManager(load_delay_s, allow_unavailable_labels)
        self.predict_batches: list[int] = []
        self.requests: list[str] = []
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._config_text: str | None = None
        self._connections: set[Any] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self._grpc_port}"

    def __enter__(self) -> "TFServingStandin":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(final=True)

    def start(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                standin._connections.add(self.connection)

            def finish(self) -> None:
                standin._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:  # noqa: N802
                self._dispatch("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch("POST")

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                standin.requests.append(f"{method} {self.path}")
                if method == "POST" and standin.predict_delay_s:
                    time.sleep(standin.predict_delay_s)
                try:
                    status, payload = standin.handle(method, self.path, body)
                except StandinError as exc:
                    status, payload = exc.status, {"error": exc.message}
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._stop.clear()
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        serve.start()
        self._threads = [serve]
        if self.grpc:
            self._grpc_server = _grpc_server(self, self._grpc_port)
            self._grpc_port = self._grpc_server.port
        if self.config_file is not None:
            self._poll_config()
            poller = threading.Thread(target=self._poll_loop, daemon=True)
            poller.start()
            self._threads.append(poller)

    def restart(self) -> None:
        """TF Serving restarts: down, then up on the same port with nothing loaded. It reads the config
        file again; a label on a version that is not loaded yet makes it refuse the whole config."""
        self.stop()
        self.manager = ModelManager(self.manager.load_delay_s, self.manager.allow_unavailable_labels)
        self._config_text = None
        self.start()

    def stop(self, final: bool = False) -> None:
        """Close the port (connections are refused until `start()`)."""
        import socket

        self._stop.set()
        if self._grpc_server is not None:
            self._grpc_server.stop(0).wait(5)
            self._grpc_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for connection in list(self._connections):  # a server that goes down drops its connections
            try:
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass
        self._connections.clear()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll_config()

    def _poll_config(self) -> None:
        try:
            text = self.config_file.read_text(encoding="utf-8")  # type: ignore[union-attr]
        except FileNotFoundError:
            return
        if text == self._config_text:
            return
        try:
            configs = read_model_config(text)
        except (ValueError, KeyError, IndexError) as exc:
            self._record_error(f"INVALID_ARGUMENT: {exc}")
            return
        errors_before = len(self.manager.config_errors)
        self.manager.apply(configs)
        if len(self.manager.config_errors) == errors_before:
            self._config_text = text  # applied; a refused config is tried again at the next poll
        else:
            message = self.manager.config_errors.pop()
            self._record_error(message)

    def _record_error(self, message: str) -> None:
        errors = self.manager.config_errors
        if not errors or errors[-1] != message:
            errors.append(message)

    def wait_available(self, name: str, version: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            servable = self.manager.models.get(name, {}).get(version)
            if servable is not None and servable.state == AVAILABLE:
                return
            time.sleep(0.02)
        raise TimeoutError(f"version {version} of {name} did not become AVAILABLE")

    # --- the REST API ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        if method == "POST":
            match = _PREDICT.match(path)
            if match is None:
                raise StandinError(400, f"Malformed request: {method} {path}")
            name, version, label, verb = match.groups()
            if verb.lower() != "predict":
                raise StandinError(400, f"{verb} is not supported by this stand-in")
            self.rest_request_bytes.append(len(body))
            return 200, self._predict(name, int(version) if version else None, label, body)
        if method == "GET":
            match = _STATUS.match(path)
            if match is None:
                raise StandinError(400, f"Malformed request: {method} {path}")
            name, version, label, metadata = match.groups()
            version_number = int(version) if version else None
            if metadata:
                return 200, self._metadata(name, version_number, label)
            return 200, self.manager.status(name, version_number, label)
        raise StandinError(400, f"Malformed request: {method} {path}")

    def _metadata(self, name: str, version: int | None, label: str | None) -> dict[str, Any]:
        servable = self.manager.servable(name, version, label)
        defs = {}
        for key, fn in servable.signatures.items():
            inputs = {k: _tensor_info(v) for k, v in fn.structured_input_signature[1].items()}
            outputs = {k: _tensor_info(v) for k, v in fn.structured_outputs.items()}
            defs[key] = {"inputs": inputs, "outputs": outputs, "method_name": "tensorflow/serving/predict"}
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
            "metadata": {"signature_def": {"signature_def": defs}},
        }

    def _predict(self, name: str, version: int | None, label: str | None, body: bytes) -> dict[str, Any]:
        import tensorflow as tf

        try:
            request = json.loads(body)
        except ValueError as exc:
            raise StandinError(400, f"JSON Parse error: {exc}") from None
        if not isinstance(request, dict):
            raise StandinError(400, "JSON Value is not an object")
        if ("instances" in request) == ("inputs" in request):
            raise StandinError(400, "JSON Value: Excepting one of 'instances' or 'inputs'")
        signature_name = request.get("signature_name", "serving_default")
        if not isinstance(signature_name, str):
            raise StandinError(400, "'signature_name' key must be a string value.")
        servable = self.manager.servable(name, version, label)
        fn = servable.signatures.get(signature_name)
        if fn is None:
            raise StandinError(400, f'Serving signature name: "{signature_name}" not found in signature def')
        input_specs = fn.structured_input_signature[1]
        (input_name, spec), = input_specs.items()
        values = request.get("instances", request.get("inputs"))
        if "instances" in request and isinstance(values, list) and values and isinstance(values[0], dict) and "b64" not in values[0]:
            try:  # row format with named inputs: [{"name": value}, ...]
                values = [row[input_name] for row in values]
            except (KeyError, TypeError):
                raise StandinError(400, f"JSON Value: instances do not all name input {input_name!r}") from None
        if spec.dtype == tf.string:
            try:
                array = np.array([base64.b64decode(v["b64"], validate=True) for v in values], dtype=object)
            except (TypeError, KeyError, ValueError, binascii.Error):
                raise StandinError(400, "JSON Value: " + json.dumps(values)[:60] + ' Type: String is not of expected type: {"b64": ...}') from None
        else:
            try:
                array = np.asarray(values, dtype=spec.dtype.as_numpy_dtype)
            except (TypeError, ValueError, OverflowError):
                raise StandinError(400, "JSON Value: " + json.dumps(values)[:60] + f" Type: Object is not of expected type: {spec.dtype.name}") from None
        expected = spec.shape.as_list()
        if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected, array.shape)):
            raise StandinError(400, f"input tensor alias not found in signature or shape mismatch: expected {expected}, got {list(array.shape)}")
        self.predict_batches.append(int(array.shape[0]))
        outputs = fn(**{input_name: tf.constant(array)})
        if len(outputs) == 1:
            (result,) = outputs.values()
            value = result.numpy().tolist()
            return {"predictions": value} if "instances" in request else {"outputs": value}
        if "instances" in request:
            rows = int(array.shape[0])
            return {"predictions": [{k: v.numpy()[i].tolist() for k, v in outputs.items()} for i in range(rows)]}
        return {"outputs": {k: v.numpy().tolist() for k, v in outputs.items()}}


def _tensor_info(spec: Any) -> dict[str, Any]:
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape.as_list()]
    return {"dtype": f"DT_{spec.dtype.name.upper()}", "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": spec.name or ""}


# ----------------------------------------------------------------------------------------------------------
# The gRPC server (TF Serving's tensorflow.serving.PredictionService and ModelService)
# ----------------------------------------------------------------------------------------------------------

_GRPC_CODES = {404: "NOT_FOUND", 400: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}


def _grpc_server(standin: TFServingStandin, port: int) -> Any:
    """A started grpc.Server on 127.0.0.1:`port` (0: any) answering from `standin`'s models; `.port` is set."""
    import concurrent.futures

    import grpc
    import tensorflow as tf
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    def spec_of(model_spec: Any) -> tuple[str, int | None, str | None]:
        which = model_spec.WhichOneof("version_choice")
        version = int(model_spec.version.value) if which == "version" else None
        label = model_spec.version_label if which == "version_label" else None
        return model_spec.name, version, label

    def abort(context: Any, exc: StandinError) -> None:
        context.abort(getattr(grpc.StatusCode, _GRPC_CODES.get(exc.status, "UNKNOWN")), exc.message)

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
            standin.grpc_request_bytes.append(request.ByteSize())
            standin.requests.append(f"gRPC Predict {request.model_spec.name}")
            if standin.predict_delay_s:
                time.sleep(standin.predict_delay_s)
            try:
                servable = standin.manager.servable(*spec_of(request.model_spec))
                signature = request.model_spec.signature_name or "serving_default"
                fn = servable.signatures.get(signature)
                if fn is None:
                    raise StandinError(400, f'Serving signature name: "{signature}" not found in signature def')
                (input_name, spec), = fn.structured_input_signature[1].items()
                if set(request.inputs) != {input_name}:
                    raise StandinError(400, f"input tensor alias not found in signature: {sorted(request.inputs)}; expected {input_name}")
                proto = request.inputs[input_name]
                if proto.dtype != spec.dtype.as_datatype_enum:
                    raise StandinError(400, f"Expects arg[0] to be {spec.dtype.name} but {tf.dtypes.as_dtype(proto.dtype).name} is provided")
                array = tf.make_ndarray(proto)
                expected = spec.shape.as_list()
                if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected, array.shape)):
                    raise StandinError(400, f"shape mismatch: expected {expected}, got {list(array.shape)}")
            except StandinError as exc:
                abort(context, exc)
            standin.predict_batches.append(int(array.shape[0]))
            outputs = fn(**{input_name: tf.constant(array)})
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature
            for key, value in outputs.items():
                result = value.numpy()
                tensor = response.outputs[key]
                tensor.dtype = value.dtype.as_datatype_enum
                tensor.tensor_shape.CopyFrom(tf.TensorShape(result.shape).as_proto())
                tensor.float_val.extend(result.astype(np.float32).ravel().tolist())  # TF Serving's default: the typed field
            return response

        def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            if list(request.metadata_field) != ["signature_def"]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported")
            try:
                servable = standin.manager.servable(*spec_of(request.model_spec))
            except StandinError as exc:
                abort(context, exc)
            defs = get_model_metadata_pb2.SignatureDefMap()
            for key, fn in servable.signatures.items():
                sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
                for name, spec in fn.structured_input_signature[1].items():
                    sig.inputs[name].CopyFrom(meta_graph_pb2.TensorInfo(name=spec.name or name, dtype=spec.dtype.as_datatype_enum, tensor_shape=spec.shape.as_proto()))
                for name, spec in fn.structured_outputs.items():
                    sig.outputs[name].CopyFrom(meta_graph_pb2.TensorInfo(name=spec.name or name, dtype=spec.dtype.as_datatype_enum, tensor_shape=spec.shape.as_proto()))
                defs.signature_def[key].CopyFrom(sig)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(defs)
            return response

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                status = standin.manager.status(*spec_of(request.model_spec))
            except StandinError as exc:
                abort(context, exc)
            response = get_model_status_pb2.GetModelStatusResponse()
            for item in status["model_version_status"]:
                entry = response.model_version_status.add()
                entry.version = int(item["version"])
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(item["state"])
                entry.status.error_message = item["status"]["error_message"] or ""
            return response

    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="standin-grpc"),
        options=[("grpc.max_receive_message_length", -1), ("grpc.so_reuseport", 0)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), server)
    server.port = server.add_insecure_port(f"127.0.0.1:{port}")
    if server.port == 0:
        raise OSError(f"the gRPC stand-in could not bind 127.0.0.1:{port}")
    server.start()
    return server
