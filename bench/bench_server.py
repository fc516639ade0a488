"""Benchmark the sync server: fallback throughput and latency, batching on and off, and 304 assignment checks.

    python bench/bench_server.py [--saved-model DIR] [--seconds 5] [--clients 1,16,64] [--json out.json]

In one run it:
  1. gets a SavedModel (`--saved-model`, else trains a 96x96 demo-architecture model for one epoch on
     a small synthetic data set: accuracy is irrelevant, the compute is the real one), converts it
     into a signed bundle, and renders a few synthetic shop photos;
  2. measures the compact JSON encoding the TF Serving client sends against json.dumps;
  3. for batching on and off: starts `sync-server serve` in a subprocess (embedded SavedModel, or
     `--tf-serving-url`), publishes over HTTP, enrols a device, and for each client count sends
     fallback predictions from that many concurrent clients for `--seconds` (after a warm-up),
     recording throughput and p50/p99 latency;
  4. measures assignment checks per second with If-None-Match (all answered 304) from 16 clients.

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


def prepare_inputs(work: Path, saved_model: Path | None) -> tuple[Path, Path, Path, list[bytes]]:
    """(SavedModel, bundle, publisher public key, photos)."""
    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    data = work / "data"
    if not data.exists():
        generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 8), ("val", 2), ("test", 4)), long_side=(480, 800)))
    photos = [p.read_bytes() for p in sorted((data / "test").rglob("*.jpg"))][:16]
    if saved_model is None:
        saved_model = work / "model"
        if not saved_model.exists():
            from edge_demo.train import TrainOptions, train

            print("training a throwaway 96x96 model (one epoch) ...", flush=True)
            train(data, saved_model, TrainOptions(epochs=1, patience=0))
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair

    key = work / "publisher"
    if not key.exists():
        write_keypair(key)
    bundle = work / "bundle"
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


# ----------------------------------------------------------------------------------------------------------
# The server under test
# ----------------------------------------------------------------------------------------------------------


def server_process(data_dir: Path, public_key: Path, batching: bool, tf_serving_url: str | None) -> contextlib.AbstractContextManager[str]:
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
        response.raise_for_status()
        fast = fast + 1 if time.perf_counter() - started < 0.25 else 0


def fallback_runs(url: str, device: dict[str, str], photos: list[bytes], levels: list[int], seconds: float) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {device['token']}", "Content-Type": "application/octet-stream"}
    warm_up(url, device, photos)

    async def predict(connection: RawConnection, i: int) -> int:
        status, _ = await connection.request("POST", "/v1/models/bench/predict", headers, photos[i % len(photos)])
        return status

    results = []
    for clients in levels:
        result = asyncio.run(load(url, clients, seconds, predict, warmup_s=1.0))
        print(f"    {clients:>3} clients: {result['per_second']:>7.1f} photos/s  p50 {result['p50_ms']:>7.1f} ms  "
              f"p99 {result['p99_ms']:>7.1f} ms  {result['statuses']}", flush=True)
        results.append(result)
    return results


def batch_sizes(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("sync_server_predict_batch_size_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sync_server_predict_batch_size_sum"):
            total = float(line.rsplit(" ", 1)[1])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved-model", type=Path, help="SavedModel to serve (default: train a throwaway 96x96 one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-classify-bench", help="cache folder")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level (default 5)")
    parser.add_argument("--clients", default="1,16,64", help="concurrent client counts (default 1,16,64)")
    parser.add_argument("--assignment-clients", type=int, default=16)
    parser.add_argument("--tf-serving-url", help="benchmark TF Serving at this URL instead of the embedded predictor")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    levels = [int(c) for c in args.clients.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    saved_model, bundle, public_key, photos = prepare_inputs(args.work, args.saved_model)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "backend": "tf_serving" if args.tf_serving_url else "embedded",
        "photo_bytes_mean": int(np.mean([len(p) for p in photos])),
        "encoding": encoding_report(saved_model, photos[0]),
        "fallback": {},
    }
    enc = report["encoding"]
    print(f"TF Serving request body for one {enc['input_shape']} photo: exact {enc['exact_shortest_float32']['bytes']:,} B in "
          f"{enc['exact_shortest_float32']['ms']} ms; json.dumps {enc['json_dumps_tolist']['bytes']:,} B in "
          f"{enc['json_dumps_tolist']['ms']} ms; 4 decimals {enc['rounded_4_decimals']['bytes']:,} B", flush=True)

    data_dir = args.work / "server-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir()
    device: dict[str, str] = {}
    for batching in (True, False):
        label = "on" if batching else "off"
        print(f"fallback, batching {label} ({report['backend']}):", flush=True)
        with server_process(data_dir, public_key, batching, args.tf_serving_url) as url:
            if not device:
                device = publish_and_enroll(url, bundle, saved_model)
            runs = fallback_runs(url, device, photos, levels, args.seconds)
            report["fallback"][f"batching_{label}"] = {"runs": runs, **batch_sizes(url)}
            print(f"    mean batch size {report['fallback'][f'batching_{label}']['mean_batch_size']}", flush=True)
            if not batching:
                assignment = assignment_run(url, device, args.assignment_clients, args.seconds)
                report["assignment_304"] = assignment
                print(f"assignment checks with If-None-Match from {assignment['clients']} clients: "
                      f"{assignment['per_second']:.0f}/s, p50 {assignment['p50_ms']} ms, p99 {assignment['p99_ms']} ms, "
                      f"statuses {assignment['statuses']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
