"""Channels and staged rollouts: which version each device of a channel should run.

A channel (`stable`, `canary`, any name) of a model has a `version` and may have a staged rollout: a
candidate version sent to `percent` of the channel's devices. Which devices is decided by
`bucket(device, model, channel, candidate)`, a number in [0, 100) from a hash of the device id: a
device is in the rollout when its bucket is below the percentage, so raising the percentage only adds
devices and no device flips back and forth.

    set       the channel's version, now (a rollout in progress is dropped)
    rollout   start a rollout of a candidate to a percentage, or change its percentage
    promote   the candidate becomes the channel's version for every device
    pause     the candidate goes to no device (devices fall back to the channel's version); resumable
    resume    the paused rollout goes on, counting failures afresh
    rollback  drop the rollout; with none, go back to the channel's previous version

Every call takes effect at once: it bumps the shared assignment revision, which wakes the push
streams (here and on other instances) and the TF Serving reconciler. A rollout whose devices report
failures above `failure_threshold` (after at least `min_reports` reports) pauses itself; a failure is a
version that did not load, failed its smoke test, or that the device rolled back.

A rollout has a mode. `canary` (the default) serves the candidate to its share of devices. `shadow`
serves them the channel's version as before and gives them the candidate as their `shadow`, to run on
`sample_rate` of their requests off the request path and report about (telemetry mode "shadow").
Shadow -> canary (`rollout` again with mode canary) and canary -> the channel (`promote`) are gated
on quality (`gates.evaluate_gates`) unless forced; after telemetry about the candidate, a failed gate
pauses the rollout with its reason (`check_quality`, at most once per channel per `quality_check_s`).
Events: set, rollout, shadow, canary, promote, pause, resume, shadow_resume, auto_pause, gate_pause,
rollback.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from .config import QualityGates, RolloutOptions
from .db import Database, as_utc, bump_revision, iso
from .errors import BadRequestError, ConfigError, ConflictError, NotFoundError
from .models import Channel, Device, DeviceStatus, Model, RolloutEvent, utcnow
from .registry import find_model, find_version
from .serving_repo import ServedModel

if TYPE_CHECKING:
    from .gates import GateResult

log = logging.getLogger("sync_server.rollout")

CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_CHANNEL = "stable"
ACTIVE, PAUSED = "active", "paused"
CANARY, SHADOW = "canary", "shadow"
MODES = (CANARY, SHADOW)
DEFAULT_SAMPLE_RATE = 0.1


class GateNotMetError(ConflictError):
    """Raised when a gated step (shadow -> canary, promote) finds the quality gates not met (409 `gate_not_met`)."""

    def __init__(self, message: str, result: "GateResult") -> None:
        super().__init__(message, code="gate_not_met")
        self.result = result

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["error"]["gates"] = self.result.to_dict()
        return body


def check_channel_name(name: str) -> str:
    if not CHANNEL_PATTERN.match(name):
        raise BadRequestError(
            f"channel name {name!r} is not usable: lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters",
            code="bad_channel",
        )
    return name


def bucket(device_id: str, model: str, channel: str, version: int) -> float:
    """Where a device falls in a rollout of `version`: a stable number in [0, 100)."""
    digest = hashlib.sha256(f"{model}\0{channel}\0{version}\0{device_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def rollout_mode(channel: Any) -> str:
    """The mode of a channel's rollout (`canary` for rollouts made before modes existed)."""
    return getattr(channel, "rollout_mode", None) or CANARY


def in_cohort(channel: Any, model: str, device_id: str) -> bool:
    """True when the device's bucket is below the rollout's percentage (whatever its state and mode)."""
    return channel.rollout_version is not None and (
        bucket(device_id, model, channel.name, channel.rollout_version) < (channel.rollout_percent or 0.0)
    )


def assigned_version(channel: Channel | None, model: str, device_id: str) -> tuple[int | None, bool]:
    """(version the device should run, whether that is a rollout candidate). A shadow rollout's
    candidate is never the version a device runs (see `assigned_shadow`)."""
    if channel is None:
        return None, False
    if channel.rollout_state == ACTIVE and rollout_mode(channel) == CANARY and in_cohort(channel, model, device_id):
        return channel.rollout_version, True
    return channel.version, False


def assigned_shadow(channel: Any, model: str, device_id: str) -> tuple[int, float] | None:
    """(version, sample rate) the device should run in shadow beside its version, or None."""
    if channel is None or channel.rollout_state != ACTIVE or rollout_mode(channel) != SHADOW:
        return None
    if not in_cohort(channel, model, device_id):
        return None
    rate = channel.rollout_sample_rate
    return channel.rollout_version, DEFAULT_SAMPLE_RATE if rate is None else float(rate)


def channel_view(model: str, channel: Channel, gates: QualityGates | None = None,
                 options: RolloutOptions | None = None) -> dict[str, Any]:
    """The channel as the API shows it; `gates` are the server's, which the rollout's own override."""
    rollout = None
    if channel.rollout_version is not None:
        mode = rollout_mode(channel)
        rollout = {
            "version": channel.rollout_version,
            "percent": channel.rollout_percent,
            "state": channel.rollout_state,
            "reason": channel.rollout_reason,
            "started_at": iso(channel.rollout_started_at),
            "failure_threshold": channel.failure_threshold,
            "min_reports": channel.min_reports,
            "mode": mode,
            "sample_rate": (channel.rollout_sample_rate or DEFAULT_SAMPLE_RATE) if mode == SHADOW else None,
            "gated": _is_gated(channel, options),
            "gates": _gates_of(channel, gates).to_dict() if gates is not None else None,
            "gate_overrides": dict(channel.rollout_gates or {}),
        }
    return {
        "model": model,
        "channel": channel.name,
        "version": channel.version,
        "previous_version": channel.previous_version,
        "rollout": rollout,
        "updated_at": iso(channel.updated_at),
    }


class Rollouts:
    """Changes channels; `on_change(model)` runs after each committed change (push, TF Serving)."""

    def __init__(
        self,
        db: Database,
        options: RolloutOptions,
        on_change: Callable[[str], None] | None = None,
        gates: QualityGates | None = None,
    ) -> None:
        self.db = db
        self.options = options
        self.gates = gates or QualityGates()
        self.on_change = on_change or (lambda _model: None)
        self._quality_lock = threading.Lock()
        self._quality_checked: dict[tuple[str, str], float] = {}  # (model, channel) -> monotonic time
        #: (model, channel) -> the timer of the check that follows throttled reports, and its (version, mode).
        self._trailing: dict[tuple[str, str], tuple[threading.Timer, list[Any]]] = {}
        self._closed = False
        #: Quality evaluations made after telemetry (the throttle keeps it to one per channel per interval).
        self.quality_evaluations = 0

    # --- reading --------------------------------------------------------------------------------

    def get(self, model: str, channel: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = self._channel(session, model, channel, create=False)
            view = channel_view(model, row, self.gates, self.options)
            events = session.scalars(
                select(RolloutEvent).where(RolloutEvent.channel_id == row.id).order_by(RolloutEvent.id.desc()).limit(50)
            ).all()
            view["history"] = [
                {"action": e.action, "version": e.version, "percent": e.percent, "reason": e.reason, "at": iso(e.at)}
                for e in events
            ]
            view["devices"], view["shadow_devices"] = self._device_counts(session, row)
            return view

    def quality(self, model: str, channel: str) -> dict[str, Any]:
        """The quality gates' verdict on the channel's rollout now (what promote would say)."""
        with self.db.read() as session:
            row = self._channel(session, model, channel, create=False)
            _require_rollout(row, channel)
            return self._evaluate(session, row).to_dict()

    # --- changing -------------------------------------------------------------------------------

    def set_version(self, model: str, channel: str, version: int) -> dict[str, Any]:
        def change(session: Session, row: Channel) -> None:
            find_version(session, model, version)
            if row.version != version:
                row.previous_version = row.version
                row.version = version
            reason = None
            if row.rollout_version is not None:
                reason = f"the rollout of version {row.rollout_version} was replaced"
                _clear_rollout(row)
            _event(session, row, "set", version, None, reason)

        return self._change(model, channel, change, create=True)

    def start(
        self,
        model: str,
        channel: str,
        version: int,
        percent: float,
        *,
        failure_threshold: float | None = None,
        min_reports: int | None = None,
        mode: str = CANARY,
        sample_rate: float | None = None,
        gates: dict[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Start a rollout of `version` to `percent` of the channel's devices, change its percentage, or
        move a shadow rollout of the same version to canary (gated unless `force`).

        `gates` (field -> value) override the server's quality gates for this rollout; they are kept
        when a later call does not give them again.
        """
        if not 0 < percent <= 100:
            raise BadRequestError(f"percent must be more than 0 and at most 100, got {percent}", code="bad_percent")
        if mode not in MODES:
            raise BadRequestError(f"mode must be 'shadow' or 'canary', got {mode!r}", code="bad_mode")
        if sample_rate is not None and mode != SHADOW:
            raise BadRequestError("sample_rate is for shadow rollouts (mode 'shadow')", code="bad_mode")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise BadRequestError(f"sample_rate must be more than 0 and at most 1, got {sample_rate}", code="bad_sample_rate")
        if gates:
            try:
                self.gates.with_overrides(gates)
            except ConfigError as exc:
                raise BadRequestError(exc.message, code="bad_gates") from None

        def change(session: Session, row: Channel) -> None:
            find_version(session, model, version)
            if row.version == version:
                raise ConflictError(f"version {version} is already the version of channel {channel!r}", code="already_current")
            same = row.rollout_version == version
            was = rollout_mode(row) if same else None
            if same and was == CANARY and mode == SHADOW:
                raise ConflictError(
                    f"version {version} is already in a canary rollout on {channel!r}; a canary does not go back to "
                    "shadow (pause it, or roll it back and start a shadow rollout)",
                    code="bad_mode_change",
                )
            if gates is not None:
                row.rollout_gates = dict(gates)  # {} gates the rollout with the server's gates
            elif not same:
                row.rollout_gates = {} if mode == SHADOW else None  # a shadow is always gated
            reason = None
            if same and was == SHADOW and mode == CANARY:
                result = self._evaluate(session, row)  # the shadow's figures
                reason = self._gate_step(row, result, force, f"move version {version} from shadow to canary")
                if row.rollout_gates is None:
                    row.rollout_gates = {}  # its promotion is gated too
                action = "canary"
                row.rollout_state = ACTIVE
                row.rollout_reason = None
                row.rollout_started_at = utcnow()  # the canary's figures and failures count from here
                row.rollout_sample_rate = None
            elif not same:
                row.rollout_version = version
                row.rollout_state = ACTIVE
                row.rollout_reason = None
                row.rollout_started_at = utcnow()
                row.rollout_sample_rate = None
                action = "shadow" if mode == SHADOW else "rollout"
            else:
                action = "shadow" if mode == SHADOW else "rollout"
            row.rollout_mode = mode
            if mode == SHADOW:
                row.rollout_sample_rate = float(sample_rate) if sample_rate is not None else (
                    row.rollout_sample_rate if same and row.rollout_sample_rate is not None else DEFAULT_SAMPLE_RATE
                )
            row.rollout_percent = float(percent)
            row.failure_threshold = self.options.failure_threshold if failure_threshold is None else failure_threshold
            row.min_reports = self.options.min_reports if min_reports is None else min_reports
            _event(session, row, action, version, percent, reason)

        return self._change(model, channel, change, create=True)

    def promote(self, model: str, channel: str, *, force: bool = False) -> dict[str, Any]:
        """The candidate becomes the channel's version; gated on quality unless `force`."""

        def change(session: Session, row: Channel) -> None:
            candidate = _require_rollout(row, channel)
            reason = None
            if self._gated(row):
                result = self._evaluate(session, row)
                reason = self._gate_step(row, result, force, f"promote version {candidate} to channel {channel!r}")
            row.previous_version = row.version
            row.version = candidate
            _clear_rollout(row)
            _event(session, row, "promote", candidate, 100.0, reason)

        return self._change(model, channel, change)

    def pause(self, model: str, channel: str, reason: str | None = None) -> dict[str, Any]:
        def change(session: Session, row: Channel) -> None:
            candidate = _require_rollout(row, channel)
            if row.rollout_state == PAUSED:
                raise ConflictError(f"the rollout of version {candidate} on {channel!r} is already paused", code="already_paused")
            row.rollout_state = PAUSED
            row.rollout_reason = reason or "paused by an admin"
            _event(session, row, "pause", candidate, row.rollout_percent, row.rollout_reason)

        return self._change(model, channel, change)

    def resume(self, model: str, channel: str) -> dict[str, Any]:
        def change(session: Session, row: Channel) -> None:
            candidate = _require_rollout(row, channel)
            if row.rollout_state != PAUSED:
                raise ConflictError(f"the rollout of version {candidate} on {channel!r} is not paused", code="not_paused")
            row.rollout_state = ACTIVE
            row.rollout_reason = None
            row.rollout_started_at = utcnow()  # failures and quality figures are counted afresh
            action = "shadow_resume" if rollout_mode(row) == SHADOW else "resume"
            _event(session, row, action, candidate, row.rollout_percent, None)

        view = self._change(model, channel, change)
        with self._quality_lock:
            self._quality_checked.pop((model, channel), None)
        return view

    def rollback(self, model: str, channel: str) -> dict[str, Any]:
        def change(session: Session, row: Channel) -> None:
            if row.rollout_version is not None:
                candidate = row.rollout_version
                _clear_rollout(row)
                _event(session, row, "rollback", row.version, None, f"the rollout of version {candidate} was rolled back")
            elif row.previous_version is not None:
                bad = row.version
                row.version, row.previous_version = row.previous_version, None
                _event(session, row, "rollback", row.version, None, f"version {bad} was rolled back")
            else:
                raise ConflictError(
                    f"channel {channel!r} has no rollout and no previous version to roll back to", code="nothing_to_roll_back"
                )

        return self._change(model, channel, change)

    def check_failures(
        self, session: Session, model: Model, channel_name: str, version: int, *, shadow_version: int | None = None
    ) -> str | None:
        """Pause the rollout of `version` on the channel if too many devices report failures or rollbacks.

        A shadow rollout counts the status reports that say what became of its candidate
        (`details.shadow` = {"version": `shadow_version`, "state": running | declined | refused | failed},
        sent about the version the device serves): refused (did not verify, load or pass its smoke test,
        or crashed) and failed (errors on photos) are failures; declined (the device's resource policy
        said no) is no report. Runs inside the caller's write transaction (a status report); returns the
        pause reason, if any.
        """
        row = session.scalar(
            select(Channel).where(Channel.model_id == model.id, Channel.name == channel_name).with_for_update()
        )
        if row is None or row.rollout_state != ACTIVE:
            return None
        mode = rollout_mode(row)
        if mode == CANARY and row.rollout_version == version:
            failed = or_(
                DeviceStatus.load_ok.is_(False), DeviceStatus.smoke_test_ok.is_(False), DeviceStatus.rolled_back.is_(True)
            )
            about = DeviceStatus.version == version
            what = f"failed to load, failed to smoke-test or rolled back version {version}"
        elif mode == SHADOW and shadow_version is not None and row.rollout_version == shadow_version:
            state = DeviceStatus.details[("shadow", "state")].as_string()
            failed = state.in_(("refused", "failed"))
            about = (DeviceStatus.details[("shadow", "version")].as_integer() == shadow_version) & state.in_(
                ("running", "refused", "failed"))
            what = f"refused version {shadow_version} in shadow or failed running it"
            version = shadow_version
        else:
            return None
        query = (
            select(func.count(), func.coalesce(func.sum(case((failed, 1), else_=0)), 0))
            .select_from(DeviceStatus)
            .join(Device, Device.id == DeviceStatus.device_id)
            .where(
                Device.model_id == model.id,
                Device.channel == channel_name,
                about,
                DeviceStatus.reported_at >= row.rollout_started_at,
            )
        )
        reports, failures = session.execute(query).one()
        threshold = self.options.failure_threshold if row.failure_threshold is None else row.failure_threshold
        minimum = self.options.min_reports if row.min_reports is None else row.min_reports
        if reports < max(1, minimum) or failures / reports <= threshold:
            return None
        reason = (
            f"paused automatically: {failures} of {reports} devices {what} ({failures / reports:.0%}, above the "
            f"{threshold:.0%} threshold)"
        )
        row.rollout_state = PAUSED
        row.rollout_reason = reason
        row.updated_at = utcnow()
        _event(session, row, "auto_pause", version, row.rollout_percent, reason)
        bump_revision(session)
        log.warning("rollout paused", extra={"model": model.name, "channel": channel_name, "version": version, "reason": reason})
        return reason

    def check_quality(self, model: str, channel: str, version: int, mode: str = "serving") -> str | None:
        """After a telemetry report about `version` (`mode` "serving" or "shadow"): pause the channel's
        active rollout of it when a quality gate fails; returns the pause reason, if any.

        At most one evaluation per channel per `quality_check_s`: a report inside the interval is judged
        by one trailing evaluation at its end (the figures cover every report of the window, so none is
        left out, and a burst that ends is still judged). The figures are read in a read transaction;
        the pause, if any, happens in its own write transaction after checking that the rollout is
        still the one judged.
        """
        key = (model, channel)
        now = time.monotonic()
        with self._quality_lock:
            if self._closed:
                return None
            last = self._quality_checked.get(key)
            wait = 0.0 if last is None else self.options.quality_check_s - (now - last)
            if wait > 0:
                pending = self._trailing.get(key)
                if pending is not None:
                    pending[1][:] = [version, mode]  # the trailing check judges the latest report's rollout
                else:
                    timer = threading.Timer(wait, self._trailing_check, (key,))
                    timer.daemon = True
                    self._trailing[key] = (timer, [version, mode])
                    timer.start()
                return None
            self._quality_checked[key] = now
            if len(self._quality_checked) > 10_000:  # bounded: forget the oldest half
                for old in sorted(self._quality_checked, key=self._quality_checked.__getitem__)[:5_000]:
                    del self._quality_checked[old]
        return self._judge_quality(model, channel, version, mode)

    def close(self) -> None:
        """Cancel the trailing quality checks (the server is stopping)."""
        with self._quality_lock:
            self._closed = True
            timers = [timer for timer, _ in self._trailing.values()]
            self._trailing.clear()
        for timer in timers:
            timer.cancel()

    def _trailing_check(self, key: tuple[str, str]) -> None:
        with self._quality_lock:
            pending = self._trailing.pop(key, None)
            if pending is None or self._closed:
                return
            self._quality_checked[key] = time.monotonic()
            version, mode = pending[1]
        try:
            self._judge_quality(key[0], key[1], version, mode)
        except Exception as exc:  # noqa: BLE001  (a timer thread: log, the next report tries again)
            log.warning("could not check a rollout's quality gates: %s", getattr(exc, "message", None) or exc,
                        extra={"model": key[0], "channel": key[1], "version": version})

    def _judge_quality(self, model: str, channel: str, version: int, mode: str) -> str | None:
        wanted = SHADOW if mode == "shadow" else CANARY
        with self.db.read() as session:
            model_id = session.scalar(select(Model.id).where(Model.name == model))
            if model_id is None:
                return None
            row = session.scalar(select(Channel).where(Channel.model_id == model_id, Channel.name == channel))
            if row is None or row.rollout_state != ACTIVE or row.rollout_version != version or rollout_mode(row) != wanted:
                return None
            started = as_utc(row.rollout_started_at)
            with self._quality_lock:
                self.quality_evaluations += 1
            result = self._evaluate(session, row)
        if not result.failed:
            return None
        reason = "paused automatically: " + "; ".join(c.message for c in result.failed)
        with self.db.write() as session:
            row = session.scalar(
                select(Channel).where(Channel.model_id == model_id, Channel.name == channel).with_for_update()
            )
            if (row is None or row.rollout_state != ACTIVE or row.rollout_version != version
                    or rollout_mode(row) != wanted or as_utc(row.rollout_started_at) != started):
                return None  # changed meanwhile (paused, resumed, promoted): that judgement is moot
            row.rollout_state = PAUSED
            row.rollout_reason = reason
            row.updated_at = utcnow()
            _event(session, row, "gate_pause", version, row.rollout_percent, reason)
            bump_revision(session)
        log.warning("rollout paused", extra={"model": model, "channel": channel, "version": version, "mode": wanted,
                                             "reason": reason, "failed_gates": [c.gate for c in result.failed]})
        self.on_change(model)
        return reason

    # --- quality gates --------------------------------------------------------------------------

    def _evaluate(self, session: Session, row: Channel) -> "GateResult":
        """The gates' verdict on the channel's rollout: the candidate's figures (shadow reports in a
        shadow rollout, serving reports in a canary) against the channel's version's serving reports,
        both from this channel, over the last `window_s` and never from before the rollout (re)started.

        From a (re)start the window is exact (`rollout_quality.window_quality`): a resumed rollout is
        judged afresh. A window that only slides starts at the top of its hour (the rollups' resolution).
        """
        from .gates import evaluate_gates
        from .quality import version_quality
        from .rollout_quality import window_quality

        assert row.rollout_version is not None
        gates = _gates_of(row, self.gates)
        mode = rollout_mode(row)
        report_mode = "shadow" if mode == SHADOW else "serving"
        since = utcnow() - timedelta(seconds=gates.window_s)
        started = as_utc(row.rollout_started_at)
        if started is not None and started > since:
            candidate = window_quality(session, row.model_id, row.rollout_version, mode=report_mode, channel=row.name,
                                       since=started)
            current = None if row.version is None else window_quality(
                session, row.model_id, row.version, mode="serving", channel=row.name, since=started, distributions=False)
        else:
            candidate = version_quality(session, row.model_id, row.rollout_version, mode=report_mode, channel=row.name,
                                        since=since)
            current = None if row.version is None else version_quality(
                session, row.model_id, row.version, mode="serving", channel=row.name, since=since)
        return evaluate_gates(candidate, current, gates, mode=mode)

    def _gated(self, row: Channel) -> bool:
        """Whether the rollout's steps wait for its quality gates (a failed gate pauses any rollout)."""
        return _is_gated(row, self.options)

    @staticmethod
    def _gate_step(row: Channel, result: "GateResult", force: bool, step: str) -> str | None:
        """GateNotMetError unless the gates are met or `force`; the event's reason for a forced step."""
        if result.passed:
            return None
        if not force:
            raise GateNotMetError(
                f"cannot {step}: the quality gates are not met ({result.summary()}); wait for figures, or send "
                '{"force": true}',
                result,
            )
        log.warning("quality gates forced", extra={"channel": row.name, "version": row.rollout_version, "step": step,
                                                    "summary": result.summary()})
        return f"forced past the quality gates: {result.summary()}"

    # --- TF Serving -----------------------------------------------------------------------------

    def desired_serving(self) -> dict[str, ServedModel]:
        """Per model: the versions some channel uses (current, previous, candidate) and each channel's label."""
        with self.db.read() as session:
            rows = session.execute(select(Model.name, Channel).join(Channel, Channel.model_id == Model.id)).all()
            wanted: dict[str, tuple[set[int], dict[str, int]]] = {}
            for name, channel in rows:
                versions, labels = wanted.setdefault(name, (set(), {}))
                for v in (channel.version, channel.previous_version, channel.rollout_version):
                    if v is not None:
                        versions.add(v)
                if channel.version is not None:
                    labels[channel.name] = channel.version
            return {name: ServedModel(frozenset(v), labels) for name, (v, labels) in wanted.items() if v}

    def rollout_states(self) -> list[dict[str, Any]]:
        """Every channel with its rollout state, for metrics."""
        with self.db.read() as session:
            rows = session.execute(select(Model.name, Channel).join(Channel, Channel.model_id == Model.id)).all()
            return [channel_view(name, channel, self.gates, self.options) for name, channel in rows]

    # --- internals ------------------------------------------------------------------------------

    def _change(self, model: str, channel: str, change: Callable[[Session, Channel], None], *, create: bool = False) -> dict[str, Any]:
        check_channel_name(channel)
        with self.db.write() as session:
            row = self._channel(session, model, channel, create=create, lock=True)
            change(session, row)
            row.updated_at = utcnow()
            bump_revision(session)
            session.flush()
            view = channel_view(model, row, self.gates, self.options)
        log.info("channel changed", extra={"model": model, "channel": channel, "state": view})
        self.on_change(model)
        return view

    @staticmethod
    def _channel(session: Session, model: str, channel: str, *, create: bool, lock: bool = False) -> Channel:
        model_row = find_model(session, model)
        query = select(Channel).where(Channel.model_id == model_row.id, Channel.name == channel)
        row = session.scalar(query.with_for_update() if lock else query)
        if row is None:
            if not create:
                known = session.scalars(select(Channel.name).where(Channel.model_id == model_row.id).order_by(Channel.name)).all()
                raise NotFoundError(
                    f"model {model!r} has no channel {channel!r} (channels: {', '.join(known) or 'none'})", code="unknown_channel"
                )
            row = Channel(model_id=model_row.id, name=channel)
            session.add(row)
            session.flush()
        return row

    @staticmethod
    def _device_counts(session: Session, row: Channel) -> tuple[dict[str, int], dict[str, int]]:
        """Devices of this channel per assigned version, and per shadow version (a shadow rollout's cohort)."""
        model_name = session.scalar(select(Model.name).where(Model.id == row.model_id)) or ""
        ids = session.scalars(
            select(Device.id).where(Device.model_id == row.model_id, Device.channel == row.name, Device.revoked.is_(False))
        ).all()
        counts: dict[str, int] = {}
        shadows: dict[str, int] = {}
        for device_id in ids:
            version, _ = assigned_version(row, model_name, device_id)
            key = "none" if version is None else str(version)
            counts[key] = counts.get(key, 0) + 1
            shadow = assigned_shadow(row, model_name, device_id)
            if shadow is not None:
                shadows[str(shadow[0])] = shadows.get(str(shadow[0]), 0) + 1
        return counts, shadows


def _require_rollout(row: Channel, channel: str) -> int:
    if row.rollout_version is None:
        raise ConflictError(f"channel {channel!r} has no rollout in progress", code="no_rollout")
    return row.rollout_version


def _clear_rollout(row: Channel) -> None:
    row.rollout_version = None
    row.rollout_percent = None
    row.rollout_state = None
    row.rollout_reason = None
    row.rollout_started_at = None
    row.failure_threshold = None
    row.min_reports = None
    row.rollout_mode = None
    row.rollout_sample_rate = None
    row.rollout_gates = None


def _is_gated(row: Channel, options: RolloutOptions | None) -> bool:
    """Shadow rollouts, rollouts started with `gates` (even `{}`), and every rollout with
    `--gate-every-rollout on`: their steps wait for the quality gates."""
    return (rollout_mode(row) == SHADOW or row.rollout_gates is not None
            or bool(options is not None and options.gate_every_rollout))


def _gates_of(row: Channel, gates: QualityGates) -> QualityGates:
    """The server's gates with the rollout's own overrides."""
    overrides = getattr(row, "rollout_gates", None)
    return gates.with_overrides(overrides) if overrides else gates


def _event(session: Session, row: Channel, action: str, version: int | None, percent: float | None, reason: str | None) -> None:
    session.add(RolloutEvent(channel_id=row.id, action=action, version=version, percent=percent, reason=reason))

