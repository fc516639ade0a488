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
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Callable

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from .config import RolloutOptions
from .db import Database, bump_revision, iso
from .errors import BadRequestError, ConflictError, NotFoundError
from .models import Channel, Device, DeviceStatus, Model, RolloutEvent, utcnow
from .registry import find_model, find_version
from .serving_repo import ServedModel

log = logging.getLogger("sync_server.rollout")

CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_CHANNEL = "stable"
ACTIVE, PAUSED = "active", "paused"


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


def assigned_version(channel: Channel | None, model: str, device_id: str) -> tuple[int | None, bool]:
    """(version the device should run, whether that is a rollout candidate)."""
    if channel is None:
        return None, False
    if (
        channel.rollout_state == ACTIVE
        and channel.rollout_version is not None
        and bucket(device_id, model, channel.name, channel.rollout_version) < (channel.rollout_percent or 0.0)
    ):
        return channel.rollout_version, True
    return channel.version, False


def channel_view(model: str, channel: Channel) -> dict[str, Any]:
    rollout = None
    if channel.rollout_version is not None:
        rollout = {
            "version": channel.rollout_version,
            "percent": channel.rollout_percent,
            "state": channel.rollout_state,
            "reason": channel.rollout_reason,
            "started_at": iso(channel.rollout_started_at),
            "failure_threshold": channel.failure_threshold,
            "min_reports": channel.min_reports,
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

    def __init__(self, db: Database, options: RolloutOptions, on_change: Callable[[str], None] | None = None) -> None:
        self.db = db
        self.options = options
        self.on_change = on_change or (lambda _model: None)

    # --- reading --------------------------------------------------------------------------------

    def get(self, model: str, channel: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = self._channel(session, model, channel, create=False)
            view = channel_view(model, row)
            events = session.scalars(
                select(RolloutEvent).where(RolloutEvent.channel_id == row.id).order_by(RolloutEvent.id.desc()).limit(50)
            ).all()
            view["history"] = [
                {"action": e.action, "version": e.version, "percent": e.percent, "reason": e.reason, "at": iso(e.at)}
                for e in events
            ]
            view["devices"] = self._device_counts(session, row)
            return view

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
    ) -> dict[str, Any]:
        if not 0 < percent <= 100:
            raise BadRequestError(f"percent must be more than 0 and at most 100, got {percent}", code="bad_percent")

        def change(session: Session, row: Channel) -> None:
            find_version(session, model, version)
            if row.version == version:
                raise ConflictError(f"version {version} is already the version of channel {channel!r}", code="already_current")
            if row.rollout_version != version:
                row.rollout_version = version
                row.rollout_state = ACTIVE
                row.rollout_reason = None
                row.rollout_started_at = utcnow()
            row.rollout_percent = float(percent)
            row.failure_threshold = self.options.failure_threshold if failure_threshold is None else failure_threshold
            row.min_reports = self.options.min_reports if min_reports is None else min_reports
            _event(session, row, "rollout", version, percent, None)

        return self._change(model, channel, change, create=True)

    def promote(self, model: str, channel: str) -> dict[str, Any]:
        def change(session: Session, row: Channel) -> None:
            candidate = _require_rollout(row, channel)
            row.previous_version = row.version
            row.version = candidate
            _clear_rollout(row)
            _event(session, row, "promote", candidate, 100.0, None)

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
            row.rollout_started_at = utcnow()  # failures are counted afresh
            _event(session, row, "resume", candidate, row.rollout_percent, None)

        return self._change(model, channel, change)

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

    def check_failures(self, session: Session, model: Model, channel_name: str, version: int) -> str | None:
        """Pause the rollout of `version` on the channel if too many devices report failures or rollbacks.

        Runs inside the caller's write transaction (a status report); returns the pause reason, if any.
        """
        row = session.scalar(
            select(Channel).where(Channel.model_id == model.id, Channel.name == channel_name).with_for_update()
        )
        if row is None or row.rollout_state != ACTIVE or row.rollout_version != version:
            return None
        failed = or_(
            DeviceStatus.load_ok.is_(False), DeviceStatus.smoke_test_ok.is_(False), DeviceStatus.rolled_back.is_(True)
        )
        query = (
            select(func.count(), func.coalesce(func.sum(case((failed, 1), else_=0)), 0))
            .select_from(DeviceStatus)
            .join(Device, Device.id == DeviceStatus.device_id)
            .where(
                Device.model_id == model.id,
                Device.channel == channel_name,
                DeviceStatus.version == version,
                DeviceStatus.reported_at >= row.rollout_started_at,
            )
        )
        reports, failures = session.execute(query).one()
        threshold = self.options.failure_threshold if row.failure_threshold is None else row.failure_threshold
        minimum = self.options.min_reports if row.min_reports is None else row.min_reports
        if reports < max(1, minimum) or failures / reports <= threshold:
            return None
        reason = (
            f"paused automatically: {failures} of {reports} devices failed to load, failed to smoke-test or rolled "
            f"back version {version} ({failures / reports:.0%}, above the {threshold:.0%} threshold)"
        )
        row.rollout_state = PAUSED
        row.rollout_reason = reason
        row.updated_at = utcnow()
        _event(session, row, "auto_pause", version, row.rollout_percent, reason)
        bump_revision(session)
        log.warning("rollout paused", extra={"model": model.name, "channel": channel_name, "version": version, "reason": reason})
        return reason

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
            return [channel_view(name, channel) for name, channel in rows]

    # --- internals ------------------------------------------------------------------------------

    def _change(self, model: str, channel: str, change: Callable[[Session, Channel], None], *, create: bool = False) -> dict[str, Any]:
        check_channel_name(channel)
        with self.db.write() as session:
            row = self._channel(session, model, channel, create=create, lock=True)
            change(session, row)
            row.updated_at = utcnow()
            bump_revision(session)
            session.flush()
            view = channel_view(model, row)
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
    def _device_counts(session: Session, row: Channel) -> dict[str, int]:
        """Devices of this channel per assigned version."""
        model_name = session.scalar(select(Model.name).where(Model.id == row.model_id)) or ""
        ids = session.scalars(
            select(Device.id).where(Device.model_id == row.model_id, Device.channel == row.name, Device.revoked.is_(False))
        ).all()
        counts: dict[str, int] = {}
        for device_id in ids:
            version, _ = assigned_version(row, model_name, device_id)
            key = "none" if version is None else str(version)
            counts[key] = counts.get(key, 0) + 1
        return counts


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


def _event(session: Session, row: Channel, action: str, version: int | None, percent: float | None, reason: str | None) -> None:
    session.add(RolloutEvent(channel_id=row.id, action=action, version=version, percent=percent, reason=reason))

