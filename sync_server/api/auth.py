"""Bearer-token authentication: the admin token, or a device token issued at enrolment."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import anyio
from fastapi import Depends, Request

from ..devices import DeviceIdentity, require_own
from ..errors import AuthenticationError, PermissionDeniedError
from ..services import Services
from .schemas import DeviceId


async def services(request: Request) -> Services:
    """The app's parts (async: no worker thread for a lookup)."""
    return request.app.state.services


@dataclass(frozen=True)
class Caller:
    """Who called: the admin, or a device."""

    admin: bool = False
    device: DeviceIdentity | None = None


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationError("this call needs an Authorization: Bearer TOKEN header", code="missing_token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the Authorization header must be 'Bearer TOKEN'", code="bad_token")
    return token.strip()


async def caller(request: Request) -> Caller:
    """The admin or the device behind the bearer token; 401 for an unknown token.

    A device seen recently is answered from memory; otherwise the token is looked up on a worker thread.
    """
    token = bearer_token(request)
    state: Services = request.app.state.services
    admin_token = state.config.admin_token or ""
    if admin_token and hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")):
        return Caller(admin=True)
    device = state.devices.cached_identity(token)
    if device is None:
        device = await anyio.to_thread.run_sync(state.devices.authenticate, token)
    if device is None:
        raise AuthenticationError("the bearer token is not valid", code="bad_token")
    request.state.device_id = device.id
    return Caller(device=device)


async def admin(who: Caller = Depends(caller)) -> Caller:
    if not who.admin:
        raise PermissionDeniedError("this call needs the admin token", code="admin_only")
    return who


async def device(who: Caller = Depends(caller)) -> DeviceIdentity:
    if who.device is None:
        raise PermissionDeniedError("this call needs a device token (the admin token is not a device)", code="device_only")
    return who.device


async def own_device(
    device_id: DeviceId, who: DeviceIdentity = Depends(device)
) -> DeviceIdentity:
    """The calling device, if the path's `device_id` is its own (403 otherwise). A dependency, so it
    runs before any answer starts: a stream for another device's id is refused, not broken mid-way."""
    require_own(who, device_id)
    return who


async def current_assignment(state: Services, device: DeviceIdentity):  # type: ignore[no-untyped-def]
    """The device's assignment: from memory when nothing changed, else read on a worker thread."""
    return state.devices.cached_assignment(device) or await anyio.to_thread.run_sync(state.devices.assignment, device)
