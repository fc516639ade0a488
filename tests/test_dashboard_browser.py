"""An operator opens the dashboard in a real browser: logs in, reads the charts, pauses a drifting rollout.

A real sync-server process and a real headless Chromium (Debian's `chromium`, driven by Playwright
through its executable path: Playwright's own browser download is not used). scripts/test.sh installs
Chromium where it is missing and it can; on CI (CI=true) a missing browser fails this test instead of
skipping it.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.dashboard_demo import CHANNEL, MODEL, DemoFleet, baseline_bundles, report, seed
from tests.server_fixtures import ADMIN_TOKEN, ENROLLMENT_SECRET, publisher, serve_process, server_config  # noqa: F401

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def chromium_or_skip() -> Any:
    """`playwright.sync_api` once Chromium and Playwright are both there; else skip (fail on CI)."""
    problem = None
    try:
        import playwright.sync_api as api
    except ImportError:
        problem = "Playwright is not installed (pip install -e '.[dev]')"
    if problem is None and not CHROMIUM.is_file():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path/to/chromium)"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the dashboard's browser test cannot run on CI: {problem}", pytrace=False)
        pytest.skip(problem)
    return api


@contextlib.contextmanager
def demo_server(publisher: Any, tmp_path: Path, **seed_options: Any) -> Iterator[tuple[str, DemoFleet]]:
    """(URL, fleet): a sync-server process over a seeded demo fleet (v2 rolling out to 40 % of stable
    with quality gates, drifting in its past hours); gates are checked at every report."""
    data = tmp_path / "data"
    bundles = baseline_bundles(publisher.bundles[1], publisher.public_key, publisher.private_key, tmp_path)
    fleet = seed(server_config(data, None, publisher), bundles, publisher.saved_model, gates={}, **seed_options)
    args = ["--data-dir", str(data), "--admin-token", ADMIN_TOKEN, "--enrollment-secret", ENROLLMENT_SECRET,
            "--publisher-keys", str(publisher.public_key), "--embedded-preload", "off", "--log-format", "text",
            "--quality-check-interval", "0"]
    with serve_process(args, tmp_path / "server.log", ready_path="/healthz", ready_timeout_s=60) as (url, _process):
        yield url, fleet


def log_in(page: Any, url: str) -> None:
    page.goto(f"{url}/dashboard/models/{MODEL}")
    assert "/dashboard/login" in page.url, "the model page needs a login first"
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/dashboard/models/{MODEL}")
    assert page.inner_text("h1") == MODEL


def admin_channel(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/models/{MODEL}/channels/{CHANNEL}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def last_value(data: list[float | None]) -> float:
    values = [v for v in data if v is not None]
    assert values, "a dataset with no value"
    return values[-1]


def test_an_operator_logs_in_reads_the_charts_and_pauses_the_rollout_from_the_page(publisher, tmp_path):  # noqa: F811
    api = chromium_or_skip()
    problems: list[str] = []
    with demo_server(publisher, tmp_path) as (url, _fleet), api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            page.goto(f"{url}/dashboard/models/{MODEL}")
            assert "/dashboard/login" in page.url, "the model page needs a login first"
            page.fill("#token", "not-the-token-at-all")
            page.click("button[type=submit]")
            assert "not the admin token" in page.inner_text("#login-error")
            page.fill("#token", ADMIN_TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/dashboard/models/{MODEL}")
            assert page.inner_text("h1") == MODEL
            problems.clear()  # the refused login's 401 is no error of the page

            page.wait_for_selector("#charts[data-drawn]", state="attached", timeout=10_000)  # no eval: the CSP forbids it
            charts = page.evaluate(
                """() => Array.from(document.querySelectorAll('canvas[data-chart]')).map((canvas) => {
                       const chart = Chart.getChart(canvas);
                       const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                       let painted = 0;
                       for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
                       return {key: canvas.dataset.chart, painted,
                               datasets: chart ? chart.data.datasets.map((d) => ({label: d.label, data: d.data})) : []};
                   })"""
            )
            by_key = {c["key"]: c for c in charts}
            assert page.evaluate("document.getElementById('charts').dataset.drawn") == str(len(charts))
            for key in ("fallback_rate", "low_confidence_rate", "disagreement_rate", "class_jsd", "input_shift", "devices"):
                chart = by_key[key]
                assert {d["label"] for d in chart["datasets"]} == {"v1", "v2"}, (key, chart["datasets"])
                assert chart["painted"] > 2000, f"the {key} chart is blank"
            assert {d["label"] for d in by_key["latency_ms"]["datasets"]} == {"v1 p50", "v1 p99", "v2 p50", "v2 p99"}
            low = {d["label"]: last_value(d["data"]) for d in by_key["low_confidence_rate"]["datasets"]}
            jsd = {d["label"]: last_value(d["data"]) for d in by_key["class_jsd"]["datasets"]}
            assert low["v2"] > low["v1"] + 5 and jsd["v2"] > jsd["v1"], "the drifting candidate shows on the charts"

            page.click(f"#channel-{CHANNEL} a:text-is('Pause')")
            assert page.inner_text("h1") == f"Pause the rollout on {CHANNEL}?"
            page.fill("#reason", "low-confidence answers doubled on v2")
            page.click("#confirm-button")
            page.wait_for_url(f"{url}/dashboard/models/{MODEL}?done=pause&on={CHANNEL}#channel-{CHANNEL}")
            assert "Paused the rollout on stable" in page.inner_text("#flash")
            assert page.inner_text(f"#channel-{CHANNEL} .rollout-state") == "paused"
            assert page.inner_text(f"#channel-{CHANNEL} .pause-reason") == "low-confidence answers doubled on v2"
        finally:
            browser.close()
        channel = admin_channel(url)
        assert channel["rollout"]["state"] == "paused" and channel["rollout"]["reason"] == "low-confidence answers doubled on v2"
        assert channel["history"][0]["action"] == "pause"
    assert not problems, f"the browser reported errors (a CSP violation shows here): {problems}"


def test_a_drifting_canary_pauses_itself_and_the_dashboard_shows_why(publisher, tmp_path):  # noqa: F811
    api = chromium_or_skip()
    rng = random.Random(1)
    with demo_server(publisher, tmp_path) as (url, fleet), api.sync_playwright() as playwright:
        assert admin_channel(url)["rollout"]["state"] == "active"
        paused = None
        for version, devices, drift in ((1, fleet.on_v1, 0.0), (2, fleet.on_v2, 1.0)):
            for device_id in devices:
                response = httpx.post(f"{url}/v1/devices/{device_id}/telemetry", json=report(version, rng, fleet.labels, drift),
                                      headers={"Authorization": f"Bearer {fleet.tokens[device_id]}"})
                assert response.status_code in (200, 201, 202), response.text
                paused = paused or response.json().get("rollout_paused")
        channel = admin_channel(url)
        assert paused and channel["rollout"]["state"] == "paused" and channel["rollout"]["reason"] == paused
        assert channel["history"][0]["action"] != "pause", "nobody paused it by hand"

        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            log_in(page, url)
            assert page.inner_text(f"#channel-{CHANNEL} .rollout-state") == "paused"
            assert page.inner_text(f"#channel-{CHANNEL} .pause-reason") == paused
            page.click(f"#channel-{CHANNEL} details.history summary")
            history = page.inner_text(f"#channel-{CHANNEL} details.history tbody tr:first-child")
            assert channel["history"][0]["action"] in history
        finally:
            browser.close()
