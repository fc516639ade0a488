"""`ServerConfig`: every option of the sync server, from defaults, `SYNC_SERVER_*` variables and flags.

One table (`SETTINGS`) names each option once: its field in the config, its command-line flag, its
environment variable, how to parse it and its help text. The CLI builds its flags from that table, so a
flag and its variable cannot drift apart. Precedence: flag, then environment variable, then default.
"""

from __future__ import annotations

import argparse
import os
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

ENV_PREFIX = "SYNC_SERVER_"
#: The backends' protocols (`--backend-protocol`); the first is the default.
BACKEND_PROTOCOLS = ("tf-serving-rest", "tf-serving-grpc", "oip")
DATA_DIR_ENV = ENV_PREFIX + "DATA_DIR"

MiB = 1 << 20


def default_data_dir() -> Path:
    """`$SYNC_SERVER_DATA_DIR`, else `$XDG_DATA_HOME/edge-classify/sync-server`, else under ~/.local/share."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edge-classify" / "sync-server"


@dataclass(frozen=True)
class BatchingOptions:
    """How concurrent predictions are combined into one backend call, only when there is load.

    With no batch of a model version running, a photo goes at once (no wait at low load). While
    `num_batch_threads` batches run, photos queue and go together as the next batch when one ends;
    while some but not all run, a batch waits up to `max_wait_ms` to fill (never past a deadline).
    A batch holds at most `max_batch_size` photos.
    """

    enabled: bool = True
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    num_batch_threads: int = 2


@dataclass(frozen=True)
class UploadLimits:
    """The largest request bodies the server reads; larger ones get 413 before they are stored."""

    max_upload_bytes: int = 1024 * MiB  # a publish: bundle + SavedModel archives together
    max_image_bytes: int = 20 * MiB  # one photo for the fallback
    max_image_pixels: int = 50_000_000  # checked from the header, before decoding
    # A fallback needs a few hundred pixels: a JPEG decodes at 1/8 scale (a 50 MP one: 0.8 MP), but
    # PNG, WebP, BMP and GIF decode at full size, so they get this lower limit (16 MP: any phone's
    # full-size still; 64 MB as RGBA).
    max_decoded_pixels: int = 16_000_000
    decode_budget_bytes: int = 512 * MiB  # decoded pixels of all photos being prepared at once
    decode_wait_s: float = 2.0  # longest a photo waits for room in the budget before 503 busy
    max_json_bytes: int = 1 * MiB  # status, telemetry and admin calls


@dataclass(frozen=True)
class TFServingOptions:
    """Where the full-model backend runs and how to talk to it. Without `url` the embedded predictor answers.

    `protocol` is how: TF Serving's REST API (`http://host:8501`), TF Serving's gRPC API
    (`grpc://host:8500` or `host:8500`) or the Open Inference Protocol (`http://host:8080`).
    """

    url: str | None = None
    protocol: str = "tf-serving-rest"  # one of BACKEND_PROTOCOLS
    base_path: str | None = None  # the model repository as TF Serving sees it (default: our local path)
    timeout_s: float = 10.0  # one predict call
    connect_timeout_s: float = 1.0
    retries: int = 2  # extra tries after a connection error (never after TF Serving answered)
    retry_backoff_s: float = 0.05
    retry_after_s: int = 5  # what a 503 tells the device
    load_timeout_s: float = 300.0  # how long to wait for a version to load before leaving its label as it was
    status_poll_s: float = 1.0  # how often to ask TF Serving whether a version is loaded
    watch_s: float = 5.0  # how often to check that TF Serving still holds the labelled versions (a restart forgets them)


@dataclass(frozen=True)
class RolloutOptions:
    """When a staged rollout pauses itself: more than `failure_threshold` of at least `min_reports` reports failed."""

    failure_threshold: float = 0.2
    min_reports: int = 5
    #: Seconds between two evaluations of a channel's quality gates after telemetry reports (a flood of
    #: reports costs one evaluation per channel per this many seconds; 0: after every report).
    quality_check_s: float = 5.0
    #: Gate the promotion of every canary rollout on quality, not only shadow rollouts and rollouts
    #: started with `gates` (a failed gate pauses any rollout either way).
    gate_every_rollout: bool = False


#: The quality gates' fields that are margins or limits on a rate (0..1).
_GATE_RATES = ("max_fallback_rate_increase", "max_low_confidence_increase", "max_disagreement_increase",
               "min_shadow_agreement", "max_class_jsd")


@dataclass(frozen=True)
class QualityGates:
    """When a rollout's version may move on (shadow -> canary -> the channel) and when it pauses itself.

    Figures are taken over the last `window_s` seconds since the rollout (re)started; each gate judges
    only when both sides have at least `min_predictions` (else "not enough data": a step is refused, a
    rollout never pauses for it). Increases are absolute, candidate minus the channel's current version;
    `max_class_jsd` is the Jensen-Shannon divergence (base 2, 0..1) of the candidate's predicted classes
    from its bundle baseline; `max_input_shift` the largest per-channel mean shift in baseline stds.
    """

    window_s: float = 3600.0
    min_predictions: int = 200
    max_fallback_rate_increase: float = 0.05
    max_low_confidence_increase: float = 0.05
    max_disagreement_increase: float = 0.05
    min_shadow_agreement: float = 0.90
    max_class_jsd: float = 0.10
    max_input_shift: float = 1.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
                raise ConfigError(f"quality gate {item.name} must be a number of at least 0, got {value!r}")
            if item.name in _GATE_RATES and value > 1:
                raise ConfigError(f"quality gate {item.name} must be 0..1, got {value!r}")
        if self.window_s <= 0:
            raise ConfigError(f"quality gate window_s must be more than 0 seconds, got {self.window_s!r}")
        if int(self.min_predictions) != self.min_predictions or self.min_predictions < 1:
            raise ConfigError(f"quality gate min_predictions must be a whole number of at least 1, got {self.min_predictions!r}")

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "QualityGates":
        """These gates with some fields replaced (a rollout's own gates); ConfigError for an unknown field."""
        if not overrides:
            return self
        known = {item.name for item in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown quality gate {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return replace(self, **dict(overrides))

    @classmethod
    def parse(cls, text: str) -> "QualityGates":
        """Gates from JSON (`{"min_predictions": 500}`; missing fields keep their defaults) or a JSON file's path."""
        import json

        source = str(text).strip()
        if not source.startswith("{"):
            try:
                source = Path(source).expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise _BadValue(f"not a JSON object and not a readable file ({exc.strerror or exc})") from None
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise _BadValue(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, dict):
            raise _BadValue("must be a JSON object of gate fields")
        try:
            return cls().with_overrides(data)
        except ConfigError as exc:
            raise _BadValue(exc.message) from None


class _BadValue(ValueError, argparse.ArgumentTypeError):
    """A value a setting's parser refuses, with a message argparse shows as it is."""


@dataclass(frozen=True)
class ConnectionOptions:
    """How long a client may take to send its request, and how many connections are held at once.

    Request headers must arrive within `header_timeout_s` of the connection opening (or of the last
    response, on a kept-alive connection); a body gets `body_timeout_s` plus one second for every
    `body_min_bytes_per_s` bytes it delivered. At `max_connections` (0: derived from the descriptor
    limit) the connection waiting longest for its headers is closed to make room.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    body_min_bytes_per_s: int = 1024
    max_connections: int = 0
    keep_alive_s: int = 5


@dataclass(frozen=True)
class ThrottleOptions:
    """Token buckets per credential (device token, enrolment secret): `*_per_s` refill, `*_burst` size.

    Buckets live in each server instance (not shared between instances); 0 for a rate turns that
    limit off.
    """

    enabled: bool = True
    predict_per_s: float = 5.0
    predict_burst: int = 20
    reports_per_s: float = 0.5
    reports_burst: int = 60  # a device's outbox replays its backlog after an outage
    enroll_per_s: float = 10.0
    enroll_burst: int = 100
    max_tracked: int = 100_000  # credentials remembered at once (least recently used are forgotten)


@dataclass(frozen=True)
class RetentionOptions:
    """How long telemetry is kept: raw reports `telemetry_days`, their hourly rollups `rollup_days`.

    A background task deletes older rows every `interval_s`, at most `batch_rows` raw rows (or that
    many rollup rows' worth of hours) per transaction, so a large purge never holds a long lock.
    """

    telemetry_days: float = 14.0
    rollup_days: float = 400.0
    interval_s: float = 3600.0
    batch_rows: int = 5000


@dataclass(frozen=True)
class ServerConfig:
    """Everything the sync server needs to run; build it with `ServerConfig.load` or directly."""

    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # default: SQLite in the data directory
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None  # default: admin_token_file, else generated once into DATA/admin-token
    admin_token_file: Path | None = None  # a file holding the admin token (keeps it out of the process list)
    #: A fleet-wide enrolment secret, only when given: devices otherwise enrol with enrolment tokens
    #: (`sync-server enrollment-token create`), which expire and can be revoked.
    enrollment_secret: str | None = None
    publisher_keys: tuple[Path, ...] = ()  # trusted Ed25519 public keys (and every file in DATA/trusted-keys/)
    tf_serving: TFServingOptions = field(default_factory=TFServingOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    limits: UploadLimits = field(default_factory=UploadLimits)
    rollout: RolloutOptions = field(default_factory=RolloutOptions)
    quality_gates: QualityGates = field(default_factory=QualityGates)
    connections: ConnectionOptions = field(default_factory=ConnectionOptions)
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)
    retention: RetentionOptions = field(default_factory=RetentionOptions)
    predict_deadline_s: float | None = None  # a fallback prediction's deadline (default: the TF Serving timeout)
    push_poll_s: float = 1.0  # how often to look for changes made by other server instances
    sse_keepalive_s: float = 15.0
    embedded_max_loaded: int = 4  # SavedModels the embedded predictor keeps in memory
    embedded_preload: bool = True  # load the versions channels use as soon as they are set
    auto_migrate: bool = True
    log_level: str = "info"
    log_format: str = "json"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "publisher_keys", tuple(Path(p).expanduser() for p in self.publisher_keys))
        _check(self)

    # --- derived paths ------------------------------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        """`database_url`, or the embedded SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'sync-server.db'}"

    @property
    def prediction_deadline_s(self) -> float:
        """Seconds a fallback prediction may take from arrival: `predict_deadline_s`, else the TF Serving timeout."""
        return self.predict_deadline_s or self.tf_serving.timeout_s

    @property
    def uses_tf_serving(self) -> bool:
        """True when a TF Serving (REST or gRPC) answers: it loads versions from the config file we write."""
        return bool(self.tf_serving.url) and self.tf_serving.protocol.startswith("tf-serving")

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def serving_dir(self) -> Path:
        """Holds the TF Serving model repository (`models/NAME/VERSION/`) and `models.config`."""
        return self.data_dir / "tf-serving"

    @property
    def trusted_keys_dir(self) -> Path:
        return self.data_dir / "trusted-keys"

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> "ServerConfig":
        """Defaults, overridden by `SYNC_SERVER_*` variables, overridden by `flags` (setting name -> value).

        `flags` holds already-parsed values keyed by setting name (the `dest` of each CLI flag);
        None means "not given". Raises ConfigError naming the variable or flag that is wrong.
        """
        environ = os.environ if environ is None else environ
        flags = flags or {}
        values: dict[str, Any] = {}
        given: dict[str, str] = {}  # setting name -> the variable that set it (two settings may share a name)
        for setting in SETTINGS:
            if flags.get(setting.name) is not None:
                values[setting.name] = flags[setting.name]
            elif setting.env in environ and environ[setting.env] != "":
                try:
                    value = setting.parse(environ[setting.env])
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"{setting.env}={environ[setting.env]!r}: {exc}") from None
                if setting.name in given and values[setting.name] != value:
                    raise ConfigError(f"{given[setting.name]} and {setting.env} disagree; set one of them")
                values[setting.name], given[setting.name] = value, setting.env
        return build_config(values)

    def with_secrets(self) -> "ServerConfig":
        """This config with the admin token and enrolment secret filled in from the data directory.

        Missing secrets are generated once (random, 0600 files) so that a server on embedded defaults
        is never open; `sync-server path` prints where they are.
        """
        admin = self.admin_token or (_file_secret(self.admin_token_file, "admin token") if self.admin_token_file else None)
        admin = admin or _stored_secret(self.data_dir / "admin-token")
        return replace(self, admin_token=admin)  # no fleet enrolment secret unless one was given


# ----------------------------------------------------------------------------------------------------------
# The settings table
# ----------------------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected on/off, true/false, yes/no or 1/0")


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in str(text).split(os.pathsep) if p)


@dataclass(frozen=True)
class Setting:
    """One option: `name` is the dotted field in ServerConfig (`batching.max_batch_size`)."""

    name: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.lstrip("-").replace("-", "_").upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "--data-dir", Path, "where the database, artifacts and TF Serving repository live", "DIR"),
    Setting("database_url", "--database-url", str, "SQLAlchemy URL, e.g. postgresql+psycopg://host/db (default: SQLite in the data dir)", "URL"),
    Setting("host", "--host", str, "address to listen on (default 127.0.0.1)"),
    Setting("port", "--port", int, "port to listen on (default 8080)"),
    Setting("admin_token", "--admin-token", str, "bearer token for admin calls; visible in the process list, prefer --admin-token-file or the variable (default: generated into DATA/admin-token)", "TOKEN"),
    Setting("admin_token_file", "--admin-token-file", Path, "file holding the admin token", "FILE"),
    Setting("enrollment_secret", "--enrollment-secret", str, "a fleet-wide secret devices may enrol with (default: none; devices enrol with tokens from 'sync-server enrollment-token create')", "SECRET"),
    Setting("publisher_keys", "--publisher-keys", _paths, f"trusted Ed25519 public key files, separated by '{os.pathsep}' (plus every file in DATA/trusted-keys/)", "PATHS"),
    Setting("tf_serving.url", "--tf-serving-url", str, "TF Serving REST address, e.g. http://tf-serving:8501 (default: embedded predictor; same as --backend-url)", "URL"),
    Setting("tf_serving.url", "--backend-url", str, "the full-model backend's address: http://tf-serving:8501 (REST, OIP) or grpc://tf-serving:8500 (default: embedded predictor)", "URL"),
    Setting("tf_serving.protocol", "--backend-protocol", str, "how to talk to --backend-url: tf-serving-rest, tf-serving-grpc or oip (default tf-serving-rest)", "PROTOCOL"),
    Setting("tf_serving.base_path", "--tf-serving-base-path", str, "the model repository's path as TF Serving sees it (default: the local path)", "PATH"),
    Setting("tf_serving.timeout_s", "--tf-serving-timeout", float, "seconds one TF Serving predict call may take (default 10)", "S"),
    Setting("tf_serving.retries", "--tf-serving-retries", int, "retries after a connection error (default 2)", "N"),
    Setting("tf_serving.retry_after_s", "--retry-after", int, "Retry-After seconds sent with 503 when the backend is down (default 5)", "S"),
    Setting("tf_serving.load_timeout_s", "--tf-serving-load-timeout", float, "seconds to wait for TF Serving to load a version before giving up on its label (default 300)", "S"),
    Setting("tf_serving.status_poll_s", "--tf-serving-status-poll", float, "seconds between model status checks while a version loads (default 1)", "S"),
    Setting("tf_serving.watch_s", "--tf-serving-watch", float, "seconds between checks that TF Serving still holds the versions in use; after a restart the config is rewritten (default 5)", "S"),
    Setting("batching.enabled", "--batching", _bool, "combine concurrent predictions into batches: on or off (default on)", "on|off"),
    Setting("batching.max_batch_size", "--max-batch-size", int, "largest batch (default 32)", "N"),
    Setting("batching.max_wait_ms", "--max-batch-wait-ms", float, "longest a batch waits to fill while another batch of its version runs; none when idle (default 2)", "MS"),
    Setting("batching.num_batch_threads", "--num-batch-threads", int, "batches of one model version running at once (default 2)", "N"),
    Setting("limits.max_upload_bytes", "--max-upload-bytes", int, "largest publish upload (default 1 GiB)", "BYTES"),
    Setting("limits.max_image_bytes", "--max-image-bytes", int, "largest photo for the fallback (default 20 MiB)", "BYTES"),
    Setting("limits.max_image_pixels", "--max-image-pixels", int, "most pixels in a photo (default 50 million)", "N"),
    Setting("limits.max_decoded_pixels", "--max-decoded-pixels", int, "most pixels of a photo decoded at full size: PNG, WebP, BMP, GIF (default 16 million; JPEGs decode scaled)", "N"),
    Setting("limits.decode_budget_bytes", "--decode-budget", int, "bytes of decoded pixels of all photos being prepared at once (default 512 MiB)", "BYTES"),
    Setting("limits.decode_wait_s", "--decode-wait", float, "seconds a photo waits for room in the decode budget before 503 busy (default 2)", "S"),
    Setting("rollout.failure_threshold", "--rollout-failure-threshold", float, "failed fraction of device reports that pauses a rollout (default 0.2)", "F"),
    Setting("rollout.min_reports", "--rollout-min-reports", int, "reports needed before a rollout can pause itself (default 5)", "N"),
    Setting("quality_gates", "--quality-gates", QualityGates.parse, "a rollout's quality gates as JSON or a JSON file, e.g. '{\"min_predictions\": 500, \"max_class_jsd\": 0.2}' (fields: window_s, min_predictions, max_fallback_rate_increase, max_low_confidence_increase, max_disagreement_increase, min_shadow_agreement, max_class_jsd, max_input_shift)", "JSON|FILE"),
    Setting("quality_gates.min_predictions", "--gate-min-predictions", int, "predictions each side needs before a quality gate judges (default 200)", "N"),
    Setting("quality_gates.window_s", "--gate-window", float, "seconds of telemetry the quality gates look at (default 3600)", "S"),
    Setting("rollout.gate_every_rollout", "--gate-every-rollout", _bool, "promoting any canary rollout waits for its quality gates, not only shadow rollouts and rollouts started with gates: on or off (default off)", "on|off"),
    Setting("rollout.quality_check_s", "--quality-check-interval", float, "seconds between two quality-gate checks of one channel after telemetry reports (default 5; 0: every report)", "S"),
    Setting("push_poll_s", "--push-poll", float, "seconds between checks for changes made by other instances (default 1)", "S"),
    Setting("embedded_max_loaded", "--embedded-max-loaded", int, "SavedModels the embedded predictor keeps loaded (default 4)", "N"),
    Setting("embedded_preload", "--embedded-preload", _bool, "load versions in use before their first request: on or off (default on)", "on|off"),
    Setting("auto_migrate", "--auto-migrate", _bool, "upgrade the database schema at start: on or off (default on)", "on|off"),
    Setting("log_level", "--log-level", str, "debug, info, warning or error (default info)", "LEVEL"),
    Setting("log_format", "--log-format", str, "json (one object a line) or text (default json)", "FORMAT"),
    Setting("predict_deadline_s", "--predict-deadline", float, "seconds a fallback prediction may take, queue included; later it gets 503 (default: the TF Serving timeout)", "S"),
    Setting("connections.header_timeout_s", "--header-timeout", float, "seconds a client has to send its request headers (default 10)", "S"),
    Setting("connections.body_timeout_s", "--body-timeout", float, "seconds a request body may take, plus 1 s per --body-min-rate bytes received (default 30)", "S"),
    Setting("connections.body_min_bytes_per_s", "--body-min-rate", int, "bytes per second a slow body must keep up to earn more time (default 1024)", "BYTES"),
    Setting("connections.max_connections", "--max-connections", int, "connections held at once (default 0: the descriptor limit less a quarter of it, at least 96)", "N"),
    Setting("connections.keep_alive_s", "--keep-alive-timeout", int, "seconds an idle kept-alive connection stays open (default 5)", "S"),
    Setting("throttle.enabled", "--throttle", _bool, "rate-limit predictions, reports and enrolment per credential: on or off (default on)", "on|off"),
    Setting("throttle.predict_per_s", "--predict-rate", float, "fallback predictions per second per device (default 5; 0: no limit)", "R"),
    Setting("throttle.predict_burst", "--predict-burst", int, "fallback predictions a device may send at once (default 20)", "N"),
    Setting("throttle.reports_per_s", "--report-rate", float, "status and telemetry reports per second per device (default 0.5; 0: no limit)", "R"),
    Setting("throttle.reports_burst", "--report-burst", int, "reports a device may send at once (default 60)", "N"),
    Setting("throttle.enroll_per_s", "--enroll-rate", float, "enrolments per second per enrolment credential (default 10; 0: no limit)", "R"),
    Setting("throttle.enroll_burst", "--enroll-burst", int, "enrolments one credential may make at once (default 100)", "N"),
    Setting("retention.telemetry_days", "--telemetry-retention-days", float, "days raw telemetry reports are kept; the hourly rollups keep their sums (default 14)", "DAYS"),
    Setting("retention.rollup_days", "--rollup-retention-days", float, "days the hourly telemetry rollups are kept (default 400)", "DAYS"),
    Setting("retention.interval_s", "--retention-interval", float, "seconds between deletions of expired telemetry (default 3600)", "S"),
)


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """A ServerConfig from setting names (dotted for nested options) and parsed values."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if "." in name:
            group, key = name.split(".", 1)
            nested.setdefault(group, {})[key] = value
        else:
            top[name] = value
    defaults = ServerConfig.__dataclass_fields__
    for group, changes in nested.items():
        factory = defaults[group].default_factory  # type: ignore[misc]
        top[group] = replace(top.get(group) or factory(), **changes)  # a whole group given (JSON) is the base
    try:
        return ServerConfig(**top)
    except TypeError as exc:
        raise ConfigError(f"bad server configuration: {exc}") from None


def _check(config: ServerConfig) -> None:
    def positive(value: float, what: str, allow_zero: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{what} must be a positive number, got {value!r}")

    if not 0 < config.port < 65536:
        raise ConfigError(f"the port must be 1..65535, got {config.port}")
    positive(config.batching.max_batch_size, "the maximum batch size")
    positive(config.batching.max_wait_ms, "the maximum batch wait", allow_zero=True)
    positive(config.batching.num_batch_threads, "the number of batch threads")
    positive(config.limits.max_upload_bytes, "the upload limit")
    positive(config.limits.max_image_bytes, "the photo size limit")
    positive(config.limits.max_image_pixels, "the photo pixel limit")
    positive(config.limits.max_decoded_pixels, "the decoded pixel limit")
    positive(config.limits.decode_budget_bytes, "the decode budget")
    positive(config.limits.decode_wait_s, "the decode wait", allow_zero=True)
    positive(config.tf_serving.timeout_s, "the TF Serving timeout")
    positive(config.tf_serving.retries, "the TF Serving retries", allow_zero=True)
    positive(config.push_poll_s, "the push poll interval")
    positive(config.embedded_max_loaded, "the number of loaded SavedModels")
    if config.predict_deadline_s is not None:
        positive(config.predict_deadline_s, "the prediction deadline")
    positive(config.connections.header_timeout_s, "the header timeout")
    positive(config.connections.body_timeout_s, "the body timeout")
    positive(config.connections.body_min_bytes_per_s, "the minimum body rate")
    positive(config.connections.max_connections, "the connection limit", allow_zero=True)
    positive(config.connections.keep_alive_s, "the keep-alive timeout")
    for what in ("predict", "reports", "enroll"):
        positive(getattr(config.throttle, f"{what}_per_s"), f"the {what} rate", allow_zero=True)
        positive(getattr(config.throttle, f"{what}_burst"), f"the {what} burst")
    positive(config.throttle.max_tracked, "the number of throttled credentials tracked")
    positive(config.rollout.quality_check_s, "the quality check interval", allow_zero=True)
    positive(config.retention.telemetry_days, "the telemetry retention (days)")
    positive(config.retention.rollup_days, "the rollup retention (days)")
    positive(config.retention.interval_s, "the retention interval")
    positive(config.retention.batch_rows, "the retention batch size")
    if not 0 <= config.rollout.failure_threshold <= 1:
        raise ConfigError(f"the rollout failure threshold must be 0..1, got {config.rollout.failure_threshold}")
    if config.tf_serving.protocol not in BACKEND_PROTOCOLS:
        raise ConfigError(f"the backend protocol must be one of {', '.join(BACKEND_PROTOCOLS)}, got {config.tf_serving.protocol!r}")
    if config.tf_serving.protocol == "tf-serving-grpc":
        if config.tf_serving.url is not None:
            from .predict.tf_serving_grpc import grpc_target

            grpc_target(config.tf_serving.url)  # ConfigError naming the address when it is not host:port
    elif config.tf_serving.url is not None and not config.tf_serving.url.startswith(("http://", "https://")):
        raise ConfigError(f"the TF Serving URL must start with http:// or https://, got {config.tf_serving.url!r}")
    if config.log_format not in ("json", "text"):
        raise ConfigError(f"the log format must be json or text, got {config.log_format!r}")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"the log level must be debug, info, warning or error, got {config.log_level!r}")
    for name in ("admin_token", "enrollment_secret"):
        value = getattr(config, name)
        if value is not None and len(value) < 16:
            raise ConfigError(f"the {name.replace('_', ' ')} must be at least 16 characters")


def _file_secret(path: Path, what: str) -> str:
    """The secret in a file the operator named (first line, stripped); ConfigError when unusable."""
    try:
        value = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if len(value) < 16:
        raise ConfigError(f"the {what} in {path} must be at least 16 characters")
    return value


def _stored_secret(path: Path) -> str:
    """The secret in `path`, created (random, mode 0600) the first time."""
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    value = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process was faster: use its secret
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


def config_fields() -> list[str]:
    """Names of ServerConfig's top-level fields (for docs and tests)."""
    return [f.name for f in fields(ServerConfig)]
