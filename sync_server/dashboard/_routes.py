"""The dashboard's routes: login, pages, chart data and the rollout actions (each confirmed first)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..api.schemas import ChannelName, ModelName
from ..errors import BadRequestError, ConflictError, SyncServerError
from ..services import Services
from ..throttle import TokenBuckets, retry_after
from . import _views
from ._session import COOKIE, Session, SessionSigner

log = logging.getLogger("sync_server.dashboard")

PREFIX = "/dashboard"
HERE = Path(__file__).parent
#: No inline script or style anywhere: every script and style sheet is a file under /dashboard/static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Login attempts per client address: bursts of 5, then one every 12 s.
LOGIN_BURST, LOGIN_PER_S = 5, 1 / 12

ACTIONS: dict[str, dict[str, str]] = {
    "promote": {"verb": "Promote", "done": "Promoted the rollout's version on {channel}: every device of the channel gets it."},
    "pause": {"verb": "Pause", "done": "Paused the rollout on {channel}: its devices go back to the channel's version."},
    "resume": {"verb": "Resume", "done": "Resumed the rollout on {channel}."},
    "rollback": {"verb": "Roll back", "done": "Rolled back {channel}."},
    "stage": {"verb": "Set the percentage", "done": "The rollout on {channel} is a canary at its new percentage."},
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))


def _when(value: str | None) -> str:
    if not value:
        return "never"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    if seconds < 90:
        ago = f"{max(0, int(seconds))} s ago"
    elif seconds < 5400:
        ago = f"{int(seconds // 60)} min ago"
    elif seconds < 2 * 86400:
        ago = f"{seconds / 3600:.1f} h ago"
    else:
        ago = f"{seconds / 86400:.0f} days ago"
    return f"{moment:%Y-%m-%d %H:%M} UTC ({ago})"


def _share(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{float(value) * 100:.{digits}f} %"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    number = float(value)
    return "< 0.001" if 0 < abs(number) < 0.001 else f"{number:.{digits}g}"


templates.filters.update(when=_when, share=_share, num=_num)


# --- plumbing -----------------------------------------------------------------------------------------


class Dashboard:
    """The dashboard's state on the app: the session signer and the login throttle."""

    def __init__(self, admin_token: str) -> None:
        self.signer = SessionSigner(admin_token)
        self.logins = TokenBuckets(LOGIN_PER_S, LOGIN_BURST, max_keys=10_000)


def _services(request: Request) -> Services:
    return request.app.state.services


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


def _session(request: Request) -> Session | None:
    return _dashboard(request).signer.session(request.cookies.get(COOKIE))


def _secure_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _page(request: Request, template: str, status: int = 200, session: Session | None = None, **context: Any) -> HTMLResponse:
    signer = _dashboard(request).signer
    html = templates.get_template(template).render(
        prefix=PREFIX, session=session, csrf=signer.csrf_token(session) if session else None, **context
    )
    return _secure_headers(HTMLResponse(html, status_code=status))  # type: ignore[return-value]


def _redirect(url: str) -> Response:
    return _secure_headers(RedirectResponse(url, status_code=303))


def _to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _redirect(f"{PREFIX}/login?next={quote(here, safe='')}")


def _same_origin(request: Request) -> bool:
    """The Origin header (or, without one, the Referer) names this server, when the browser sent one."""
    host = request.headers.get("host", "")
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        if value == "null":
            return False
        return urlsplit(value).netloc == host
    return True


def _forbidden(request: Request, message: str, session: Session | None = None) -> HTMLResponse:
    return _page(request, "error.html", 403, session=session, title="Refused", message=message)


def _checked_post(request: Request, csrf: str | None) -> tuple[Session | None, Response | None]:
    """The session of a state-changing POST, or the answer refusing it (login page, 403)."""
    session = _session(request)
    if session is None:
        return None, _to_login(request)
    if not _same_origin(request):
        return None, _forbidden(request, "This form was sent from another site; it was not carried out.", session)
    if not _dashboard(request).signer.csrf_ok(session, csrf):
        return None, _forbidden(
            request, "The form's security token is missing or does not match your session; reload the page and try again.", session
        )
    return session, None


def _safe_next(target: str | None) -> str:
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return PREFIX + "/"


# --- login --------------------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str | None = Query(None, max_length=500)) -> Response:  # noqa: A002
    if _session(request) is not None:
        return _redirect(_safe_next(next))
    return _page(request, "login.html", next=_safe_next(next))


@router.post("/login")
def login(request: Request, token: str = Form("", max_length=500), next: str = Form("", max_length=500)) -> Response:  # noqa: A002
    dashboard = _dashboard(request)
    if not _same_origin(request):
        return _page(request, "login.html", 403, next=_safe_next(next), error="This login form was sent from another site.")
    client = request.client.host if request.client else "-"
    wait_s = dashboard.logins.take(client)
    if wait_s > 0:
        seconds = retry_after(wait_s)
        response = _page(request, "login.html", 429, next=_safe_next(next),
                         error=f"Too many login attempts from this address; try again in {seconds} s.")
        response.headers["Retry-After"] = str(seconds)
        return response
    if not dashboard.signer.admin_token_matches(token.strip()):
        log.warning("dashboard login refused", extra={"client": client})
        return _page(request, "login.html", 401, next=_safe_next(next),
                     error="That is not the admin token of this server (sync-server path prints where it is kept).")
    session, cookie = dashboard.signer.new_session()
    response = _redirect(_safe_next(next))
    response.set_cookie(
        COOKIE, cookie, max_age=int(dashboard.signer.lifetime_s), path=PREFIX, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("dashboard login", extra={"client": client})
    return response


@router.post("/logout")
def logout(request: Request, csrf: str | None = Form(None, max_length=200)) -> Response:
    session, refused = _checked_post(request, csrf)
    if refused is not None:
        return refused
    _dashboard(request).signer.end(session)  # type: ignore[arg-type]
    response = _redirect(f"{PREFIX}/login")
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


# --- pages --------------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
def overview(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    return _page(request, "overview.html", session=session, models=_views.overview(_services(request)))


@router.get("/models/{name}")
def model_page(request: Request, name: ModelName, done: str | None = Query(None, max_length=20),
               on: str | None = Query(None, max_length=64), channel: str | None = Query(None, max_length=64),
               hours: float = Query(24, gt=0, le=24 * 90)) -> Response:
    """The model's page; `channel` and `hours` choose the figures and charts, `done` and `on` the message
    after an action."""
    session = _session(request)
    if session is None:
        return _to_login(request)
    try:
        page = _views.model_page(_services(request), name, channel=channel, hours=hours)
    except SyncServerError as exc:
        return _page(request, "error.html", exc.status, session=session, title="Not found", message=exc.message)
    channels = [c["channel"] for c in page["channels"]]
    flash = None
    if done in ACTIONS and on in channels:
        flash = ACTIONS[done]["done"].format(channel=on)
    chart_channel = channel if channel in channels else None
    series_url = f"{PREFIX}/models/{quote(name, safe='')}/series.json?hours={hours:g}"
    if chart_channel:
        series_url += f"&channel={quote(chart_channel, safe='')}"
    return _page(request, "model.html", session=session, model=page, flash=flash, hours=hours,
                 chart_channel=chart_channel, series_url=series_url, actions=ACTIONS)


@router.get("/models/{name}/series.json")
def series(request: Request, name: ModelName, channel: str | None = Query(None, max_length=64),
           hours: float = Query(24, gt=0, le=24 * 90)) -> Response:
    if _session(request) is None:
        return _secure_headers(JSONResponse({"error": {"code": "login_required", "message": "log in to the dashboard first"}}, 401))
    try:
        body = _views.chart_series(_services(request), name, channel=channel or None, hours=hours)
    except SyncServerError as exc:
        return _secure_headers(JSONResponse(exc.to_dict(), exc.status))
    return _secure_headers(JSONResponse(body))


# --- actions ------------------------------------------------------------------------------------------


def _run(services: Services, name: str, channel: str, action: str, *, reason: str, force: bool, percent: float | None) -> None:
    """Carry out `action` with the `Rollouts` method the admin API uses for it."""
    rollouts = services.rollouts
    if action == "promote":
        rollouts.promote(name, channel, force=force)
    elif action == "pause":
        rollouts.pause(name, channel, reason.strip() or None)
    elif action == "resume":
        rollouts.resume(name, channel)
    elif action == "rollback":
        rollouts.rollback(name, channel)
    elif action == "stage":
        rollout = rollouts.get(name, channel)["rollout"]
        if rollout is None:
            raise ConflictError(f"channel {channel!r} has no rollout in progress", code="no_rollout")
        if percent is None:
            raise BadRequestError("give the percentage of the channel's devices that get the candidate", code="bad_percent")
        rollouts.start(name, channel, rollout["version"], percent, mode="canary", force=force)


def _confirm(request: Request, session: Session, name: str, channel: str, action: str, status: int = 200,
             error: SyncServerError | None = None, reason: str = "", percent: float | None = None) -> Response:
    try:
        view = _services(request).rollouts.get(name, channel)
    except SyncServerError as exc:
        return _page(request, "error.html", exc.status, session=session, title="Not found", message=exc.message)
    rollout = view["rollout"] or {}
    return _page(
        request, "confirm.html", status, session=session, model=name, channel=view, action=action, verb=ACTIONS[action]["verb"],
        error=error, reason=reason, percent=percent or (rollout.get("percent") if rollout.get("mode") != "shadow" else None),
        can_force=action == "promote" or (action == "stage" and rollout.get("mode") == "shadow"),
    )


@router.get("/models/{name}/channels/{channel}/{action}")
def confirm(request: Request, name: ModelName, channel: ChannelName, action: str) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    if action not in ACTIONS:
        return _page(request, "error.html", 404, session=session, title="Not found", message=f"There is no action {action!r}.")
    return _confirm(request, session, name, channel, action)


@router.post("/models/{name}/channels/{channel}/{action}")
def act(request: Request, name: ModelName, channel: ChannelName, action: str, csrf: str | None = Form(None, max_length=200),
        reason: str = Form("", max_length=500), force: bool = Form(False), percent: str = Form("", max_length=20)) -> Response:
    session, refused = _checked_post(request, csrf)
    if refused is not None:
        return refused
    assert session is not None
    if action not in ACTIONS:
        return _page(request, "error.html", 404, session=session, title="Not found", message=f"There is no action {action!r}.")
    share: float | None = None
    try:
        try:
            share = float(percent) if percent.strip() else None
        except ValueError:
            raise BadRequestError(f"the percentage must be a number, got {percent!r}", code="bad_percent") from None
        _run(_services(request), name, channel, action, reason=reason, force=force, percent=share)
    except SyncServerError as exc:
        return _confirm(request, session, name, channel, action, status=exc.status, error=exc, reason=reason, percent=share)
    log.info("dashboard action", extra={"model": name, "channel": channel, "action": action})
    return _redirect(f"{PREFIX}/models/{quote(name, safe='')}?done={action}&on={quote(channel, safe='')}#channel-{quote(channel, safe='')}")
