"""An operator uses the dashboard: logs in with the admin token, reads a model's page, pauses a rollout.

The server runs in process (FastAPI's TestClient); tests/test_dashboard_browser.py drives a real
server process from a real Chromium.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from sync_server.dashboard._session import COOKIE, SessionSigner
from sync_server.dashboard._views import LOST_S, ONLINE_S, STALLED_S, device_state
from sync_server.models import Device, utcnow
from tests.server_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    MODEL,
    Server,
    _drop_postgres_at_exit,
    db_url,
    publisher,
    running_server,
    server_config,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "sync_server" / "dashboard"


def login(server: Server, token: str = ADMIN_TOKEN, **headers: str) -> Any:
    return server.client.post("/dashboard/login", data={"token": token, "next": "/dashboard/"}, headers=headers,
                              follow_redirects=False)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def staged(server: Server, publisher: Any, percent: float = 50) -> None:
    """v1 on stable, v2 rolling out to `percent` of it."""
    server.publish_ok(publisher, 1, 2)
    server.set_channel(1)
    response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout", json={"version": 2, "percent": percent})
    assert response.status_code == 200, response.text


def channel(server: Server) -> dict[str, Any]:
    response = server.admin("GET", f"/v1/models/{MODEL}/channels/stable")
    assert response.status_code == 200, response.text
    return response.json()


def test_login_sets_a_strict_httponly_expiring_cookie_and_logout_ends_the_session(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        response = login(server)
        assert response.status_code == 303 and response.headers["location"] == "/dashboard/"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/dashboard", "Max-Age="):
            assert attribute in cookie, cookie
        assert "Secure" not in cookie, "plain http: a Secure cookie would never come back"
        assert ADMIN_TOKEN not in cookie

        page = server.client.get("/dashboard/")
        assert page.status_code == 200 and "Models" in page.text
        stolen = server.client.cookies.get(COOKIE)
        out = server.client.post("/dashboard/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
        assert server.client.get("/dashboard/", follow_redirects=False).status_code == 303

        server.client.cookies.set(COOKIE, stolen, path="/dashboard")
        replayed = server.client.get("/dashboard/", follow_redirects=False)
        assert replayed.status_code == 303, "a logged-out session stays out, even with its cookie"


def test_the_cookie_is_secure_over_https(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.client.base_url = "https://testserver"
        response = login(server)
        assert response.status_code == 303
        assert "Secure" in response.headers["set-cookie"]


def test_a_wrong_token_gets_the_login_page_again_and_attempts_are_throttled(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        refused = login(server, token="not-the-admin-token")
        assert refused.status_code == 401
        assert "not the admin token of this server" in refused.text and 'name="token"' in refused.text
        assert "set-cookie" not in refused.headers
        statuses = [login(server, token=f"guess-{i}").status_code for i in range(6)]
        assert statuses[:4] == [401] * 4 and statuses[-1] == 429, statuses
        throttled = login(server)
        assert throttled.status_code == 429, "while throttled, even the right token waits"
        assert int(throttled.headers["retry-after"]) >= 1 and "Too many login attempts" in throttled.text


def test_pages_and_chart_data_need_a_valid_session(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        page = server.client.get(f"/dashboard/models/{MODEL}", follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"] == f"/dashboard/login?next=%2Fdashboard%2Fmodels%2F{MODEL}"
        data = server.client.get(f"/dashboard/models/{MODEL}/series.json")
        assert data.status_code == 401 and data.json()["error"]["code"] == "login_required"
        assert server.client.get(f"/dashboard/models/{MODEL}/channels/stable/pause", follow_redirects=False).status_code == 303

        _, other_server_cookie = SessionSigner("another-admin-token-0123456789").new_session()
        _, ours = SessionSigner(ADMIN_TOKEN).new_session()
        payload, _, signature = ours.rpartition(".")
        for forged in (other_server_cookie, payload + "." + "0" * len(signature), "garbage", payload + ".", "x." + signature):
            server.client.cookies.set(COOKIE, forged, path="/dashboard")
            assert server.client.get("/dashboard/", follow_redirects=False).status_code == 303, forged

        assert login(server).status_code == 303
        assert server.client.get(f"/dashboard/models/{MODEL}").status_code == 200
        assert server.client.get(f"/dashboard/models/{MODEL}/series.json").status_code == 200


def test_a_session_expires(publisher, tmp_path):
    now = [1_000_000.0]
    signer = SessionSigner(ADMIN_TOKEN, lifetime_s=60, clock=lambda: now[0])
    session, cookie = signer.new_session()
    assert signer.session(cookie) == session
    now[0] += 61
    assert signer.session(cookie) is None


def test_a_post_without_or_with_a_wrong_csrf_token_or_from_another_site_is_refused(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        staged(server, publisher)
        assert login(server).status_code == 303
        url = f"/dashboard/models/{MODEL}/channels/stable/pause"
        good = csrf_of(server.client.get(url).text)
        for data in ({"reason": "no token"}, {"reason": "wrong", "csrf": "0" * len(good)}, {"reason": "other", "csrf": good[:-1] + "é"}):
            response = server.client.post(url, data=data, follow_redirects=False)
            assert response.status_code == 403, data
            assert "security token" in response.text
        cross = server.client.post(url, data={"csrf": good}, headers={"Origin": "https://evil.example"}, follow_redirects=False)
        assert cross.status_code == 403 and "another site" in cross.text
        referred = server.client.post(url, data={"csrf": good}, headers={"Referer": "https://evil.example/x"}, follow_redirects=False)
        assert referred.status_code == 403
        other_session = SessionSigner(ADMIN_TOKEN)
        session, _ = other_session.new_session()
        stolen = server.client.post(url, data={"csrf": other_session.csrf_token(session)}, follow_redirects=False)
        assert stolen.status_code == 403, "a CSRF token of another session does not fit this one"
        assert channel(server)["rollout"]["state"] == "active", "no refused POST changed anything"


def test_a_pause_from_the_dashboard_takes_effect_and_resume_undoes_it(db_url, publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", db_url, publisher)) as server:
        staged(server, publisher, percent=100)
        device = server.enroll()
        assert device.assigned_version() == 2
        assert login(server).status_code == 303

        confirm = server.client.get(f"/dashboard/models/{MODEL}/channels/stable/pause")
        assert confirm.status_code == 200
        assert "Pause the rollout on stable?" in confirm.text and "go back to v1" in confirm.text
        assert channel(server)["rollout"]["state"] == "active", "asking for confirmation changes nothing"

        done = server.client.post(
            f"/dashboard/models/{MODEL}/channels/stable/pause",
            data={"csrf": csrf_of(confirm.text), "reason": "fallback rate doubled on kiosk-3"},
            headers={"Origin": "http://testserver"}, follow_redirects=False,
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"/dashboard/models/{MODEL}?done=pause&on=stable#channel-stable"
        view = channel(server)
        assert view["rollout"]["state"] == "paused" and view["rollout"]["reason"] == "fallback rate doubled on kiosk-3"
        assert view["history"][0]["action"] == "pause"
        assert device.assigned_version() == 1, "the paused candidate goes to no device"

        page = server.client.get(done.headers["location"])
        assert "Paused the rollout on stable" in page.text
        assert 'rollout-state">paused<' in page.text and "fallback rate doubled on kiosk-3" in page.text

        resume = server.client.get(f"/dashboard/models/{MODEL}/channels/stable/resume")
        assert "fallback rate doubled on kiosk-3" in resume.text, "the confirmation says why it was paused"
        server.client.post(f"/dashboard/models/{MODEL}/channels/stable/resume", data={"csrf": csrf_of(resume.text)})
        assert channel(server)["rollout"]["state"] == "active"
        assert device.assigned_version() == 2


def test_promote_and_roll_back_from_the_dashboard_and_a_refusal_is_shown_on_the_page(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        staged(server, publisher)
        assert login(server).status_code == 303
        base = f"/dashboard/models/{MODEL}/channels/stable"
        csrf = csrf_of(server.client.get(f"{base}/promote").text)
        assert server.client.post(f"{base}/promote", data={"csrf": csrf}, follow_redirects=False).status_code == 303
        view = channel(server)
        assert view["version"] == 2 and view["rollout"] is None

        again = server.client.post(f"{base}/promote", data={"csrf": csrf}, follow_redirects=False)
        assert again.status_code == 409
        assert "Not done" in again.text and "no_rollout" in again.text and "has no rollout in progress" in again.text

        assert server.client.post(f"{base}/rollback", data={"csrf": csrf}, follow_redirects=False).status_code == 303
        assert channel(server)["version"] == 1


def test_hostile_names_and_reasons_are_escaped(publisher, tmp_path):
    hostile = '<script>alert("x")</script>'
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        staged(server, publisher)
        server.enroll(name='<img src=x onerror="alert(1)">')
        response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout/pause", json={"reason": hostile})
        assert response.status_code == 200, response.text
        assert login(server).status_code == 303
        for path in (f"/dashboard/models/{MODEL}", f"/dashboard/models/{MODEL}/channels/stable/resume"):
            html = server.client.get(path).text
            assert hostile not in html and "<img src=x" not in html
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in server.client.get(f"/dashboard/models/{MODEL}").text


def test_pages_carry_a_content_security_policy_and_no_inline_script_or_style(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        staged(server, publisher)
        assert login(server).status_code == 303
        for path in ("/dashboard/", f"/dashboard/models/{MODEL}", f"/dashboard/models/{MODEL}/channels/stable/pause", "/dashboard/login"):
            response = server.client.get(path)
            policy = response.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
            assert response.headers["x-frame-options"] == "DENY"
            html = response.text
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline script on {path}"
            assert not re.search(r"\sstyle=|<style|\son[a-z]+=", html), f"inline style or handler on {path}"


def test_the_model_page_shows_devices_per_version_online_and_stalled(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        running = server.enroll(name="kiosk-running")
        assert running.report_status(1).status_code == 200
        lost = server.enroll(name="kiosk-lost")
        server.set_channel(2)  # kiosk-running still runs v1: not yet stalled, the change is new
        with server.services.db.write() as session:
            session.execute(update(Device).where(Device.id == lost.id).values(last_seen_at=utcnow() - timedelta(hours=3)))
        assert login(server).status_code == 303
        html = server.client.get(f"/dashboard/models/{MODEL}").text
        assert "2 devices, 1 online" in html and "1 stalled" in html
        row = re.search(r"<tr class=\"stalled\">.*?</tr>", html, re.S)
        assert row and "kiosk-lost" in row.group(0) and "not seen for 3.0 h" in row.group(0)


def test_online_and_stalled_follow_their_definitions():
    now = utcnow()
    assigned_long_ago = now - timedelta(seconds=STALLED_S + 60)
    fresh = now - timedelta(seconds=60)
    assert device_state(now, now, 2, 2, assigned_long_ago).online
    assert device_state(now, now, 2, 2, assigned_long_ago).stalled is None
    assert device_state(now, now - timedelta(seconds=ONLINE_S + 1), 2, 2, assigned_long_ago).online is False
    assert device_state(now, now, 2, 1, fresh).stalled is None, "a new assignment has time to arrive"
    assert "not running v2" in (device_state(now, now, 2, 1, assigned_long_ago).stalled or "")
    assert "not seen for" in (device_state(now, now - timedelta(seconds=LOST_S + 60), 2, 2, assigned_long_ago).stalled or "")
    assert device_state(now, None, 2, None, assigned_long_ago).stalled


def test_chart_data_has_one_dataset_per_version_from_the_devices_reports(publisher, tmp_path):
    reports = {1: [(200, 10), (100, 2)], 2: [(50, 20)]}  # version -> (predictions, fallbacks) per report
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        staged(server, publisher, percent=100)
        for version, items in reports.items():
            if version == 1:
                server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout/pause")
            device = server.enroll()
            assert device.assigned_version() == version
            assert device.report_status(version).status_code == 200
            for predictions, fallbacks in items:
                response = server.client.post(
                    f"/v1/devices/{device.id}/telemetry", headers=device.headers,
                    json={"version": version, "period_s": 60, "predictions": predictions, "fallbacks": fallbacks,
                          "latency_ms": {"p50": 4.0 * version, "p99": 9.0 * version}},
                )
                assert response.status_code in (200, 201, 202), response.text
            if version == 1:
                server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout/resume")
        assert login(server).status_code == 303
        body = server.client.get(f"/dashboard/models/{MODEL}/series.json?hours=6").json()
        assert len(body["buckets"]) >= 1
        fallback = {s["label"]: s["data"] for s in body["charts"]["fallback_rate"]}
        assert set(fallback) == {"v1", "v2"}
        for version, items in reports.items():
            expected = sum(f for _, f in items) / sum(p for p, _ in items)
            assert [v for v in fallback[f"v{version}"] if v is not None] == [pytest.approx(expected)]
        on_stable = server.client.get(f"/dashboard/models/{MODEL}/series.json?hours=6&channel=stable").json()
        assert on_stable["charts"]["fallback_rate"] == body["charts"]["fallback_rate"], "every device is on stable"
        elsewhere = server.client.get(f"/dashboard/models/{MODEL}/series.json?hours=6&channel=canary").json()
        assert all(not sets for sets in elsewhere["charts"].values()), "no device reported from canary"
        latency = {s["label"] for s in body["charts"]["latency_ms"]}
        assert latency == {"v1 p50", "v1 p99", "v2 p50", "v2 p99"}
        page = server.client.get(f"/dashboard/models/{MODEL}").text
        assert 'data-series-url="/dashboard/models/shop/series.json?hours=24"' in page


def test_the_vendored_chart_library_matches_its_record_and_ships_with_the_package():
    record = (DASHBOARD / "static" / "VENDORED.md").read_text()
    recorded = re.search(r"`chart\.umd\.js`.*\| `([0-9a-f]{64})` \|", record)
    assert recorded, "VENDORED.md names the sha256 of chart.umd.js"
    assert hashlib.sha256((DASHBOARD / "static" / "chart.umd.js").read_bytes()).hexdigest() == recorded.group(1)
    assert "MIT License" in (DASHBOARD / "static" / "chart.js.LICENSE.md").read_text()
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sync_server.dashboard"]
    for path in [*(DASHBOARD / "static").iterdir(), *(DASHBOARD / "templates").iterdir()]:
        relative = path.relative_to(DASHBOARD).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} would be left out of the wheel"


def logged_in_with_a_shadow_rollout(server, publisher) -> None:  # noqa: ANN001, F811
    """Versions 1 (stable) and 2 (a shadow rollout at 20 %), and an operator logged in."""
    server.publish_ok(publisher, 1, 2)
    server.set_channel(1)
    response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout",
                            json={"version": 2, "percent": 20, "mode": "shadow"})
    assert response.status_code == 200, response.text
    assert login(server).status_code == 303


def test_a_gated_promote_shows_the_unmet_gates_and_can_be_forced_from_the_page(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        logged_in_with_a_shadow_rollout(server, publisher)
        base = f"/dashboard/models/{MODEL}/channels/stable"
        confirm = server.client.get(f"{base}/promote")
        assert 'name="force"' in confirm.text, "a gated promote offers to skip the gates"
        assert "v2 · shadow" in server.client.get(f"/dashboard/models/{MODEL}").text

        refused = server.client.post(f"{base}/promote", data={"csrf": csrf_of(confirm.text)}, follow_redirects=False)
        assert refused.status_code == 409
        assert "gate_not_met" in refused.text and "quality gates are not met" in refused.text
        assert channel(server)["rollout"]["version"] == 2, "a refused promote changes nothing"

        forced = server.client.post(f"{base}/promote", data={"csrf": csrf_of(refused.text), "force": "true"}, follow_redirects=False)
        assert forced.status_code == 303
        view = channel(server)
        assert view["version"] == 2 and view["rollout"] is None
        assert view["history"][0]["reason"].startswith("forced past the quality gates")


def test_a_shadow_rollout_moves_to_canary_from_the_page_gated_then_forced_and_its_percent_changes(publisher, tmp_path):
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        logged_in_with_a_shadow_rollout(server, publisher)
        url = f"/dashboard/models/{MODEL}/channels/stable/stage"
        confirm = server.client.get(url)
        assert "becomes a canary" in confirm.text and 'name="percent"' in confirm.text and 'name="force"' in confirm.text
        csrf = csrf_of(confirm.text)

        refused = server.client.post(url, data={"csrf": csrf, "percent": "25"}, follow_redirects=False)
        assert refused.status_code == 409 and "gate_not_met" in refused.text
        assert channel(server)["rollout"]["mode"] == "shadow"
        bad = server.client.post(url, data={"csrf": csrf, "percent": "lots"}, follow_redirects=False)
        assert bad.status_code == 400 and "must be a number" in bad.text

        forced = server.client.post(url, data={"csrf": csrf, "percent": "25", "force": "true"}, follow_redirects=False)
        assert forced.status_code == 303
        rollout = channel(server)["rollout"]
        assert (rollout["mode"], rollout["percent"], rollout["version"]) == ("canary", 25, 2)

        assert server.client.post(url, data={"csrf": csrf, "percent": "60"}, follow_redirects=False).status_code == 303
        assert channel(server)["rollout"]["percent"] == 60
