"""The `Predictor` for Open Inference Protocol ("V2") servers: Triton, KServe, MLServer, OpenVINO Model Server.

    GET  {url}/v2/health/ready                                   200 when the server can serve
    GET  {url}/v2/models/M[/versions/V]                          metadata: inputs/outputs {name, datatype, shape}
    GET  {url}/v2/models/M[/versions/V]/ready                    200 when that model (version) is ready
    POST {url}/v2/models/M[/versions/V]/infer                    one batch, binary tensor data extension

A call's body is the JSON inference header followed by the raw tensor (little-endian, row major), with
`Inference-Header-Content-Length` giving the header's length and the input's `binary_data_size` its
bytes; the output is asked for with `binary_data: true`, and an answer in plain JSON (`data`) is read too.
A 96x96 float photo is 110 kB on the wire instead of TF Serving REST's 325 kB of JSON floats; a uint8
input (a model that normalises itself: a version whose metadata declares a UINT8 input, such as the
converter's `pixels` signature served) is a quarter of that, and gets the device's fitted pixels as they are
(`takes_pixels`).

Versions: the protocol puts them in the path (`version_in="path"`, Triton, MLServer, OVMS). KServe's
Python ModelServer (0.21) answers every versioned path with 501 "Model versioning not supported yet", so
there each version is served as a model of its own, named by `name_template` (`version_in="name"`,
default `"{name}-{version}"`). The default, `"auto"`, asks by path and moves to names for good the first
time the server answers a versioned metadata or readiness request with 501.

Failures are those of the TF Serving client: only connection errors are retried, within the call's time;
unreachable, timed out, overloaded or not loaded is `BackendUnavailableError` (503, Retry-After), any other
refusal `BackendFailedError` (502). Every answer is read with a size bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx
import numpy as np

from ..errors import BackendFailedError, BackendUnavailableError
from .http_exchange import exchange, reason
from .tf_serving import OUTPUT_NAMES

log = logging.getLogger("sync_server.oip")

#: Largest answer read from an infer call (the probabilities of a batch are kilobytes).
MAX_INFER_RESPONSE_BYTES = 16 * 1024 * 1024
#: Largest metadata, readiness or error answer read.
MAX_SMALL_RESPONSE_BYTES = 256 * 1024
#: The datatypes this predictor sends, by numpy dtype, and those it reads back.
_SEND = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}
_READ = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
HEADER = "Inference-Header-Content-Length"


class BackendOptions(Protocol):
    """What the predictor reads from its options (`TFServingOptions` has all of it)."""

    url: str | None
    timeout_s: float
    connect_timeout_s: float
    retries: int
    retry_backoff_s: float
    retry_after_s: int


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model, as its metadata declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """The input the predictor feeds and the output it reads, from `GET /v2/models/M[/versions/V]`."""

    input: TensorInfo
    output: TensorInfo


class OIPPredictor:
    """Asks an Open Inference Protocol server for each version's predictions. `transport` replaces the network (tests)."""

    kind = "oip"

    def __init__(
        self,
        options: BackendOptions,
        *,
        version_in: Literal["auto", "path", "name"] = "auto",
        name_template: str = "{name}-{version}",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not options.url:
            raise ValueError("OIPPredictor needs options.url")
        if version_in not in ("auto", "path", "name"):
            raise ValueError(f"version_in must be 'auto', 'path' or 'name', got {version_in!r}")
        self.options = options
        self.url = options.url.rstrip("/")
        self.version_in = version_in
        self.name_template = name_template
        timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
        self._info: dict[tuple[str, int], ModelInfo] = {}
        #: Bytes of the last infer request's body (header and tensor), for the benchmark and tests.
        self.last_request_bytes = 0

    # --- the Predictor interface ------------------------------------------------------------------

    async def predict(self, name: str, version: int, batch: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """Probabilities float32 [N, classes] for `batch` (float32 or uint8 [N, H, W, C]), within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget(timeout_s)
        batch = np.asarray(batch)
        datatype = _SEND.get(batch.dtype)
        if datatype is None:
            raise ValueError(f"OIPPredictor sends float32 or uint8 tensors, got {batch.dtype}")
        info = await self.model_info(name, version, timeout_s=deadline - loop.time())
        if info.input.datatype != datatype:
            raise BackendFailedError(
                f"version {version} of model {name} takes {info.input.datatype} input {info.input.name!r}, "
                f"but the server prepared {datatype}"
            )
        body, header_length = encode_infer_request(info, batch)
        self.last_request_bytes = len(body)
        headers = {"Content-Type": "application/octet-stream", HEADER: str(header_length)}
        response, content = await self._send(
            "POST", self._path(name, version) + "/infer", content=body, headers=headers,
            deadline=deadline, limit=MAX_INFER_RESPONSE_BYTES,
        )  # fmt: skip
        if response.status_code != 200:
            if response.status_code in (400, 404):  # the model may have been reloaded with other tensor names
                self._info.pop((name, version), None)
            raise self._error(response.status_code, content, what=_servable(name, version))
        try:
            scores = decode_infer_response(content, response.headers.get(HEADER), info.output.name)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"the OIP server's answer for {_servable(name, version)} could not be read: {exc}") from exc
        if scores.ndim != 2 or scores.shape[0] != batch.shape[0]:
            raise BackendFailedError(f"expected [{batch.shape[0]}, classes] probabilities from {_servable(name, version)}, got shape {scores.shape}")
        return scores

    async def takes_pixels(self, name: str, version: int, *, timeout_s: float | None = None) -> bool:
        """Whether the version's input is UINT8: it takes the device's fitted pixels and normalises them itself."""
        return (await self.model_info(name, version, timeout_s=timeout_s)).input.datatype == "UINT8"

    async def model_info(self, name: str, version: int, *, timeout_s: float | None = None) -> ModelInfo:
        """The model's input and output names and types, asked once per version and kept."""
        found = self._info.get((name, version))
        if found is not None:
            return found
        deadline = asyncio.get_running_loop().time() + self._budget(timeout_s)
        response, content = await self._get_versioned(self._path(name, version), "", name, version, deadline)
        if response.status_code != 200:
            raise self._error(response.status_code, content, what=_servable(name, version))
        try:
            info = parse_model_info(json.loads(content))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"the OIP server's metadata of {_servable(name, version)} could not be read: {exc}") from exc
        self._info[(name, version)] = info
        return info

    async def version_ready(self, name: str, version: int) -> bool:
        """Whether the server says that version is ready (`GET .../ready` answers 200)."""
        deadline = asyncio.get_running_loop().time() + self._budget(None)
        response, _ = await self._get_versioned(self._path(name, version), "/ready", name, version, deadline)
        return response.status_code == 200

    async def model_status(self, name: str, versions: tuple[int, ...] = ()) -> dict[int, str]:
        """{version: "AVAILABLE" | "UNAVAILABLE"} for `versions` and every version asked for before.

        The protocol has no list of a model's versions; each one is asked for by its readiness endpoint.
        """
        known = sorted(set(versions) | {v for (n, v) in self._info if n == name})
        states = {}
        for version in known:
            states[version] = "AVAILABLE" if await self.version_ready(name, version) else "UNAVAILABLE"
        return states

    async def ready(self) -> str | None:
        """None when `GET /v2/health/ready` answers 200, else why not (one try, 2 s)."""
        try:
            response = await self._http.get(self.url + "/v2/health/ready", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"the OIP server at {self.url} is unreachable ({reason(exc)})"
        return None if response.status_code == 200 else f"the OIP server at {self.url} is not ready (HTTP {response.status_code})"

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- internals ------------------------------------------------------------------------------

    async def _get_versioned(self, path: str, suffix: str, name: str, version: int, deadline: float) -> tuple[httpx.Response, bytes]:
        """GET path+suffix; in "auto", a 501 to a versioned path moves this predictor to versions in names."""
        response, content = await self._send("GET", path + suffix, deadline=deadline, limit=MAX_SMALL_RESPONSE_BYTES)
        if response.status_code == 501 and self.version_in == "auto":
            self.version_in = "name"
            log.warning(
                "the OIP server has no versions in its paths; asking for each version as a model named %s",
                self.name_template, extra={"model": name, "version": version},
            )  # fmt: skip
            response, content = await self._send("GET", self._path(name, version) + suffix, deadline=deadline, limit=MAX_SMALL_RESPONSE_BYTES)
        return response, content

    def _path(self, name: str, version: int) -> str:
        if self.version_in == "name":
            return "/v2/models/" + _segment(self.name_template.format(name=name, version=int(version)))
        return f"/v2/models/{_segment(name)}/versions/{int(version)}"

    def _budget(self, timeout_s: float | None) -> float:
        return self.options.timeout_s if timeout_s is None else max(0.0, min(timeout_s, self.options.timeout_s))

    async def _send(
        self, method: str, path: str, *, deadline: float, limit: int, content: bytes | None = None, headers: dict | None = None
    ) -> tuple[httpx.Response, bytes]:
        """One exchange ending by `deadline`, retried only after connection errors; the body read up to `limit`."""

        async def attempt(timeout: httpx.Timeout) -> tuple[httpx.Response, bytes]:
            request = self._http.build_request(method, self.url + path, content=content, headers=headers, timeout=timeout)
            response = await self._http.send(request, stream=True)
            try:
                return response, await _read_bounded(response, limit)
            finally:
                await response.aclose()

        return await exchange(attempt, deadline=deadline, peer=f"the OIP server at {self.url}", options=self.options)

    def _error(self, status: int, content: bytes, what: str) -> Exception:
        message = _error_message(status, content)
        if status == 404 or "not found" in message.lower() or "not ready" in message.lower():
            return BackendUnavailableError(
                f"the OIP server has not loaded {what} ({message})",
                retry_after_s=self.options.retry_after_s,
                code="version_not_loaded",
            )
        if status in (429, 503):
            return BackendUnavailableError(
                f"the OIP server is overloaded or unavailable ({message})", retry_after_s=self.options.retry_after_s
            )
        if status in (405, 501) or "versioning not supported" in message.lower():
            return BackendFailedError(
                f"the OIP server refused {what}: {message} (a server without versions in the path, such as KServe's "
                f"ModelServer, serves each version as a model of its own: version_in='name' or 'auto')"
            )
        return BackendFailedError(f"the OIP server refused {what}: {message}")


# --- the wire format -------------------------------------------------------------------------------


def encode_infer_request(info: ModelInfo, batch: np.ndarray) -> tuple[bytes, int]:
    """The body of an infer call (JSON header + raw little-endian tensor) and the header's length."""
    datatype = _SEND[batch.dtype]
    raw = np.ascontiguousarray(batch, dtype=batch.dtype.newbyteorder("<")).tobytes()
    header = {
        "inputs": [
            {"name": info.input.name, "shape": list(batch.shape), "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [{"name": info.output.name, "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return text + raw, len(text)


def decode_infer_response(content: bytes, header_length: str | None, output_name: str) -> np.ndarray:
    """The named output of an infer answer, binary (after the JSON header) or JSON `data`."""
    if header_length is not None:
        length = int(header_length)
        if not 0 < length <= len(content):
            raise ValueError(f"{HEADER} {length} does not fit a {len(content)}-byte answer")
        header, binary = json.loads(content[:length]), memoryview(content)[length:]
    else:
        header, binary = json.loads(content), memoryview(b"")
    if not isinstance(header, dict) or not isinstance(header.get("outputs"), list):
        raise TypeError("the answer has no 'outputs' list")
    offset = 0
    for output in header["outputs"]:
        if not isinstance(output, dict):
            raise TypeError("an output is not a JSON object")
        parameters = output.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None and (not isinstance(size, int) or size < 0 or offset + size > len(binary)):
            raise ValueError(f"output {output.get('name')!r} claims {size} binary bytes; {len(binary) - offset} are left")
        if output.get("name") != output_name:
            offset += size or 0
            continue
        datatype = output.get("datatype")
        if datatype not in _READ:
            raise ValueError(f"output {output_name!r} is {datatype}, not a float tensor")
        shape = tuple(int(d) for d in output["shape"])
        if any(d < 0 for d in shape):
            raise ValueError(f"output {output_name!r} has a negative dimension: {shape}")
        if size is not None:
            dtype = np.dtype(_READ[datatype]).newbyteorder("<")
            if size != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"output {output_name!r} of shape {list(shape)} cannot be {size} bytes of {datatype}")
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype)
        else:
            array = np.asarray(output["data"], dtype=np.float64).reshape(-1)
        return array.reshape(shape).astype(np.float32)
    raise KeyError(f"output {output_name!r} is not in the answer")


def parse_model_info(data: object) -> ModelInfo:
    """The one image input and the probabilities output of a model's metadata."""
    if not isinstance(data, dict):
        raise TypeError("the metadata is not a JSON object")
    inputs = [_tensor(item) for item in data.get("inputs") or []]
    outputs = [_tensor(item) for item in data.get("outputs") or []]
    if len(inputs) != 1:
        raise ValueError(f"the model declares {len(inputs)} inputs; one image input is expected")
    if not outputs:
        raise ValueError("the model declares no outputs")
    by_name = {o.name: o for o in outputs}
    output = next((by_name[k] for k in OUTPUT_NAMES if k in by_name), sorted(outputs, key=lambda o: o.name)[0])
    return ModelInfo(inputs[0], output)


def _tensor(item: object) -> TensorInfo:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("datatype"), str):
        raise TypeError(f"a tensor in the metadata is not {{name, datatype, shape}}: {str(item)[:120]}")
    return TensorInfo(item["name"], item["datatype"], tuple(int(d) for d in item.get("shape") or ()))


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BackendFailedError(f"the OIP server's answer is {int(declared)} bytes; at most {limit} are read")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BackendFailedError(f"the OIP server's answer is over {limit} bytes; at most {limit} are read")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(status: int, content: bytes) -> str:
    try:
        data = json.loads(content)
    except ValueError:
        return content[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])[:300]
    return f"HTTP {status}"


def _segment(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def _servable(name: str, version: int) -> str:
    return f"version {version} of model {name}"


