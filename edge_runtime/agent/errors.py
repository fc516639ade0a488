"""The errors of the edge agent, under the edge runtime's `EdgeRuntimeError`.

    AgentError                   base of everything `edge_runtime.agent` raises
    ├── NotEnrolledError         the device has no identity yet (run `edge-agent enroll`)
    ├── ServerUnreachableError   the sync server could not be reached in time (offline, refused, timeout),
    │                            also after the bounded retries ran out
    ├── ServerRejectedError      the server answered with an error (`status`, `code`): bad secret, revoked, ...
    ├── DownloadError            a file could not be downloaded, or its size or sha256 is not the announced one
    │   ├── DiskFullError        the device's disk has no room for it (ENOSPC, a short write, or too little
    │                            free space for the declared size): never a fault of the release
    │   └── DownloadSupersededError  a newer assignment came during the download (its part file stays)
    └── UpdateRefusedError       a candidate version failed a step (files, signature, load, smoke test);
                                 the device keeps serving the version it has

Mistakes of the caller (bad options) are `ValueError`s; failures of the world are the branches above.
"""

from __future__ import annotations

from ..errors import EdgeRuntimeError


class AgentError(EdgeRuntimeError):
    """Base class of the errors raised by `edge_runtime.agent`."""


class NotEnrolledError(AgentError):
    """Raised when the device has no stored identity."""


class ServerUnreachableError(AgentError):
    """Raised when the sync server cannot be reached, or did not answer within the timeout."""


class ServerRejectedError(AgentError):
    """Raised when the sync server answered with an HTTP error; `code` is its machine-readable error code."""

    def __init__(self, message: str, *, status: int, code: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s  # the server's Retry-After (429, 503), in seconds

    @property
    def permanent(self) -> bool:
        """True when asking again cannot help (4xx other than 408/429)."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


class DownloadError(AgentError):
    """Raised when a file cannot be downloaded, or does not match its announced size or sha256."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class DiskFullError(DownloadError):
    """Raised when the store's file system has no room: ENOSPC, a short write, or less free space than a
    download needs. Reported as `disk_full`, never as a bad release; the agent retries when space returns.

    `needed` and `free` are bytes (None where unknown).
    """

    def __init__(self, message: str, *, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(message, corrupt=False)
        self.needed = needed
        self.free = free


class DownloadSupersededError(DownloadError):
    """Raised when a newer assignment arrived during a download: it stops, its part file stays for later."""


class UpdateRefusedError(AgentError):
    """Raised when a candidate version fails verification, loading or its smoke test.

    `step` names the step ("files", "signature", "load", "smoke_test"); `load_ok` and `smoke_test_ok`
    are what the status report to the server says. `retry_s` is set for a transient reason (the agent
    died while loading it): the version is tried again after that many seconds.
    """

    def __init__(self, message: str, *, step: str, load_ok: bool, smoke_test_ok: bool | None,
                 retry_s: float | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.load_ok = load_ok
        self.smoke_test_ok = smoke_test_ok
        self.retry_s = retry_s
