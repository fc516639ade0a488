"""Benchmark the sync server: fallback throughput and latency, batching on and off, and 304 assignment checks.

    python bench/bench_server.py [--models demo,mobilenetv2] [--saved-model DIR] [--seconds 5]
                                 [--clients 1,16,64] [--json out.json]

In one run, for each model (`demo`: a 96x96 demo-architecture model trained for one epoch on a small
synthetic data set, or `--saved-model`; `mobilenetv2`: `MobileNetV2(weights=None)` at 224x224 with 6
classes, random weights and real compute, built into the work folder; nothing is downloaded), published
with `converter.serving.add_pixel_signatures` (`--pixel-signatures off`: as exported), it:
  1. converts the SavedModel into a signed bundle and renders a few synthetic shop photos;
  2. measures the bytes on the wire per photo (device to server, and server to backend for each protocol:
     float32 for a version without the pixel signatures, uint8 / base64 PNG for one with them, from the
     backends' own encoders) and the compact JSON encoding the TF Serving REST client sends against json.dumps;
  3. measures where a photo's CPU time goes in this process: preparing it (decode, fit, resize) and
     the model per photo at batch 1 and at a full batch;
  4. for batching on and off: starts `sync-server serve` in a subprocess (embedded SavedModel, or
     `--tf-serving-url`), publishes over HTTP, enrols a device, and for each client count sends
     fallback predictions from that many concurrent clients for `--seconds` (after a warm-up),
     recording throughput, p50/p99 latency and the server's batches (from /metrics);
  5. checks the issue's targets (1 client: on within 5 % of off; 64 clients: on at least 1.8x off,
     p99 under 200 ms) and prints met / MISSED;
  6. for the first model, measures assignment checks per second with If-None-Match (all 304).

The load generator runs in this process (asyncio, one keep-alive HTTP/1.1 connection per client);
the server runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import httpx
from _sync_server import sync_server_process
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN = "bench-admin-token-0123456789abcdef"
SECRET = "bench-enrol-secret-0123456789abcdef"


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def build_mobilenetv2(out: Path, data: Path) -> Path:
    """A 224x224 MobileNetV2 (random weights, 6 classes) exported like a trained demo model."""
    import contextlib
    import io

    import tensorflow as tf
    import tf_keras as keras

    from edge_demo.train import INPUT_NAME, OUTPUT_NAME
    from preprocessing import PreprocessSpec

    if (out / "saved_model.pb").is_file():
        return out
    print("building a 224x224 MobileNetV2 (random weights) ...", flush=True)
    labels = (data / "labels.txt").read_text().split()
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=len(labels))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda image: {OUTPUT_NAME: model(image, training=False)},
                         input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name=INPUT_NAME)])
    with contextlib.redirect_stdout(io.StringIO()):
        archive.write_out(str(tmp))
    spec = PreprocessSpec(height=224, width=224, fit="pad", pad_color=(128, 128, 128))  # as the demo: [-1, 1]
    (tmp / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    (tmp / "preprocess_spec.json").write_text(spec.to_json() + "\n")
    tmp.rename(out)
    return out


def prepare_inputs(work: Path, saved_model: Path | None, model: str = "demo",
                   pixel_signatures: bool = False) -> tuple[Path, Path, Path, list[bytes]]:
    """(SavedModel, bundle, publisher public key, photos); with `pixel_signatures` the SavedModel converted and
    published is `add_pixel_signatures`' copy (the backend then gets uint8 pixels, normalised in the graph)."""
    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    data = work / "data"
    if not data.exists():
        generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 8), ("val", 2), ("test", 4)), long_side=(480, 800)))
    photos = [p.read_bytes() for p in sorted((data / "test").rglob("*.jpg"))][:16]
    if model == "mobilenetv2":
        saved_model = build_mobilenetv2(work / "mobilenetv2", data)
    elif saved_model is None:
        saved_model = work / "model"
        if not saved_model.exists():
            from edge_demo.train import TrainOptions, train

            print("training a throwaway 96x96 model (one epoch) ...", flush=True)
            train(data, saved_model, TrainOptions(epochs=1, patience=0))
    if pixel_signatures:
        from converter.serving import add_pixel_signatures

        with_pixels = work / f"{model}-pixels"
        if not (with_pixels / "saved_model.pb").is_file():
            shutil.rmtree(with_pixels, ignore_errors=True)
            add_pixel_signatures(saved_model, with_pixels)
        saved_model = with_pixels
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair

    key = work / "publisher"
    if not key.exists():
        write_keypair(key)
    bundle = work / f"bundle-{model}{'-pixels' if pixel_signatures else ''}"
    shutil.rmtree(bundle, ignore_errors=True)
    convert(saved_model, ConvertOptions(out=bundle, validation=ValidationOptions(skip=True), signing=SigningOptions(key=key), name="bench", version=1))
    return saved_model, bundle, Path(str(key) + ".pub"), photos


def encoding_report(saved_model: Path, photo: bytes) -> dict[str, Any]:
    """Size and time of the TF Serving request body: exact shortest float32 vs json.dumps vs rounded."""
    from preprocessing import PreprocessSpec, preprocess
    from sync_server.predict.json_tensor import encode_float_tensor

    spec = PreprocessSpec.from_json((saved_model / "preprocess_spec.json").read_text())
    x = preprocess(photo, spec)[None]

    def timed(fn) -> tuple[int, float]:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        for _ in range(20):
            text = fn()
        return len(text), (time.perf_counter() - started) / 20 * 1000

    exact = timed(lambda: encode_float_tensor(x))
    naive = timed(lambda: json.dumps(x.tolist()))
    rounded = timed(lambda: json.dumps(np.round(x.astype(np.float64), 4).tolist()))
    return {
        "input_shape": list(x.shape),
        "exact_shortest_float32": {"bytes": exact[0], "ms": round(exact[1], 2), "bit_exact": True},
        "json_dumps_tolist": {"bytes": naive[0], "ms": round(naive[1], 2), "bit_exact": True},
        "rounded_4_decimals": {"bytes": rounded[0], "ms": round(rounded[1], 2), "bit_exact": False},
    }


def wire_report(saved_model: Path, photos: list[bytes]) -> dict[str, Any]:
    """Bytes per photo on each hop, from the backends' own encoders: float32 for a version without the pixel
    signatures, uint8 (REST: base64 PNGs) for one with them; the REST PNGs' size varies with the photo (mean)."""
    from preprocessing import PreprocessSpec, preprocess, preprocess_pixels
    from sync_server.predict.json_tensor import encode_float_tensor
    from sync_server.predict.oip import ModelInfo, TensorInfo, encode_infer_request
    from sync_server.predict.tf_serving import encode_png, encode_png_request
    from sync_server.predict.tf_serving_grpc import _protos, encode_tensor

    spec = PreprocessSpec.from_json((saved_model / "preprocess_spec.json").read_text())
    x = preprocess(photos[0], spec)[None]
    pixels = [preprocess_pixels(p, spec)[None] for p in photos]

    def grpc_bytes(batch: np.ndarray, signature: str, key: str) -> int:
        request = _protos().predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "bench", signature
        request.model_spec.version.value = 1
        request.inputs[key].CopyFrom(encode_tensor(batch))
        return request.ByteSize()

    def oip_bytes(batch: np.ndarray, datatype: str) -> int:
        info = ModelInfo(TensorInfo("image", datatype, (-1, spec.height, spec.width, 3)), TensorInfo("output_0", "FP32", (-1, 6)))
        return len(encode_infer_request(info, batch)[0])

    png_ms = {}
    for level in (0, 1, 3, 6):
        started = time.perf_counter()
        sizes = [len(encode_png(p[0], level)) for p in pixels]
        png_ms[level] = {"ms": round((time.perf_counter() - started) / len(pixels) * 1000, 2), "png_bytes_mean": int(np.mean(sizes)),
                         "png_bytes_max": max(sizes)}
    return {
        "device_to_server_photo_bytes": int(np.mean([len(p) for p in photos])),
        "device_to_server_prepared_uint8_bytes": spec.height * spec.width * 3,
        "server_to_backend_embedded_bytes": 0,  # in this process: no wire
        "server_to_backend_rest_json_bytes": len(encode_float_tensor(x)),
        "server_to_backend_float32_tensor_bytes": int(x.nbytes),
        "per_protocol": {
            "tf-serving-rest": {"float32": len('{"instances":' + encode_float_tensor(x) + "}"),
                                "pixels": int(np.mean([len(encode_png_request(p, "png")) for p in pixels]))},
            "tf-serving-grpc": {"float32": grpc_bytes(x, "serving_default", "image"), "pixels": grpc_bytes(pixels[0], "pixels", "pixels")},
            "oip": {"float32": oip_bytes(x, "FP32"), "pixels": oip_bytes(pixels[0], "UINT8")},
        },
        "png_by_compress_level": png_ms,
    }


def lone_request_overhead(fn: Any, x: np.ndarray, rounds: int = 200) -> dict[str, float]:
    """One request at a time through the batcher against straight to the model, interleaved in this process.

    The 1-client comparison over HTTP swings by +-20 % on a shared machine; interleaving the two paths
    call by call cancels the neighbours' load and leaves what batching itself costs a lone request.
    """
    import anyio
    import tensorflow as tf

    from sync_server.config import BatchingOptions
    from sync_server.predict.batching import Batcher

    limiter = anyio.CapacityLimiter(4)

    async def run(key: object, batch: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        return await anyio.to_thread.run_sync(lambda: next(iter(fn(tf.constant(batch)).values())).numpy(), limiter=limiter)

    async def main() -> tuple[float, float]:
        batcher = Batcher(run, BatchingOptions())
        on, off = [], []
        for i in range(rounds + 10):
            t0 = time.perf_counter()
            await batcher.submit("m", x, asyncio.get_running_loop().time() + 10)
            t1 = time.perf_counter()
            await run("m", x[None], timeout_s=10)
            t2 = time.perf_counter()
            if i >= 10:
                on.append(t1 - t0)
                off.append(t2 - t1)
        await batcher.aclose()
        return float(np.median(on)) * 1000, float(np.median(off)) * 1000

    on_ms, off_ms = asyncio.run(main())
    return {"lone_request_batcher_ms": round(on_ms, 3), "lone_request_direct_ms": round(off_ms, 3)}


def cpu_report(saved_model: Path, photos: list[bytes], max_batch: int = 32) -> dict[str, float]:
    """Where a photo's time goes, measured in this process: prepare, and the model at batch 1 and full."""
    import tensorflow as tf

    from preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec.from_json((saved_model / "preprocess_spec.json").read_text())
    started = time.perf_counter()
    xs = [preprocess(photos[i % len(photos)], spec) for i in range(64)]
    prepare_ms = (time.perf_counter() - started) / 64 * 1000
    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]

    def per_photo_ms(size: int, rounds: int) -> float:
        batch = tf.constant(np.stack([xs[i % len(xs)] for i in range(size)]))
        fn(batch)  # trace and warm
        started = time.perf_counter()
        for _ in range(rounds):
            fn(batch)
        return (time.perf_counter() - started) / rounds / size * 1000

    return {
        **lone_request_overhead(fn, xs[0]),
        "prepare_ms_per_photo": round(prepare_ms, 2),
        "model_ms_per_photo_batch_1": round(per_photo_ms(1, 30), 2),
        f"model_ms_per_photo_batch_{max_batch}": round(per_photo_ms(max_batch, 3), 2),
    }


# ----------------------------------------------------------------------------------------------------------
# The server under test
# ----------------------------------------------------------------------------------------------------------


def server_process(data_dir: Path, public_key: Path, batching: bool, tf_serving_url: str | None,
                   extra: dict[str, str] | None = None) -> contextlib.AbstractContextManager[str]:
    settings = {
        "SYNC_SERVER_DATA_DIR": str(data_dir),
        "SYNC_SERVER_ADMIN_TOKEN": ADMIN,
        "SYNC_SERVER_ENROLLMENT_SECRET": SECRET,
        "SYNC_SERVER_PUBLISHER_KEYS": str(public_key),
        "SYNC_SERVER_BATCHING": "on" if batching else "off",
        "SYNC_SERVER_THROTTLE": "off",  # one device sends every request, far faster than a device would
        "SYNC_SERVER_LOG_LEVEL": "warning",
    }
    if tf_serving_url:
        settings["SYNC_SERVER_TF_SERVING_URL"] = tf_serving_url
    settings.update(extra or {})
    return sync_server_process(settings, data_dir / f"server-{'on' if batching else 'off'}.log")


def publish_and_enroll(url: str, bundle: Path, saved_model: Path) -> dict[str, str]:
    from sync_server.client import SyncServerClient

    with SyncServerClient(url, ADMIN) as admin:
        admin.publish(bundle, saved_model, channel="stable")
    device = httpx.post(url + "/v1/devices/enroll", headers={"Authorization": f"Bearer {SECRET}"}, json={"model": "bench"}, timeout=30).json()
    return device


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams.

    httpx's async pool costs more CPU than the server at 64 connections (measured here: a trivial
    Starlette app fell from 236 to 60 requests/s between 16 and 64 httpx clients), so the load
    generator speaks HTTP/1.1 itself: one request at a time per connection, Content-Length bodies.
    """

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


async def load(url: str, clients: int, seconds: float, request: Any, warmup_s: float = 1.0) -> dict[str, Any]:
    """Run `clients` concurrent loops of `request(connection, i)` for `warmup_s + seconds`.

    Throughput counts the requests that *finished* inside the measured window (after the warm-up,
    before the end), divided by its length; latency percentiles are over the requests that *started*
    inside it. Requests still running at the end are waited for but do not stretch the window.
    """
    spans: list[tuple[float, float, int]] = []
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop = measure_from + seconds

    async def worker(index: int) -> None:
        connection = RawConnection(url)
        i = index
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status = await request(connection, i)
                spans.append((t0, time.perf_counter(), status))
                i += clients
        finally:
            await connection.close()

    await asyncio.gather(*(worker(i) for i in range(clients)))
    finished = [s for s in spans if measure_from <= s[1] < stop]
    started = [s for s in spans if measure_from <= s[0] < stop]
    values = np.asarray([t1 - t0 for t0, t1, _ in started]) * 1000 if started else np.zeros(1)
    statuses: dict[int, int] = {}
    for _, _, status in started:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "clients": clients,
        "requests": len(started),
        "finished": len(finished),
        "completed": len(spans),  # all, the warm-up's too: what the CPU time measured around load() served
        "latencies_ms": values.tolist() if started else [],
        "per_second": round(len(finished) / seconds, 1),
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def warm_up(url: str, device: dict[str, str], photos: list[bytes], timeout_s: float = 120.0) -> None:
    """Wait until the model is loaded (a prediction answers fast), so no level measures the load."""
    headers = {"Authorization": f"Bearer {device['token']}", "Content-Type": "application/octet-stream"}
    deadline = time.monotonic() + timeout_s
    fast = 0
    while fast < 5:
        if time.monotonic() > deadline:
            raise RuntimeError("the model did not warm up in time")
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/models/bench/predict", content=photos[fast % len(photos)], headers=headers, timeout=120)
        if response.status_code == 503:  # still loading past the request's deadline (a busy machine): ask again
            fast = 0
            time.sleep(0.5)
            continue
        response.raise_for_status()
        fast = fast + 1 if time.perf_counter() - started < 0.25 else 0


def server_pid(url: str) -> int | None:
    """The pid of our child `sync-server serve` listening at `url` (found by its SYNC_SERVER_PORT)."""
    port = f"SYNC_SERVER_PORT={httpx.URL(url).port}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and port in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    label: str
    url: str
    device: dict[str, str]
    pid: int | None


def warm_up_batches(server: "Server", photos: list[bytes], clients: int = 64, seconds: float = 3.0) -> None:
    """Untimed load at 64 clients, so the model meets the batch sizes of the levels before they are timed.

    A model's first call at a new batch size is slow (the kernels for that shape are made then): the
    first level to meet sizes 2..32 would otherwise time those stalls, which TF Serving avoids with
    warm-up requests.
    """
    headers = {"Authorization": f"Bearer {server.device['token']}", "Content-Type": "application/octet-stream"}

    async def predict(connection: RawConnection, i: int) -> int:
        status, _ = await connection.request("POST", "/v1/models/bench/predict", headers, photos[i % len(photos)])
        return status

    asyncio.run(load(server.url, clients, seconds, predict, warmup_s=0.0))


@dataclass(frozen=True)
class Payload:
    """What each request carries: the photo (`/predict`) or the device's fitted pixels (`/predict/pixels`)."""

    name: str
    path: str
    bodies: list[bytes]
    headers: dict[str, str]


def payloads(saved_model: Path, photos: list[bytes], names: list[str]) -> list[Payload]:
    from preprocessing import PreprocessSpec, preprocess_pixels

    spec = PreprocessSpec.from_json((saved_model / "preprocess_spec.json").read_text())
    made = {
        "photo": lambda: Payload("photo", "/v1/models/bench/predict", photos, {"Content-Type": "application/octet-stream"}),
        "pixels": lambda: Payload(
            "pixels", "/v1/models/bench/predict/pixels", [preprocess_pixels(p, spec).tobytes() for p in photos],
            {"Content-Type": "application/x-edge-pixels", "X-Pixels-Shape": f"{spec.height}x{spec.width}x3",
             "X-Spec-Digest": spec.pixels_digest()},
        ),
    }
    return [made[name]() for name in names]


def fallback_levels(servers: list[Server], payload: Payload, levels: list[int], seconds: float, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Each level as `rounds` alternating runs per server, pooled: neighbours' load hits both alike.

    The CPU time of the server process, of this load generator and of the whole machine is measured
    around each run, per photo answered: what is left of the machine's is other processes' load.
    """
    results: dict[str, list[dict[str, Any]]] = {server.label: [] for server in servers}
    for clients in levels:
        pooled: dict[str, dict[str, Any]] = {s.label: {"runs": [], "cpu": [0.0, 0.0, 0.0, 0.0], "metrics": [0.0, 0.0, 0.0]} for s in servers}
        for _ in range(rounds):
            for server in servers:
                headers = {"Authorization": f"Bearer {server.device['token']}", **payload.headers}
                bodies = payload.bodies

                async def predict(connection: RawConnection, i: int, headers: dict[str, str] = headers) -> int:
                    status, _ = await connection.request("POST", payload.path, headers, bodies[i % len(bodies)])
                    return status

                before = batch_metrics(server.url)
                cpu0 = (process_cpu_s(server.pid), time.process_time(), machine_busy_s(), time.perf_counter())
                run = asyncio.run(load(server.url, clients, seconds, predict, warmup_s=1.0))
                cpu1 = (process_cpu_s(server.pid), time.process_time(), machine_busy_s(), time.perf_counter())
                after = batch_metrics(server.url)
                into = pooled[server.label]
                into["runs"].append(run)
                into["cpu"] = [a + (b - c) for a, b, c in zip(into["cpu"], cpu1, cpu0)]
                into["metrics"] = [a + after[k] - before[k] for a, k in zip(into["metrics"], ("batches", "photos", "backend_s"))]
        for server in servers:
            into = pooled[server.label]
            runs = into["runs"]
            latencies = np.asarray([v for r in runs for v in r["latencies_ms"]] or [0.0])
            statuses: dict[str, int] = {}
            for r in runs:
                for k, v in r["statuses"].items():
                    statuses[k] = statuses.get(k, 0) + v
            completed = sum(r["completed"] for r in runs) or 1
            server_s, loadgen_s, machine_s, wall_s = into["cpu"]
            batches, batch_photos, backend_s = into["metrics"]
            result = {
                "clients": clients,
                "rounds": rounds,
                "requests": sum(r["requests"] for r in runs),
                "per_second": round(sum(r["finished"] for r in runs) / (seconds * rounds), 1),
                "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                "p99_ms": round(float(np.percentile(latencies, 99)), 1),
                "statuses": statuses,
                "mean_batch_size": round(batch_photos / batches, 2) if batches else 0.0,
                "backend_ms_per_batch": round(backend_s / batches * 1000, 2) if batches else 0.0,
                "cpu_ms_per_photo": {
                    "server": round(server_s / completed * 1000, 2),
                    "load_generator": round(loadgen_s / completed * 1000, 2),
                    "other_processes": round(max(0.0, machine_s - server_s - loadgen_s) / completed * 1000, 2),
                },
                "machine_busy_cores": round(machine_s / wall_s, 2),
            }
            cpu = result["cpu_ms_per_photo"]
            print(f"    {payload.name}, batching {server.label:>3}, {clients:>3} clients: {result['per_second']:>7.1f} photos/s  p50 {result['p50_ms']:>7.1f} ms  "
                  f"p99 {result['p99_ms']:>7.1f} ms  batch {result['mean_batch_size']:>5.1f} photos {result['backend_ms_per_batch']:>6.1f} ms  "
                  f"CPU ms/photo server {cpu['server']:.2f} loadgen {cpu['load_generator']:.2f} others {cpu['other_processes']:.2f}  "
                  f"busy {result['machine_busy_cores']:.2f} cores  {result['statuses']}", flush=True)
            results[server.label].append(result)
    return results


def batch_metrics(url: str) -> dict[str, float]:
    """The server's totals so far: batches, photos in them, and seconds spent in backend calls."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {"batches": 0.0, "photos": 0.0, "backend_s": 0.0}
    for line in text.splitlines():
        if line.startswith("sync_server_predict_batch_size_count"):
            found["batches"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sync_server_predict_batch_size_sum"):
            found["photos"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sync_server_predict_batch_duration_seconds_sum"):
            found["backend_s"] = float(line.rsplit(" ", 1)[1])
    return found


def batch_sizes(url: str) -> dict[str, float]:
    found = batch_metrics(url)
    count, total = found["batches"], found["photos"]
    return {"batches": count, "mean_batch_size": round(total / count, 2) if count else 0.0}


def assignment_run(url: str, device: dict[str, str], clients: int, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {device['token']}"}
    etag = httpx.get(f"{url}/v1/devices/{device['device_id']}/assignment", headers=headers, timeout=30).headers["etag"]
    conditional = {**headers, "If-None-Match": etag}

    path = f"/v1/devices/{device['device_id']}/assignment"

    async def check(connection: RawConnection, i: int) -> int:
        status, _ = await connection.request("GET", path, conditional)
        return status

    return asyncio.run(load(url, clients, seconds, check))


# ----------------------------------------------------------------------------------------------------------


#: The issue's targets: (name, what is measured, bound, True when the measure must stay below it).
TARGETS = (
    ("1 client: on no slower than off (within 5 %)", "ratio_1", 0.95, False),
    ("64 clients: on at least 1.8x off", "ratio_64", 1.8, False),
    ("64 clients: p99 under 200 ms (on)", "p99_64_ms", 200.0, True),
)


def check_targets(fallback: dict[str, Any]) -> dict[str, Any]:
    """The targets for one model's runs; a level not run is 'not measured'."""
    def level(mode: str, clients: int) -> dict[str, Any] | None:
        return next((r for r in fallback[f"batching_{mode}"]["runs"] if r["clients"] == clients), None)

    measured: dict[str, float] = {}
    for clients in (1, 64):
        on, off = level("on", clients), level("off", clients)
        if on and off and off["per_second"]:
            measured[f"ratio_{clients}"] = round(on["per_second"] / off["per_second"], 3)
        if clients == 64 and on:
            measured["p99_64_ms"] = on["p99_ms"]
    checked = {}
    for name, key, bound, is_max in TARGETS:
        value = measured.get(key)
        met = None if value is None else bool(value < bound if is_max else value >= bound)
        checked[name] = {"measured": value, "bound": bound, "met": met}
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,mobilenetv2", help="models to measure: demo, mobilenetv2 (default both)")
    parser.add_argument("--saved-model", type=Path, help="SavedModel to serve as 'demo' (default: train a throwaway 96x96 one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-classify-bench", help="cache folder")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level (default 5)")
    parser.add_argument("--clients", default="1,16,64", help="concurrent client counts (default 1,16,64)")
    parser.add_argument("--payloads", default="photo,pixels", help="what devices send: photo, pixels (default both)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off runs per level, pooled (default 3)")
    parser.add_argument("--assignment-clients", type=int, default=16)
    parser.add_argument("--tf-serving-url", help="benchmark TF Serving at this URL instead of the embedded predictor")
    parser.add_argument("--server-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra SYNC_SERVER_* setting for both servers, e.g. SYNC_SERVER_NUM_BATCH_THREADS=1")
    parser.add_argument("--pixel-signatures", choices=("on", "off"), default="on",
                        help="publish the SavedModel with converter.serving.add_pixel_signatures, so the server sends "
                             "uint8 pixels to the model (default on); off: float32 as for an older export")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    levels = [int(c) for c in args.clients.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"demo", "mobilenetv2"})
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}: choose demo or mobilenetv2")
    payload_names = [p.strip() for p in args.payloads.split(",") if p.strip()]
    if not payload_names or set(payload_names) - {"photo", "pixels"}:
        parser.error("--payloads: choose photo, pixels or both")
    extra = dict(item.split("=", 1) for item in args.server_setting)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "backend": "tf_serving" if args.tf_serving_url else "embedded",
        "pixel_signatures": args.pixel_signatures,
        "server_settings": extra,
        "models": {},
    }
    for model in models:
        print(f"== {model}", flush=True)
        saved_model, bundle, public_key, photos = prepare_inputs(args.work, args.saved_model, model, args.pixel_signatures == "on")
        max_batch = int(extra.get("SYNC_SERVER_MAX_BATCH_SIZE", 32))
        entry: dict[str, Any] = {
            "wire": wire_report(saved_model, photos),
            "encoding": encoding_report(saved_model, photos[0]),
            "cpu": cpu_report(saved_model, photos, max_batch),
            "fallback": {},
        }
        report["models"][model] = entry
        enc, wire = entry["encoding"], entry["wire"]
        print(f"input {enc['input_shape']}; bytes per photo: device->server {wire['device_to_server_photo_bytes']:,} (photo; "
              f"prepared uint8 pixels would be {wire['device_to_server_prepared_uint8_bytes']:,}); server->backend "
              f"embedded 0 (in process), REST JSON {wire['server_to_backend_rest_json_bytes']:,}, float32 tensor "
              f"{wire['server_to_backend_float32_tensor_bytes']:,}", flush=True)
        for protocol, sizes in wire["per_protocol"].items():
            print(f"server->backend {protocol}: float32 {sizes['float32']:,} B, uint8 pixels {sizes['pixels']:,} B per photo", flush=True)
        print(f"PNG per photo by compress level (REST pixels): {wire['png_by_compress_level']}", flush=True)
        print(f"TF Serving REST body: exact {enc['exact_shortest_float32']['ms']} ms to encode; json.dumps "
              f"{enc['json_dumps_tolist']['bytes']:,} B in {enc['json_dumps_tolist']['ms']} ms", flush=True)
        print(f"CPU per photo in this process: {entry['cpu']}", flush=True)

        servers: list[Server] = []
        with contextlib.ExitStack() as stack:
            for batching in (True, False):
                label = "on" if batching else "off"
                data_dir = args.work / f"server-data-{model}-{label}"
                shutil.rmtree(data_dir, ignore_errors=True)
                data_dir.mkdir()
                url = stack.enter_context(server_process(data_dir, public_key, batching, args.tf_serving_url, extra))
                servers.append(Server(label, url, publish_and_enroll(url, bundle, saved_model), server_pid(url)))
            for server in servers:
                warm_up(server.url, server.device, photos)
                warm_up_batches(server, photos)
            for payload in payloads(saved_model, photos, payload_names):
                print(f"fallback ({report['backend']}, {payload.name}), batching on and off, {args.rounds} alternating rounds per level:", flush=True)
                levels_run = fallback_levels(servers, payload, levels, args.seconds, args.rounds)
                entry["fallback"][payload.name] = {f"batching_{label}": {"runs": runs} for label, runs in levels_run.items()}
            if model == models[0]:
                off = servers[1]
                assignment = assignment_run(off.url, off.device, args.assignment_clients, args.seconds)
                assignment.pop("latencies_ms", None)
                report["assignment_304"] = assignment
                print(f"assignment checks with If-None-Match from {assignment['clients']} clients: "
                      f"{assignment['per_second']:.0f}/s, p50 {assignment['p50_ms']} ms, p99 {assignment['p99_ms']} ms, "
                      f"statuses {assignment['statuses']}", flush=True)
        entry["targets"] = {name: check_targets(runs) for name, runs in entry["fallback"].items()}

    print("\n| model | payload | clients | on photos/s | off photos/s | on/off | on p50 / p99 ms | off p50 / p99 ms | on mean batch | server CPU ms/photo on / off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, entry in report["models"].items():
        for payload, runs in entry["fallback"].items():
            for on, off in zip(runs["batching_on"]["runs"], runs["batching_off"]["runs"]):
                ratio = on["per_second"] / off["per_second"] if off["per_second"] else float("nan")
                print(f"| {model} | {payload} | {on['clients']} | {on['per_second']:.1f} | {off['per_second']:.1f} | {ratio:.2f}x | "
                      f"{on['p50_ms']:.0f} / {on['p99_ms']:.0f} | {off['p50_ms']:.0f} / {off['p99_ms']:.0f} | {on['mean_batch_size']:.1f} | "
                      f"{on['cpu_ms_per_photo']['server']:.2f} / {off['cpu_ms_per_photo']['server']:.2f} |")
    print()
    for model, entry in report["models"].items():
        print(f"{model}: bytes per photo device->server: photo {entry['wire']['device_to_server_photo_bytes']:,}, pixels "
              f"{entry['wire']['device_to_server_prepared_uint8_bytes']:,}; server->backend: embedded 0, REST JSON "
              f"{entry['wire']['server_to_backend_rest_json_bytes']:,}, float32 tensor {entry['wire']['server_to_backend_float32_tensor_bytes']:,}")
    print("\n| server -> backend, one photo | " + " | ".join(report["models"]) + " |")
    print("|---|" + "---|" * len(report["models"]))
    for protocol in ("tf-serving-rest", "tf-serving-grpc", "oip"):
        cells = [f"{e['wire']['per_protocol'][protocol]['float32']:,} B / {e['wire']['per_protocol'][protocol]['pixels']:,} B"
                 for e in report["models"].values()]
        print(f"| {protocol} float32 / pixels | " + " | ".join(cells) + " |")
    for model, entry in report["models"].items():
        cpu = entry["cpu"]
        print(f"{model}: a lone request, interleaved in process: through the batcher {cpu['lone_request_batcher_ms']} ms, "
              f"straight to the model {cpu['lone_request_direct_ms']} ms "
              f"({cpu['lone_request_direct_ms'] / cpu['lone_request_batcher_ms']:.3f}x the throughput of off)")
        for payload, runs in entry["fallback"].items():
            on = next((r for r in runs["batching_on"]["runs"] if r["clients"] == 64), None)
            off = next((r for r in runs["batching_off"]["runs"] if r["clients"] == 64), None)
            if on and off:
                def cost(r: dict[str, Any]) -> float:
                    return r["cpu_ms_per_photo"]["server"] + r["cpu_ms_per_photo"]["load_generator"]
                print(f"{model}, {payload}: 64 clients, CPU per photo (server + load generator) off / on: "
                      f"{cost(off):.2f} / {cost(on):.2f} ms = {cost(off) / cost(on):.2f}x the photos per CPU-second; "
                      f"other processes took {on['cpu_ms_per_photo']['other_processes']:.2f} / {off['cpu_ms_per_photo']['other_processes']:.2f} ms per photo (on / off)")
    for model, entry in report["models"].items():
        for payload, targets in entry["targets"].items():
            for name, t in targets.items():
                state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
                print(f"{model}, {payload}: {name}: {state} (measured {t['measured']}, bound {t['bound']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
