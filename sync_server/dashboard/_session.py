"""Dashboard sessions: a signed, expiring cookie after the operator gives the admin token, and CSRF tokens.

The cookie is `base64url(json {"sid", "exp"}) "." hex(HMAC-SHA256(key, payload))`, where `key` is
derived from the server's admin token: a new admin token ends every session at once, and a server
with no admin token has no dashboard login. Nothing is stored per session, so any instance behind a
load balancer accepts it; a logout is remembered (in memory, until the session would have expired)
by the instance that handled it.

Every state-changing request carries `csrf`, a hidden form field: HMAC(key, "csrf" + sid), compared
with `hmac.compare_digest`. A page of another site can neither read it nor forge it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

COOKIE = "sync_dashboard"
#: How long a login lasts.
SESSION_S = 8 * 3600
_KEY_INFO = b"sync-server dashboard session v1"


@dataclass(frozen=True)
class Session:
    """A logged-in operator: the session id and when it ends (epoch seconds)."""

    sid: str
    expires: float


class SessionSigner:
    """Makes and checks session cookies and CSRF tokens with a key derived from the admin token."""

    def __init__(self, admin_token: str, *, lifetime_s: float = SESSION_S, clock: Callable[[], float] = time.time) -> None:
        self._admin = admin_token.encode("utf-8")
        self._key = hmac.new(self._admin, _KEY_INFO, hashlib.sha256).digest()
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._ended: dict[str, float] = {}  # sid -> expiry, for logouts
        self._lock = threading.Lock()

    def admin_token_matches(self, token: str) -> bool:
        return bool(self._admin) and hmac.compare_digest(token.encode("utf-8"), self._admin)

    def new_session(self) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(secrets.token_urlsafe(18), self._clock() + self.lifetime_s)
        payload = base64.urlsafe_b64encode(json.dumps({"sid": session.sid, "exp": int(session.expires)}).encode()).rstrip(b"=")
        return session, payload.decode("ascii") + "." + self._sign(payload)

    def session(self, cookie: str | None) -> Session | None:
        """The session of a cookie value, or None when it is missing, forged, expired or logged out."""
        if not cookie or len(cookie) > 512 or "." not in cookie:
            return None
        payload, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(self._sign(payload.encode("utf-8", "replace")).encode(), signature.encode("utf-8", "replace")):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            sid, expires = str(data["sid"]), float(data["exp"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if expires <= self._clock():
            return None
        with self._lock:
            if sid in self._ended:
                return None
        return Session(sid, expires)

    def end(self, session: Session) -> None:
        """Log out: this instance refuses the session from now on."""
        now = self._clock()
        with self._lock:
            for sid in [s for s, exp in self._ended.items() if exp <= now]:
                del self._ended[sid]
            self._ended[session.sid] = session.expires

    def csrf_token(self, session: Session) -> str:
        return self._sign(b"csrf\0" + session.sid.encode("ascii"))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session).encode(), (token or "").encode("utf-8", "replace"))

    def _sign(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()
