"""What the source announces: the version a device should run, with its files and manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..store import ModelRef
from .download import RemoteFile

#: The files a bundle may have; an assignment naming others is refused (no path tricks).
BUNDLE_FILES = ("model.tflite", "manifest.json", "manifest.sig", "labels.txt")


@dataclass(frozen=True)
class Assignment:
    """The server's answer to "what should I run?" (`GET .../assignment` or an `assignment` event)."""

    model: str
    version: int | None
    files: dict[str, RemoteFile]
    rollout: bool = False
    etag: str | None = None

    @property
    def ref(self) -> ModelRef | None:
        return ModelRef(self.model, self.version) if self.version is not None else None

    @classmethod
    def from_json(cls, data: Any, etag: str | None = None) -> "Assignment":
        """Parse and check the JSON; `ValueError` says what is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise ValueError("the assignment is not an object with a model name")
        version = data.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise ValueError(f"the assignment's version {version!r} is not a positive integer")
        files: dict[str, RemoteFile] = {}
        for name, item in (data.get("files") or {}).items():
            if name not in BUNDLE_FILES:
                raise ValueError(f"the assignment lists an unexpected file {name!r}")
            try:
                files[name] = RemoteFile(name, str(item["sha256"]), int(item["size"]), str(item["url"]))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"the assignment's entry for {name} is incomplete ({exc})") from exc
        if version is not None:
            for needed in ("model.tflite", "manifest.json", "labels.txt"):
                if needed not in files:
                    raise ValueError(f"the assignment of version {version} lists no {needed}")
        return cls(data["model"], version, files, bool(data.get("rollout")), etag)
