"""Peak memory of a real `sync-server` process under hostile photos for the fallback.

    python bench/bench_server_memory.py [--saved-model DIR] [--phases gif,png49,png16,jpeg12,all] [--json out.json]
                                        [--setting SYNC_SERVER_DECODE_BUDGET=268435456 ...]

In one run it:
  1. gets a SavedModel (`--saved-model`, else trains a tiny 32x32 demo model for one epoch: the model
     is irrelevant, the decode is what is measured), converts it into a signed bundle;
  2. makes the photos: a 7000x7000 GIF (~60 KB), a 7000x7000 RGBA PNG (~208 KB, 49 MP), a 4000x4000
     RGBA PNG (16 MP, at the server's default limit for full-size decodes) and a 12 MP JPEG;
  3. starts `sync-server serve` in a subprocess (embedded SavedModel, preloaded), publishes, enrols a
     device and warms the model up; then for each phase it resets the process's peak RSS
     (/proc/PID/clear_refs), sends the phase's photos all at once, and reads the peak (VmHWM) and,
     two seconds later, what stays resident (VmRSS).

Phases: gif (4 GIFs), png49 (8 concurrent 7000x7000 RGBA PNGs), png16 (8 concurrent 16 MP PNGs),
jpeg12 (16 concurrent 12 MP JPEGs), all (everything above at once). Run it from an older checkout
(copy this file into its bench/) to measure the same mix before a change.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _sync_server import sync_server_started  # noqa: E402

ADMIN = "bench-admin-token-0123456789abcdef"
SECRET = "bench-enrol-secret-0123456789abcdef"
MODEL = "memory"


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def saved_model_and_bundle(work: Path, saved_model: Path | None) -> tuple[Path, Path, Path]:
    """(SavedModel, signed bundle, publisher public key)."""
    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair

    if saved_model is None:
        saved_model = work / "model"
        if not (saved_model / "saved_model.pb").exists():
            from edge_demo.synthetic import GeneratorOptions, generate_dataset
            from edge_demo.train import TrainOptions, demo_spec, train

            data = work / "data"
            if not data.exists():
                generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 6), ("val", 2), ("test", 2)), long_side=(200, 300)))
            print("training a throwaway 32x32 model (one epoch) ...", flush=True)
            shutil.rmtree(saved_model, ignore_errors=True)
            train(data, saved_model, TrainOptions(epochs=1, batch_size=16, width=0.25, patience=0,
                                                  spec=demo_spec().replace(height=32, width=32)))
    key = work / "publisher"
    if not key.exists():
        write_keypair(key)
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    convert(saved_model, ConvertOptions(out=bundle, validation=ValidationOptions(skip=True), signing=SigningOptions(key=key),
                                        name=MODEL, version=1))
    return saved_model, bundle, Path(str(key) + ".pub")


def photos() -> dict[str, bytes]:
    """The hostile mix: small files that decode to huge pictures, and ordinary phone photos."""
    import numpy as np
    from PIL import Image

    def save(image: Image.Image, fmt: str, **params: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        return buffer.getvalue()

    gif = Image.new("P", (7000, 7000), 0)
    gif.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    gif.paste(1, (1000, 1000, 3000, 3000))
    png49 = Image.new("RGBA", (7000, 7000), (255, 0, 0, 0))
    png49.paste((0, 0, 255, 255), (1000, 1000, 3000, 3000))
    png16 = Image.new("RGBA", (4000, 4000), (0, 128, 0, 0))
    png16.paste((200, 0, 255, 255), (500, 500, 2500, 2500))
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((4032, 3024), Image.Resampling.BICUBIC)
    return {
        "gif": save(gif, "GIF", transparency=0),
        "png49": save(png49, "PNG", optimize=True),
        "png16": save(png16, "PNG", optimize=True),
        "jpeg12": save(scene, "JPEG", quality=90),
    }


PHASES: dict[str, list[tuple[str, int]]] = {
    "gif": [("gif", 4)],
    "png49": [("png49", 8)],
    "png16": [("png16", 8)],
    "jpeg12": [("jpeg12", 16)],
    "all": [("png49", 8), ("png16", 8), ("gif", 4), ("jpeg12", 16)],
}


# ----------------------------------------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(data_dir: Path, public_key: Path, settings: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`sync-server serve` on a free port; yields (url, pid) once /readyz answers 200."""
    env = {
        "SYNC_SERVER_DATA_DIR": str(data_dir), "SYNC_SERVER_ADMIN_TOKEN": ADMIN, "SYNC_SERVER_ENROLLMENT_SECRET": SECRET,
        "SYNC_SERVER_PUBLISHER_KEYS": str(public_key), "SYNC_SERVER_LOG_LEVEL": "warning",
        "SYNC_SERVER_THROTTLE": "off",  # one device sends the whole mix: measure memory, not the rate limit
        **settings,
    }
    with sync_server_started(env, data_dir / "server.log", ready_timeout_s=180) as (url, process):
        yield url, process.pid


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and its peak since the last reset (VmHWM), in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss": round(values["VmRSS"], 1), "peak": round(values["VmHWM"], 1)}


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def send_all(url: str, token: str, bodies: list[bytes]) -> list[dict[str, Any]]:
    """POST every photo at once (one connection each); the answers' status, code and Retry-After."""
    def one(body: bytes) -> dict[str, Any]:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/models/{MODEL}/predict", content=body, timeout=120,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        code = response.json().get("error", {}).get("code") if response.status_code != 200 else "ok"
        return {"status": response.status_code, "code": code, "retry_after": response.headers.get("retry-after"),
                "seconds": round(time.perf_counter() - started, 2)}

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def warm_up(url: str, token: str, photo: bytes) -> None:
    deadline = time.monotonic() + 180
    while send_all(url, token, [photo])[0]["status"] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the model did not answer in 180 s")
        time.sleep(0.5)


def run(work: Path, saved_model: Path | None, phases: list[str], settings: dict[str, str]) -> dict[str, Any]:
    saved_model, bundle, public_key = saved_model_and_bundle(work, saved_model)
    mix = photos()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "tree": str(ROOT), "settings": settings, "photo_bytes": {k: len(v) for k, v in mix.items()}, "phases": {},
    }
    data_dir = work / "server-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    with server(data_dir, public_key, settings) as (url, pid):
        from sync_server.client import SyncServerClient

        with SyncServerClient(url, ADMIN) as admin:
            admin.publish(bundle, saved_model, channel="stable")
        device = httpx.post(url + "/v1/devices/enroll", headers={"Authorization": f"Bearer {SECRET}"},
                            json={"model": MODEL}, timeout=30).json()
        warm_up(url, device["token"], mix["jpeg12"])
        report["baseline_mb"] = memory_mb(pid)["rss"]
        print(f"server {pid} ready, {report['baseline_mb']:.0f} MB resident after warm-up", flush=True)
        for phase in phases:
            bodies = [mix[name] for name, count in PHASES[phase] for _ in range(count)]
            reset_peak(pid)
            before = memory_mb(pid)["rss"]
            answers = send_all(url, device["token"], bodies)
            peak = memory_mb(pid)["peak"]
            time.sleep(2)
            after = memory_mb(pid)["rss"]
            statuses: dict[str, int] = {}
            for answer in answers:
                key = f"{answer['status']} {answer['code']}"
                statuses[key] = statuses.get(key, 0) + 1
            busy_without_retry_after = sum(1 for a in answers if a["status"] == 503 and not a["retry_after"])
            report["phases"][phase] = {
                "requests": len(bodies), "rss_before_mb": before, "peak_mb": peak, "rss_after_2s_mb": after,
                "peak_added_mb": round(peak - before, 1), "held_after_mb": round(after - before, 1),
                "statuses": statuses, "503_without_retry_after": busy_without_retry_after,
                "slowest_s": max(a["seconds"] for a in answers),
            }
            print(f"  {phase:<7} {len(bodies):>2} photos: peak {peak:>7.0f} MB (+{peak - before:>6.0f}), "
                  f"2 s later {after:>6.0f} MB (+{after - before:>5.0f}); {statuses}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved-model", type=Path, help="SavedModel to serve (default: train a throwaway 32x32 one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-classify-bench-memory")
    parser.add_argument("--phases", default="gif,png49,png16,jpeg12,all", help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--setting", action="append", default=[], metavar="SYNC_SERVER_X=VALUE", help="extra server setting")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    settings = dict(s.split("=", 1) for s in args.setting)
    args.work.mkdir(parents=True, exist_ok=True)
    report = run(args.work, args.saved_model, phases, settings)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
