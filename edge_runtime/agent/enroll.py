"""Enrolment: trade the server's enrolment secret for this device's own id and token, once."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..store import ModelStore
from .client import SyncClient
from .config import AgentPaths, Identity, save_identity
from .errors import AgentError, ServerRejectedError
from .options import RetryOptions
from .retry import with_retries

#: Enrolment is interactive: a few quick tries, then a clear error.
ENROLL_RETRY = RetryOptions(attempts=3, base_s=0.3, max_s=2.0)


def enroll(
    paths: AgentPaths,
    server: str,
    secret: str,
    *,
    model: str | None = None,
    channel: str | None = None,
    name: str | None = None,
    public_key: str | Path | None = None,
    force: bool = False,
    timeout_s: float = 10.0,
    retry: RetryOptions = ENROLL_RETRY,
) -> Identity:
    """Enrol with the server and store the identity (and the publisher key, when given)."""
    if paths.identity.exists() and not force:
        raise AgentError(f"this device is already enrolled ({paths.identity}); pass --force to enrol it again")
    model = model or _installed_model(paths)
    if not model:
        raise AgentError("which model does this device run? pass --model NAME")
    if public_key is not None:
        _pin_key(paths, Path(public_key))
    client = SyncClient(server, secret, timeout_s=timeout_s)
    body = {"model": model, **({"channel": channel} if channel else {}), **({"name": name} if name else {})}
    try:
        reply = with_retries(
            lambda: client.request("POST", "/v1/devices/enroll", body=body, ok=(200, 201)),
            retry,
            what=f"enrolling with {client.server}",
        )
    except ServerRejectedError as exc:
        if exc.code == "bad_enrollment_secret":
            raise AgentError(f"the server at {client.server} refused the enrolment secret: check --secret") from exc
        raise
    data = reply.json()
    try:
        identity = Identity(client.server, str(data["device_id"]), str(data["token"]), str(data["model"]),
                            str(data.get("channel") or "stable"), name)
    except (KeyError, TypeError) as exc:
        raise AgentError(f"the server's enrolment answer is incomplete ({exc})") from exc
    save_identity(paths, identity)
    return identity


def _installed_model(paths: AgentPaths) -> str | None:
    current = ModelStore(paths.home).current()
    return current.name if current else None


def _pin_key(paths: AgentPaths, key: Path) -> None:
    from converter.errors import KeyFileError
    from converter.signing import load_public_keys

    try:
        load_public_keys(key)  # one key, or a ring with the next publisher key too
    except KeyFileError as exc:
        raise AgentError(f"--public-key: {exc}") from exc
    paths.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(key, paths.home / "trusted.pub")
