"""`AgentOptions`: everything the agent can be told, as small composed dataclasses with named defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Where the local classification API listens by default: loopback only (it has no authentication).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
POLICIES = ("availability", "resource")
FALLBACK_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class RetryOptions:
    """Bounded retries: try `attempts` times, waiting base·2^n seconds (at most `max_s`), minus up to
    `jitter` of it at random so that a thousand devices do not retry in step."""

    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        _positive(self.attempts, "retry attempts")
        _positive(self.base_s, "the retry base delay")
        _positive(self.max_s, "the longest retry delay")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"the retry jitter must be between 0 and 1, got {self.jitter}")


@dataclass(frozen=True)
class TimeoutOptions:
    """Every network call has a timeout (seconds per connect or read), an overall deadline, and downloads a
    minimum throughput."""

    request_s: float = 10.0  # one JSON call: assignment, status, telemetry, enrolment
    download_s: float = 30.0  # silence while a file downloads
    stream_s: float = 45.0  # silence on the push stream before reconnecting (the server sends keepalives every 15 s)
    fallback_s: float = 2.0  # the whole exchange with the server's full model, per photo
    exchange_s: float = 30.0  # the whole of one JSON call (a dripping answer fails here), and of a stream's headers
    download_floor_bps: float = 4096.0  # a download slower than this over a window is abandoned (it resumes later)
    download_window_s: float = 30.0  # ... measured over this many seconds

    def __post_init__(self) -> None:
        for name in ("request_s", "download_s", "stream_s", "fallback_s", "exchange_s"):
            _positive(getattr(self, name), f"the {name[:-2]} timeout")
        _positive(self.download_floor_bps, "the download throughput floor")
        _positive(self.download_window_s, "the download throughput window")


@dataclass(frozen=True)
class HealthPolicy:
    """When a freshly switched-to version is rolled back on the device's own decision.

    For `probation_s` after a switch, the version is rolled back when more than `max_error_rate` of
    at least `min_requests` requests failed inside the model (bad photos do not count), or when the
    agent crashed `max_crashes` times while running it (or while loading it). Only a death while the
    version was inside the interpreter counts as a crash (a kill or power cut between calls does not);
    a version refused for crashes is tried again after `crash_retry_s`.
    """

    probation_s: float = 600.0
    min_requests: int = 20
    max_error_rate: float = 0.2
    max_crashes: int = 2
    #: A version refused for crashes (a transient reason) is tried again after this, doubling each time.
    crash_retry_s: float = 1800.0

    def __post_init__(self) -> None:
        _positive(self.probation_s, "the probation time")
        _positive(self.crash_retry_s, "the wait before a crashed version is tried again")
        _positive(self.min_requests, "the minimum number of requests")
        _positive(self.max_crashes, "the crash limit")
        if not 0 <= self.max_error_rate < 1:
            raise ValueError(f"the error rate limit must be in [0, 1), got {self.max_error_rate}")


@dataclass(frozen=True)
class ServeOptions:
    """The local HTTP API that apps on the device classify through."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    max_image_bytes: int = 20 * 1024 * 1024
    top_k: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"the port must be 0..65535, got {self.port}")
        _positive(self.max_image_bytes, "the photo size limit")
        _positive(self.top_k, "top_k")


@dataclass(frozen=True)
class ShadowOptions:
    """Whether and when this device runs a candidate in shadow beside the version it serves.

    A shadow version is downloaded, verified and loaded (one interpreter thread) only while the disk
    keeps `min_free_bytes` free after it and its model file is at most `max_model_bytes`; the
    resource-preserving policy never loads a second model. Sampled requests wait in a queue of
    `queue_size` photos for the one low-priority shadow thread; when it is full they are dropped (counted).
    """

    enabled: bool = True
    min_free_bytes: int = 64 * 1024 * 1024
    max_model_bytes: int = 256 * 1024 * 1024
    queue_size: int = 16

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0 or isinstance(self.min_free_bytes, bool):
            raise ValueError(f"the free disk a shadow version must leave must be >= 0 bytes, got {self.min_free_bytes!r}")
        _positive(self.max_model_bytes, "the largest shadow model")
        _positive(self.queue_size, "the shadow queue size")


@dataclass(frozen=True)
class SampleOptions:
    """Opt-in: keep the photos answered below the confidence threshold, for the next training set
    (see `samples.py`). `folder` None: off (the default); `max_bytes` bounds the folder (oldest dropped)."""

    folder: Path | None = None
    max_bytes: int = 100 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.folder is not None:
            object.__setattr__(self, "folder", Path(self.folder).expanduser())
        _positive(self.max_bytes, "the sample folder's byte budget")


@dataclass(frozen=True)
class AgentOptions:
    """How the agent runs. `home` is the device's model store (default `$EDGE_CLASSIFY_HOME`); the
    agent's own files live in `home/agent/` and partial downloads in `home/downloads/`."""

    home: Path | None = None
    public_key: Path | None = None  # default: $EDGE_CLASSIFY_PUBLIC_KEY, else home/trusted.pub
    serve: ServeOptions = field(default_factory=ServeOptions)
    push: bool = True  # listen to the server's event stream; False: poll only
    poll_interval_s: float = 30.0  # polling with If-None-Match while the stream is down (or push is off)
    policy: str = "availability"  # "availability": load new, then unload old; "resource": the reverse
    retry: RetryOptions = field(default_factory=RetryOptions)
    timeouts: TimeoutOptions = field(default_factory=TimeoutOptions)
    health: HealthPolicy = field(default_factory=HealthPolicy)
    fallback: str = "auto"  # ask the server's full model: when unsure, never, always
    fallback_threshold: float | None = None  # None: the model's own confidence threshold
    telemetry_period_s: float = 60.0
    outbox_max_rows: int = 100_000
    threads: int | None = None  # interpreter threads
    shadow: ShadowOptions = field(default_factory=ShadowOptions)
    samples: SampleOptions = field(default_factory=SampleOptions)  # keep low-confidence photos (off by default)

    def __post_init__(self) -> None:
        if self.home is not None:
            object.__setattr__(self, "home", Path(self.home).expanduser())
        if self.public_key is not None:
            object.__setattr__(self, "public_key", Path(self.public_key).expanduser())
        if self.policy not in POLICIES:
            raise ValueError(f"the policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACK_MODES)}, got {self.fallback!r}")
        if self.fallback_threshold is not None and not 0 <= self.fallback_threshold <= 1:
            raise ValueError(f"the fallback threshold must be between 0 and 1, got {self.fallback_threshold}")
        _positive(self.poll_interval_s, "the poll interval")
        _positive(self.telemetry_period_s, "the telemetry period")
        _positive(self.outbox_max_rows, "the outbox size")
        if self.threads is not None:
            _positive(self.threads, "threads")


def _positive(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
