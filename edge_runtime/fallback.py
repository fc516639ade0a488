"""Ask the sync server's full model when the device is unsure, never waiting longer than a bound.

The request, when the device has the fitted pixels it fed its own model (the default):
`POST {server}/v1/models/{name}/predict/pixels?version={v}&top_k={k}` with `Content-Type:
application/x-edge-pixels`, `X-Pixels-Shape: HxWx3`, `X-Spec-Digest: <PreprocessSpec.pixels_digest()>`
and the raw uint8 pixels (H*W*3 bytes: 27 KB at 96x96, 147 KB at 224x224) as the body: no decode on
the server, and the full model sees exactly the device's input. An older server without that route
(404 at routing, or 415) gets the photo instead, and this client remembers not to try pixels again;
a server whose version has another spec (409 `spec_mismatch`) gets the photo for that request.

The photo request: `POST {server}/v1/models/{name}/predict?version={v}&top_k={k}` with the photo's
bytes as the body (`application/octet-stream`). Both carry `Authorization: Bearer TOKEN` when the
device is enrolled. The answer: `{"model": {"name", "version"}, "top_k": [{"label", "score"}, ...]}`.

Only the standard library is used, so the device starts fast. The whole exchange (the pixel request
and, if the server needs it, the photo request) runs on a worker thread that the caller waits for at
most `timeout` seconds: a server that accepts the connection and then drips bytes cannot hold a photo
longer than that.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FallbackUnavailableError
from .results import Category

if TYPE_CHECKING:  # annotations only: the device imports numpy and preprocessing anyway, but not here
    import numpy as np

    from preprocessing import PreprocessSpec

DEFAULT_TIMEOUT_S = 2.0
#: The content type of a pixel payload (sync_server.api.predict reads it).
PIXELS_CONTENT_TYPE = "application/x-edge-pixels"


@dataclass(frozen=True)
class FallbackOptions:
    """Where and how long to ask the server."""

    server_url: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    token: str | None = None


@dataclass(frozen=True)
class ServerAnswer:
    """The full model's top-k for one photo."""

    categories: tuple[Category, ...]
    model_name: str
    model_version: int | None


@dataclass(frozen=True)
class PixelPayload:
    """The fitted uint8 pixels a device fed its own model, and the digest of the spec that fitted them."""

    data: bytes  # row-major RGB, height * width * 3 bytes
    height: int
    width: int
    spec_digest: str

    def __post_init__(self) -> None:
        if len(self.data) != self.height * self.width * 3:
            raise ValueError(f"pixels of {self.height}x{self.width}x3 are {self.height * self.width * 3} bytes, got {len(self.data)}")

    @classmethod
    def from_array(cls, pixels: "np.ndarray", spec: "PreprocessSpec") -> "PixelPayload":
        """From `preprocessing.preprocess_pixels(photo, spec)` (uint8, `spec.pixel_shape`)."""
        if str(pixels.dtype) != "uint8" or tuple(pixels.shape) != spec.pixel_shape:
            raise ValueError(f"pixels must be uint8 {spec.pixel_shape}, got {pixels.dtype} {tuple(pixels.shape)}")
        return cls(pixels.tobytes(), spec.height, spec.width, spec.pixels_digest())


class FallbackClient:
    """Sends low-confidence photos to the server's full model."""

    def __init__(self, options: FallbackOptions) -> None:
        if not options.server_url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {options.server_url!r}")
        if options.timeout_s <= 0:
            raise ValueError("the fallback timeout must be positive")
        self.options = options
        self._no_pixel_route = False  # set once the server showed it has no pixel route

    def predict(
        self, image: bytes, model_name: str, model_version: int | None, top_k: int, pixels: PixelPayload | None = None
    ) -> ServerAnswer:
        """The server's answer, or `FallbackUnavailableError` within `timeout_s` seconds.

        With `pixels`, they are sent instead of the photo unless this server has shown it cannot take them.
        """
        query = {"top_k": str(top_k)}
        if model_version is not None:
            query["version"] = str(model_version)
        base = self.options.server_url.rstrip("/") + f"/v1/models/{urllib.parse.quote(model_name, safe='')}/predict"
        suffix = "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        photo_request = urllib.request.Request(
            base + suffix, data=image, headers={**headers, "Content-Type": "application/octet-stream"}, method="POST"
        )
        pixel_request = None
        if pixels is not None and self.sends_pixels:
            pixel_headers = {
                **headers,
                "Content-Type": PIXELS_CONTENT_TYPE,
                "X-Pixels-Shape": f"{pixels.height}x{pixels.width}x3",
                "X-Spec-Digest": pixels.spec_digest,
            }
            pixel_request = urllib.request.Request(base + "/pixels" + suffix, data=pixels.data, headers=pixel_headers, method="POST")
        outcome: dict[str, object] = {}
        deadline = time.monotonic() + self.options.timeout_s  # both requests together

        def _call() -> None:
            try:
                if pixel_request is not None:
                    try:
                        outcome["body"] = self._send(pixel_request, deadline)
                        return
                    except urllib.error.HTTPError as exc:
                        if not self._photo_instead(exc):
                            raise
                outcome["body"] = self._send(photo_request, deadline)
            except BaseException as exc:  # reported to the waiting caller  # noqa: BLE001
                outcome["error"] = exc

        worker = threading.Thread(target=_call, name="edge-fallback", daemon=True)
        worker.start()
        worker.join(self.options.timeout_s)
        late = FallbackUnavailableError(f"the server did not answer within {self.options.timeout_s:g} s")
        if worker.is_alive():
            raise late
        if isinstance(outcome.get("error"), TimeoutError) or (
            isinstance(outcome.get("error"), urllib.error.URLError) and isinstance(outcome["error"].reason, TimeoutError)  # type: ignore[union-attr]
        ):
            raise late from outcome["error"]  # type: ignore[misc]  # the socket's deadline is the same bound
        if "error" in outcome:
            raise FallbackUnavailableError(_describe(outcome["error"])) from outcome["error"]  # type: ignore[misc]
        return _parse(outcome["body"])  # type: ignore[arg-type]

    @property
    def sends_pixels(self) -> bool:
        """False once this server showed it has no pixel route (an older sync server)."""
        return not self._no_pixel_route

    def _send(self, request: urllib.request.Request, deadline: float) -> bytes:
        with urllib.request.urlopen(request, timeout=max(0.001, deadline - time.monotonic())) as response:
            return response.read(1 << 20)

    def _photo_instead(self, exc: urllib.error.HTTPError) -> bool:
        """Whether a refused pixel request should be retried with the photo (remembering an old server)."""
        code = _error_code(exc)
        if exc.code == 415 or (exc.code in (404, 405) and code in (None, "not_found", "method_not_allowed")):
            self._no_pixel_route = True  # the route is missing (unknown models answer `unknown_model`)
            return True
        return exc.code == 409 and code == "spec_mismatch"  # this version has another spec: its own decode


def _error_code(exc: urllib.error.HTTPError) -> str | None:
    """`error.code` of a JSON error answer (read once and kept on `exc` for `_describe`)."""
    if not hasattr(exc, "_edge_body"):
        try:
            exc._edge_body = exc.read(4096)  # type: ignore[attr-defined]
        except OSError:
            exc._edge_body = b""  # type: ignore[attr-defined]
    try:
        error = json.loads(exc._edge_body).get("error")  # type: ignore[attr-defined]
        return str(error["code"]) if isinstance(error, dict) and "code" in error else None
    except (ValueError, AttributeError, TypeError):
        return None


def _parse(body: bytes) -> ServerAnswer:
    try:
        data = json.loads(body)
        categories = tuple(Category(str(c["label"]), float(c["score"])) for c in data["top_k"])
        model = data.get("model") or {}
        version = model.get("version")
        return ServerAnswer(categories, str(model.get("name", "")), int(version) if version is not None else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise FallbackUnavailableError(f"the server's answer could not be read: {exc}") from exc


def _describe(exc: object) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        _error_code(exc)  # reads the body once
        try:
            detail = json.loads(exc._edge_body).get("error", {}).get("message", "")  # type: ignore[attr-defined]
        except (ValueError, AttributeError, TypeError):
            detail = ""
        return f"the server answered HTTP {exc.code}" + (f": {detail}" if detail else "")
    if isinstance(exc, urllib.error.URLError):
        return f"the server is unreachable ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "the server did not answer in time"
    return f"the server request failed ({exc.__class__.__name__}: {exc})"
