"""Enrolment tokens: per-batch credentials for enrolling devices, so one leaked secret does not open the fleet.

An admin creates a token (`POST /v1/enrollment-tokens`, `sync-server enrollment-token create`): it
expires (default a week), enrols at most `max_uses` devices (default 1), may be limited to one model
and may set the channel its devices follow. It can be revoked at once, optionally with every device it
enrolled. The server keeps only its SHA-256; the token (`et_...`) is shown once. A device presents it
exactly where it presented the old fleet secret (`Authorization: Bearer et_...` on
`POST /v1/devices/enroll`), so the agent needs no change.

The fleet-wide secret still works, but only when the operator gives one explicitly
(`--enrollment-secret` / `SYNC_SERVER_ENROLLMENT_SECRET`); the server no longer generates one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import Database, as_utc, bump_revision, iso
from .errors import AuthenticationError, NotFoundError
from .models import Device, EnrollmentToken, Model, utcnow
from .registry import find_model
from .rollout import check_channel_name

TOKEN_PREFIX = "et_"
ID_PREFIX = "enr_"


@dataclass(frozen=True)
class Grant:
    """What a consumed enrolment token allows: its id, the model it is limited to, the channel it sets."""

    id: str
    model_id: int | None
    channel: str | None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def consume(session: Session, token: str) -> Grant:
    """Use `token` once inside the caller's write transaction (the enrolment); 401 naming why it cannot."""
    row = session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_sha256 == _hash(token)).with_for_update())
    if row is None:
        raise AuthenticationError("the enrolment token is not known to this server", code="bad_enrollment_secret")
    if row.revoked:
        raise AuthenticationError(f"enrolment token {row.id} was revoked; ask for a new one", code="bad_enrollment_secret")
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= utcnow():
        raise AuthenticationError(f"enrolment token {row.id} expired at {iso(expires)}; ask for a new one", code="bad_enrollment_secret")
    if row.uses >= row.max_uses:
        raise AuthenticationError(
            f"enrolment token {row.id} was already used for {row.uses} device(s), its limit; ask for a new one",
            code="bad_enrollment_secret",
        )
    row.uses += 1
    row.last_used_at = utcnow()
    return Grant(row.id, row.model_id, row.channel)


class EnrollmentTokens:
    """Create, list and revoke enrolment tokens (admin)."""

    def __init__(self, db: Database, on_change: Callable[[str], None] | None = None) -> None:
        self.db = db
        self.on_change = on_change or (lambda _model: None)

    def create(
        self,
        *,
        expires_in_s: int = 7 * 86400,
        max_uses: int = 1,
        model: str | None = None,
        channel: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """A new token; the answer is the only place its secret part is ever shown."""
        if channel is not None:
            check_channel_name(channel)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.write() as session:
            model_id = find_model(session, model).id if model is not None else None
            row = EnrollmentToken(
                id=ID_PREFIX + secrets.token_hex(8), token_sha256=_hash(token), model_id=model_id, channel=channel, note=note,
                max_uses=max_uses, uses=0, expires_at=utcnow() + timedelta(seconds=expires_in_s), revoked=False,
                created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            view = self._view(row, model)
        return {**view, "token": token}

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            names = dict(session.execute(select(Model.id, Model.name)).all())
            rows = session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at)).all()
            return [self._view(r, names.get(r.model_id)) for r in rows]

    def revoke(self, token_id: str, *, devices: bool = False) -> dict[str, Any]:
        """Revoke a token; with `devices`, also every device it enrolled (a token that leaked)."""
        with self.db.write() as session:
            row = session.get(EnrollmentToken, token_id)
            if row is None:
                raise NotFoundError(f"unknown enrolment token {token_id!r}", code="unknown_enrollment_token")
            row.revoked = True
            models: list[str] = []
            revoked_devices = 0
            if devices:
                enrolled = session.execute(
                    select(Device.id, Model.name).join(Model, Model.id == Device.model_id)
                    .where(Device.enrollment_token_id == token_id, Device.revoked.is_(False))
                ).all()
                revoked_devices = len(enrolled)
                models = sorted({name for _, name in enrolled})
                if enrolled:
                    session.execute(update(Device).where(Device.id.in_([d for d, _ in enrolled])).values(revoked=True))
                    bump_revision(session)
        for model in models:
            self.on_change(model)
        return {"id": token_id, "revoked": True, "revoked_devices": revoked_devices}

    @staticmethod
    def _view(row: EnrollmentToken, model: str | None) -> dict[str, Any]:
        expires = as_utc(row.expires_at)
        return {
            "id": row.id,
            "model": model,
            "channel": row.channel,
            "note": row.note,
            "max_uses": row.max_uses,
            "uses": row.uses,
            "expires_at": iso(expires),
            "expired": bool(expires is not None and expires <= utcnow()),
            "revoked": row.revoked,
            "created_at": iso(row.created_at),
            "last_used_at": iso(row.last_used_at),
        }


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `12h`, `7d`; ValueError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:], None)
    number = text[:-1] if factor else text
    if not number.isdigit() or len(number) > 9:
        raise ValueError(f"{text!r} is not a duration such as 3600, 30m, 12h or 7d")
    return int(number) * (factor or 1)


# ----------------------------------------------------------------------------------------------------------
# `sync-server enrollment-token create|list|revoke`
# ----------------------------------------------------------------------------------------------------------


def add_cli(sub: Any, settings: Any) -> None:
    """Add the `enrollment-token` command to the `sync-server` parser (`sub`: its subparsers)."""
    command = sub.add_parser(
        "enrollment-token", parents=[settings],
        help="create, list or revoke enrolment tokens (expiring, revocable credentials for enrolling devices)",
    )
    command.add_argument("action", choices=("create", "list", "revoke"))
    command.add_argument("token_id", nargs="?", metavar="ID", help="revoke: the token's id (enr_...)")
    command.add_argument("--model", metavar="NAME", help="create: only devices of this model")
    command.add_argument("--channel", metavar="NAME", help="create: devices enrolled with it follow this channel")
    command.add_argument("--uses", type=int, default=1, metavar="N", help="create: devices it may enrol (default 1)")
    command.add_argument("--expires", default="7d", metavar="DURATION", help="create: lifetime such as 3600, 30m, 12h, 7d (default 7d)")
    command.add_argument("--note", metavar="TEXT", help="create: what it is for")
    command.add_argument("--revoke-devices", action="store_true", help="revoke: also revoke every device it enrolled")
    command.add_argument("--server", metavar="URL", help="talk to a running server instead of the data dir")
    command.add_argument("--json", action="store_true", help="print the result as JSON")
    command.set_defaults(run=run_cli)


def run_cli(args: Any, config: Any) -> int:
    """Run `sync-server enrollment-token ACTION`; one line per token, or JSON."""
    import contextlib
    import json

    from .errors import ConfigError

    body: dict[str, Any] = {}
    if args.action == "create":
        try:
            body = {"expires_in_s": parse_duration(args.expires), "max_uses": args.uses}
        except ValueError as exc:
            raise ConfigError(f"--expires: {exc}") from None
        if not 1 <= args.uses <= 100_000 or not 1 <= body["expires_in_s"] <= 366 * 86400:
            raise ConfigError("--uses must be 1 to 100000 and --expires at most 366 days")
        body.update({k: v for k, v in (("model", args.model), ("channel", args.channel), ("note", args.note)) if v})
    if args.action == "revoke" and not args.token_id:
        raise ConfigError("revoke needs the token's id: sync-server enrollment-token revoke enr_...")
    with contextlib.ExitStack() as stack:
        if args.server:
            from .cli import _admin_token
            from .client import SyncServerClient

            client = stack.enter_context(SyncServerClient(args.server, _admin_token(config)))
            if args.action == "create":
                result: Any = client._check(client._send("POST", "/v1/enrollment-tokens", json=body))
            elif args.action == "list":
                result = client.get("/v1/enrollment-tokens")
            else:
                path = f"/v1/enrollment-tokens/{args.token_id}" + ("?devices=true" if args.revoke_devices else "")
                result = client._check(client._send("DELETE", path))
        else:
            from .services import Services

            services = Services.build(config, with_predictor=False)
            stack.callback(services.close)
            services.db.migrate()
            tokens = EnrollmentTokens(services.db)
            if args.action == "create":
                result = tokens.create(**body)
            elif args.action == "list":
                result = tokens.list()
            else:
                result = tokens.revoke(args.token_id, devices=args.revoke_devices)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.action == "create":
        scope = f" for model {result['model']}" if result["model"] else ""
        scope += f" on channel {result['channel']}" if result["channel"] else ""
        print(f"{result['token']}\n{result['id']}: enrols {result['max_uses']} device(s){scope} until {result['expires_at']} "
              "(the token is shown only now)")
    elif args.action == "list":
        for item in result:
            state = "revoked" if item["revoked"] else "expired" if item["expired"] else "active"
            print(f"{item['id']}  {state:<7}  {item['uses']}/{item['max_uses']} used  until {item['expires_at']}  "
                  f"{item['model'] or '*'}/{item['channel'] or '*'}  {item['note'] or ''}".rstrip())
        if not result:
            print("no enrolment tokens")
    else:
        print(f"{result['id']} revoked" + (f", and {result['revoked_devices']} device(s) it enrolled" if args.revoke_devices else ""))
    return 0
