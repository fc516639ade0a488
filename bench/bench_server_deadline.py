"""How late does a fallback prediction's 503 come when TF Serving is slow? (It should come at the deadline.)

    python bench/bench_server_deadline.py [--saved-model DIR] [--timeout 2] [--clients 64,200] [--json out.json]

Starts the TF Serving stand-in (tests/tf_serving_standin.py: TF Serving's REST API over the real
SavedModel) and `sync-server serve --tf-serving-url ... --tf-serving-timeout T` in a subprocess,
publishes a bundle, checks that a prediction succeeds, then makes the stand-in answer predictions
only after 30 s and sends N concurrent predictions from one device (one raw connection each, all
connected first, each timed from its own last byte sent). It prints when the 503 answers arrived:
p50, p99 and the last, against the deadline T.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _sync_server import sync_server_process  # noqa: E402
from bench_server import ADMIN, SECRET, prepare_inputs, publish_and_enroll  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved-model", type=Path, help="SavedModel to serve (default: train a throwaway 96x96 one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edge-classify-bench", help="cache folder")
    parser.add_argument("--timeout", type=float, default=2.0, help="the server's TF Serving timeout, in seconds (default 2)")
    parser.add_argument("--clients", default="64,200", help="concurrent request counts (default 64,200)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from tests.test_server_deadlines import concurrent_requests, predict_request
    from tests.tf_serving_standin import TFServingStandin

    args.work.mkdir(parents=True, exist_ok=True)
    saved_model, bundle, public_key, photos = prepare_inputs(args.work, args.saved_model)
    results: dict[str, Any] = {"timeout_s": args.timeout, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        with TFServingStandin(data_dir / "tf-serving" / "models.config") as tfs:
            settings = {
                "SYNC_SERVER_DATA_DIR": str(data_dir),
                "SYNC_SERVER_ADMIN_TOKEN": ADMIN,
                "SYNC_SERVER_ENROLLMENT_SECRET": SECRET,
                "SYNC_SERVER_PUBLISHER_KEYS": str(public_key),
                "SYNC_SERVER_LOG_LEVEL": "warning",
                "SYNC_SERVER_TF_SERVING_URL": tfs.url,
                "SYNC_SERVER_TF_SERVING_TIMEOUT": str(args.timeout),
                "SYNC_SERVER_THROTTLE": "off",  # one device sends every request
            }
            with sync_server_process(settings, Path(tmp) / "server.log") as url:
                device = publish_and_enroll(url, bundle, saved_model)
                tfs.wait_available("bench", 1, timeout=120)
                port, request = urlsplit(url).port, predict_request(device["token"], photos[0], "bench")
                deadline = time.monotonic() + 120
                while concurrent_requests(port, request, 1)[0].status != 200:
                    assert time.monotonic() < deadline, "the fast TF Serving never answered"
                    time.sleep(0.5)
                for count in [int(c) for c in args.clients.split(",")]:
                    tfs.predict_delay_s = 30.0
                    answers = concurrent_requests(port, request, count, timeout_s=120)
                    tfs.predict_delay_s = 0.0
                    seconds = sorted(a.seconds for a in answers)
                    codes: dict[str, int] = {}
                    for a in answers:
                        key = f"{a.status} {a.body.get('error', {}).get('code', 'ok')}"
                        codes[key] = codes.get(key, 0) + 1
                    run = {
                        "clients": count,
                        "p50_s": round(seconds[len(seconds) // 2], 3),
                        "p99_s": round(seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))], 3),
                        "last_s": round(seconds[-1], 3),
                        "answers": codes,
                    }
                    results["runs"].append(run)
                    print(f"{count:4d} concurrent, timeout {args.timeout:g} s: 503 p50 {run['p50_s']:.2f} s, "
                          f"p99 {run['p99_s']:.2f} s, last {run['last_s']:.2f} s  {codes}", flush=True)
                    time.sleep(args.timeout + 1)  # let the abandoned backend calls end
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
