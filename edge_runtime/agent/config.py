"""Where the agent keeps its files, and the device identity `edge-agent enroll` stores.

    HOME/                     the device's model store (`$EDGE_CLASSIFY_HOME`), shared with `edge-classify`
    HOME/trusted.pub          the publisher key pinned on the device
    HOME/downloads/           partial and finished downloads (`<sha256>.part`): they survive a reboot
    HOME/agent/identity.json  server URL, device id and token (mode 0600)
    HOME/agent/state.json     refused versions, probation and crash counts (see `state.py`)
    HOME/agent/outbox.sqlite  reports waiting to be sent (see `outbox.py`)
    HOME/agent/run.json       pid and local URL of the running daemon
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..store import default_home
from .errors import NotEnrolledError

PUBLIC_KEY_ENV = "EDGE_CLASSIFY_PUBLIC_KEY"


@dataclass(frozen=True)
class AgentPaths:
    """The files of one device, under its store's home."""

    home: Path

    @classmethod
    def at(cls, home: str | Path | None) -> "AgentPaths":
        return cls(Path(home).expanduser() if home is not None else default_home())

    @property
    def agent_dir(self) -> Path:
        return self.home / "agent"

    @property
    def identity(self) -> Path:
        return self.agent_dir / "identity.json"

    @property
    def state(self) -> Path:
        return self.agent_dir / "state.json"

    @property
    def outbox(self) -> Path:
        return self.agent_dir / "outbox.sqlite"

    @property
    def run_file(self) -> Path:
        return self.agent_dir / "run.json"

    @property
    def downloads(self) -> Path:
        return self.home / "downloads"

    def public_key(self, explicit: str | Path | None = None) -> Path:
        """The pinned publisher key: `explicit`, else `$EDGE_CLASSIFY_PUBLIC_KEY`, else HOME/trusted.pub."""
        chosen = explicit or os.environ.get(PUBLIC_KEY_ENV) or (self.home / "trusted.pub")
        return Path(chosen)


@dataclass(frozen=True)
class Identity:
    """Who this device is to its sync server."""

    server: str
    device_id: str
    token: str
    model: str
    channel: str
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """Everything but the token (for `edge-agent status` and the local API)."""
        data = self.to_dict()
        data.pop("token")
        return data


def save_identity(paths: AgentPaths, identity: Identity) -> Path:
    """Write the identity atomically, readable by the owner only (it holds the device token)."""
    write_json_atomic(paths.identity, identity.to_dict(), mode=0o600)
    return paths.identity


def load_identity(paths: AgentPaths) -> Identity:
    """The stored identity, or `NotEnrolledError` saying how to enrol."""
    try:
        data = json.loads(paths.identity.read_text(encoding="utf-8"))
        return Identity(
            server=str(data["server"]),
            device_id=str(data["device_id"]),
            token=str(data["token"]),
            model=str(data["model"]),
            channel=str(data.get("channel") or "stable"),
            name=data.get("name"),
        )
    except FileNotFoundError:
        raise NotEnrolledError(
            f"this device is not enrolled (no {paths.identity}): run `edge-agent enroll --server URL --secret SECRET`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotEnrolledError(f"the identity file {paths.identity} is unreadable ({exc}): enrol again with --force") from exc


def write_json_atomic(path: Path, data: Any, *, mode: int = 0o644) -> None:
    """Write JSON to a temporary file, fsync it and rename it over `path`: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
