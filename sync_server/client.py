"""A small HTTP client of the sync server's API, for the CLI, the demo and the benchmark."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx

from .errors import (
    AuthenticationError,
    BackendUnavailableError,
    BadRequestError,
    BundleRejectedError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    SyncServerError,
)

_BY_STATUS: dict[int, type[SyncServerError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BundleRejectedError,
    503: BackendUnavailableError,
}


def tar_folder(folder: Path) -> bytes:
    """A gzipped tar of the folder's contents (names relative to the folder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(Path(folder).rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


class SyncServerClient:
    """Calls one sync server with one bearer token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s, transport=transport
        )

    def publish(self, bundle_dir: Path, saved_model_dir: Path, channel: str | None = None) -> dict[str, Any]:
        files = {
            "bundle": ("bundle.tar.gz", tar_folder(bundle_dir), "application/gzip"),
            "saved_model": ("saved_model.tar.gz", tar_folder(saved_model_dir), "application/gzip"),
        }
        data = {"channel": channel} if channel else None
        return self._check(self._send("POST", "/v1/models", files=files, data=data))

    def predict(self, model: str, photo: bytes, *, version: int | None = None, channel: str | None = None, top_k: int = 5) -> dict[str, Any]:
        params: dict[str, Any] = {"top_k": top_k}
        if version is not None:
            params["version"] = version
        if channel is not None:
            params["channel"] = channel
        return self._check(
            self._send("POST", f"/v1/models/{model}/predict", params=params, content=photo,
                       headers={"Content-Type": "application/octet-stream"})
        )

    def predict_pixels(self, model: str, pixels: bytes, height: int, width: int, spec_digest: str, *,
                       version: int | None = None, channel: str | None = None, top_k: int = 5) -> dict[str, Any]:
        """The full model's top-k for fitted uint8 pixels (H*W*3 bytes; `PreprocessSpec.pixels_digest()`)."""
        params: dict[str, Any] = {"top_k": top_k}
        if version is not None:
            params["version"] = version
        if channel is not None:
            params["channel"] = channel
        headers = {"Content-Type": "application/x-edge-pixels", "X-Pixels-Shape": f"{height}x{width}x3", "X-Spec-Digest": spec_digest}
        return self._check(self._send("POST", f"/v1/models/{model}/predict/pixels", params=params, content=pixels, headers=headers))

    def delete_version(self, model: str, version: int, *, dry_run: bool = False) -> dict[str, Any]:
        params = {"dry_run": "true"} if dry_run else None
        return self._check(self._send("DELETE", f"/v1/models/{model}/versions/{version}", params=params))

    def get(self, path: str) -> Any:
        return self._check(self._send("GET", path))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST a JSON body to an admin route; errors raise as `get`'s do."""
        return self._check(self._send("POST", path, json=body or {}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SyncServerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(f"the sync server at {self.url} is unreachable ({exc})") from exc

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            error = response.json()["error"]
            code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", f"HTTP {response.status_code}: {response.text[:200]}"
        kind = _BY_STATUS.get(response.status_code, SyncServerError)
        if kind is AuthenticationError:
            raise AuthenticationError(message, code=code)
        if kind is BackendUnavailableError:
            raise BackendUnavailableError(message, code=code)
        raise kind(message, code=code)
