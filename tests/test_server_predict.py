"""A device unsure about a photo asks the server's full model (embedded SavedModel), batched under load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import struct
import zlib

import numpy as np
import pytest

from preprocessing import PreprocessSpec, preprocess
from sync_server import BatchingOptions, UploadLimits
from sync_server.predict.batching import Batcher
from tests.server_fixtures import MODEL, live_server, photo_bytes, publisher, running_server, server_config  # noqa: F401


@pytest.fixture(scope="module")
def fallback(publisher, tmp_path_factory):
    """One server under uvicorn for the module (the SavedModel loads once): v1 and v2, stable -> v1."""
    data = tmp_path_factory.mktemp("fallback")
    config = server_config(
        data, None, publisher,
        batching=BatchingOptions(max_batch_size=8, max_wait_ms=30, num_batch_threads=1),
        limits=UploadLimits(max_image_bytes=1_000_000),
    )
    with live_server(config) as server:
        server.publish_ok(publisher, 1, 2)
        server.set_channel(1)
        yield server


@pytest.fixture(scope="module")
def reference(publisher):
    """The SavedModel's own probabilities for a photo, prepared with its float spec."""
    import tensorflow as tf

    model = tf.saved_model.load(str(publisher.saved_model))
    fn = model.signatures["serving_default"]
    spec = PreprocessSpec.from_json((publisher.saved_model / "preprocess_spec.json").read_text())

    def probabilities(photo: bytes) -> np.ndarray:
        (out,) = fn(tf.constant(preprocess(photo, spec)[None])).values()
        return out.numpy()[0]

    return probabilities


def test_a_device_gets_the_full_models_top_k_for_a_photo(fallback, reference, demo_dataset, publisher):
    device = fallback.enroll()
    photo = photo_bytes(demo_dataset, "mug")
    response = device.predict(photo, top_k=3)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == {"name": MODEL, "version": 1}, "without ?version: the device's assigned version"
    assert answer["latency_ms"] > 0
    expected = reference(photo)
    order = np.argsort(-expected)[:3]
    assert [c["label"] for c in answer["top_k"]] == [publisher.labels[i] for i in order]
    assert [c["score"] for c in answer["top_k"]] == pytest.approx([float(expected[i]) for i in order], abs=1e-5)

    assert len(device.predict(photo, top_k=1).json()["top_k"]) == 1
    assert len(device.predict(photo, top_k=100).json()["top_k"]) == len(publisher.labels)
    unassigned = device.predict(photo, version=2)
    assert unassigned.status_code == 403 and unassigned.json()["error"]["code"] == "not_assigned"
    by_admin = fallback.admin("POST", f"/v1/models/{MODEL}/predict", params={"version": 2}, content=photo,
                              headers={"Content-Type": "application/octet-stream"})
    assert by_admin.json()["model"]["version"] == 2, "the admin may ask any version"


def test_the_device_side_fallback_client_gets_the_answer(fallback, demo_dataset):
    """edge_runtime.fallback, as a kiosk runs it, against the real server over HTTP."""
    from edge_runtime.fallback import FallbackClient, FallbackOptions

    device = fallback.enroll()
    client = FallbackClient(FallbackOptions(fallback.url, timeout_s=30, token=device.token))
    answer = client.predict(photo_bytes(demo_dataset, "book"), MODEL, None, 2)
    assert (answer.model_name, answer.model_version, len(answer.categories)) == (MODEL, 1, 2)
    assert answer.categories[0].score >= answer.categories[1].score


def test_bad_photos_and_bad_requests_get_json_errors(fallback, demo_dataset):
    device = fallback.enroll()
    photo = photo_bytes(demo_dataset, "mug")
    cases = [
        (b"", 400, "empty"),
        (b"%PDF-1.4 this is a document", 422, "unsupported_format"),
        (b"hello, not a photo", 422, "not_an_image"),
        (photo[: len(photo) // 2], 422, "truncated"),
        (b"\xff" * 1_000_001, 413, "too_large"),
    ]
    for body, status, code in cases:
        response = device.predict(body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        assert response.json()["error"]["message"]

    response = device.predict(_png_claiming(30_000, 30_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large", "pixel limit from the header"

    assert device.predict(photo, top_k=0).json()["error"] == {
        "code": "invalid_request", "message": "query parameter top_k: Input should be greater than or equal to 1"}
    unknown_version = device.predict(photo, version=9)
    assert unknown_version.status_code == 403 and unknown_version.json()["error"]["code"] == "not_assigned"
    admin_version = fallback.client.post(f"/v1/models/{MODEL}/predict", params={"version": 9}, headers=fallback.admin_headers, content=photo)
    assert admin_version.status_code == 404 and admin_version.json()["error"]["code"] == "unknown_version"
    other_model = fallback.client.post("/v1/models/other/predict", headers=device.headers, content=photo)
    assert other_model.status_code == 403 and other_model.json()["error"]["code"] == "forbidden"
    admin_unknown = fallback.client.post("/v1/models/other/predict", headers=fallback.admin_headers, content=photo)
    assert admin_unknown.status_code == 404 and admin_unknown.json()["error"]["code"] == "unknown_model"
    admin_channel = fallback.client.post(f"/v1/models/{MODEL}/predict", params={"channel": "stable"}, headers=fallback.admin_headers, content=photo)
    assert admin_channel.json()["model"]["version"] == 1
    assert fallback.client.post(f"/v1/models/{MODEL}/predict", content=photo).status_code == 401


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims a huge picture (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_concurrent_requests_are_batched_and_answer_like_single_ones(fallback, reference, demo_dataset, publisher):
    device = fallback.enroll()
    photos = [photo_bytes(demo_dataset, label, i) for label in publisher.labels for i in range(2)]

    def ask(photo: bytes) -> dict:
        response = device.predict(photo, top_k=len(publisher.labels))
        assert response.status_code == 200, response.text
        return {c["label"]: c["score"] for c in response.json()["top_k"]}

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, photos))
    for photo, answer in zip(photos, answers):
        expected = reference(photo)
        assert [answer[label] for label in publisher.labels] == pytest.approx(expected.tolist(), abs=1e-5)

    metrics = fallback.client.get("/metrics").text
    sizes = {float(le): float(count) for le, count in re.findall(
        r'sync_server_predict_batch_size_bucket\{backend="embedded",le="([\d.+Inf]+)"\} ([\d.]+)', metrics) if le != "+Inf"}
    total = float(re.search(r'sync_server_predict_batch_size_count\{backend="embedded"\} ([\d.]+)', metrics).group(1))
    assert total < len(photos) + 10, "some photos shared a batch"
    assert sizes[1.0] < total, "not every batch held one photo"


def test_batching_off_sends_each_photo_alone(publisher, demo_dataset, tmp_path):
    config = server_config(tmp_path / "data", None, publisher, batching=BatchingOptions(enabled=False))
    with running_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        device = server.enroll()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda i: device.predict(photo_bytes(demo_dataset, index=i)).status_code, range(6)))
        assert statuses == [200] * 6
        metrics = server.client.get("/metrics").text
        assert 'sync_server_predict_batch_size_bucket{backend="embedded",le="1.0"} 6.0' in metrics


# --- the batcher on its own ------------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(coro)


def test_the_batcher_fills_batches_up_to_the_maximum_and_keeps_order():
    seen: list[int] = []

    async def run(key, batch):
        seen.append(len(batch))
        await asyncio.sleep(0.01)
        return batch * 2

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=4, max_wait_ms=50, num_batch_threads=1))
        results = await asyncio.gather(*(batcher.submit("m", np.full(3, i, np.float32)) for i in range(10)))
        await batcher.aclose()
        return results

    results = _run(main())
    assert [r.tolist() for r in results] == [[2.0 * i] * 3 for i in range(10)]
    assert max(seen) == 4 and sum(seen) == 10 and len(seen) == 3


def test_a_lone_request_waits_at_most_the_maximum_wait():
    async def run(key, batch):
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=20, num_batch_threads=1))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit("m", np.zeros(2, np.float32))
        elapsed = loop.time() - started
        await batcher.aclose()
        return elapsed

    assert _run(main()) < 0.2


def test_on_an_idle_servable_a_request_is_sent_by_its_own_task_and_those_arriving_meanwhile_batch_up():
    tasks: list[tuple[int, bool]] = []

    async def run(key, batch):
        tasks.append((len(batch), asyncio.current_task() is asking))
        await asyncio.sleep(0.05)
        return batch + 1

    async def main():
        nonlocal asking
        batcher = Batcher(run, BatchingOptions(max_batch_size=8, max_wait_ms=20, num_batch_threads=2))
        await batcher.submit("m", np.zeros(1, np.float32))  # starts the lane's scheduler
        await asyncio.sleep(0.01)
        tasks.clear()
        asking = asyncio.create_task(batcher.submit("m", np.zeros(1, np.float32)))
        await asyncio.sleep(0.01)  # the lone request is with the backend now
        meanwhile = await asyncio.gather(*(batcher.submit("m", np.full(1, i, np.float32)) for i in range(5)))
        alone = await asking
        records = list(batcher.recent)
        await batcher.aclose()
        return alone, meanwhile, records

    asking = None
    alone, meanwhile, records = _run(main())
    assert alone.tolist() == [1.0] and [m.tolist() for m in meanwhile] == [[1.0 + i] for i in range(5)]
    assert tasks == [(1, True), (5, False)], "the lone request went by itself; the five behind it as one batch"
    assert records[-2].size == 1 and records[-2].waited_s == 0.0 and records[-1].others_in_flight == 1


def test_a_failing_batch_fails_each_of_its_requests_and_the_next_batch_runs():
    calls = []

    async def run(key, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("backend exploded")
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=8, max_wait_ms=20, num_batch_threads=1))
        first = await asyncio.gather(*(batcher.submit("m", np.ones(1, np.float32)) for _ in range(3)), return_exceptions=True)
        second = await batcher.submit("m", np.ones(1, np.float32))
        await batcher.aclose()
        return first, second

    first, second = _run(main())
    assert all(isinstance(e, RuntimeError) and str(e) == "backend exploded" for e in first)
    assert second.tolist() == [1.0]


def test_versions_are_batched_separately():
    keys = []

    async def run(key, batch):
        keys.append((key, len(batch)))
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=8, max_wait_ms=20, num_batch_threads=1))
        await asyncio.gather(*(batcher.submit(("m", 1 + i % 2), np.ones(1, np.float32)) for i in range(6)))
        await batcher.aclose()

    _run(main())
    assert sorted(keys) == [(("m", 1), 3), (("m", 2), 3)]



def test_a_request_whose_deadline_passes_in_the_queue_is_never_sent_and_a_batch_gets_the_time_left():
    """One slow batch holds the only slot; the requests queued behind it give up at their deadline."""
    sent: list[tuple[int, float]] = []

    async def run(key, batch, timeout_s=None):
        sent.append((len(batch), timeout_s))
        await asyncio.sleep(0.5)
        return batch

    async def ask(batcher, loop, deadline_in: float):
        deadline = loop.time() + deadline_in
        async with asyncio.timeout_at(deadline):
            return await batcher.submit("m", np.ones(1, np.float32), deadline)

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(run, BatchingOptions(max_batch_size=1, max_wait_ms=0, num_batch_threads=1))
        started = loop.time()
        first = asyncio.create_task(ask(batcher, loop, 2.0))
        await asyncio.sleep(0.05)
        queued = await asyncio.gather(*(ask(batcher, loop, 0.3) for _ in range(3)), return_exceptions=True)
        queued_done = loop.time() - started
        answer = await first
        await asyncio.sleep(0.1)
        await batcher.aclose()
        return queued, queued_done, answer

    queued, queued_done, answer = _run(main())
    assert all(isinstance(e, TimeoutError) for e in queued)
    assert queued_done < 0.5, "the queued requests were answered at their deadline, not after the batch ahead"
    assert answer.tolist() == [1.0]
    assert len(sent) == 1, f"requests past their deadline were sent: {sent}"
    assert 1.8 < sent[0][1] <= 2.0, "the backend call got the time its request had left"


# --- adaptive batching: no wait when idle, batches under load -----------------------------------------


def test_a_lone_request_goes_at_once_even_with_a_long_batch_window():
    """With nothing running, the batch window does not apply: the photo is sent as soon as it arrives."""
    sent_after: list[float] = []

    async def run(key, batch):
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=5_000, num_batch_threads=2))
        loop = asyncio.get_running_loop()
        answers = []
        for _ in range(3):  # one at a time, as a single device asks
            started = loop.time()
            answers.append(await batcher.submit("m", np.ones(2, np.float32)))
            sent_after.append(loop.time() - started)
        records = list(batcher.recent)
        await batcher.aclose()
        return answers, records

    answers, records = _run(main())
    assert [a.tolist() for a in answers] == [[1.0, 1.0]] * 3
    assert [r.size for r in records] == [1, 1, 1]
    assert max(sent_after) < 1.0, f"a lone request waited for the 5 s batch window: {sent_after}"
    assert all(r.others_in_flight == 0 for r in records)


def test_requests_arriving_while_a_batch_runs_go_together_as_the_next_batch():
    """One slot: the first photo goes alone; the ten that come while it runs form the next batch."""
    sizes: list[int] = []

    async def run(key, batch):
        sizes.append(len(batch))
        await asyncio.sleep(0.3)
        return batch + 1

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=5_000, num_batch_threads=1))
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(batcher.submit("m", np.zeros(1, np.float32)))
        while batcher.in_flight("m") == 0:
            await asyncio.sleep(0.005)
        later = [asyncio.create_task(batcher.submit("m", np.full(1, i, np.float32))) for i in range(10)]
        answers = await asyncio.gather(first, *later)
        elapsed = loop.time() - started
        await batcher.aclose()
        return answers, elapsed

    answers, elapsed = _run(main())
    assert sizes == [1, 10], sizes
    assert [a.tolist() for a in answers] == [[1.0]] + [[i + 1.0] for i in range(10)]
    assert elapsed < 3.0, "the second batch went when the backend was free, not after the 5 s window"


def test_with_two_slots_a_busy_servable_gathers_its_second_batch_and_sends_it_when_the_first_ends():
    """A batch is running and a slot is free: photos gather (up to the window) instead of going one by one."""
    sizes: list[int] = []

    async def run(key, batch):
        sizes.append(len(batch))
        await asyncio.sleep(0.3)
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=5_000, num_batch_threads=2))
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(batcher.submit("m", np.zeros(1, np.float32)))
        while batcher.in_flight("m") == 0:
            await asyncio.sleep(0.005)
        later = []
        for i in range(6):  # trickling in, as prepared photos do
            later.append(asyncio.create_task(batcher.submit("m", np.full(1, i, np.float32))))
            await asyncio.sleep(0.01)
        await asyncio.gather(first, *later)
        elapsed = loop.time() - started
        await batcher.aclose()
        return elapsed

    elapsed = _run(main())
    assert sizes == [1, 6], sizes
    assert elapsed < 3.0, "the gathering batch went when the running one finished, not after the 5 s window"


def test_a_queued_request_past_its_deadline_is_not_sent_with_a_long_batch_window():
    """The wait for a batch to fill never outlasts a deadline: the request gives up on time, unsent."""
    sent: list[int] = []

    async def run(key, batch, timeout_s=None):
        sent.append(len(batch))
        await asyncio.sleep(1.0)
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=5_000, num_batch_threads=2))
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(batcher.submit("m", np.zeros(1, np.float32), loop.time() + 5))
        while batcher.in_flight("m") == 0:
            await asyncio.sleep(0.005)
        started = loop.time()
        deadline = started + 0.2
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await batcher.submit("m", np.ones(1, np.float32), deadline)
        gave_up_after = loop.time() - started
        await first
        await asyncio.sleep(0.05)
        await batcher.aclose()
        return gave_up_after

    gave_up_after = _run(main())
    assert gave_up_after < 0.9, "the caller was answered at its deadline"
    assert sent == [1], f"the request past its deadline was sent: {sent}"


def test_closing_the_batcher_answers_the_photos_of_a_batch_still_gathering():
    """A batch waiting to fill when the server stops: its callers are cancelled, none is left hanging."""
    async def run(key, batch):
        await asyncio.sleep(0.3)
        return batch

    async def main():
        batcher = Batcher(run, BatchingOptions(max_batch_size=32, max_wait_ms=5_000, num_batch_threads=2))
        first = asyncio.create_task(batcher.submit("m", np.zeros(1, np.float32)))
        while batcher.in_flight("m") == 0:
            await asyncio.sleep(0.005)
        gathering = asyncio.create_task(batcher.submit("m", np.ones(1, np.float32)))
        await asyncio.sleep(0.05)  # taken by the second slot, waiting for more
        await batcher.aclose()
        done, pending = await asyncio.wait({first, gathering}, timeout=2.0)
        return gathering in done and gathering.cancelled(), pending

    gathering_cancelled, pending = _run(main())
    assert not pending, "a caller was left waiting after the batcher closed"
    assert gathering_cancelled
