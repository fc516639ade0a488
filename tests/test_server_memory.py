"""Any device can send small files that decode to huge pictures: the server answers each one clearly and
its memory stays under a stated bound (the decode budget plus a margin), in a real server process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import time
from pathlib import Path
from typing import Iterator

import httpx
from PIL import Image

from tests.server_fixtures import ADMIN_TOKEN, ENROLLMENT_SECRET, MODEL, publisher, serve_process  # noqa: F401

BUDGET_MB = 160
MARGIN_MB = 100  # request bodies, threads' stacks, the model's tensors, allocator slack


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rgba_png(size: int) -> bytes:
    image = Image.new("RGBA", (size, size), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (size // 7, size // 7, size * 3 // 7, size * 3 // 7))
    return _encode(image, "PNG", optimize=True)


def gif(size: int) -> bytes:
    image = Image.new("P", (size, size), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (size // 7, size // 7, size * 3 // 7, size * 3 // 7))
    return _encode(image, "GIF", transparency=0)


def _status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024
    return fields


@contextlib.contextmanager
def server_process(data_dir: Path, public_key: Path, **settings: str) -> Iterator[tuple[str, int]]:
    env = {
        "SYNC_SERVER_DATA_DIR": str(data_dir), "SYNC_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
        "SYNC_SERVER_ENROLLMENT_SECRET": ENROLLMENT_SECRET, "SYNC_SERVER_PUBLISHER_KEYS": str(public_key),
        "SYNC_SERVER_LOG_LEVEL": "warning",
        "SYNC_SERVER_THROTTLE": "off",  # one device sends the whole burst: this is about memory, not rate limits
        **{f"SYNC_SERVER_{k.upper()}": v for k, v in settings.items()},
    }
    with serve_process([], data_dir / "server.log", env=env) as (url, process):
        yield url, process.pid


def test_big_pictures_get_clear_answers_and_the_server_stays_under_its_memory_bound(publisher, chelsea, tmp_path):  # noqa: F811
    from sync_server.client import SyncServerClient

    with server_process(tmp_path, publisher.public_key, decode_budget=str(BUDGET_MB << 20), decode_wait="0.5") as (url, pid):
        with SyncServerClient(url, ADMIN_TOKEN) as admin:
            admin.publish(publisher.bundles[1], publisher.saved_model, channel="stable")
        device = httpx.post(f"{url}/v1/devices/enroll", headers={"Authorization": f"Bearer {ENROLLMENT_SECRET}"},
                            json={"model": MODEL}, timeout=30).json()
        headers = {"Authorization": f"Bearer {device['token']}", "Content-Type": "application/octet-stream"}

        def predict(body: bytes) -> httpx.Response:
            return httpx.post(f"{url}/v1/models/{MODEL}/predict", content=body, headers=headers, timeout=60)

        phone_photo = _encode(chelsea.resize((4032, 3024)), "JPEG", quality=90)  # 12 MP: decoded at 1/8
        deadline = time.monotonic() + 120
        while predict(phone_photo).status_code != 200:  # the SavedModel loads on first use
            assert time.monotonic() < deadline, "the model never answered"
            time.sleep(0.5)

        baseline = _status(pid)["VmRSS"]
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        full_size_png = rgba_png(4000)  # 16 MP RGBA: at the limit, 64 MB decoded
        bodies = [full_size_png] * 8 + [rgba_png(7000), gif(7000)]  # 208 KB and ~60 KB files, 49 MP each
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(predict, bodies))
        peak = _status(pid)["VmHWM"]
        jpegs = [predict(phone_photo) for _ in range(3)]

    for answer in answers[:8]:
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "busy" and int(answer.headers["Retry-After"]) >= 1
            assert "send it again" in answer.json()["error"]["message"]
    assert any(a.status_code == 200 for a in answers[:8]), "the budget lets some of them through"
    for answer in answers[8:]:  # decoded at full size, 49 MP: refused from the header
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large", answer.text
        assert "decoded at full size" in answer.json()["error"]["message"]
    assert [j.status_code for j in jpegs] == [200] * 3, "phone photos are still welcome"
    assert peak - baseline < BUDGET_MB + MARGIN_MB, f"peak {peak:.0f} MB over a baseline of {baseline:.0f} MB"
