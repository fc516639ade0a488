"""A client of TensorFlow Serving's REST API, and the predictor that uses it.

    POST {url}/v1/models/NAME[/versions/N | /labels/L]:predict   {"instances": [...]} -> {"predictions": [...]}
    GET  {url}/v1/models/NAME                                     {"model_version_status": [...]}
    GET  {url}/v1/models/NAME/versions/N/metadata                 the signatures (once per version)

Float batches go to `serving_default` as JSON numbers. A version with the converter's `pixels_png`
signature gets the device's fitted uint8 pixels instead, one PNG per photo (lossless, compress level 1:
2 ms for 224x224 here) as `{"signature_name": "pixels_png", "instances": [{"png": {"b64": ...}}]}`: TF
Serving's JSON carries bytes only as base64 for string inputs, and uint8 pixels as JSON integers would
be about 4 bytes each. A 224x224 photo is 1.77 MB of float JSON, 60-140 KB this way (photos; noise
would be 200 KB: PNG cannot shrink it).

Errors come back as `{"error": "message"}` with an HTTP status mapped from the gRPC code (404 NOT_FOUND,
400 INVALID_ARGUMENT and FAILED_PRECONDITION, 503 UNAVAILABLE, ...). Only connection errors are
retried (nothing reached TF Serving), and only while the call's time lasts; a timeout or an answer
is final. A call with `timeout_s` ends within it, whatever the backend does (connection pool wait,
connect, send and read together). A server that cannot be
reached, times out, or has not loaded the version yet becomes `BackendUnavailableError` (503 with
Retry-After); any other refusal becomes `BackendFailedError` (502).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import urllib.parse
from typing import Awaitable

import httpx
import numpy as np

from ..config import TFServingOptions
from ..errors import BackendFailedError, BackendUnavailableError
from .http_exchange import exchange, reason
from .json_tensor import encode_float_tensor

log = logging.getLogger("sync_server.tf_serving")

#: Outputs looked for, in order, when a signature has several.
OUTPUT_NAMES = ("probabilities", "probability", "scores", "output_0")
#: The converter's signatures for fitted uint8 pixels (converter.serving): as a tensor, and as PNGs.
PIXELS_SIGNATURE = "pixels"
PNG_SIGNATURE = "pixels_png"
#: zlib level of the PNGs sent (1: 2 ms and 54 KB mean for a 224x224 photo; 6: 6.5 ms and 50 KB).
PNG_COMPRESS_LEVEL = 1


class TFServingClient:
    """Talks to one TF Serving REST endpoint. `transport` replaces the network (tests)."""

    def __init__(self, options: TFServingOptions, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not options.url:
            raise ValueError("TFServingClient needs options.url")
        self.options = options
        self.url = options.url.rstrip("/")
        timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
        self._signatures: dict[tuple[str, int], dict[str, str]] = {}  # (model, version) -> {signature: input name}
        #: Bytes of the last predict request's body, for the benchmark and tests.
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
        """The model's output for a batch, in row format; float32 [N, ...]; within `timeout_s` when given."""
        if version is not None and label is not None:
            raise ValueError("ask for a version or a label, not both")
        path = f"/v1/models/{_segment(name)}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif label is not None:
            path += f"/labels/{_segment(label)}"
        body = '{"instances":' + encode_float_tensor(instances)
        if signature_name:
            body += ',"signature_name":' + json.dumps(signature_name)
        body += "}"
        return await self._predict(path, body.encode("utf-8"), name, version, label, timeout_s)

    async def predict_pixels(self, name: str, pixels: np.ndarray, *, version: int, timeout_s: float | None = None) -> np.ndarray:
        """The model's output for uint8 pixels [N, H, W, 3], sent as PNGs to the version's `pixels_png` signature."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.timeout_s if timeout_s is None else min(timeout_s, self.options.timeout_s))
        signatures = await self.signatures(name, version, timeout_s=deadline - loop.time())
        if PNG_SIGNATURE not in signatures:
            raise BackendFailedError(f"version {version} of model {name} has no {PNG_SIGNATURE!r} signature for pixels")
        body = await asyncio.to_thread(encode_png_request, pixels, signatures[PNG_SIGNATURE])
        return await self._predict(f"/v1/models/{_segment(name)}/versions/{int(version)}", body, name, version, None,
                                   max(0.001, deadline - loop.time()))

    async def signatures(self, name: str, version: int, *, timeout_s: float | None = None) -> dict[str, str]:
        """{signature: its input's name} of a version's one-input signatures (its metadata, asked once and kept)."""
        found = self._signatures.get((name, version))
        if found is not None:
            return found
        what = _servable(name, version, None)
        response = await self._send("GET", f"/v1/models/{_segment(name)}/versions/{int(version)}/metadata", timeout_s=timeout_s)
        data = _json(response)
        if response.status_code != 200:
            raise self._error(response.status_code, data, what=what)
        try:
            defs = data["metadata"]["signature_def"]["signature_def"]  # type: ignore[index]
            found = {str(key): next(iter(sig["inputs"])) for key, sig in defs.items() if len(sig.get("inputs") or {}) == 1}
        except (KeyError, TypeError, StopIteration, AttributeError) as exc:
            raise BackendFailedError(f"TF Serving's metadata of {what} could not be read: {exc!r}") from exc
        self._signatures[(name, version)] = found
        return found

    async def _predict(self, path: str, body: bytes, name: str, version: int | None, label: str | None,
                       timeout_s: float | None) -> np.ndarray:
        self.last_request_bytes = len(body)
        response = await self._send("POST", path + ":predict", content=body, timeout_s=timeout_s)
        data = _json(response)
        if response.status_code != 200:
            if response.status_code == 400 and version is not None:  # the version may have been reloaded
                self._signatures.pop((name, version), None)
            raise self._error(response.status_code, data, what=_servable(name, version, label))
        try:
            return _predictions(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"TF Serving's predict answer could not be read: {exc}") from exc

    async def model_status(self, name: str) -> dict[int, str]:
        """{version: state} for a model; {} when TF Serving does not know the model (yet)."""
        response = await self._send("GET", f"/v1/models/{_segment(name)}")
        data = _json(response)
        if response.status_code == 404:
            return {}
        if response.status_code != 200:
            raise self._error(response.status_code, data, what=f"the status of model {name}")
        try:
            return {int(item["version"]): str(item.get("state", "UNKNOWN")) for item in data.get("model_version_status", [])}
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendFailedError(f"TF Serving's model status answer could not be read: {exc}") from exc

    async def ping(self) -> str | None:
        """None when TF Serving's REST server answers at all, else why not (one try, 2 s)."""
        try:
            response = await self._http.get(self.url + "/v1/models/_readiness_probe", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"TF Serving at {self.url} is unreachable ({reason(exc)})"
        # Any answer below 500 (404 for the probe's made-up model) means the REST server is up.
        return None if response.status_code < 500 else f"TF Serving at {self.url} answered HTTP {response.status_code}"

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- internals ------------------------------------------------------------------------------

    async def _send(self, method: str, path: str, content: bytes | None = None, timeout_s: float | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if content is not None else None
        budget = self.options.timeout_s if timeout_s is None else min(timeout_s, self.options.timeout_s)

        def attempt(timeout: httpx.Timeout) -> Awaitable[httpx.Response]:
            return self._http.request(method, self.url + path, content=content, headers=headers, timeout=timeout)

        deadline = asyncio.get_running_loop().time() + budget
        return await exchange(attempt, deadline=deadline, peer=f"TF Serving at {self.url}", options=self.options)

    def _error(self, status: int, data: object, what: str) -> Exception:
        message = data.get("error") if isinstance(data, dict) else None
        message = str(message or f"HTTP {status}")
        not_loaded = status == 404 or "Unrecognized servable version label" in message
        if not_loaded:
            return BackendUnavailableError(
                f"TF Serving has not loaded {what} yet ({message})",
                retry_after_s=self.options.retry_after_s,
                code="version_not_loaded",
            )
        if status in (429, 503):
            return BackendUnavailableError(
                f"TF Serving is overloaded or unavailable ({message})", retry_after_s=self.options.retry_after_s
            )
        return BackendFailedError(f"TF Serving refused {what}: {message}")


class TFServingPredictor:
    """The `Predictor` backed by TF Serving: asks for each version by number."""

    kind = "tf_serving"

    def __init__(self, client: TFServingClient) -> None:
        self.client = client

    #: The signature whose presence means the version takes the fitted uint8 pixels.
    pixels_signature = PNG_SIGNATURE

    async def predict(self, name: str, version: int, batch: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        if batch.dtype == np.uint8:
            return await self.client.predict_pixels(name, batch, version=version, timeout_s=timeout_s)
        return await self.client.predict(name, batch, version=version, timeout_s=timeout_s)

    async def takes_pixels(self, name: str, version: int, *, timeout_s: float | None = None) -> bool:
        """Whether the version has the signature for the device's uint8 pixels (from its metadata, asked once)."""
        return self.pixels_signature in await self.client.signatures(name, version, timeout_s=timeout_s)

    async def model_status(self, name: str) -> dict[int, str]:
        return await self.client.model_status(name)

    async def ready(self) -> str | None:
        return await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


def encode_png(pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """One photo's uint8 pixels [H, W, 3] as a PNG: lossless, so the model sees exactly these pixels."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(out, "PNG", compress_level=compress_level)
    return out.getvalue()


def encode_png_request(pixels: np.ndarray, input_name: str, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """The REST predict body for the `pixels_png` signature: one base64 PNG per photo of `pixels` [N, H, W, 3]."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"PNG pixels must be uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    key = json.dumps(input_name)
    rows = ",".join('{%s:{"b64":"%s"}}' % (key, base64.b64encode(encode_png(photo, compress_level)).decode("ascii")) for photo in pixels)
    return ('{"signature_name":"%s","instances":[%s]}' % (PNG_SIGNATURE, rows)).encode("ascii")


def _predictions(data: object) -> np.ndarray:
    if not isinstance(data, dict):
        raise TypeError("the answer is not a JSON object")
    if "predictions" in data:
        rows = data["predictions"]
        if rows and isinstance(rows[0], dict):  # several named outputs: a list of objects
            key = next((k for k in OUTPUT_NAMES if k in rows[0]), sorted(rows[0])[0])
            rows = [row[key] for row in rows]
    elif "outputs" in data:
        rows = data["outputs"]
        if isinstance(rows, dict):
            key = next((k for k in OUTPUT_NAMES if k in rows), sorted(rows)[0])
            rows = rows[key]
    else:
        raise KeyError("neither 'predictions' nor 'outputs' in the answer")
    array = np.asarray(rows, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected [batch, classes] probabilities, got shape {array.shape}")
    return array


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return {"error": response.text[:500]} if response.status_code != 200 else None


def _segment(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def _servable(name: str, version: int | None, label: str | None) -> str:
    if version is not None:
        return f"version {version} of model {name}"
    if label is not None:
        return f"label {label!r} of model {name}"
    return f"model {name}"


