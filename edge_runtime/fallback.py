"""Ask the sync server's full model when the device is unsure, never waiting longer than a bound.

The request: `POST {server}/v1/models/{name}/predict?version={v}&top_k={k}` with the photo's bytes as
the body (`application/octet-stream`) and, when the device is enrolled, `Authorization: Bearer TOKEN`.
The answer: `{"model": {"name", "version"}, "top_k": [{"label", "score"}, ...]}`.

Only the standard library is used, so the device starts fast. The whole exchange runs on a worker
thread that the caller waits for at most `timeout` seconds: a server that accepts the connection and
then drips bytes cannot hold a photo longer than that.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import FallbackUnavailableError
from .results import Category

DEFAULT_TIMEOUT_S = 2.0


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


class FallbackClient:
    """Sends low-confidence photos to the server's full model."""

    def __init__(self, options: FallbackOptions) -> None:
        if not options.server_url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {options.server_url!r}")
        if options.timeout_s <= 0:
            raise ValueError("the fallback timeout must be positive")
        self.options = options

    def predict(self, image: bytes, model_name: str, model_version: int | None, top_k: int) -> ServerAnswer:
        """The server's answer, or `FallbackUnavailableError` within `timeout_s` seconds."""
        query = {"top_k": str(top_k)}
        if model_version is not None:
            query["version"] = str(model_version)
        url = (
            self.options.server_url.rstrip("/")
            + f"/v1/models/{urllib.parse.quote(model_name, safe='')}/predict?"
            + urllib.parse.urlencode(query)
        )
        headers = {"Content-Type": "application/octet-stream", "Accept": "application/json"}
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        request = urllib.request.Request(url, data=image, headers=headers, method="POST")
        outcome: dict[str, object] = {}

        def _call() -> None:
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                    outcome["body"] = response.read(1 << 20)
            except BaseException as exc:  # reported to the waiting caller  # noqa: BLE001
                outcome["error"] = exc

        worker = threading.Thread(target=_call, name="edge-fallback", daemon=True)
        worker.start()
        worker.join(self.options.timeout_s)
        if worker.is_alive():
            raise FallbackUnavailableError(f"the server did not answer within {self.options.timeout_s:g} s")
        if "error" in outcome:
            raise FallbackUnavailableError(_describe(outcome["error"])) from outcome["error"]  # type: ignore[misc]
        return _parse(outcome["body"])  # type: ignore[arg-type]


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
        try:
            detail = json.loads(exc.read(4096)).get("error", {}).get("message", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        return f"the server answered HTTP {exc.code}" + (f": {detail}" if detail else "")
    if isinstance(exc, urllib.error.URLError):
        return f"the server is unreachable ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "the server did not answer in time"
    return f"the server request failed ({exc.__class__.__name__}: {exc})"
