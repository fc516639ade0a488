"""Benchmark the agent's local API: `POST /classify` on one kept-alive connection against a new
connection per request (issue 11, finding 9: 44 ms against 1.9 ms, Nagle plus delayed ACK).

    python bench/bench_agent_keepalive.py --bundle DIR --public-key KEY [--requests 200] [--json out.json]

It loads the bundle with the agent's own loader, starts the agent's `LocalApi` on a free loopback port
(the same HTTP handler `edge-agent run` serves) and posts the same photo `--requests` times, first each on
a new `http.client` connection, then all on one kept-alive connection, and prints the medians and p90s.
A kept-alive answer should cost no more than a new connection's (the TCP handshake is the only difference).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _photo() -> bytes:
    import skimage.data

    return (Path(skimage.data.__file__).parent / "rocket.jpg").read_bytes()


def _post(connection: http.client.HTTPConnection, photo: bytes) -> float:
    started = time.perf_counter()
    connection.request("POST", "/classify?fallback=never", body=photo, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise SystemExit(f"POST /classify answered {response.status}: {body[:200]!r}")
    return elapsed


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 3), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "min_ms": round(ordered[0], 3), "n": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "demo-output" / "bundle-int8")
    parser.add_argument("--public-key", type=Path, default=ROOT / "demo-output" / "keys" / "publisher.pub")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.bundle / "model.tflite").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: pass --bundle DIR (a signed bundle) and --public-key KEY")

    import tempfile

    from edge_runtime.agent.options import AgentOptions, ServeOptions
    from edge_runtime.agent.servable import ServableHandle, make_loader
    from edge_runtime.agent.serving import Classify, LocalApi

    photo = _photo()
    with tempfile.TemporaryDirectory() as home:
        options = AgentOptions(home=Path(home), serve=ServeOptions(port=0), fallback="never")
        handle = ServableHandle()
        handle.swap(make_loader(args.public_key, Path(home), threads=1)(args.bundle))
        classify = Classify(handle, options, fallback=None, record=lambda *a, **k: None, health=lambda *a, **k: None)
        api = LocalApi(classify, lambda: {}, options)
        api.start()
        host, port = api.url.removeprefix("http://").split(":")
        try:
            warm = http.client.HTTPConnection(host, int(port), timeout=10)
            for _ in range(10):
                _post(warm, photo)
            warm.close()
            fresh = []
            for _ in range(args.requests):
                connection = http.client.HTTPConnection(host, int(port), timeout=10)
                fresh.append(_post(connection, photo))
                connection.close()
            kept = []
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            for _ in range(args.requests):
                kept.append(_post(connection, photo))
            connection.close()
        finally:
            api.stop()
            handle.swap(None)
    results = {"machine": f"{os.cpu_count()} cores", "photo_bytes": len(photo), "new_connection": _summary(fresh),
               "kept_alive": _summary(kept)}
    print(json.dumps(results, indent=2))
    print(f"\nPOST /classify median: new connection {results['new_connection']['median_ms']:.2f} ms, "
          f"kept-alive {results['kept_alive']['median_ms']:.2f} ms ({args.requests} requests each)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
