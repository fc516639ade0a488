"""Artifact downloads from immutable, content-addressed URLs: `/v1/artifacts/{sha256}`.

The URL names the content, so the answer never changes: strong ETag (the hash), a year of caching,
`If-None-Match` -> 304, and one byte range (`Range: bytes=START-[END]`, `bytes=-N`, with `If-Range`)
-> 206 so an interrupted download resumes. Several ranges, or a Range that cannot be parsed, get the
whole file (RFC 9110 allows ignoring Range); a range past the end gets 416.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse

from ..errors import NotFoundError, RangeNotSatisfiableError
from ..services import Services
from . import auth
from .schemas import responses

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

CACHE_CONTROL = "private, max-age=31536000, immutable"
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_CHUNK = 256 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_DIGITS = 18  # a range number longer than this is past the end of any file


@router.head("/{sha256}", include_in_schema=False)
@router.get("/{sha256}", responses=responses(304, 404, 416))
def download(
    sha256: Annotated[str, PathParam(min_length=1, max_length=128, description="the file's SHA-256 (64 hex digits)")],
    request: Request,
    who: auth.Caller = Depends(auth.caller),
    state: Services = Depends(auth.services),
) -> Response:
    """Download a bundle file. Devices may fetch only files of the versions assigned to them (the one
    to serve and a shadow rollout's candidate): any other hash, known or not, gets the same 404, so a
    device cannot learn which files exist."""
    if who.device is not None:
        assigned = state.devices.cached_assignment(who.device) or state.devices.assignment(who.device)
        owners = state.registry.versions_with_artifact(sha256) if _HEX64.match(sha256) else []
        allowed = {(who.device.model, v) for v in (assigned.version, assigned.shadow) if v is not None}
        if not allowed.intersection(owners):
            raise NotFoundError(
                f"no artifact {sha256[:64]!r} among the files of the version assigned to device {who.device.id}",
                code="unknown_artifact",
            )
    path = state.artifacts.open_path(sha256)
    etag = f'"{sha256}"'
    size = path.stat().st_size
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    wanted = _byte_range(request.headers.get("range"), request.headers.get("if-range"), etag, size)
    if wanted is None:
        return _WholeFile(path, media_type="application/octet-stream", headers=headers)
    start, end = wanted  # inclusive
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(status_code=206, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_read(path, start, end), status_code=206, headers=headers, media_type="application/octet-stream")


class _WholeFile(FileResponse):
    """FileResponse without its own Range handling: we already decided to send the whole file."""

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k not in (b"range", b"if-range")]
        await super().__call__(scope, receive, send)


def _byte_range(header: str | None, if_range: str | None, etag: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for one satisfiable range; None for the whole file; 416 when past the end."""
    if not header:
        return None
    if if_range is not None and if_range.strip() != etag:
        return None  # the client's partial copy is of other content: send it all
    match = _RANGE.match(header)
    if match is None:
        return None  # several ranges or unparsable: ignore
    first, last = (g.lstrip("0") or ("0" if g else "") for g in match.groups())
    if first == "" and last == "":
        return None
    if len(first) > _MAX_DIGITS:  # no artifact is 10^18 bytes: past the end (and no 5000-digit int())
        raise RangeNotSatisfiableError(
            f"the range starts past the artifact's {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    if len(last) > _MAX_DIGITS:
        last = str(size - 1) if first != "" else str(size)  # an end or suffix past the end: up to the end
    if first == "":
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiableError(f"an empty suffix range of a {size}-byte artifact cannot be satisfied", headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiableError(
            f"range {header.strip()!r} is outside the artifact's {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


async def _read(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = await handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    return header.strip() == "*" or etag in [c.strip().removeprefix("W/") for c in header.split(",")]
