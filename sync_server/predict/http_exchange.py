"""One exchange with an HTTP prediction backend (TF Serving's REST API, an OIP server), by a deadline.

Both backends need the same rules: the whole exchange ends by one deadline (httpx's timeouts are
per step), only a connection that could not be made is retried (with exponential backoff, while the
deadline leaves room), and every failure becomes one `BackendUnavailableError` naming the peer.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Protocol, TypeVar

import httpx

from ..errors import BackendUnavailableError

T = TypeVar("T")


class RetryOptions(Protocol):
    connect_timeout_s: float
    retries: int
    retry_backoff_s: float
    retry_after_s: int


async def exchange(attempt: Callable[[httpx.Timeout], Awaitable[T]], *, deadline: float, peer: str,
                   options: RetryOptions) -> T:
    """`attempt(timeout)` until it returns, ending by `deadline` (the event loop's clock); `peer` names
    the backend in messages ("TF Serving at http://…")."""
    loop = asyncio.get_running_loop()
    attempts = 1 + max(0, options.retries)
    budget = max(0.0, deadline - loop.time())
    for try_number in range(attempts):
        remaining = max(0.001, deadline - loop.time())
        timeout = httpx.Timeout(remaining, connect=min(options.connect_timeout_s, remaining))
        try:
            async with asyncio.timeout_at(deadline):
                return await attempt(timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            backoff = options.retry_backoff_s * (2**try_number)
            if try_number + 1 < attempts and loop.time() + backoff < deadline:
                await asyncio.sleep(backoff)
                continue
            raise BackendUnavailableError(
                f"{peer} is unreachable ({reason(exc)}); try again shortly", retry_after_s=options.retry_after_s
            ) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise BackendUnavailableError(
                f"{peer} did not answer within {round(budget, 1):g} s", retry_after_s=options.retry_after_s,
                code="backend_timeout",
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailableError(
                f"the connection to {peer} failed ({reason(exc)})", retry_after_s=options.retry_after_s
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def reason(exc: BaseException) -> str:
    """An exception as a short reason for a message (its text, else its class name)."""
    return str(exc).strip() or type(exc).__name__
