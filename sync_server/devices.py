"""Devices: enrolment, token authentication, assignments, status reports and telemetry.

A device enrols once with the enrolment secret and gets an id and a token; the server keeps only the
token's SHA-256. Every later call carries `Authorization: Bearer TOKEN`. A device follows one model on
one channel; its assignment is the version `rollout.assigned_version` picks for it (and, in a shadow
rollout's cohort, the `shadow` version `rollout.assigned_shadow` picks), with an ETag that changes
exactly when the answer does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Database, as_utc, bump_revision, iso
from .errors import AuthenticationError, NotFoundError, PermissionDeniedError
from .models import Channel, Device, DeviceStatus, Model, RolloutEvent, utcnow
from .registry import files_view, find_model, find_version, require_version
from .rollout import (
    ACTIVE,
    CANARY,
    DEFAULT_CHANNEL,
    PAUSED,
    SHADOW,
    Rollouts,
    assigned_shadow,
    assigned_version,
    bucket,
    check_channel_name,
    in_cohort,
    rollout_mode,
)

log = logging.getLogger("sync_server.devices")

TOKEN_PREFIX = "dt_"
_LAST_SEEN_EVERY = timedelta(seconds=60)
#: Identities and channel states are cached this long at most; any change empties the cache at once
#: (here, or within `push_poll_s` when made by another instance).
_CACHE_TTL_S = 60.0


@dataclass(frozen=True)
class DeviceIdentity:
    """Who is calling: an authenticated, not revoked device."""

    id: str
    model: str
    model_id: int
    channel: str


@dataclass(frozen=True)
class Assignment:
    """What a device should run now; `etag` changes exactly when the rest does."""

    device_id: str
    model: str
    channel: str
    version: int | None
    rollout: bool
    etag: str
    shadow: int | None = None  # a shadow rollout's candidate, run beside `version` on a sample of requests
    shadow_sample_rate: float | None = None


@dataclass(frozen=True)
class ChannelState:
    """What an assignment needs of a channel, detached from the database session."""

    name: str
    version: int | None
    rollout_version: int | None
    rollout_percent: float | None
    rollout_state: str | None
    rollout_mode: str | None = None
    rollout_sample_rate: float | None = None

    @classmethod
    def of(cls, channel: Channel | None) -> "ChannelState | None":
        if channel is None:
            return None
        return cls(channel.name, channel.version, channel.rollout_version, channel.rollout_percent, channel.rollout_state,
                   channel.rollout_mode, channel.rollout_sample_rate)


def _assignment(device: DeviceIdentity, channel_name: str, channel: ChannelState | None) -> Assignment:
    version, in_rollout = assigned_version(channel, device.model, device.id)  # type: ignore[arg-type]
    shadow = assigned_shadow(channel, device.model, device.id)
    key = f"{device.model}|{channel_name}|{version}|{int(in_rollout)}"
    if shadow is not None:
        key += f"|shadow {shadow[0]} {shadow[1]!r}"
    etag = '"' + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + '"'
    if shadow is None:
        return Assignment(device.id, device.model, channel_name, version, in_rollout, etag)
    return Assignment(device.id, device.model, channel_name, version, in_rollout, etag, shadow[0], shadow[1])


@dataclass
class _Roster:
    """Every device of one model (channel, revoked) and its channels, read in one go for one generation
    of the caches: when a change wakes a thousand push streams, one thread reads them and the others
    wait for it instead of each asking the database."""

    generation: int
    expires: float
    ready: threading.Event
    devices: dict[str, tuple[str, bool]] | None = None
    channels: dict[str, ChannelState] | None = None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Devices:
    """Device records, their tokens, assignments and reports."""

    def __init__(self, db: Database, rollouts: Rollouts, enrollment_secret: str, on_change: Callable[[str], None] | None = None) -> None:
        self.db = db
        self.rollouts = rollouts
        self._enrollment_secret = enrollment_secret
        self.on_change = on_change or (lambda _model: None)
        self._lock = threading.Lock()
        self._generation = 0
        self._identities: dict[str, tuple[float, DeviceIdentity]] = {}
        self._channels: dict[tuple[int, str], tuple[float, ChannelState | None]] = {}
        self._views: dict[tuple[str, int], dict[str, Any]] = {}
        self._rosters: dict[int, _Roster] = {}
        self._seen_tried: dict[str, float] = {}
        self._last_seen_logged = -1e18
        #: `last_seen_at` writes that failed (full disk, database locked or down); authentication went on.
        self.last_seen_failures = 0

    # --- enrolment and authentication -----------------------------------------------------------

    def enroll(self, secret: str | None, model: str, channel: str | None, name: str | None) -> dict[str, Any]:
        """A new device id and token, for an enrolment token (`et_...`, see `enrollment.py`) that is
        valid for this model, or for the fleet-wide enrolment secret when the server was given one."""
        from .enrollment import TOKEN_PREFIX as ENROLLMENT_TOKEN_PREFIX
        from .enrollment import consume

        if not secret:
            raise AuthenticationError("enrolment needs an enrolment token", code="bad_enrollment_secret")
        by_token = secret.startswith(ENROLLMENT_TOKEN_PREFIX)
        if not by_token and not (
            self._enrollment_secret
            and hmac.compare_digest(secret.encode("utf-8"), self._enrollment_secret.encode("utf-8"))
        ):
            raise AuthenticationError(
                "the enrolment secret is wrong: enrol with a token from 'sync-server enrollment-token create'",
                code="bad_enrollment_secret",
            )
        if channel is not None:
            check_channel_name(channel)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        device_id = "dev_" + secrets.token_hex(8)
        with self.db.write() as session:
            grant = consume(session, secret) if by_token else None  # 401 when unknown, expired, used up, revoked
            model_row = find_model(session, model)
            if grant is not None:
                if grant.model_id is not None and grant.model_id != model_row.id:
                    raise PermissionDeniedError(
                        f"enrolment token {grant.id} is for another model, not {model!r}", code="token_not_for_model"
                    )
                if grant.channel is not None:
                    if channel is not None and channel != grant.channel:
                        raise PermissionDeniedError(
                            f"enrolment token {grant.id} enrols devices on channel {grant.channel!r}, not {channel!r}",
                            code="token_not_for_channel",
                        )
                    channel = grant.channel
            channel = channel or DEFAULT_CHANNEL
            session.add(Device(id=device_id, name=name, model_id=model_row.id, channel=channel, token_sha256=token_hash(token),
                               enrollment_token_id=grant.id if grant is not None else None))
        return {"device_id": device_id, "token": token, "model": model, "channel": channel}

    def cached_identity(self, token: str) -> DeviceIdentity | None:
        """The device holding `token` if it was authenticated recently and nothing changed since (no I/O)."""
        entry = self._identities.get(token_hash(token))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def authenticate(self, token: str) -> DeviceIdentity | None:
        """The device holding `token`, or None when no device has it (revoked devices raise)."""
        digest = token_hash(token)
        generation = self._generation
        with self.db.read() as session:
            row = session.execute(
                select(Device.id, Device.revoked, Device.channel, Device.model_id, Device.last_seen_at, Model.name)
                .join(Model, Model.id == Device.model_id)
                .where(Device.token_sha256 == digest)
            ).first()
        if row is None:
            return None
        if row.revoked:
            raise AuthenticationError(f"device {row.id} was revoked; enrol it again", code="revoked_token")
        self._note_seen(row.id, as_utc(row.last_seen_at))
        identity = DeviceIdentity(row.id, row.name, row.model_id, row.channel)
        with self._lock:
            if generation == self._generation:
                self._identities[digest] = (time.monotonic() + _CACHE_TTL_S, identity)
        return identity

    def _note_seen(self, device_id: str, seen: datetime | None) -> None:
        """Write `last_seen_at` at most once a minute per device, best effort: a full disk, a locked or
        read-only database must never fail an authentication (the device only wants to read). Failed
        writes are counted (`last_seen_failures`) and logged at most once a minute."""
        now = time.monotonic()
        if seen is not None and utcnow() - seen <= _LAST_SEEN_EVERY:
            return
        with self._lock:
            if self._seen_tried.get(device_id, -1e18) > now - _LAST_SEEN_EVERY.total_seconds():
                return  # tried within the minute (and maybe failed): do not hammer a full disk
            self._seen_tried[device_id] = now
            if len(self._seen_tried) > 100_000:  # bounded: forget the oldest half
                for key in sorted(self._seen_tried, key=self._seen_tried.__getitem__)[:50_000]:
                    del self._seen_tried[key]
        try:
            with self.db.write() as session:
                device = session.get(Device, device_id)
                if device is not None:
                    device.last_seen_at = utcnow()
        except Exception as exc:  # noqa: BLE001  (any write failure: the read must go on)
            with self._lock:
                self.last_seen_failures += 1
                quiet = now - self._last_seen_logged < 60.0
                if not quiet:
                    self._last_seen_logged = now
            if not quiet:
                log.warning("could not record a device's last_seen_at (%d failures so far): %s",
                            self.last_seen_failures, getattr(exc, "message", None) or exc)

    def invalidate(self) -> None:
        """Forget cached identities and channels: something that can change an assignment changed."""
        with self._lock:
            self._generation += 1
            self._identities.clear()
            self._channels.clear()
            self._rosters.clear()

    # --- assignment -----------------------------------------------------------------------------

    def cached_assignment(self, device: DeviceIdentity) -> Assignment | None:
        """The assignment from cached channel state, or None when it must be read (no I/O)."""
        entry = self._channels.get((device.model_id, device.channel))
        if entry is None or entry[0] < time.monotonic():
            return None
        return _assignment(device, device.channel, entry[1])

    def assignment(self, device: DeviceIdentity) -> Assignment:
        """Which version `device` should run, read afresh (the device may have moved channel or been
        revoked); cheap (no manifest), so ETag checks stay fast. Devices of the same model share one
        read of their model's devices and channels (see `_Roster`)."""
        roster = self._roster(device.model_id)
        found = self._from_roster(device, roster) if roster is not None else None
        return found if found is not None else self._read_assignment(device)

    def pushed_assignment(self, device: DeviceIdentity) -> Assignment | None:
        """`assignment` from a roster already read for the current generation, or None (no I/O, no
        waiting): what a woken push stream tries before it takes a worker thread."""
        with self._lock:
            roster = self._rosters.get(device.model_id)
            usable = (roster is not None and roster.ready.is_set() and roster.generation == self._generation
                      and roster.expires >= time.monotonic() and roster.devices is not None)
        return self._from_roster(device, roster) if usable else None

    def _roster(self, model_id: int) -> _Roster | None:
        with self._lock:
            generation = self._generation
            roster = self._rosters.get(model_id)
            leader = roster is None or roster.generation != generation or roster.expires < time.monotonic()
            if leader:
                roster = _Roster(generation, time.monotonic() + _CACHE_TTL_S, threading.Event())
                self._rosters[model_id] = roster
        assert roster is not None
        if leader:
            try:
                roster.devices, roster.channels = self._read_roster(model_id)
            finally:
                roster.ready.set()  # on an error, devices stays None: everyone reads their own
        elif not roster.ready.wait(timeout=30.0):
            return None
        return roster if roster.devices is not None else None

    def _read_roster(self, model_id: int) -> tuple[dict[str, tuple[str, bool]], dict[str, ChannelState]]:
        with self.db.read() as session:
            rows = session.execute(
                select(Device.id, Device.channel, Device.revoked).where(Device.model_id == model_id)
            ).all()
            channels = session.scalars(select(Channel).where(Channel.model_id == model_id)).all()
            states = {c.name: ChannelState.of(c) for c in channels}
        return {row.id: (row.channel, bool(row.revoked)) for row in rows}, states  # type: ignore[return-value]

    def _from_roster(self, device: DeviceIdentity, roster: _Roster) -> Assignment | None:
        assert roster.devices is not None and roster.channels is not None
        entry = roster.devices.get(device.id)
        if entry is None:  # enrolled after the roster was read
            return None
        channel, revoked = entry
        if revoked:
            raise AuthenticationError(f"device {device.id} is no longer enrolled", code="revoked_token")
        state = roster.channels.get(channel)
        with self._lock:
            if roster.generation == self._generation and channel == device.channel:
                self._channels[(device.model_id, channel)] = (roster.expires, state)
        return _assignment(device, channel, state)

    def _read_assignment(self, device: DeviceIdentity) -> Assignment:
        generation = self._generation
        with self.db.read() as session:
            current = session.execute(
                select(Device.channel, Device.revoked).where(Device.id == device.id)
            ).first()
            if current is None or current.revoked:
                raise AuthenticationError(f"device {device.id} is no longer enrolled", code="revoked_token")
            row = session.scalar(select(Channel).where(Channel.model_id == device.model_id, Channel.name == current.channel))
            state = ChannelState.of(row)
        with self._lock:
            if generation == self._generation and current.channel == device.channel:
                self._channels[(device.model_id, current.channel)] = (time.monotonic() + _CACHE_TTL_S, state)
        return _assignment(device, current.channel, state)

    def cached_view(self, assignment: Assignment) -> dict[str, Any] | None:
        """`assignment_view` when it needs no I/O (the versions' manifests were read before), else None."""
        for version in (assignment.version, assignment.shadow):
            if version is not None and (assignment.model, version) not in self._views:
                return None
        return self.assignment_view(assignment)

    def assignment_view(self, assignment: Assignment) -> dict[str, Any]:
        """The assignment with the version's manifest and its content-addressed file URLs; `shadow` the
        same for a shadow rollout's candidate, with the share of requests to run it on."""
        view: dict[str, Any] = {
            "device_id": assignment.device_id,
            "model": assignment.model,
            "channel": assignment.channel,
            "version": assignment.version,
            "rollout": assignment.rollout,
            "manifest": None,
            "files": None,
            "shadow": None,
        }
        if assignment.version is not None:
            view.update(self._version_view(assignment.model, assignment.version))
        if assignment.shadow is not None:
            view["shadow"] = {
                "version": assignment.shadow,
                **self._version_view(assignment.model, assignment.shadow),
                "sample_rate": assignment.shadow_sample_rate,
            }
        return view

    def _version_view(self, model: str, version: int) -> dict[str, Any]:
        """{"manifest", "files"} of a version; versions never change, so each is read once."""
        key = (model, version)
        cached = self._views.get(key)
        if cached is None:
            with self.db.read() as session:
                row = find_version(session, model, version)
                cached = {"manifest": row.manifest, "files": files_view(row)}
            self._views[key] = cached
        return cached

    # --- reports --------------------------------------------------------------------------------

    def record_status(
        self,
        device: DeviceIdentity,
        version: int,
        *,
        running: bool,
        load_ok: bool,
        smoke_test_ok: bool | None,
        message: str | None,
        details: dict[str, Any] | None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Store the device's report about `version`; may pause a failing rollout.

        An upsert per (device, version). A resent copy of the report that last changed the row (same
        idempotency key) changes nothing, not even its time: after a paused rollout is resumed, only
        reports made since count, and an old failure the outbox sends again is not one of them.
        `details.rolled_back: true` marks a version the device loaded, then rolled back: it counts as
        a failure of a rollout. `details.shadow` ({"version", "state"}) says what became of a shadow
        rollout's candidate on the device: refusals and failures count against that rollout.
        """
        from .telemetry import check_idempotency_key

        key = check_idempotency_key(idempotency_key)
        paused = None
        with self.db.write() as session:
            model = find_model(session, device.model)
            require_version(session, model, version)
            require_assigned(session, device.id, device.model, version)
            row = session.get(DeviceStatus, (device.id, version))
            if key is not None and row is not None and row.report_key == key:
                return {"recorded": True, "duplicate": True, "rollout_paused": None}
            if running:  # only one version runs at a time
                for other in session.scalars(
                    select(DeviceStatus).where(DeviceStatus.device_id == device.id, DeviceStatus.version != version)
                ):
                    other.running = False
            if row is None:
                row = DeviceStatus(device_id=device.id, version=version)
                session.add(row)
            row.running = running
            row.load_ok = load_ok
            row.smoke_test_ok = smoke_test_ok
            row.rolled_back = (details or {}).get("rolled_back") is True
            row.message = message
            row.details = details
            row.reported_at = utcnow()
            row.report_key = key
            session.flush()
            channel = session.scalar(select(Device.channel).where(Device.id == device.id)) or device.channel
            shadow = (details or {}).get("shadow")
            shadow_version = shadow.get("version") if isinstance(shadow, dict) else None
            paused = self.rollouts.check_failures(
                session, model, channel, version,
                shadow_version=shadow_version if isinstance(shadow_version, int) and not isinstance(shadow_version, bool) else None,
            )
        if paused:
            self.on_change(device.model)
        return {"recorded": True, "duplicate": False, "rollout_paused": paused}

    def check_assigned(self, device: DeviceIdentity, version: int) -> None:
        """403 `not_assigned` unless the server assigned `version` to `device` (see `require_assigned`)."""
        with self.db.read() as session:
            require_assigned(session, device.id, device.model, version)

    def record_telemetry(self, device: DeviceIdentity, report: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Store one periodic telemetry report, once per idempotency key (see `telemetry.record`); then,
        when it is about an active rollout's candidate, judge the rollout's quality gates (which may
        pause it: `Rollouts.check_quality`, throttled per channel). The answer says `rollout_paused`
        (the reason) when this report's check paused it."""
        from . import telemetry

        result = telemetry.record(self.db, device.id, device.model, report, idempotency_key)
        if result.get("duplicate"):
            return result
        mode = report.get("mode") or "serving"
        if self._may_concern_rollout(device, report["version"], mode):
            try:
                paused = self.rollouts.check_quality(device.model, device.channel, report["version"], mode)
                if paused:
                    result = {**result, "rollout_paused": paused}
            except Exception as exc:  # noqa: BLE001  (the report is stored; a failed judgement must not fail it)
                log.warning("could not check a rollout's quality gates: %s", getattr(exc, "message", None) or exc,
                            extra={"model": device.model, "channel": device.channel, "version": report["version"]})
        return result

    def _may_concern_rollout(self, device: DeviceIdentity, version: int, mode: str) -> bool:
        """False when the cached channel state shows no active rollout of `version` in `mode` (no I/O)."""
        entry = self._channels.get((device.model_id, device.channel))
        if entry is None or entry[0] < time.monotonic():
            return True  # not known here: let check_quality read it
        state = entry[1]
        return (
            state is not None
            and state.rollout_state == ACTIVE
            and state.rollout_version == version
            and rollout_mode(state) == (SHADOW if mode == "shadow" else CANARY)
        )

    def telemetry_summary(self, model: str, version: int | None = None) -> dict[str, Any]:
        """Telemetry summed over devices, per version (see `telemetry.summary`)."""
        from . import telemetry

        return telemetry.summary(self.db, model, version)

    # --- admin ----------------------------------------------------------------------------------

    def list(self, model: str | None = None, channel: str | None = None) -> list[dict[str, Any]]:
        with self.db.read() as session:
            query = select(Device, Model.name).join(Model, Model.id == Device.model_id).order_by(Device.created_at)
            if model is not None:
                query = query.where(Model.name == model)
            if channel is not None:
                query = query.where(Device.channel == channel)
            return [self._view(session, device, name) for device, name in session.execute(query).all()]

    def get(self, device_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            device = self._find(session, device_id)
            return self._view(session, device, device.model.name)

    def update(self, device_id: str, channel: str) -> dict[str, Any]:
        check_channel_name(channel)
        with self.db.write() as session:
            device = self._find(session, device_id)
            device.channel = channel
            bump_revision(session)
            session.flush()
            model = device.model.name
            view = self._view(session, device, model)
        self.on_change(model)
        return view

    def revoke(self, device_id: str) -> dict[str, Any]:
        with self.db.write() as session:
            device = self._find(session, device_id)
            device.revoked = True
            bump_revision(session)
            model = device.model.name
        self.on_change(model)
        return {"device_id": device_id, "revoked": True}

    @staticmethod
    def _find(session: Session, device_id: str) -> Device:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"unknown device {device_id!r}", code="unknown_device")
        return device

    @staticmethod
    def _view(session: Session, device: Device, model: str) -> dict[str, Any]:
        channel = session.scalar(select(Channel).where(Channel.model_id == device.model_id, Channel.name == device.channel))
        version, in_rollout = assigned_version(channel, model, device.id)
        shadow = assigned_shadow(channel, model, device.id)
        statuses = session.scalars(select(DeviceStatus).where(DeviceStatus.device_id == device.id)).all()
        running = next((s for s in statuses if s.running), None)
        return {
            "device_id": device.id,
            "name": device.name,
            "model": model,
            "channel": device.channel,
            "revoked": device.revoked,
            "created_at": iso(device.created_at),
            "last_seen_at": iso(device.last_seen_at),
            "assigned_version": version,
            "rollout": in_rollout,
            "shadow_version": shadow[0] if shadow else None,
            "running_version": running.version if running else None,
            "status": [
                {
                    "version": s.version,
                    "running": s.running,
                    "load_ok": s.load_ok,
                    "smoke_test_ok": s.smoke_test_ok,
                    "rolled_back": s.rolled_back,
                    "message": s.message,
                    "reported_at": iso(s.reported_at),
                }
                for s in sorted(statuses, key=lambda s: s.version)
            ],
        }


_ASSIGNING = ("set", "promote", "rollback")  # events that give their version to every device of the channel
_STAGING = ("rollout", "resume", "canary")  # events that give it to the devices whose bucket is below their percent
_SHADOWING = ("shadow", "shadow_resume")  # events that give it, as their shadow, to the devices below their percent


def versions_assigned(
    session: Session, device_id: str, model: str, *, unless: int | None = None, mode: str = "serving"
) -> tuple[set[int], str]:
    """(every version the server assigned this device on its channel since it enrolled, the channel).

    Mode "serving": the channel's version now, its canary candidate if the device falls in the
    rollout, and each version the channel's history gave it since it enrolled (a set, promote or
    rollback gave every device the version; a rollout, resume or shadow -> canary step only the devices
    whose bucket is below its percentage). Mode "shadow": the shadow versions it was given (a shadow
    rollout's candidate, now or in the history, for devices below its percentage), never a version it
    served. A device moved to another channel counts only the new channel's versions. With `unless`,
    the history is not read when that version is among the current ones.
    """
    shadow = mode == "shadow"
    device = session.get(Device, device_id)
    if device is None:
        raise AuthenticationError(f"device {device_id} is no longer enrolled", code="revoked_token")
    channel = session.scalar(select(Channel).where(Channel.model_id == device.model_id, Channel.name == device.channel))
    versions: set[int] = set()
    if channel is None:
        return versions, device.channel
    if channel.version is not None and not shadow:
        versions.add(channel.version)
    if (
        channel.rollout_version is not None
        and channel.rollout_state in (ACTIVE, PAUSED)
        and (rollout_mode(channel) == SHADOW) == shadow
        and in_cohort(channel, model, device_id)
    ):
        versions.add(channel.rollout_version)
    if unless is not None and unless in versions:
        return versions, device.channel  # the common case: a report about what it runs now; no history read
    events = session.execute(
        select(RolloutEvent.action, RolloutEvent.version, RolloutEvent.percent, RolloutEvent.at)
        .where(RolloutEvent.channel_id == channel.id, RolloutEvent.version.is_not(None))
        .order_by(RolloutEvent.id)
    ).all()
    staging = _SHADOWING if shadow else _STAGING
    assigning = () if shadow else _ASSIGNING
    enrolled = as_utc(device.created_at)
    before: dict[bool, tuple[int, float | None]] = {}  # what the channel gave when the device enrolled
    given: list[tuple[bool, int, float | None]] = []
    for action, version, percent, at in events:
        if action not in assigning and action not in staging:
            continue
        staged = action in staging
        moment = as_utc(at)
        if enrolled is not None and moment is not None and moment < enrolled:
            before[staged] = (version, percent)
        else:
            given.append((staged, version, percent))
    given += [(staged, version, percent) for staged, (version, percent) in before.items()]
    for staged, version, percent in given:
        if not staged or bucket(device_id, model, channel.name, version) < (percent or 0.0):
            versions.add(version)
    return versions, device.channel


def require_assigned(session: Session, device_id: str, model: str, version: int, mode: str = "serving") -> None:
    """A device's report counts only for a version the server assigned it (403 `not_assigned`): a device
    outside a rollout cannot pause it, and no device can claim to run a version it never got (and so
    keep it from being deleted). A shadow report (`mode` "shadow") counts only for a version the device
    was given as its shadow; a serving report not for a version it only ran in shadow."""
    versions, channel = versions_assigned(session, device_id, model, unless=version, mode=mode)
    if version not in versions:
        if mode == "shadow":
            message = (f"device {device_id} was never assigned version {version} of model {model} as its shadow "
                       f"(channel {channel!r}): a shadow report is only about the shadow version the server sent it")
        else:
            message = (f"device {device_id} was never assigned version {version} of model {model} (channel {channel!r}): "
                       "a device reports only about versions the server sent it")
        raise PermissionDeniedError(message, code="not_assigned")


def require_shadow_assigned(session: Session, device_id: str, model: str, version: int) -> None:
    """403 `not_assigned` unless the server gave this device `version` as its shadow (now or before)."""
    require_assigned(session, device_id, model, version, mode="shadow")


def last_seen_metrics(devices: Devices) -> Callable[[], Any]:
    """A scrape-time collector: `sync_server_last_seen_write_failures_total`, the `last_seen_at` writes
    that failed while the authentication went on (for `Metrics.add_state`)."""
    from prometheus_client.core import CounterMetricFamily

    def collect():  # type: ignore[no-untyped-def]
        family = CounterMetricFamily(
            "sync_server_last_seen_write_failures",
            "Writes of a device's last_seen_at that failed (full disk, database locked or down); authentication went on",
        )
        family.add_metric([], float(devices.last_seen_failures))
        yield family

    return collect


def require_own(device: DeviceIdentity, device_id: str) -> None:
    """A device may read and report only for itself."""
    if device.id != device_id:
        raise PermissionDeniedError(f"device {device.id} may not act for device {device_id}", code="forbidden")
