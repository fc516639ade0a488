"""Benchmark the converter: size ratio, agreement and latency of every quantization mode, in one run.

    python bench/bench_convert.py                       # the demo model (run `edge-demo` first)
    python bench/bench_convert.py SAVED_MODEL --validation DIR --calibration DIR
    python bench/bench_convert.py --tiny                # a throwaway 32x32 model on synthetic photos
    python bench/bench_convert.py --json                # the numbers as JSON

Each mode is converted with `converter.convert` exactly as `edge-convert` does (unsigned, into a
temporary folder, the gate at 0 so every mode reports), then compared with the SavedModel on the
validation photos. Latency is the median time of one prepared photo through each model (LiteRT with
`--threads`, default 1; the SavedModel through TensorFlow's own thread pool), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from converter import (  # noqa: E402
    ConversionError,
    ConvertOptions,
    QuantizationOptions,
    SigningOptions,
    ValidationOptions,
)

MODES = ("float32", "dynamic", "float16", "int8")
DEMO = ROOT / "demo-output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model", nargs="?", type=Path, default=DEMO / "model")
    parser.add_argument("--validation", type=Path, default=DEMO / "data" / "val")
    parser.add_argument("--calibration", type=Path, default=DEMO / "data" / "train")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads (default %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="benchmark a throwaway 32x32 model instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        work = Path(scratch)
        if args.tiny:
            args.saved_model, args.validation, args.calibration = _tiny_model(work)
        elif not (args.saved_model / "saved_model.pb").is_file():
            print(f"{args.saved_model} is not a SavedModel: run `scripts/demo.sh` first, or pass --tiny",
                  file=sys.stderr)
            return 2
        rows = []
        for mode in args.modes:
            started = time.perf_counter()
            try:
                result = _convert(args, mode, work / mode)
            except ConversionError as exc:
                print(f"{mode}: {exc}", file=sys.stderr)
                return 2
            rows.append(_row(mode, result, time.perf_counter() - started))
    if args.json:
        print(json.dumps({"saved_model": str(args.saved_model), "threads": args.threads, "modes": rows}, indent=2))
    else:
        _print_table(args, rows)
    return 0


def _convert(args: argparse.Namespace, mode: str, out: Path):
    from converter import convert

    return convert(args.saved_model, ConvertOptions(
        out=out,
        quantization=QuantizationOptions(mode, args.calibration if mode == "int8" else None),
        validation=ValidationOptions(images=args.validation, min_agreement=0.0, min_class_agreement=0.0,
                                     threads=args.threads),
        signing=SigningOptions(unsigned=True),
    ))


def _row(mode: str, result, seconds: float) -> dict:
    v = result.validation
    return {
        "mode": mode,
        "tflite_bytes": v.tflite.size_bytes,
        "saved_model_bytes": v.saved_model.size_bytes,
        "size_ratio": round(v.size_ratio, 4),
        "agreement": round(v.agreement, 4),
        "min_class_agreement": round(min(c.agreement for c in v.per_class), 4),
        "mean_abs_diff": round(v.mean_abs_diff, 5),
        "tflite_accuracy": round(v.tflite.accuracy, 4),
        "saved_model_accuracy": round(v.saved_model.accuracy, 4),
        "tflite_ms": v.tflite.latency_ms,
        "saved_model_ms": v.saved_model.latency_ms,
        "speedup": round(v.saved_model.latency_ms / max(v.tflite.latency_ms, 1e-9), 1),
        "photos": v.images,
        "convert_seconds": round(seconds, 1),
    }


def _print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    first = rows[0]
    print(f"SavedModel {args.saved_model}: {first['saved_model_bytes'] / 2**20:.2f} MiB, "
          f"top-1 {first['saved_model_accuracy']:.1%} on {first['photos']} photos, "
          f"{first['saved_model_ms']:.2f} ms/photo (TensorFlow)")
    print(f"{'mode':8} {'size':>10} {'ratio':>6} {'agree':>7} {'worst cls':>9} {'mean|dp|':>9} "
          f"{'top-1':>6} {'ms/photo':>9} {'speedup':>8} {'convert':>8}")
    for r in rows:
        print(f"{r['mode']:8} {r['tflite_bytes'] / 1024:>7.1f}KiB {r['size_ratio']:>6.3f} {r['agreement']:>7.1%} "
              f"{r['min_class_agreement']:>9.1%} {r['mean_abs_diff']:>9.5f} {r['tflite_accuracy']:>6.1%} "
              f"{r['tflite_ms']:>9.3f} {r['speedup']:>7.1f}x {r['convert_seconds']:>7.1f}s")
    print(f"(LiteRT on {args.threads} thread(s); latency is the median over the validation photos)")


def _tiny_model(work: Path) -> tuple[Path, Path, Path]:
    """Synthetic photos and a 32x32 model trained for a few epochs: seconds, for a quick look."""
    from edge_demo.synthetic import GeneratorOptions, generate_dataset
    from edge_demo.train import TrainOptions, demo_spec, train

    data = work / "data"
    generate_dataset(data, GeneratorOptions(seed=0, splits=(("train", 30), ("val", 10)), long_side=(320, 480),
                                            large_fraction=0.0), workers=2)
    options = TrainOptions(epochs=8, batch_size=16, width=0.25, patience=0,
                           spec=demo_spec().replace(height=32, width=32))
    model = train(data, work / "model", options).export_dir
    return model, data / "val", data / "train"


if __name__ == "__main__":
    raise SystemExit(main())
