"""Benchmark what the drift telemetry costs a device's request path: `Classify` (the local API's work for
one photo, without HTTP) as it is now, against the same code as it was before (read from git), in one
run, on the same photos and bundle.

    python bench/bench_agent_telemetry.py [--bundle demo-output/bundle-int8 --public-key demo-output/keys/publisher.pub]
                                          [--before 47bf872] [--requests 200] [--rounds 5] [--json out.json]

Now: one decode (`preprocess_pixels`), `normalise`, the model, then `TelemetryRecorder.record` with the
label index, low-confidence and disagreement flags and the input statistics of the fitted pixels (one
256-bin histogram per channel), and a 13-field journal line. Before (`--before`, the commit ahead of
this work): `preprocess`, the model, `record` with a 6-field line; a fallback decoded the photo a
second time to send its pixels.

Two cases; each photo goes through all four setups in turn (the order rotating), so that a busy
machine's load falls on each alike:
  sure     fallback never: the cost every request pays
  unsure   every photo asked to a loopback stand-in of the server's pixel route (answers at once): the
           case where the old path decoded twice

Also timed alone (steadier on a busy machine than whole requests): `TelemetryRecorder.record` before
and now, and the input statistics of one photo's fitted pixels (`pixel_sums`) against
`InputStats.add`, at the bundle's size and at 224x224. The bundle is the demo's int8 model (`--bundle`),
else one built as bench_shadow.py builds it (cached in --work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BEFORE = "47bf872"  # the commit before the drift telemetry and the decode-once request path


def old_module(commit: str, path: str, name: str) -> ModuleType:
    """`path` as it was at `commit`, imported inside its package (its relative imports resolve to today's modules)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    package = path.rsplit("/", 1)[0].replace("/", ".")
    spec = importlib.util.spec_from_loader(f"{package}._before_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    module.__package__ = package
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module


class _Answers(BaseHTTPRequestHandler):
    """The server's full model, answering at once (pixels or photo): what the fallback costs the device's CPU."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"model": {"name": "m", "version": 1}, "top_k": [{"label": "mug", "score": 0.9}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def demo_bundle(work: Path) -> tuple[Path, Path]:
    from bench_shadow import demo_bundles

    bundle, _, public = demo_bundles(work, None, None)
    return bundle, public


def photos() -> list[bytes]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [(folder / name).read_bytes() for name in ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png")]


def time_stats(size: tuple[int, int], repeat: int = 300) -> dict[str, float]:
    import numpy as np

    from edge_runtime.agent.telemetry import pixel_sums
    from preprocessing import InputStats, PreprocessSpec, preprocess_pixels

    pixels = preprocess_pixels(photos()[0], PreprocessSpec(height=size[0], width=size[1]))
    assert pixels.dtype == np.uint8
    out = {}
    for name, work in (("pixel_sums", lambda: pixel_sums(pixels)), ("InputStats.add", lambda: InputStats().add(pixels))):
        work()
        started = time.perf_counter()
        for _ in range(repeat):
            work()
        out[name] = round((time.perf_counter() - started) / repeat * 1e6, 1)
    return out


def time_record(size: tuple[int, int], before: str, repeat: int = 2000) -> dict[str, float]:
    """`TelemetryRecorder.record` alone, microseconds per call: before (6 fields) and now (with pixels)."""
    from edge_runtime.agent.outbox import Outbox
    from edge_runtime.agent.telemetry import TelemetryRecorder
    from preprocessing import PreprocessSpec, preprocess_pixels

    old_telemetry = sys.modules.get("edge_runtime.agent._before_telemetry") or old_module(
        before, "edge_runtime/agent/telemetry.py", "telemetry")
    pixels = preprocess_pixels(photos()[0], PreprocessSpec(height=size[0], width=size[1]))
    with tempfile.TemporaryDirectory() as tmp:
        recorders = {}
        for label, cls in (("before", old_telemetry.TelemetryRecorder), ("now", TelemetryRecorder)):
            (Path(tmp) / label).mkdir()
            recorders[label] = cls(Outbox(Path(tmp) / label / "outbox.sqlite"), "/t", 3600)
        calls = {
            "before": lambda: recorders["before"].record(1, 0.42, 9.5, fallback=True),
            "now": lambda: recorders["now"].record(1, 0.42, 9.5, fallback=True, label_index=3, low_confidence=True,
                                                   server_disagrees=False, pixels=pixels),
        }
        spent = {label: 0.0 for label in calls}
        for i in range(repeat):
            for label in (("before", "now") if i % 2 else ("now", "before")):
                started = time.perf_counter()
                calls[label]()
                spent[label] += time.perf_counter() - started
    return {label: round(total / repeat * 1e6, 1) for label, total in spent.items()}


def run(bundle: Path, public_key: Path, requests: int, rounds: int, before: str) -> dict[str, Any]:
    from edge_runtime.agent.options import AgentOptions
    from edge_runtime.agent.outbox import Outbox
    from edge_runtime.agent.servable import ServableHandle, make_loader
    from edge_runtime.agent.serving import Classify
    from edge_runtime.agent.telemetry import TelemetryRecorder
    from edge_runtime.fallback import FallbackClient, FallbackOptions

    old_servable = old_module(before, "edge_runtime/agent/servable.py", "servable")
    old_serving = old_module(before, "edge_runtime/agent/serving.py", "serving")
    old_telemetry = old_module(before, "edge_runtime/agent/telemetry.py", "telemetry")

    answers = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    answers.daemon_threads = True
    threading.Thread(target=answers.serve_forever, daemon=True).start()
    server_url = f"http://127.0.0.1:{answers.server_address[1]}"
    pictures = photos()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        servable = make_loader(public_key, home)(bundle)
        old = old_servable.Servable(servable.classifier)  # the same interpreter, the old classify()
        setups = {}
        for label, serving, telemetry, served in (("now", sys.modules["edge_runtime.agent.serving"], TelemetryRecorder, servable),
                                                  ("before", old_serving, old_telemetry.TelemetryRecorder, old)):
            (home / label).mkdir()
            outbox = Outbox(home / label / "outbox.sqlite")
            recorder = telemetry(outbox, "/v1/devices/d/telemetry", 3600)
            handle = ServableHandle()
            handle.swap(served)
            for case, mode, threshold in (("sure", "never", None), ("unsure", "auto", 1.0)):
                options = AgentOptions(home=home, fallback_threshold=threshold, fallback=mode)
                fallback = FallbackClient(FallbackOptions(server_url, 2.0, "dt_bench")) if mode != "never" else None
                assert serving is not None
                classify = serving.Classify(handle, options, fallback=fallback, record=recorder.record,
                                            health=lambda ref, error: None)
                setups[(label, case)] = (classify, mode, recorder)
        for (label, case), (classify, mode, _) in setups.items():  # warm up both, check they answer alike
            status, result = classify(pictures[0], None, 3, mode)
            assert status == 200, result
        times: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
        keys = list(setups)
        for _ in range(rounds):
            for i in range(requests):  # each photo through every setup in turn, the order rotating
                for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                    classify, mode, _ = setups[key]
                    started = time.perf_counter()
                    status, _result = classify(pictures[i % len(pictures)], None, 3, mode)
                    times[key].append((time.perf_counter() - started) * 1000)
                    assert status == 200
        for _, _, recorder in setups.values():
            recorder.close_due(force=True)
        servable.close()
    answers.shutdown()

    results: dict[str, Any] = {}
    for case in ("sure", "unsure"):
        now, then = times[("now", case)], times[("before", case)]
        results[case] = {
            "before_ms": {"p50": round(statistics.median(then), 3), "mean": round(statistics.fmean(then), 3)},
            "now_ms": {"p50": round(statistics.median(now), 3), "mean": round(statistics.fmean(now), 3)},
            "ratio_p50": round(statistics.median(now) / statistics.median(then), 3),
            "added_us_p50": round((statistics.median(now) - statistics.median(then)) * 1000, 1),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--public-key", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-shadow")
    parser.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.bundle is None:
        bundle, public = demo_bundle(args.work)
    else:
        if args.public_key is None:
            parser.error("--bundle needs --public-key")
        bundle, public = args.bundle, args.public_key
    from converter import read_bundle

    spec = read_bundle(bundle, public).spec
    report = {"bundle": str(bundle), "input": [spec.height, spec.width], "dtype": spec.dtype,
              "requests_per_case": args.requests * args.rounds,
              "request_path": run(bundle, public, args.requests, args.rounds, args.before),
              "input_stats_us": {f"{spec.height}x{spec.width}": time_stats((spec.height, spec.width)),
                                 "224x224": time_stats((224, 224))},
              "record_us": {f"{spec.height}x{spec.width}": time_record((spec.height, spec.width), args.before),
                            "224x224": time_record((224, 224), args.before)}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
