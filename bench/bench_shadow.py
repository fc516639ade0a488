"""Benchmark what shadow evaluation costs a device's requests: `POST /classify` latency (p50, p99)
through the agent's local API with the shadow off, and with a candidate running in shadow on 100 %
and on 10 % of the requests, in one run, on the same photos.

    python bench/bench_shadow.py [--bundle demo-output/bundle-int8 --sign-key demo-output/keys/publisher]
                                 [--work DIR] [--requests 20] [--rounds 50] [--json out.json]

The served version and the candidate are demo bundles: `--bundle` (the int8 bundle `edge-demo`
writes; the candidate is the same weights signed as the next version, like the OTA demo), else one
built here in `--work` (cached): the demo's own model (96x96, width 0.5) trained for one epoch on a
small synthetic set and converted to int8 with calibration, i.e. the demo's cost per photo.

It wires the agent's own parts as `edge-agent run` does: the loader (the candidate with one
interpreter thread), `Classify` with `on_classified=ShadowRunner.offer`, a real `TelemetryRecorder`
over a real outbox, and `LocalApi` on a free loopback port. `--clients` clients (default 1) post the
photos, each on its own kept-alive connection; the three modes alternate in short blocks (`--requests` each: off, 1.0, 0.1,
off, ...) so that a busy machine's load falls on each alike; p95 is given beside p99 (on a shared
machine the slowest 1 % is mostly other processes' doing). The time each request spends in
`ShadowRunner.offer` (sampling and queueing: all the shadow adds to the request path itself) is
measured apart; what remains of the shadow's cost is its thread competing for the CPU. "off" is the runner with sample rate 0 (what a device with
`--no-shadow` or no shadow assignment pays: one call that returns at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = (("off", 0.0), ("shadow 1.0", 1.0), ("shadow 0.1", 0.1))


def demo_bundles(work: Path, bundle: Path | None, sign_key: Path | None) -> tuple[Path, Path, Path]:
    """(served bundle v1, candidate bundle v2, public key)."""
    from converter import (ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions, convert, read_bundle,
                           write_bundle, write_keypair)

    work.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        sign_key = work / "publisher"
        if not sign_key.exists():
            write_keypair(sign_key)
        bundle = work / "bundle-int8"
        if not (bundle / "manifest.json").is_file():
            saved_model = work / "model"
            data = work / "data"
            if not (saved_model / "saved_model.pb").is_file():
                from edge_demo.synthetic import GeneratorOptions, generate_dataset
                from edge_demo.train import TrainOptions, train

                if not data.exists():
                    generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 8), ("val", 2), ("test", 2)),
                                                            long_side=(320, 640), large_fraction=0.0))
                print("training the demo model (96x96, width 0.5) for one epoch ...", flush=True)
                train(data, saved_model, TrainOptions(epochs=1, batch_size=16, patience=0), progress=False, overwrite=True)
            print("converting it to int8 ...", flush=True)
            convert(saved_model, ConvertOptions(out=bundle, quantization=QuantizationOptions(mode="int8", calibration=data / "train"),
                                                validation=ValidationOptions(skip=True), signing=SigningOptions(key=sign_key),
                                                name="shop-demo", version=1, overwrite=True))
    elif sign_key is None:
        raise SystemExit("bench_shadow: --bundle needs --sign-key (the candidate is the same weights signed as the next version)")
    public = Path(str(sign_key) + ".pub")
    served = read_bundle(bundle, public)
    candidate = work / f"candidate-v{served.manifest.version + 1}"
    if not (candidate / "manifest.json").is_file():
        write_bundle(candidate, served.read_model(), dataclasses.replace(served.manifest, version=served.manifest.version + 1),
                     sign_key=sign_key)
    return bundle, candidate, public


def photos() -> list[bytes]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [(folder / name).read_bytes() for name in ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(bundle: Path, candidate_bundle: Path, public_key: Path, requests: int, rounds: int, threads: int | None,
        clients: int = 1) -> dict[str, Any]:
    from edge_runtime.agent.options import AgentOptions, ServeOptions
    from edge_runtime.agent.outbox import Outbox
    from edge_runtime.agent.servable import ServableHandle, make_loader
    from edge_runtime.agent.serving import Classify, LocalApi
    from edge_runtime.agent.shadow import ShadowRunner
    from edge_runtime.agent.telemetry import TelemetryRecorder

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        options = AgentOptions(home=home, serve=ServeOptions(port=0), fallback="never", threads=threads)
        outbox = Outbox(home / "agent" / "outbox.sqlite")
        telemetry = TelemetryRecorder(outbox, "/v1/devices/bench/telemetry", 60.0)
        handle = ServableHandle()
        handle.swap(make_loader(public_key, home, threads)(bundle))
        runner = ShadowRunner(telemetry.record_shadow, queue_size=options.shadow.queue_size)
        runner.use(make_loader(public_key, home, 1)(candidate_bundle), 0.0)
        runner.start()
        hook_us: list[float] = []

        def offer(photo: Any) -> None:  # runner.offer, timed: the shadow's whole share of the request path
            started = time.perf_counter()
            runner.offer(photo)
            hook_us.append((time.perf_counter() - started) * 1e6)

        classify = Classify(handle, options, fallback=None, record=telemetry.record, health=lambda *a, **k: None,
                            on_classified=offer)
        api = LocalApi(classify, lambda: {}, options)
        api.start()
        host, port = api.url.removeprefix("http://").split(":")
        connections = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(clients)]
        images = photos()

        def post(data: bytes, connection: http.client.HTTPConnection = connections[0]) -> float:
            started = time.perf_counter()
            connection.request("POST", "/classify", body=data)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise SystemExit(f"bench_shadow: /classify answered {response.status}: {body[:200]!r}")
            return elapsed

        def block(into: list[float]) -> None:
            """`requests` photos from each client at once, on its own kept-alive connection."""
            def client(k: int) -> None:
                for i in range(requests):
                    into.append(post(images[(i + k) % len(images)], connections[k]))

            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        try:
            for data in images * 5:  # warm-up, untimed
                post(data)
            latencies: dict[str, list[float]] = {name: [] for name, _ in MODES}
            hooks: dict[str, list[float]] = {name: [] for name, _ in MODES}
            shadow_runs: dict[str, int] = {name: 0 for name, _ in MODES}
            dropped: dict[str, int] = {name: 0 for name, _ in MODES}
            for _round in range(rounds):
                for name, rate in MODES:
                    runner.sample_rate = rate
                    ran, lost = runner.counts["run"], runner.counts["dropped"]
                    hook_us.clear()
                    block(latencies[name])
                    hooks[name].extend(hook_us)
                    deadline = time.monotonic() + 30  # every sample done before the next mode is timed
                    while time.monotonic() < deadline and sum(runner.counts[k] for k in ("run", "errors", "skipped_geometry", "dropped")) \
                            < runner.counts["sampled"]:
                        time.sleep(0.002)
                    shadow_runs[name] += runner.counts["run"] - ran
                    dropped[name] += runner.counts["dropped"] - lost
        finally:
            for connection in connections:
                connection.close()
            api.stop()
            runner.stop()
            handle.swap(None)
            outbox.close()

    base = latencies["off"]
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
                              "requests_per_mode": len(base), "rounds": rounds, "clients": clients, "modes": {}}
    for name, _rate in MODES:
        values = latencies[name]
        p50, p95, p99 = statistics.median(values), percentile(values, 0.95), percentile(values, 0.99)
        result["modes"][name] = {"p50_ms": round(p50, 3), "p95_ms": round(p95, 3), "p99_ms": round(p99, 3),
                                 "mean_ms": round(statistics.fmean(values), 3),
                                 "shadow_runs": shadow_runs[name], "dropped": dropped[name],
                                 "offer_us_p50": round(statistics.median(hooks[name]), 2),
                                 "offer_us_p99": round(percentile(hooks[name], 0.99), 2),
                                 "p50_ratio_vs_off": round(p50 / statistics.median(base), 3),
                                 "p95_ratio_vs_off": round(p95 / percentile(base, 0.95), 3),
                                 "p99_ratio_vs_off": round(p99 / percentile(base, 0.99), 3)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="the served demo bundle (default: build one in --work)")
    parser.add_argument("--sign-key", type=Path, default=None, help="its publisher's private key (signs the candidate)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-shadow")
    parser.add_argument("--requests", type=int, default=20, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="the served version's interpreter threads")
    parser.add_argument("--clients", type=int, default=1, help="clients posting at once, each on its own connection")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    bundle, candidate, public = demo_bundles(args.work, args.bundle, args.sign_key)
    result = run(bundle, candidate, public, args.requests, args.rounds, args.threads, args.clients)
    result["bundle"] = str(bundle)
    print(json.dumps(result, indent=2))
    print(f"\nPOST /classify, {args.clients} kept-alive client(s), {result['requests_per_mode']} requests per mode "
          f"({result['machine']}; a shared machine: other processes' load is in every figure):")
    for name, figures in result["modes"].items():
        print(f"  {name:<11} p50 {figures['p50_ms']:7.2f} ms ({figures['p50_ratio_vs_off']:.2f}x)   "
              f"p95 {figures['p95_ms']:7.2f} ms ({figures['p95_ratio_vs_off']:.2f}x)   "
              f"p99 {figures['p99_ms']:7.2f} ms ({figures['p99_ratio_vs_off']:.2f}x)   "
              f"shadow runs {figures['shadow_runs']}, dropped {figures['dropped']}; "
              f"offer() {figures['offer_us_p50']:.1f}/{figures['offer_us_p99']:.1f} µs p50/p99")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
