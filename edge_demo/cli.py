"""`edge-demo`: the main job on embedded defaults, end to end, for a newcomer's first run.

Generates the synthetic shop photos, trains the demo classifier, converts it into a signed full-int8
bundle with `edge-convert` (showing the validation report) and its TF Serving version (which takes the
device's uint8 pixels and warms itself up), installs it on a simulated device and
classifies sample photos, good and bad, with `edge-classify`; starts the sync server, publishes the
bundle and asks the full model; then enrols an `edge-agent` and publishes a second version while an
app keeps classifying through the agent. Each later step runs the real command line, printed before
it runs, so the output shows exactly what a person would type.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_WORKDIR = Path("demo-output")
STEPS = 7
#: The bundle's name and version, and where edge-convert lays its TF Serving version (what the server serves).
NAME, VERSION = "shop-demo", 1


def served_model(work: Path) -> Path:
    """The TF Serving export `edge-convert --serving-repo` wrote beside the bundle: the SavedModel to publish."""
    return work / "serving" / NAME / str(VERSION)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="edge-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where data and models go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=300, help="training photos per category (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model is already there")
    parser.add_argument("--serve", action="store_true",
                        help="at the end, keep the sync server (and its dashboard) and the edge-agent running until Ctrl-C")
    args = parser.parse_args(argv)
    if args.per_class < 5:
        parser.error("--per-class must be at least 5")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    data_dir = _demo_data(work, args)
    retrained = _demo_model(work, data_dir, args)
    if retrained is None:
        return 2
    converted = _demo_bundle(work, data_dir, retrained)
    if converted is None:
        return 2
    status = _demo_classify(work, data_dir)
    if status != 0:
        return status
    status = _demo_server(work, fresh=converted)
    if status != 0:
        return status
    _step(6, "over the air: enrol an edge-agent, publish version 2, keep classifying through the switch")
    from edge_runtime.agent.demo import run_agent_demo

    return run_agent_demo(work, out=lambda line: print(line, flush=True), announce=lambda title: _step(7, title),
                          keep_serving=args.serve)


def _demo_data(work: Path, args: argparse.Namespace) -> Path:
    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    data_dir = work / "data"
    small = max(2, args.per_class // 5)
    options = GeneratorOptions(seed=args.seed, splits=(("train", args.per_class), ("val", small), ("test", small)))
    stamp = data_dir / ".options.json"
    wanted = json.dumps({"seed": options.seed, "splits": options.splits})
    _step(1, "demo data: synthetic product photos")
    if stamp.is_file() and stamp.read_text() == wanted:
        print(f"    reusing {data_dir} (same seed and sizes)")
        return data_dir
    started = time.perf_counter()
    summary = generate_dataset(data_dir, options, workers=2)
    stamp.write_text(wanted)
    total = sum(sum(c.values()) for c in summary.counts.values())
    print(
        f"    {total} photos of {len(summary.labels)} categories ({', '.join(summary.labels)}) in {data_dir}: "
        f"{summary.large_images} at 12 MP, {summary.exif_images} with EXIF rotation, "
        f"{time.perf_counter() - started:.0f} s"
    )
    return data_dir


def _demo_model(work: Path, data_dir: Path, args: argparse.Namespace) -> bool | None:
    """Train (or reuse) the demo model; True when it was trained now, None on failure."""
    model_dir = work / "model"
    report_file = model_dir / "training.json"
    stamp = data_dir / ".options.json"
    _step(2, "demo model: a MobileNet-style classifier trained from scratch")
    fresh = report_file.is_file() and stamp.stat().st_mtime <= report_file.stat().st_mtime
    if fresh and not args.retrain:
        report = json.loads(report_file.read_text())
        print(f"    reusing {model_dir} (use --retrain to train again)")
        trained_now = False
    else:
        from converter.progress import native_log_captured

        with native_log_captured() as (log, _terminal):  # TensorFlow's C++ start-up chatter
            from edge_demo.train import TrainingError, TrainOptions, train

            options = TrainOptions(seed=args.seed) if args.epochs is None else TrainOptions(seed=args.seed, epochs=args.epochs)
            try:
                result = train(data_dir, model_dir, options, progress=False, overwrite=True)
            except TrainingError as exc:
                error = exc
            else:
                error = None
        if error is not None:
            print(f"edge-demo: {error}", file=sys.stderr)
            return None
        report = json.loads(report_file.read_text())
        print(f"    trained {result.epochs} epochs in {result.seconds:.0f} s; SavedModel in {model_dir}")
        trained_now = True
    val, test = report.get("val_accuracy"), report.get("test_accuracy")
    print(f"    validation accuracy {val:.1%}" + (f", test accuracy {test:.1%}" if test is not None else ""))
    return trained_now


def _demo_bundle(work: Path, data_dir: Path, retrained: bool) -> bool | None:
    """Convert (or reuse) the bundle; True when it was made now, None on failure."""
    keys = work / "keys"
    bundle = work / "bundle-int8"
    _step(3, "convert: SavedModel -> signed full-int8 TFLite bundle, validated against the SavedModel, and its TF Serving version")
    if not (keys / "publisher").is_file():
        keys.mkdir(parents=True, exist_ok=True)
        if _run(["edge-convert", "keygen", "--out", keys / "publisher"]) != 0:
            return None
    served = served_model(work)
    if (bundle / "manifest.json").is_file() and (served / "saved_model.pb").is_file() and not retrained:
        print(f"    reusing {bundle} and {served}; the bundle's report:")
        return False if _run(["edge-convert", "inspect", bundle, "--public-key", keys / "publisher.pub"]) == 0 else None
    if served.exists():  # TF Serving versions are immutable: the demo re-makes its own
        print(f"    (removing the previous TF Serving version {served})")
        shutil.rmtree(served)
    command = [
        "edge-convert", work / "model", "--out", bundle, "--quantize", "int8",
        "--calibration", data_dir / "train", "--validation", data_dir / "test",
        "--name", NAME, "--version", str(VERSION), "--sign-key", keys / "publisher", "--force",
        "--serving-repo", work / "serving",
    ]
    return True if _run(command) == 0 else None


def _demo_classify(work: Path, data_dir: Path) -> int:
    _step(4, "classify on a device: install the bundle, then edge-classify good and bad photos")
    device = work / "device"
    if device.exists():
        shutil.rmtree(device)  # a fresh device each run: a re-made bundle may reuse version 1
    device.mkdir(parents=True)
    shutil.copyfile(work / "keys" / "publisher.pub", device / "trusted.pub")  # the key pinned on the device
    env = {"EDGE_CLASSIFY_HOME": str(device)}
    status = _run(["edge-classify", "models", "install", work / "bundle-int8", "--use"], env)
    if status != 0:
        return 2
    samples = work / "samples"
    if samples.exists():
        shutil.rmtree(samples)
    samples.mkdir()
    labels = (data_dir / "labels.txt").read_text().split()
    for label in labels:
        first = sorted((data_dir / "test" / label).glob("*.jpg"))[-1]
        shutil.copyfile(first, samples / f"{label}.jpg")
    (samples / "not-a-photo.jpg").write_text("a shopping list, saved with the wrong name\n")
    good = (samples / labels[0]).with_suffix(".jpg").read_bytes()
    (samples / "cut-off-upload.jpg").write_bytes(good[: len(good) // 3])
    status = _run(["edge-classify", samples, "--top-k", "2"], env)
    print(f"    (exit status {status}: 1 means some inputs were bad, as two are on purpose)")
    return 0 if status in (0, 1) else status


def _demo_server(work: Path, fresh: bool) -> int:
    _step(5, "sync server on embedded defaults: publish the bundle, ask the full model")
    data = work / "sync-server"
    if fresh and data.exists():
        shutil.rmtree(data)  # a re-made bundle reuses version 1: start the registry afresh
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--data-dir", data, "--publisher-keys", work / "keys" / "publisher.pub"]
    command = ["sync-server", "serve", *common, "--port", str(port), "--log-format", "text", "--log-level", "warning"]
    print(f"    $ {' '.join(shlex.quote(str(w)) for w in command)} &", flush=True)
    log = (work / "sync-server.log").open("w")
    server = subprocess.Popen([_executable("sync-server"), *map(str, command[1:])], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        if not _wait_ready(url, server, timeout_s=90):
            print(f"edge-demo: the sync server did not start; see {work / 'sync-server.log'}", file=sys.stderr)
            return 2
        print(f"      ready on {url}")
        status = _run(["sync-server", "publish", work / "bundle-int8", "--saved-model", served_model(work),
                       "--channel", "stable", "--server", url, "--data-dir", data])
        if status != 0:
            return 2
        photo = work / "samples" / "backpack.jpg"
        status = _run(["sync-server", "predict", photo, "--model", NAME, "--server", url, "--data-dir", data])
        return 0 if status == 0 else 2
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(command: list[object], env: dict[str, str] | None = None) -> int:
    """Print a command as a person would type it, then run it with this Python's scripts."""
    words = [str(c) for c in command]
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print(f"    $ {prefix + ' ' if prefix else ''}{' '.join(shlex.quote(w) for w in words)}", flush=True)
    words[0] = _executable(words[0])
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **(env or {})}
    completed = subprocess.run(words, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in completed.stdout.splitlines():
        print(f"      {line}")
    sys.stdout.flush()
    return completed.returncode


def _step(number: int, title: str) -> None:
    print(f"==> {number}/{STEPS} {title}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
