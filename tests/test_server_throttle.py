"""Request throttling: a device that sends too much is told to wait (429 with an honest Retry-After).

One device floods the fallback, its reports or enrolment; it gets 429 once its bucket is empty, and a
request sent after the Retry-After it was given goes through. Other devices and the admin are not
slowed down, and `/metrics` counts what was refused.
"""

from __future__ import annotations

import re
import time

import pytest

from sync_server.config import ThrottleOptions
from sync_server.throttle import TokenBuckets, retry_after
from tests.server_fixtures import ENROLLMENT_SECRET, MODEL, publisher, running_server, server_config  # noqa: F401

BURST = 3


@pytest.fixture
def server(publisher, tmp_path):
    throttle = ThrottleOptions(predict_per_s=0.5, predict_burst=BURST, reports_per_s=0.5, reports_burst=BURST,
                               enroll_per_s=0.5, enroll_burst=BURST + 2)
    with running_server(server_config(tmp_path / "data", None, publisher, throttle=throttle)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        yield server


def _telemetry(device):
    body = {"version": 1, "period_s": 60, "predictions": 10, "fallbacks": 1}
    return device.server.client.post(f"/v1/devices/{device.id}/telemetry", headers=device.headers, json=body)


def _throttled(server, scope: str) -> float:
    text = server.client.get("/metrics").text
    match = re.search(rf'sync_server_throttled_requests_total\{{scope="{scope}"\}} ([\d.]+)', text)
    return float(match.group(1)) if match else 0.0


def test_a_device_flooding_reports_gets_429_and_retry_after_is_honest(server):
    flooding, other = server.enroll(), server.enroll()
    answers = [_telemetry(flooding) for _ in range(BURST)]
    assert [a.status_code for a in answers] == [202] * BURST, answers[-1].text

    refused = _telemetry(flooding)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "0.5 per second with bursts of 3" in refused.json()["error"]["message"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 2, "an empty bucket refilling at 0.5/s has a token within 2 s"
    assert flooding.report_status(1).status_code == 429, "status and telemetry share the reports bucket"

    assert _telemetry(other).status_code == 202, "another device is not slowed down"

    time.sleep(wait)
    assert _telemetry(flooding).status_code == 202, f"waiting the {wait} s Retry-After was enough"
    assert _throttled(server, "reports") == 2


def test_a_device_flooding_the_fallback_gets_429_before_its_photo_is_read(server):
    flooding, other = server.enroll(), server.enroll()
    for _ in range(BURST):
        assert flooding.predict(b"").status_code == 400, "an empty photo still takes a token"
    refused = flooding.predict(b"")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert other.predict(b"").status_code == 400
    admin = server.client.post(f"/v1/models/{MODEL}/predict", headers=server.admin_headers, content=b"")
    assert all(server.client.post(f"/v1/models/{MODEL}/predict", headers=server.admin_headers, content=b"").status_code == 400
               for _ in range(BURST + 2)), "the admin token is not throttled"
    assert admin.status_code == 400

    time.sleep(int(refused.headers["retry-after"]))
    assert flooding.predict(b"").status_code == 400
    assert _throttled(server, "predict") == 1
    metrics = server.client.get("/metrics").text
    assert 'sync_server_requests_total{method="POST",route="/v1/models/{name}/predict",status="429"} 1.0' in metrics


def test_enrolment_is_throttled_per_credential(server):
    for _ in range(BURST + 2 - 1):  # the fixture's server has not enrolled anyone yet
        server.enroll()
    headers = {"Authorization": f"Bearer {ENROLLMENT_SECRET}"}
    last = server.client.post("/v1/devices/enroll", headers=headers, json={"model": MODEL})
    assert last.status_code == 201, "the whole burst is allowed"
    refused = server.client.post("/v1/devices/enroll", headers=headers, json={"model": MODEL})
    assert refused.status_code == 429 and refused.headers["retry-after"] in ("1", "2")
    wrong = server.client.post("/v1/devices/enroll", headers={"Authorization": "Bearer not-the-secret-0123456789"}, json={"model": MODEL})
    assert wrong.status_code == 401, "another credential has its own bucket"
    assert _throttled(server, "enroll") == 1


def test_throttling_can_be_turned_off(publisher, tmp_path):
    config = server_config(tmp_path / "data", None, publisher, throttle=ThrottleOptions(enabled=False))
    with running_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        assert all(device.predict(b"").status_code == 400 for _ in range(30))


def test_a_token_bucket_refills_at_its_rate_and_retry_after_rounds_up():
    now = [100.0]
    buckets = TokenBuckets(rate_per_s=0.4, burst=2, max_keys=2, clock=lambda: now[0])
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.0
    wait = buckets.take("a")
    assert wait == pytest.approx(2.5) and retry_after(wait) == 3
    now[0] += 2.4
    assert buckets.take("a") > 0, "not a whole token yet"
    now[0] += 0.1
    assert buckets.take("a") == 0.0, "a token is back after the wait"
    assert retry_after(1.0) == 1 and retry_after(0.01) == 1

    assert buckets.take("b") == 0.0 and buckets.take("c") == 0.0
    assert len(buckets) == 2, "the least recently used credential is forgotten"
