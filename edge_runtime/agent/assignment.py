"""What the source announces: the version a device should run, with its files and manifest.

The server's JSON is hostile until checked: `Assignment.from_json` (and `parse_assignment`, from raw
bytes) turn it into typed objects or raise `InvalidAssignmentError` (a `ValueError`) naming what is
wrong, and nothing else: a list where an object belongs, a string size, a path trick, a nesting that
blows the parser's stack. Whatever it was, the follower refuses it with that reason and goes on.

The optional `shadow` part (a candidate to run beside the served version, off the request path) is
checked the same way, but a malformed one never costs the device its served version: the assignment
is kept without it, and `shadow_problem` says why the shadow part was ignored (the manager reports it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..store import ModelRef
from .download import RemoteFile

#: The files a bundle may have; an assignment naming others is refused (no path tricks).
BUNDLE_FILES = ("model.tflite", "manifest.json", "manifest.sig", "labels.txt")
#: The largest file an assignment may declare (a TFLite model for a shop device is megabytes).
MAX_FILE_BYTES = 4 * 1024**3
_MAX_TEXT = 2048


class InvalidAssignmentError(ValueError):
    """Raised when the server's assignment is not what the protocol says; `version` is its version when
    that much could be read (so the refusal can be reported against it)."""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


@dataclass(frozen=True)
class ShadowAssignment:
    """A candidate version to run on `sample_rate` of the requests beside the served one (never served)."""

    version: int
    files: dict[str, RemoteFile]
    sample_rate: float

    @classmethod
    def from_json(cls, data: Any, serving: int | None) -> "ShadowAssignment | None":
        """Check the assignment's `shadow` value (None: no shadow); `InvalidAssignmentError` says what is wrong."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise InvalidAssignmentError(f"the assignment's shadow is {_kind(data)}, not an object")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:
            raise InvalidAssignmentError(f"the shadow's version {_show(version)} is not a positive integer")
        if version == serving:
            raise InvalidAssignmentError(f"the shadow's version {version} is the version served", version)
        rate = data.get("sample_rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise InvalidAssignmentError(f"the shadow's sample rate {_show(rate)} is not a number in 0..1", version)
        files = _bundle_files(data.get("files"), version, "shadow", f"the shadow version {version}")
        return cls(version, files, float(rate))


@dataclass(frozen=True)
class Assignment:
    """The server's answer to "what should I run?" (`GET .../assignment` or an `assignment` event)."""

    model: str
    version: int | None
    files: dict[str, RemoteFile]
    rollout: bool = False
    etag: str | None = None
    shadow: ShadowAssignment | None = None
    #: Why the server's `shadow` part was ignored, and its version when that much could be read.
    shadow_problem: tuple[int | None, str] | None = None

    @property
    def ref(self) -> ModelRef | None:
        return ModelRef(self.model, self.version) if self.version is not None else None

    @property
    def shadow_ref(self) -> ModelRef | None:
        return ModelRef(self.model, self.shadow.version) if self.shadow is not None else None

    @classmethod
    def from_json(cls, data: Any, etag: str | None = None) -> "Assignment":
        """Check decoded JSON; `InvalidAssignmentError` (a `ValueError`) says what is wrong."""
        if not isinstance(data, dict):
            raise InvalidAssignmentError(f"the assignment is {_kind(data)}, not an object")
        model = data.get("model")
        if not isinstance(model, str) or not model or len(model) > 200:
            raise InvalidAssignmentError(f"the assignment's model {_show(model)} is not a model name")
        version = data.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31):
            raise InvalidAssignmentError(f"the assignment's version {_show(version)} is not a positive integer")
        raw_files = data.get("files")
        files = _bundle_files({} if raw_files is None else raw_files, version, "assignment",
                              None if version is None else f"the assignment of version {version}")
        rollout = data.get("rollout", False)
        if rollout is not None and not isinstance(rollout, bool):
            raise InvalidAssignmentError(f"the assignment's rollout flag {_show(rollout)} is not true or false", version)
        if etag is not None and (not isinstance(etag, str) or len(etag) > 200):
            raise InvalidAssignmentError("the assignment's ETag is longer than 200 characters", version)
        shadow, problem = None, None
        try:
            shadow = ShadowAssignment.from_json(data.get("shadow"), version)
        except InvalidAssignmentError as exc:  # a broken shadow part never costs the served version
            problem = (exc.version, str(exc))
        return cls(model, version, files, bool(rollout), etag, shadow, problem)


def _bundle_files(raw: Any, version: int | None, part: str, needing: str | None) -> dict[str, RemoteFile]:
    """The `files` object of the assignment or its shadow (`part`), checked; with `needing` (how to
    name the version in the message), the three files every bundle has must be listed."""
    if not isinstance(raw, dict):
        raise InvalidAssignmentError(f"the {part}'s files are {_kind(raw)}, not an object of name: file", version)
    files: dict[str, RemoteFile] = {}
    for name, item in raw.items():
        if name not in BUNDLE_FILES:
            raise InvalidAssignmentError(f"the {part} lists an unexpected file {_show(name)}", version)
        files[name] = _remote_file(name, item, version)
    if needing is not None:
        for needed in ("model.tflite", "manifest.json", "labels.txt"):
            if needed not in files:
                raise InvalidAssignmentError(f"{needing} lists no {needed}", version)
    return files


def parse_assignment(raw: str | bytes, etag: str | None = None) -> Assignment:
    """An `Assignment` from the bytes of an answer or an event; `InvalidAssignmentError` when they are not one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidAssignmentError(f"the assignment is not JSON ({_first_line(exc)})") from None
    try:
        return Assignment.from_json(data, etag)
    except RecursionError:
        raise InvalidAssignmentError("the assignment is nested too deeply") from None


def _remote_file(name: str, item: Any, version: int | None) -> RemoteFile:
    if not isinstance(item, dict):
        raise InvalidAssignmentError(f"the assignment's entry for {name} is {_kind(item)}, not an object", version)
    sha256, size, url = item.get("sha256"), item.get("size"), item.get("url")
    if not isinstance(sha256, str):
        raise InvalidAssignmentError(f"the assignment's entry for {name} has no sha256", version)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
        raise InvalidAssignmentError(f"the assignment's size of {name}, {_show(size)}, is not 0..{MAX_FILE_BYTES} bytes", version)
    if not isinstance(url, str) or not url or len(url) > _MAX_TEXT or not url.startswith(("/", "http://", "https://")) \
            or any(ch in url for ch in "\r\n\x00 "):
        raise InvalidAssignmentError(f"the assignment's URL of {name}, {_show(url)}, is not a path or an http(s) URL", version)
    try:
        return RemoteFile(name, sha256, size, url)
    except ValueError as exc:
        raise InvalidAssignmentError(str(exc), version) from None


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
