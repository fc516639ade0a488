"""Benchmark the push path: how long from a publish (or a rollout) until 50 / 99 / 100 % of devices
report the new version, with a thousand devices holding push streams to one sync server.

    python bench/bench_agent.py [--devices 1000] [--no-download] [--saved-model DIR] [--json out.json]

In one run it:
  1. gets a SavedModel (`--saved-model`, else trains a throwaway 32x32 demo model for one epoch on a
     small synthetic set, cached in --work) and makes signed bundles v1, v2, v3 of it;
  2. starts `sync-server serve` in a subprocess (SQLite, embedded predictor not preloaded), publishes
     v1 to channel `stable` and enrols the devices;
  3. opens one Server-Sent Events stream per device (asyncio + httpx, all in this process) and waits
     until every device got its v1 assignment;
  4. publishes v2 to `stable` and times, per device, the `assignment` event for v2 and its
     `POST .../status` report for v2 (after downloading model.tflite, unless --no-download), as a real
     agent does; then starts a 100 % rollout of v3 and times the same.

The simulated devices do what `edge-agent` does on the wire; they do not load the model (that is the
device's CPU, not the server's). The load generator and the server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _sync_server import sync_server_process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN = "bench-admin-token-0123456789abcdef"
SECRET = "bench-enrol-secret-0123456789abcdef"
MODEL = "bench-agent"


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def prepare_inputs(work: Path, saved_model: Path | None) -> tuple[Path, dict[int, Path], Path]:
    """(SavedModel, {version: signed bundle}, publisher public key)."""
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, read_bundle, write_bundle, write_keypair

    if saved_model is None:
        saved_model = work / "model"
        if not (saved_model / "saved_model.pb").is_file():
            from edge_demo.synthetic import GeneratorOptions, generate_dataset
            from edge_demo.train import TrainOptions, demo_spec, train

            data = work / "data"
            if not data.exists():
                generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 8), ("val", 2), ("test", 2)), long_side=(320, 480), large_fraction=0.0))
            print("training a throwaway 32x32 model (one epoch) ...", flush=True)
            spec = demo_spec().replace(height=32, width=32)
            train(data, saved_model, TrainOptions(epochs=1, batch_size=16, width=0.25, patience=0, spec=spec), progress=False, overwrite=True)
    key = work / "publisher"
    if not key.exists():
        write_keypair(key)
    public = Path(str(key) + ".pub")
    first = work / "bundle-v1"
    shutil.rmtree(first, ignore_errors=True)
    convert(saved_model, ConvertOptions(out=first, validation=ValidationOptions(skip=True), signing=SigningOptions(key=key), name=MODEL, version=1))
    bundle = read_bundle(first, public)
    bundles = {1: first}
    for version in (2, 3):
        path = work / f"bundle-v{version}"
        shutil.rmtree(path, ignore_errors=True)
        bundles[version] = write_bundle(path, bundle.read_model(), dataclasses.replace(bundle.manifest, version=version), sign_key=key)
    return saved_model, bundles, public


# ----------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def server_process(data_dir: Path, public_key: Path) -> contextlib.AbstractContextManager[str]:
    settings = {
        "SYNC_SERVER_DATA_DIR": str(data_dir),
        "SYNC_SERVER_ADMIN_TOKEN": ADMIN,
        "SYNC_SERVER_ENROLLMENT_SECRET": SECRET,
        "SYNC_SERVER_PUBLISHER_KEYS": str(public_key),
        "SYNC_SERVER_EMBEDDED_PRELOAD": "off",
        # 2,000 devices enrol with one fleet secret from one address within seconds: far past what the
        # enrolment bucket (10/s per credential) lets one credential do.
        "SYNC_SERVER_THROTTLE": "off",
        "SYNC_SERVER_LOG_LEVEL": os.environ.get("BENCH_SERVER_LOG_LEVEL", "warning"),
    }
    return sync_server_process(settings, data_dir / "server.log", preexec_fn=_raise_fd_limit)


# ----------------------------------------------------------------------------------------------------------
# Simulated devices
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Device:
    id: str
    token: str
    subscribed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    pushed: dict[int, float] = dataclasses.field(default_factory=dict)  # version -> monotonic time of its event
    downloaded: dict[int, float] = dataclasses.field(default_factory=dict)  # version -> model.tflite received
    reported: dict[int, float] = dataclasses.field(default_factory=dict)  # version -> time its status was accepted
    errors: list[str] = dataclasses.field(default_factory=list)


async def enroll_all(http: httpx.AsyncClient, count: int, concurrency: int = 32) -> list[Device]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Device:
        async with gate:
            response = await http.post("/v1/devices/enroll", headers={"Authorization": f"Bearer {SECRET}"},
                                       json={"model": MODEL, "name": f"bench-{i}"})
            response.raise_for_status()
            data = response.json()
            return Device(data["device_id"], data["token"])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def follow(http: httpx.AsyncClient, device: Device, download: bool, stop: asyncio.Event) -> None:
    """One device: hold the push stream; on each new version, (download and) report it, as edge-agent does."""
    headers = {"Authorization": f"Bearer {device.token}"}
    last_id = None
    while not stop.is_set():
        try:
            stream_headers = {**headers, "Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            async with http.stream("GET", f"/v1/devices/{device.id}/events", headers=stream_headers, timeout=httpx.Timeout(60, read=60)) as response:
                response.raise_for_status()
                event: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line == "":
                        if event.get("event") == "assignment" and "data" in event:
                            await on_assignment(http, device, json.loads(event["data"]), headers, download)
                            last_id = event.get("id")  # only once handled: a failure gets the event again
                        event = {}
                    elif not line.startswith(":"):
                        key, _, value = line.partition(":")
                        event[key] = value[1:] if value.startswith(" ") else value
                    if stop.is_set():
                        return
        except (httpx.HTTPError, ValueError) as exc:
            device.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def on_assignment(http: httpx.AsyncClient, device: Device, assignment: dict[str, Any], headers: dict[str, str], download: bool) -> None:
    version = assignment.get("version")
    if version is None or version in device.reported:
        return
    device.pushed.setdefault(version, time.monotonic())
    if version == 1:
        device.reported[version] = device.pushed[version]
        device.subscribed.set()
        return
    if download and version not in device.downloaded:
        url = assignment["files"]["model.tflite"]["url"]
        await with_retries(device, lambda: http.get(url, headers=headers))
        device.downloaded[version] = time.monotonic()
    body = {"version": version, "running": True, "load_ok": True, "smoke_test_ok": True, "details": {"bench": True}}
    await with_retries(device, lambda: http.post(f"/v1/devices/{device.id}/status", headers=headers, json=body))
    device.reported[version] = time.monotonic()


async def with_retries(device: Device, call: Any, attempts: int = 5) -> httpx.Response:
    """What edge-agent does: bounded retries with backoff and jitter; errors are counted."""
    import random

    for attempt in range(attempts):
        try:
            response = await call()
            response.raise_for_status()
            return response
        except httpx.HTTPError as exc:
            device.errors.append(f"{type(exc).__name__}: {exc}")
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (1 - 0.5 * random.random()))
    raise AssertionError("unreachable")


def percentiles(values: list[float], total: int) -> dict[str, float | None]:
    """Seconds until 50 %, 99 % and 100 % of `total` devices (None when that many never got there)."""
    ordered = sorted(values)

    def at(share: float) -> float | None:
        needed = max(1, int(round(share * total + 0.4999)))  # ceil
        return round(ordered[needed - 1], 3) if len(ordered) >= needed else None

    return {"p50_s": at(0.50), "p99_s": at(0.99), "p100_s": at(1.00), "count": len(ordered)}


async def run(url: str, bundles: dict[int, Path], saved_model: Path, devices_n: int, download: bool) -> dict[str, Any]:
    from sync_server.client import tar_folder

    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:  # the operator's and enrolment calls

        async def publish(version: int, channel: str | None) -> float:
            files = {"bundle": ("b.tar.gz", tar_folder(bundles[version])), "saved_model": ("s.tar.gz", tar_folder(saved_model))}
            started = time.monotonic()
            response = await http.post("/v1/models", headers=admin, files=files, data={"channel": channel} if channel else None)
            response.raise_for_status()
            return started

        await publish(1, "stable")
        started = time.perf_counter()
        devices = await enroll_all(http, devices_n)
        enrol_s = time.perf_counter() - started
        print(f"enrolled {devices_n} devices in {enrol_s:.1f} s", flush=True)

        stop = asyncio.Event()
        started = time.perf_counter()
        # Devices share HTTP clients in small groups. One pool for all of them would spend this process's
        # time scanning its thousands of connections on every request (httpcore's pool is linear in
        # them): the benchmark would measure that instead of the server. A client per device costs more
        # to create than it saves.
        group = 25
        limits = httpx.Limits(max_connections=group * 2 + 10, max_keepalive_connections=group * 2 + 10)
        clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=120)
                   for _ in range((devices_n + group - 1) // group)]
        tasks = [asyncio.create_task(follow(clients[i // group], d, download, stop)) for i, d in enumerate(devices)]
        await asyncio.wait_for(asyncio.gather(*(d.subscribed.wait() for d in devices)), timeout=300)
        subscribe_s = time.perf_counter() - started
        print(f"{devices_n} push streams open, each with its v1 assignment, after {subscribe_s:.1f} s", flush=True)
        await asyncio.sleep(1.0)

        results: dict[str, Any] = {"enrol_s": round(enrol_s, 2), "subscribe_s": round(subscribe_s, 2)}
        for label, version in (("publish", 2), ("rollout", 3)):
            if label == "publish":
                t0 = await publish(2, "stable")
                publish_done = time.monotonic() - t0
            else:
                await publish(3, None)
                t0 = time.monotonic()
                response = await http.post(f"/v1/models/{MODEL}/channels/stable/rollout", headers=admin, json={"version": 3, "percent": 100})
                response.raise_for_status()
                publish_done = time.monotonic() - t0
            deadline = time.monotonic() + 300
            while sum(version in d.reported for d in devices) < devices_n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            pushed = percentiles([d.pushed[version] - t0 for d in devices if version in d.pushed], devices_n)
            fetched = percentiles([d.downloaded[version] - t0 for d in devices if version in d.downloaded], devices_n)
            reported = percentiles([d.reported[version] - t0 for d in devices if version in d.reported], devices_n)
            results[label] = {"version": version, "admin_call_s": round(publish_done, 3), "push_received": pushed,
                              "downloaded": fetched, "reported": reported}
            print(f"{label} v{version} (admin call {publish_done:.2f} s); seconds until 50/99/100 % of devices: push received "
                  f"{pushed['p50_s']}/{pushed['p99_s']}/{pushed['p100_s']}, model downloaded "
                  f"{fetched['p50_s']}/{fetched['p99_s']}/{fetched['p100_s']}, reported running "
                  f"{reported['p50_s']}/{reported['p99_s']}/{reported['p100_s']}", flush=True)
            await asyncio.sleep(1.0)

        listing = (await http.get("/v1/devices", headers=admin, params={"model": MODEL})).json()
        running = {}
        for item in listing:
            running[str(item["running_version"])] = running.get(str(item["running_version"]), 0) + 1
        results["server_running_versions"] = running
        errors: dict[str, int] = {}
        for device in devices:
            for error in device.errors:
                errors[error.split(":")[0]] = errors.get(error.split(":")[0], 0) + 1
        results["client_errors"] = errors
        results["client_error_examples"] = sorted({e for d in devices for e in d.errors})[:5]
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client in clients))
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices, one push stream each (default 1000)")
    parser.add_argument("--no-download", action="store_true", help="report without downloading model.tflite first")
    parser.add_argument("--saved-model", type=Path, help="SavedModel to publish (default: train a throwaway 32x32 one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-classify-bench-agent", help="cache folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _raise_fd_limit()
    args.work.mkdir(parents=True, exist_ok=True)
    saved_model, bundles, public_key = prepare_inputs(args.work, args.saved_model)
    data_dir = args.work / "server-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir()
    with server_process(data_dir, public_key) as url:
        results = asyncio.run(run(url, bundles, saved_model, args.devices, not args.no_download))
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "devices": args.devices,
        "download": not args.no_download,
        "model_bytes": (bundles[1] / "model.tflite").stat().st_size,
        **results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
